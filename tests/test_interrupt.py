"""SIGTERM stops a run as Ctrl-C does: exit 130, no process left behind, the next run completes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import PROJECT, run_cli, tiny_spec, write_spec

pytestmark = pytest.mark.slow


def processes_with_home(prefect_home: Path) -> list[int]:
    """Return the ids of running processes whose environment names `prefect_home`."""
    marker = f"PREFECT_HOME={prefect_home}".encode()
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:
            continue  # The process ended, or is not ours to read.
    return found


def test_sigterm_stops_run_and_its_processes(tmp_path):
    spec_path = write_spec(tmp_path, tiny_spec(defaults={"epochs": 30, "batch_size": 16, "seed": 0}))
    prefect_home = tmp_path / ".prefect"
    environment = {**os.environ, "PYTHONPATH": str(PROJECT), "PREFECT_HOME": str(prefect_home)}
    run = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", str(spec_path)],
        cwd=tmp_path, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    for line in run.stderr:
        if "stage hidden_1 epoch 1/" in line:
            break
    run.send_signal(signal.SIGTERM)
    remaining = run.stderr.read()
    assert run.wait(timeout=120) == 130, remaining[-2000:]
    assert "stackwise: interrupted; completed stages are kept" in remaining

    deadline = time.monotonic() + 90
    while processes_with_home(prefect_home) and time.monotonic() < deadline:
        time.sleep(1)
    assert processes_with_home(prefect_home) == []

    again = run_cli("run", str(spec_path), "--json", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert {stage["status"] for stage in json.loads(again.stdout)["stages"]} <= {"trained", "cached"}
