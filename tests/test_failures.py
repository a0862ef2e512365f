"""A failing stage: its message names the stage, what happened and what to change."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from flows.stack_flow import stack_flow
from tasks.errors import StageFailed
from tasks.jobs import ParentRef, StageJob
from tasks.stage_process import run_job
from tasks.store import Store
from tests.conftest import PROJECT, diverging_spec, tiny_spec, write_spec


def stage_job(parent_folder, feature_files) -> StageJob:
    return StageJob(
        stack="tiny",
        stage={"name": "hidden_2"},
        fingerprint="0" * 64,
        fingerprint_inputs={},
        parents=[ParentRef("hidden_1", str(parent_folder), feature_files)],
        dataset={},
        store_root=str(parent_folder),
    )


def test_missing_input_names_stage_and_parent(tmp_path):
    (tmp_path / "features").mkdir()
    (tmp_path / "features" / "train.parquet").write_bytes(b"")
    job = stage_job(tmp_path, {"train": "features/train.parquet", "test": "features/test.parquet"})
    with pytest.raises(
        StageFailed,
        match=r"^stage 'hidden_2': input feature file \S+/features/test.parquet of parent 'hidden_1' "
        r"is missing, .* retry the flow run or run again",
    ):
        job.check_inputs()


def test_present_inputs_pass(tmp_path):
    (tmp_path / "train.parquet").write_bytes(b"")
    stage_job(tmp_path, {"train": "train.parquet"}).check_inputs()


@pytest.mark.slow
def test_unexpected_error_names_stage_and_logs_traceback():
    events = []
    # A job without its fields makes the stage process raise a KeyError of its own.
    with pytest.raises(
        StageFailed,
        match=r"^stage 'hidden_2' failed: KeyError: .*fix its cause, then run again or retry the flow run$",
    ):
        run_job("train", {"stack": "tiny"}, "stage 'hidden_2'", on_event=events.append)
    stderr = [event for event in events if event["event"] == "stderr"]
    assert len(stderr) == 1
    assert any(line.startswith("Traceback") for line in stderr[0]["lines"])
    assert stderr[0]["lines"][-1].startswith("KeyError")


@pytest.mark.slow
def test_diverged_stage_fails_run_keeps_parent(tmp_path, prefect_server):
    spec_path = write_spec(tmp_path, diverging_spec())
    state = stack_flow(str(spec_path), data_dir=str(tmp_path / "data"), return_state=True)
    assert state.is_failed()
    with pytest.raises(
        StageFailed,
        match=r"^stage 'hidden_2': training diverged, the loss became (nan|inf) in epoch 1 .*"
        r"lower the learning rate \(now 1e\+20\)",
    ):
        state.result()
    hidden_1 = list((tmp_path / "data" / "stages" / "hidden_1").iterdir())
    assert len(hidden_1) == 1
    assert Store(tmp_path / "data").verify(hidden_1[0], full=True).ok
    assert not (tmp_path / "data" / "stages" / "hidden_2").exists()


@pytest.mark.slow
def test_own_tasks_folder_does_not_shadow_stackwise(tmp_path):
    # A user's project often has a `tasks` package; stage processes must still run stackwise's.
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "__init__.py").write_text("raise ImportError('the user project tasks package')\n")
    spec_path = write_spec(tmp_path, tiny_spec(defaults={"epochs": 1, "batch_size": 64, "seed": 0}))
    environment = {**os.environ, "PYTHONPATH": str(PROJECT), "PREFECT_HOME": str(tmp_path / ".prefect")}
    # `-P` runs the command as the installed `stackwise` script does: without the working folder on the path.
    result = subprocess.run(
        [sys.executable, "-P", "-m", "flows.cli", "run", str(spec_path), "--json"],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert {stage["status"] for stage in json.loads(result.stdout)["stages"]} == {"trained"}
