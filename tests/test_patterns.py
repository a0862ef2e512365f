"""Stack patterns: branches, merges, autoencoders, anomaly scoring, fine-tuning, baselines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.stack_flow import stack_flow
from tasks.errors import SpecError
from tasks.spec import check_shapes, parse_spec
from tests.conftest import tiny_spec, write_spec

pytestmark = pytest.mark.slow


def branching_spec(merge: str = "concat") -> dict:
    spec = tiny_spec(name="branches")
    spec["stages"] = [
        {"name": "left", "layers": [{"layer": "Rescaling", "scale": 0.0625},
                                    {"layer": "Dense", "units": 16, "activation": "relu"}]},
        {"name": "right", "layers": [{"layer": "Rescaling", "scale": 0.0625},
                                     {"layer": "Dense", "units": 16, "activation": "tanh"}]},
        {"name": "head", "parents": ["left", "right"], "merge": merge, "objective": "head"},
    ]
    return spec


def overlaps(first: dict, second: dict) -> bool:
    return first["started_at"] < second["finished_at"] and second["started_at"] < first["finished_at"]


def test_branches_train_concurrently(tmp_path, prefect_server):
    summary = stack_flow(str(write_spec(tmp_path, branching_spec())), data_dir=str(tmp_path / "data"))
    stages = {stage["name"]: stage for stage in summary["stages"]}
    assert overlaps(stages["left"], stages["right"])
    assert stages["head"]["started_at"] >= max(stages["left"]["finished_at"], stages["right"]["finished_at"])
    assert summary["evaluation"]["metrics"]["accuracy"] > 0.5


def test_add_merge_assembles(tmp_path, prefect_server):
    summary = stack_flow(str(write_spec(tmp_path, branching_spec("add"))), data_dir=str(tmp_path / "data"))
    report = json.loads(Path(summary["report"]).read_text())
    assert report["max_abs_difference"] < 1e-4
    head = next(stage for stage in summary["stages"] if stage["name"] == "head")
    assert head["status"] == "trained"


def test_elementwise_merge_needs_equal_shapes():
    raw = branching_spec("add")
    raw["stages"][1]["layers"][1]["units"] = 8
    with pytest.raises(SpecError, match=r"stage 'head' merge: 'add' needs parents with equal output shapes, got left \[16\], right \[8\]"):
        check_shapes(parse_spec(raw), (64,), 10)


def autoencoder_spec() -> dict:
    return {
        "name": "motion_tiny",
        "data": {"source": "sktime:BasicMotions", "split": {"test": 0.3, "validation": 0.2, "seed": 0}},
        "defaults": {"epochs": 3, "batch_size": 32, "seed": 0},
        "stages": [
            {"name": "encoder_1", "objective": "autoencoder", "noise": 0.2, "layers": [
                {"layer": "LayerNormalization", "axis": 1, "center": False, "scale": False},
                {"layer": "Flatten"},
                {"layer": "Dense", "units": 24, "activation": "relu"},
            ]},
            {"name": "encoder_2", "parents": ["encoder_1"], "objective": "autoencoder",
             "layers": [{"layer": "Dense", "units": 8, "activation": "relu"}],
             "decoder": [{"layer": "Dense", "units": 16, "activation": "relu"}]},
        ],
        "evaluation": {"task": "anomaly", "normal_classes": ["Walking", "Running"]},
    }


def test_anomaly_stack_reports_auc(tmp_path, prefect_server):
    summary = stack_flow(str(write_spec(tmp_path, autoencoder_spec())), data_dir=str(tmp_path / "data"))
    report = json.loads(Path(summary["report"]).read_text())
    assert report["task"] == "anomaly"
    assert report["max_abs_difference"] < 1e-4
    for metrics in (report["metrics"], report["baseline"]["metrics"]):
        assert 0.0 <= metrics["roc_auc"] <= 1.0
        assert 0.0 <= metrics["pr_auc"] <= 1.0
    assert report["baseline"]["kind"] == "pca"
    assert report["baseline"]["components"] == 8
    # Standing and Badminton windows are the anomalies: half of the test split.
    assert report["metrics"]["anomalies"] == report["metrics"]["rows"] // 2
    for stage in summary["stages"]:
        folder = Path(stage["model_dir"]).parent
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["saved_models"] == ["model", "decoder", "target"]
        # The autoencoders trained on normal windows only: 2 of 4 classes.
        assert manifest["metrics"]["trained_rows"] < manifest["rows"]["train"]
    encoder_2 = summary["stages"][1]
    from tasks.features import read_feature_file

    assert read_feature_file(Path(encoder_2["feature_files"]["test"])).features.shape[1:] == (8,)


def test_anomaly_needs_normal_classes():
    raw = autoencoder_spec()
    del raw["evaluation"]["normal_classes"]
    with pytest.raises(SpecError, match="evaluation.normal_classes: required for task: anomaly"):
        parse_spec(raw)


def test_decoder_only_on_autoencoders():
    raw = tiny_spec()
    raw["stages"][0]["noise"] = 0.1
    with pytest.raises(SpecError, match="stage 'hidden_1': decoder and noise apply to autoencoder stages only"):
        parse_spec(raw)


def finetune_spec() -> dict:
    spec = tiny_spec(name="tuned")
    spec["stages"][0]["layers"].append({"layer": "BatchNormalization"})
    spec["fine_tune"] = {"stages": "all", "epochs": 2, "learning_rate": 0.0005}
    spec["baseline"] = "end_to_end"
    return spec


def stage_files(summary: dict) -> dict[str, bytes]:
    """Return the bytes of every stage artifact's weights and Keras file."""
    contents = {}
    for stage in summary["stages"]:
        folder = Path(stage["model_dir"]).parent
        for path in sorted(folder.rglob("*")):
            if path.is_file() and ("variables" in path.parts or path.suffix == ".keras"):
                contents[str(path)] = path.read_bytes()
    return contents


def test_fine_tune_and_baseline_leave_stages_intact(tmp_path, prefect_server):
    data_dir = str(tmp_path / "data")
    plain = tiny_spec(name="tuned")
    plain["stages"][0]["layers"].append({"layer": "BatchNormalization"})
    first = stack_flow(str(write_spec(tmp_path, plain)), data_dir=data_dir)
    before = stage_files(first)

    summary = stack_flow(str(write_spec(tmp_path, finetune_spec())), data_dir=data_dir)
    assert {stage["status"] for stage in summary["stages"]} == {"cached"}
    assert stage_files(summary) == before

    report = json.loads(Path(summary["report"]).read_text())
    assert report["fine_tune"]["stages"] == ["hidden_1", "hidden_2", "head"]
    assert report["fine_tune"]["before"]["accuracy"] == pytest.approx(first["evaluation"]["metrics"]["accuracy"])
    assert report["metrics"] == report["fine_tune"]["after"]
    assert report["baseline"]["epochs"] == 3 * 3 + 2
    assert 0.0 <= report["baseline"]["metrics"]["accuracy"] <= 1.0
    assert [stage["validation_accuracy"] is not None for stage in report["stages"]] == [True] * 3
    assert (Path(summary["model_dir"]).parent / "stagewise").is_dir()
