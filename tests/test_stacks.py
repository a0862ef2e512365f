"""Every example stack under stacks/ runs end to end, shortened to one epoch per stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tasks.features import read_feature_metadata
from tests.conftest import PROJECT, write_spec

pytestmark = pytest.mark.slow

EXAMPLES = sorted(PROJECT.glob("stacks/**/*.yaml"))
# Feature shapes that an example exists to show.
FEATURE_SHAPES = {
    "feature_map": {"wide": [8, 8, 32]},
    "digits_convnet": {"base": [64]},
    "digits_mobilenet": {"base": [1280]},
}


def shortened(raw: dict) -> dict:
    """Return the spec with one epoch for every stage."""
    raw["defaults"]["epochs"] = 1
    for stage in raw["stages"]:
        stage.pop("epochs", None)
    return raw


def make_base(spec_path: Path, copy: Path) -> None:
    """Run the example's make_base.py on the copied spec, with one epoch of pretraining."""
    script = spec_path.parent / "make_base.py"
    result = subprocess.run(
        [sys.executable, str(script), str(copy), "--epochs", "1"],
        cwd=copy.parent, capture_output=True, text=True, timeout=1200,
        env={**os.environ, "PYTHONPATH": str(PROJECT)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wrote" in result.stdout


def test_examples_found():
    names = {path.stem for path in EXAMPLES}
    assert {"digits", "feature_map", "digits_convnet", "digits_mobilenet"} <= names


@pytest.mark.parametrize("spec_path", EXAMPLES, ids=lambda path: path.stem)
def test_example_stack_runs(spec_path, tmp_path, prefect_server):
    from flows.stack_flow import stack_flow

    raw = shortened(yaml.safe_load(spec_path.read_text()))
    copy = write_spec(tmp_path, raw, name=spec_path.name)
    if any(stage.get("objective") == "pretrained" for stage in raw["stages"]):
        make_base(spec_path, copy)

    summary = stack_flow(str(copy), data_dir=str(tmp_path / "data"))

    assert {stage["status"] for stage in summary["stages"]} == {"trained"}
    report = json.loads(Path(summary["report"]).read_text())
    assert report["max_abs_difference"] < 1e-4
    if report["task"] == "anomaly":
        assert 0.0 <= report["metrics"]["roc_auc"] <= 1.0
        assert 0.0 <= report["baseline"]["metrics"]["roc_auc"] <= 1.0
    else:
        assert len(report["metrics"]["confusion_matrix"]) == len(report["classes"])
    for name, shape in FEATURE_SHAPES.get(raw["name"], {}).items():
        stage = next(stage for stage in summary["stages"] if stage["name"] == name)
        assert read_feature_metadata(Path(stage["feature_files"]["train"]))["shape"] == shape
