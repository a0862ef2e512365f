"""Runs killed with SIGKILL at several points leave nothing that a later run trusts.

One store goes through a chain of real `stackwise run` processes, each killed (the
whole process group: the command, Prefect's temporary server and the stage process)
at a later point than the one before. After every kill, each folder that carries a
manifest passes full verification, and `stackwise plan` reuses exactly the stages
published before the kill. A last run completes: it reuses those stages, trains the
rest, and leaves the earlier artifacts byte for byte as they were.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tasks.locks import ProcessLockManager
from tests.conftest import PROJECT, run_cli, tiny_spec, write_spec
from tests.store_checks import file_digests, statuses, trusted_artifacts, untrusted_published

pytestmark = pytest.mark.slow

STAGES = ("hidden_1", "hidden_2", "head")
POLL_SECONDS = 0.02
RUN_LIMIT_SECONDS = 600


def published_stages(data_dir: Path) -> set[str]:
    return {stage for stage in STAGES if list((data_dir / "stages" / stage).glob("*/manifest.json"))}


def staging_folders(data_dir: Path, prefix: str) -> list[Path]:
    return [path for path in (data_dir / "staging").glob(f"{prefix}*") if path.is_dir()]


def run_and_kill(spec_path: Path, data_dir: Path, reached: Callable[[Path], bool],
                 pause_at: str | None = None) -> None:
    """Start `stackwise run` in its own process group and SIGKILL the group once `reached`."""
    environment = {**os.environ, "PYTHONPATH": str(PROJECT)}
    if pause_at:
        environment["STACKWISE_PAUSE_AT"] = pause_at
    process = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", str(spec_path), "--data-dir", str(data_dir)],
        cwd=spec_path.parent, env=environment, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + RUN_LIMIT_SECONDS
    try:
        while not reached(data_dir):
            if process.poll() is not None:
                pytest.fail(f"the run ended (code {process.returncode}) before the kill point: "
                            f"{process.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the run did not reach the kill point in time")
            time.sleep(POLL_SECONDS)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        process.stderr.close()


def planned_reuse(spec_path: Path, data_dir: Path) -> set[str]:
    result = run_cli("plan", str(spec_path), "--data-dir", str(data_dir), cwd=spec_path.parent)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line.split() for line in result.stdout.splitlines()[1:]]
    return {line[0] for line in lines if line[1] == "reuse"}


def dataset_published(data_dir: Path) -> bool:
    return bool(list((data_dir / "datasets").glob("*/manifest.json")))


def lock_taken(data_dir: Path) -> bool:
    return dataset_published(data_dir) and bool(list((data_dir / "prefect" / "locks").glob("*.lock")))


def exporting(stage: str) -> Callable[[Path], bool]:
    return lambda data_dir: any((folder / "model").exists() for folder in staging_folders(data_dir, f"stage-{stage}-"))


def stage_published(stage: str) -> Callable[[Path], bool]:
    return lambda data_dir: stage in published_stages(data_dir)


def paused(label: str) -> Callable[[Path], bool]:
    return lambda data_dir: bool(list((data_dir / "staging").glob(f"{label}-*.paused")))


# Each step: its name, when to kill, the pause hook to set, and the stages published by then.
KILL_POINTS = [
    ("dataset manifest written, not renamed", paused("dataset"), "manifest-written:dataset", set()),
    ("first stage holds its lock", lock_taken, None, set()),
    ("first stage exporting", exporting("hidden_1"), None, set()),
    ("first stage published", stage_published("hidden_1"), None, {"hidden_1"}),
    ("second stage manifest written, not renamed", paused("stage-hidden_2"), "manifest-written:stage-hidden_2",
     {"hidden_1"}),
    ("assembling", lambda data_dir: bool(staging_folders(data_dir, "assembled-")), None, set(STAGES)),
]


def test_killed_runs_leave_nothing_trusted(tmp_path: Path):
    spec = tiny_spec()
    spec["defaults"]["epochs"] = 2
    spec_path = write_spec(tmp_path, spec)
    data_dir = tmp_path / "data"
    kept: dict[str, tuple] = {}

    for name, reached, pause_at, published in KILL_POINTS:
        run_and_kill(spec_path, data_dir, reached, pause_at)

        assert published_stages(data_dir) == published, name
        assert untrusted_published(data_dir) == [], name
        assert planned_reuse(spec_path, data_dir) == published, name
        # Artifacts published before an earlier kill are never rewritten by a later run.
        current = file_digests(data_dir / "stages")
        assert {path: current.get(path) for path in kept} == kept, name
        kept = current

    result = run_cli("run", str(spec_path), "--json", "--data-dir", str(data_dir), cwd=tmp_path)

    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert statuses(summary) == {stage: "cached" for stage in STAGES}
    assert summary["assembly_status"] == "trained"
    assert untrusted_published(data_dir) == []
    assert len(trusted_artifacts(data_dir)) == 1 + len(STAGES) + 1
    current = file_digests(data_dir / "stages")
    assert {path: current.get(path) for path in kept} == kept


def test_resumed_run_trains_only_unfinished(tmp_path: Path):
    """Killed while the second stage trains: the next run reuses the first and trains the rest."""
    spec = tiny_spec()
    spec["defaults"]["epochs"] = 2
    spec_path = write_spec(tmp_path, spec)
    data_dir = tmp_path / "data"
    run_and_kill(spec_path, data_dir, stage_published("hidden_1"))
    first = file_digests(data_dir / "stages" / "hidden_1")

    result = run_cli("run", str(spec_path), "--json", "--data-dir", str(data_dir), cwd=tmp_path)

    assert result.returncode == 0, result.stderr[-3000:]
    assert statuses(json.loads(result.stdout)) == {"hidden_1": "cached", "hidden_2": "trained", "head": "trained"}
    assert file_digests(data_dir / "stages" / "hidden_1") == first
    assert untrusted_published(data_dir) == []


LOCK_HOLDER = """
import sys, time
from pathlib import Path
from tasks.locks import ProcessLockManager
manager = ProcessLockManager(Path(sys.argv[1]))
assert manager.acquire_lock("stackwise-key", holder="killed-run")
print("locked", flush=True)
time.sleep(600)
"""


def test_lock_of_killed_process_is_released(tmp_path: Path):
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(PROJECT)},
    )
    assert holder.stdout.readline().strip() == "locked"
    manager = ProcessLockManager(tmp_path)
    assert manager.is_locked("stackwise-key")
    assert not manager.acquire_lock("stackwise-key", holder="this-run", acquire_timeout=0.3)

    holder.send_signal(signal.SIGKILL)
    holder.wait()
    holder.stdout.close()

    assert not manager.is_locked("stackwise-key")
    assert manager.acquire_lock("stackwise-key", holder="this-run", acquire_timeout=30)
    assert manager.is_lock_holder("stackwise-key", "this-run")
    manager.release_lock("stackwise-key", holder="this-run")
    assert not (tmp_path / "stackwise-key.lock").exists()
