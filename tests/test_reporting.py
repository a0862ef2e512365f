"""Run reports without Prefect: progress, artifact keys, the evaluation table, the summary, curves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tasks.reporting import (
    artifact_key,
    epoch_progress,
    evaluation_table,
    run_summary_markdown,
    write_training_curves,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HISTORY = {
    "loss": [2.0, 1.2, 0.7],
    "accuracy": [0.4, 0.7, 0.85],
    "val_loss": [1.7, 1.0, 0.6],
    "val_accuracy": [0.5, 0.8, 0.88],
}


def summary(curves: dict[str, str] | None = None) -> dict:
    """Return a run summary shaped like the flow's return value."""
    value = {
        "stack": "digits",
        "flow_run_id": "0b7c",
        "stages": [
            {"name": "hidden_1", "status": "cached", "fingerprint": "67a27849efc4" + "0" * 52,
             "seconds": 0.0, "validation_accuracy": 0.9611},
            {"name": "head", "status": "trained", "fingerprint": "ab13ed1c95ca" + "1" * 52,
             "seconds": 11.72, "validation_accuracy": 0.9556},
        ],
        "evaluation": {"split": "test", "metrics": {
            "accuracy": 0.9694, "macro_f1": 0.9698, "log_loss": 0.154, "rows": 360,
            "confusion_matrix": [[1]],
        }},
        "assembly_status": "trained",
        "model_dir": "/store/assembled/digits/cf12/model",
        "report": "/store/assembled/digits/cf12/report.json",
    }
    if curves is not None:
        value["curves"] = curves
    return value


@pytest.mark.parametrize(
    ("epoch", "epochs", "expected"),
    [(0, 4, 0.0), (1, 4, 25.0), (4, 4, 100.0), (5, 4, 100.0), (1, 0, 100.0)],
)
def test_epoch_progress(epoch, epochs, expected):
    assert epoch_progress(epoch, epochs) == expected


@pytest.mark.parametrize(
    ("parts", "expected"),
    [(("digits", "evaluation"), "digits-evaluation"),
     (("My_Stack.v2", "run-summary"), "my-stack-v2-run-summary"),
     (("--a__b--",), "a-b")],
)
def test_artifact_key_is_valid(parts, expected):
    assert artifact_key(*parts) == expected


def test_evaluation_table_rows():
    rows = evaluation_table(summary()["evaluation"])
    assert rows == [
        {"metric": "accuracy", "value": 0.9694, "split": "test"},
        {"metric": "macro F1", "value": 0.9698, "split": "test"},
        {"metric": "log loss", "value": 0.154, "split": "test"},
        {"metric": "examples", "value": 360, "split": "test"},
    ]
    # Prefect stores a table artifact as JSON.
    assert json.loads(json.dumps(rows)) == rows


def test_summary_lists_each_stage():
    curves = {"hidden_1": "/store/assembled/digits/cf12/curves/hidden_1.png", "head": "/elsewhere/head.png"}
    text = run_summary_markdown(summary(curves))
    assert text.startswith("# Stack `digits`: test accuracy 0.9694, macro F1 0.9698, log loss 0.1540\n")
    assert "| hidden_1 | cached | `67a27849efc4` | 0.0 | accuracy 0.9611 | `curves/hidden_1.png` |" in text
    assert "| head | trained | `ab13ed1c95ca` | 11.7 | accuracy 0.9556 | `/elsewhere/head.png` |" in text
    assert "- assembled artifact: `/store/assembled/digits/cf12`" in text
    assert "Assembly: trained, on 360 test examples." in text
    assert "- report: `/store/assembled/digits/cf12/report.json`" in text
    assert "training curves: none" not in text


def test_summary_without_curves_says_so():
    text = run_summary_markdown(summary())
    assert "| hidden_1 | cached | `67a27849efc4` | 0.0 | accuracy 0.9611 | none |" in text
    assert "- training curves: none; this assembled model was built before stackwise drew them" in text


def write_manifest(folder: Path, history: dict | None) -> Path:
    folder.mkdir(parents=True)
    metrics = {"validation_accuracy": 0.9} if history is None else {"history": history}
    (folder / "manifest.json").write_text(json.dumps({"metrics": metrics}))
    return folder


def test_curves_written_per_stage(tmp_path):
    folders = {
        "hidden_1": write_manifest(tmp_path / "stages" / "hidden_1", HISTORY),
        "head": write_manifest(tmp_path / "stages" / "head", {"loss": [1.0, 0.5]}),
    }
    written = write_training_curves(folders, tmp_path / "report")
    assert written == {"hidden_1": "curves/hidden_1.png", "head": "curves/head.png"}
    for relative in written.values():
        data = (tmp_path / "report" / relative).read_bytes()
        assert data.startswith(PNG_SIGNATURE)
        assert len(data) > 5000


def test_curves_skip_stage_without_history(tmp_path):
    folders = {
        "old": write_manifest(tmp_path / "old", None),
        "missing": tmp_path / "missing",
    }
    assert write_training_curves(folders, tmp_path / "report") == {}
    assert not (tmp_path / "report").exists()
