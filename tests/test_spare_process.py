"""The spare stage process: started ahead of time, used once, never with a stale environment."""

from __future__ import annotations

import pytest

from tasks import stage_process
from tasks.errors import StageFailed
from tasks.stage_process import prewarm, release_spare, run_job

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def no_spare_left():
    release_spare()
    yield
    release_spare()


def started_pid(events: list[dict]) -> int:
    return next(event["pid"] for event in events if event["event"] == "started")


def run_failing_job(events: list[dict]) -> None:
    # A job without its fields fails at once inside the stage process, after it started.
    with pytest.raises(StageFailed, match="KeyError"):
        run_job("train", {"stack": "tiny"}, "stage 'broken'", on_event=events.append)


def test_job_runs_in_spare_process():
    prewarm()
    spare = stage_process._SPARE._process
    events: list[dict] = []
    run_failing_job(events)
    assert started_pid(events) == spare.pid


def test_stage_job_starts_next_spare():
    events: list[dict] = []
    run_failing_job(events)
    following = stage_process._SPARE._process
    assert following is not None
    assert following.pid != started_pid(events)
    assert following.poll() is None


def test_spare_with_stale_environment_is_dismissed(monkeypatch):
    prewarm()
    stale = stage_process._SPARE._process
    monkeypatch.setenv("STACKWISE_MEMORY_BUDGET_MB", "7")
    events: list[dict] = []
    run_failing_job(events)
    assert started_pid(events) != stale.pid
    assert stale.wait(timeout=300) == 0


def test_released_spare_exits_cleanly():
    prewarm()
    spare = stage_process._SPARE._process
    release_spare()
    assert stage_process._SPARE._process is None
    assert spare.wait(timeout=300) == 0
