"""The stack flow on real digits: trained, cached, partly retrained, rebuilt, reloaded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows.stack_flow import stack_flow
from tasks.features import read_feature_file, read_feature_metadata
from tasks.store import Store
from tests.conftest import PROJECT, run_cli, tiny_spec, write_spec

pytestmark = pytest.mark.slow


def file_times(root: Path) -> dict[str, int]:
    """Map every SavedModel and feature file under the store to its modification time."""
    return {
        str(path.relative_to(root)): path.stat().st_mtime_ns
        for folder in ("stages", "assembled")
        for path in (root / folder).rglob("*") if path.is_file()
    }


def statuses(summary: dict) -> dict[str, str]:
    return {stage["name"]: stage["status"] for stage in summary["stages"]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, prefect_server):
    """A store in which the tiny stack has been trained once, and that run's summary."""
    folder = tmp_path_factory.mktemp("trained")
    spec_path = write_spec(folder, tiny_spec())
    summary = stack_flow(str(spec_path), data_dir=str(folder / "data"))
    return folder, summary


@pytest.fixture
def copy_of_trained(trained, tmp_path):
    """A private copy of the trained store (times preserved) and spec, for tests that change it."""
    folder, _ = trained
    shutil.copytree(folder / "data", tmp_path / "data", copy_function=shutil.copy2)
    return tmp_path, write_spec(tmp_path, tiny_spec())


def test_first_run_trains_every_stage(trained):
    folder, summary = trained
    assert statuses(summary) == {"hidden_1": "trained", "hidden_2": "trained", "head": "trained"}
    assert summary["assembly_status"] == "trained"
    assert summary["evaluation"]["split"] == "test"
    assert summary["evaluation"]["metrics"]["accuracy"] > 0.5
    assert len(summary["evaluation"]["metrics"]["confusion_matrix"]) == 10


def test_feature_files_match_splits(trained):
    folder, summary = trained
    dataset = next((folder / "data" / "datasets").iterdir())
    split_rows = json.loads((dataset / "manifest.json").read_text())["rows"]
    for stage in summary["stages"]:
        for split, path in stage["feature_files"].items():
            table = read_feature_file(Path(path))
            assert table.features.dtype.name == "float32"
            assert table.features.ndim == 2
            assert len(table) == split_rows[split]
            metadata = read_feature_metadata(Path(path))
            assert metadata["stage"] == stage["name"]
            assert metadata["fingerprint"] == stage["fingerprint"]


def test_rerun_is_cached_and_rewrites_nothing(copy_of_trained, prefect_server):
    folder, spec_path = copy_of_trained
    before = file_times(folder / "data")
    summary = stack_flow(str(spec_path), data_dir=str(folder / "data"))
    assert set(statuses(summary).values()) == {"cached"}
    assert summary["assembly_status"] == "cached"
    assert file_times(folder / "data") == before


def test_moved_store_stands_alone(copy_of_trained, prefect_server):
    folder, spec_path = copy_of_trained
    moved = folder / "moved"
    shutil.move(folder / "data", moved)
    summary = stack_flow(str(spec_path), data_dir=str(moved))
    assert set(statuses(summary).values()) == {"cached"}
    # Prefect's cached results were written for the first store; every path now names the new one.
    for stage in summary["stages"]:
        assert stage["model_dir"].startswith(f"{moved}/")
    assert summary["model_dir"].startswith(f"{moved}/")
    assert summary["report"].startswith(f"{moved}/")


def test_head_change_retrains_head_only(copy_of_trained, trained, prefect_server):
    folder, _ = copy_of_trained
    spec = tiny_spec()
    spec["stages"][2]["epochs"] = 4
    spec_path = write_spec(folder, spec)
    summary = stack_flow(str(spec_path), data_dir=str(folder / "data"))
    assert statuses(summary) == {"hidden_1": "cached", "hidden_2": "cached", "head": "trained"}
    assert summary["assembly_status"] == "trained"
    first = {stage["name"]: stage["fingerprint"] for stage in trained[1]["stages"]}
    assert summary["stages"][0]["fingerprint"] == first["hidden_1"]
    assert summary["stages"][2]["fingerprint"] != first["head"]


def test_first_stage_change_retrains_all(copy_of_trained, prefect_server):
    folder, _ = copy_of_trained
    spec = tiny_spec()
    spec["stages"][0]["layers"][1]["units"] = 24
    spec_path = write_spec(folder, spec)
    summary = stack_flow(str(spec_path), data_dir=str(folder / "data"))
    assert set(statuses(summary).values()) == {"trained"}


def test_deleted_artifact_is_rebuilt(copy_of_trained, trained, prefect_server):
    folder, spec_path = copy_of_trained
    hidden_2 = next(stage for stage in trained[1]["stages"] if stage["name"] == "hidden_2")
    artifact = folder / "data" / Path(hidden_2["model_dir"]).relative_to(trained[0] / "data").parent
    shutil.rmtree(artifact)
    summary = stack_flow(str(spec_path), data_dir=str(folder / "data"))
    assert statuses(summary)["hidden_1"] == "cached"
    assert statuses(summary)["hidden_2"] == "trained"
    assert (artifact / "manifest.json").is_file()
    # Training is deterministic, so the rebuilt artifact is identical and the head is reused.
    assert statuses(summary)["head"] == "cached"


def test_forced_retrain_keeps_identical_children(copy_of_trained, prefect_server):
    folder, spec_path = copy_of_trained
    summary = stack_flow(str(spec_path), retrain=["hidden_1"], data_dir=str(folder / "data"))
    assert statuses(summary) == {"hidden_1": "trained", "hidden_2": "cached", "head": "cached"}


def test_lower_stage_weights_unchanged(trained):
    folder, summary = trained
    store = Store(folder / "data")
    for stage in summary["stages"]:
        artifact = Path(stage["model_dir"]).parent
        assert store.verify(artifact, full=True).ok
    # hidden_1 was exported before hidden_2 and the head trained; its variables still hash
    # to the digest recorded at export time.
    from tasks.training import weights_digest

    hidden_1 = Path(summary["stages"][0]["model_dir"])
    manifest = json.loads((hidden_1.parent / "manifest.json").read_text())
    assert weights_digest(hidden_1.parent, ["model"]) == manifest["weights_digest"]


RELOAD_SCRIPT = """
import json, sys
import numpy as np
import tensorflow as tf
from tasks.features import read_feature_file
summary, dataset = json.loads(sys.argv[1]), sys.argv[2]
test = read_feature_file(dataset + "/test.parquet")
inputs = test.features
for stage in summary["stages"]:
    model = tf.saved_model.load(stage["model_dir"])
    outputs = model.serve(tf.constant(inputs)).numpy()
    stored = read_feature_file(stage["feature_files"]["test"]).features
    assert np.max(np.abs(outputs - stored)) < 1e-5, stage["name"]
    inputs = stored
assembled = tf.saved_model.load(summary["model_dir"])
probabilities = assembled.serve(tf.constant(test.features)).numpy()
print(json.dumps({"accuracy": float((probabilities.argmax(1) == test.labels).mean())}))
"""


def test_models_reload_in_fresh_process(trained):
    folder, summary = trained
    dataset = next((folder / "data" / "datasets").iterdir())
    result = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, json.dumps(summary), str(dataset)],
        cwd=PROJECT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    accuracy = json.loads(result.stdout.strip().splitlines()[-1])["accuracy"]
    report = json.loads(Path(summary["report"]).read_text())
    assert accuracy == pytest.approx(report["metrics"]["accuracy"], abs=1e-9)


def test_cli_json_summary(copy_of_trained):
    folder, spec_path = copy_of_trained
    result = run_cli("run", str(spec_path), "--json", cwd=folder)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert set(summary) >= {"stack", "flow_run_id", "stages", "evaluation", "model_dir"}
    assert [stage["status"] for stage in summary["stages"]] == ["cached"] * 3
    for stage in summary["stages"]:
        assert set(stage) >= {"name", "status", "fingerprint", "seconds", "started_at",
                              "finished_at", "model_dir", "feature_files"}
        assert set(stage["feature_files"]) == {"train", "validation", "test"}


def test_cached_run_imports_no_tensorflow(copy_of_trained):
    folder, spec_path = copy_of_trained
    script = (
        "import sys\n"
        "from flows.cli import main\n"
        f"code = main(['run', {str(spec_path)!r}, '--json'])\n"
        "from tasks import stage_process\n"
        "print('exit', code, 'tensorflow' in sys.modules, stage_process._SPARE._process is None, file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=folder, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(PROJECT), "PREFECT_HOME": str(folder / ".prefect")},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout)
    assert [stage["status"] for stage in summary["stages"]] == ["cached"] * 3
    # The flow process never imported TensorFlow and started no stage process, not even a spare.
    assert "exit 0 False True" in result.stderr


def test_plan_explains_changes(copy_of_trained):
    folder, _ = copy_of_trained
    spec = tiny_spec()
    spec["stages"][1]["layers"][0]["units"] = 12
    spec_path = write_spec(folder, spec)
    result = run_cli("plan", str(spec_path), cwd=folder)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert "reuse" in lines["hidden_1"]
    assert "train" in lines["hidden_2"]
    assert "spec changed (layers)" in lines["hidden_2"]
    assert "parent changed (hidden_2" in lines["head"]
