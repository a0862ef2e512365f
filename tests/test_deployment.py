"""Deployments on a real Prefect server: a stage diverges, the spec is fixed, the flow run is retried.

A process worker runs the flow from prefect.yaml's general deployment. The middle
stage's loss becomes NaN, so the flow run fails. After the spec is fixed, the same
flow run is retried through the API exactly as the UI's Retry button does. Only
the failed stage and the stages below it train again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from tasks.store import Store
from tests.conftest import PROJECT, run_cli, tiny_spec, write_spec
from tests.prefect_server import (  # noqa: F401 - deployed_server is a fixture.
    PrefectServer,
    deployed_server,
    progress_history,
    retry_flow_run,
    run_failing_stack,
    stage_states,
    wait_for_final_state,
)

pytestmark = pytest.mark.slow

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def file_times(folder: Path) -> dict[str, int]:
    return {str(path.relative_to(folder)): path.stat().st_mtime_ns for path in folder.rglob("*") if path.is_file()}


def only_child(folder: Path) -> Path:
    children = [path for path in folder.iterdir() if path.is_dir()]
    assert len(children) == 1, f"expected one artifact under {folder}, found {children}"
    return children[0]


@dataclass
class RetriedRun:
    """What a failed flow run looked like, and what the same run looked like after its retry."""

    run_id: UUID
    spec_path: Path
    data_dir: Path
    failed: Any
    first_attempt: dict[str, str]
    hidden_1_folder: Path
    hidden_1_times: dict[str, int]
    hidden_1_intact: bool
    hidden_2_after_failure: list[Path]
    retried: Any
    second_attempt: dict[str, str]


@pytest.fixture(scope="module")
def retried_run(deployed_server: PrefectServer, tmp_path_factory) -> RetriedRun:
    """Fail a worker run on a diverging middle stage, fix the spec and retry the same flow run."""
    folder = tmp_path_factory.mktemp("retried-run")
    run_id, spec_path = run_failing_stack(deployed_server, folder)
    failed = wait_for_final_state(deployed_server, run_id)
    data_dir = folder / "data"
    hidden_1_folder = only_child(data_dir / "stages" / "hidden_1")
    hidden_2_root = data_dir / "stages" / "hidden_2"
    hidden_2_after_failure = sorted(hidden_2_root.iterdir()) if hidden_2_root.exists() else []
    hidden_1_times = file_times(hidden_1_folder)
    hidden_1_intact = Store(data_dir).verify(hidden_1_folder, full=True).ok
    first_attempt = stage_states(deployed_server, run_id, attempt=1)

    # The fix: the middle stage goes back to the spec's default optimizer and learning rate.
    write_spec(folder, tiny_spec())
    retry_flow_run(deployed_server, run_id)
    retried = wait_for_final_state(deployed_server, run_id)

    return RetriedRun(
        run_id=run_id,
        spec_path=spec_path,
        data_dir=data_dir,
        failed=failed,
        first_attempt=first_attempt,
        hidden_1_folder=hidden_1_folder,
        hidden_1_times=hidden_1_times,
        hidden_1_intact=hidden_1_intact,
        hidden_2_after_failure=hidden_2_after_failure,
        retried=retried,
        second_attempt=stage_states(deployed_server, run_id, attempt=2),
    )


def test_deployments_match_prefect_yaml(deployed_server: PrefectServer):
    with deployed_server.client() as client:
        nightly = client.read_deployment_by_name("stackwise/digits-nightly")
        general = client.read_deployment_by_name("stackwise/stack")
    assert [schedule.schedule.cron for schedule in nightly.schedules] == ["0 3 * * *"]
    assert nightly.parameters == {"spec_path": "stacks/digits.yaml"}
    assert nightly.work_pool_name == "stackwise-pool"
    assert general.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(PROJECT)}}
    ]
    properties = general.parameter_openapi_schema["properties"]
    assert set(properties) == {"spec_path", "retrain", "data_dir"}
    assert "stack spec YAML file" in properties["spec_path"]["description"]
    assert "train again" in properties["retrain"]["description"]
    assert "artifact store" in properties["data_dir"]["description"]


def test_diverged_stage_fails_flow_run(retried_run: RetriedRun):
    assert retried_run.failed.state.is_failed()
    message = retried_run.failed.state.message
    assert "stage 'hidden_2': training diverged" in message
    assert "lower the learning rate (now 1e+20)" in message
    assert retried_run.first_attempt == {"hidden_1": "Completed", "hidden_2": "Failed"}


def test_failed_stage_leaves_earlier_artifacts_intact(retried_run: RetriedRun):
    assert retried_run.hidden_1_intact
    # The diverged stage published nothing, and its staging folder was removed.
    assert retried_run.hidden_2_after_failure == []
    assert list((retried_run.data_dir / "staging").glob("stage-hidden_2-*")) == []


def test_retry_trains_failed_stage_and_below(retried_run: RetriedRun):
    assert retried_run.retried.state.is_completed(), retried_run.retried.state.message
    assert retried_run.retried.run_count == 2
    assert retried_run.second_attempt == {"hidden_1": "Cached", "hidden_2": "Completed", "head": "Completed"}


def test_retry_leaves_cached_stage_files_untouched(retried_run: RetriedRun):
    assert file_times(retried_run.hidden_1_folder) == retried_run.hidden_1_times
    assert Store(retried_run.data_dir).verify(retried_run.hidden_1_folder, full=True).ok


def _artifacts(server: PrefectServer, run_id: UUID) -> list:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with server.client() as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )


def _task_names(server: PrefectServer, run_id: UUID) -> dict[UUID, tuple[str, int]]:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with server.client() as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    return {task_run.id: (task_run.name, task_run.flow_run_run_count) for task_run in task_runs}


def test_progress_moves_each_epoch_to_100(retried_run: RetriedRun, deployed_server: PrefectServer):
    names = _task_names(deployed_server, retried_run.run_id)
    progress = {
        names[artifact.task_run_id]: artifact
        for artifact in _artifacts(deployed_server, retried_run.run_id)
        if artifact.type == "progress" and names[artifact.task_run_id][1] == 2
    }
    assert set(progress) == {("hidden_2", 2), ("head", 2)}
    epochs = tiny_spec()["defaults"]["epochs"]
    for (stage, _), artifact in progress.items():
        assert artifact.data == 100, stage
        # One update per epoch, then the final one when the artifact is published.
        history = progress_history(deployed_server, artifact.id, expected_updates=epochs + 1)
        expected = [100.0 * epoch / epochs for epoch in range(1, epochs + 1)] + [100.0]
        assert history == pytest.approx(expected), stage


def test_failed_stage_progress_stays_below_100(retried_run: RetriedRun, deployed_server: PrefectServer):
    names = _task_names(deployed_server, retried_run.run_id)
    failed = [
        artifact for artifact in _artifacts(deployed_server, retried_run.run_id)
        if artifact.type == "progress" and names[artifact.task_run_id] == ("hidden_2", 1)
    ]
    assert len(failed) == 1
    # The loss became NaN in the first epoch, before any epoch ended.
    assert failed[0].data == 0


def test_run_report_artifacts(retried_run: RetriedRun, deployed_server: PrefectServer):
    artifacts = {artifact.key: artifact for artifact in _artifacts(deployed_server, retried_run.run_id) if artifact.key}
    assert set(artifacts) == {"tiny-evaluation", "tiny-run-summary"}
    table = json.loads(artifacts["tiny-evaluation"].data)
    assert [row["metric"] for row in table] == ["accuracy", "macro F1", "log loss", "examples"]
    assert {row["split"] for row in table} == {"test"}
    summary = artifacts["tiny-run-summary"].data
    assert "| hidden_1 | cached |" in summary
    assert "| hidden_2 | trained |" in summary
    assert "| head | trained |" in summary
    assembled = only_child(retried_run.data_dir / "assembled" / "tiny")
    assert f"- assembled artifact: `{assembled}`" in summary
    for stage in ("hidden_1", "hidden_2", "head"):
        assert f"`curves/{stage}.png`" in summary
        assert (assembled / "curves" / f"{stage}.png").read_bytes().startswith(PNG_SIGNATURE)


def test_local_run_reuses_worker_results(retried_run: RetriedRun, deployed_server: PrefectServer, tmp_path):
    result = run_cli(
        "run", str(retried_run.spec_path), "--data-dir", str(retried_run.data_dir), "--json",
        cwd=tmp_path, env=deployed_server.environment(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert [stage["status"] for stage in summary["stages"]] == ["cached"] * 3
    assert summary["assembly_status"] == "cached"
    # Cached states mean Prefect found the worker's persisted results under the data dir.
    states = stage_states(deployed_server, UUID(summary["flow_run_id"]), attempt=1)
    assert states == {"hidden_1": "Cached", "hidden_2": "Cached", "head": "Cached"}
