"""Two runs of one spec at once, on one store: both finish, each stage trains once.

This is a scheduled run firing while a local run is going. Prefect's SERIALIZABLE
cache isolation with a file lock in the store makes the second run of a stage wait
for the first and then reuse its artifact. Two cases: both runs talk to one real
`prefect server`, or each starts its own temporary server with its own database, so
that only the store is shared.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import PROJECT, tiny_spec, write_spec
from tests.store_checks import trusted_artifacts, untrusted_published

pytestmark = pytest.mark.slow

SERVER_START_SECONDS = 180
RUN_SECONDS = 900


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def base_environment(prefect_home: Path) -> dict[str, str]:
    environment = {**os.environ, "PYTHONPATH": str(PROJECT), "PREFECT_HOME": str(prefect_home),
                   "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    environment.pop("PREFECT_API_URL", None)
    return environment


@pytest.fixture
def prefect_api(tmp_path):
    """A real `prefect server start` on a free port of 127.0.0.1, with its own PREFECT_HOME."""
    port = free_port()
    environment = base_environment(tmp_path / "server-home")
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
         "--no-ui", "--analytics-off"],
        env=environment, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + SERVER_START_SECONDS
    try:
        while True:
            assert server.poll() is None, "prefect server exited while starting"
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "prefect server did not answer /api/health"
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def run_two_at_once(tmp_path: Path, environments: list[dict[str, str]]) -> list[dict]:
    """Start `stackwise run --json` once per environment, all at once; return their summaries."""
    spec = tiny_spec()
    spec["defaults"]["epochs"] = 2
    spec_path = write_spec(tmp_path, spec)
    command = [sys.executable, "-m", "flows.cli", "run", str(spec_path), "--json",
               "--data-dir", str(tmp_path / "data")]
    logs = [tmp_path / f"run-{index}.log" for index in range(len(environments))]
    runs = []
    for environment, log in zip(environments, logs):
        with open(log, "w") as stderr:
            runs.append(subprocess.Popen(command, cwd=tmp_path, env=environment, stdout=subprocess.PIPE,
                                         stderr=stderr, text=True))
    summaries = []
    for run, log in zip(runs, logs):
        stdout, _ = run.communicate(timeout=RUN_SECONDS)
        assert run.returncode == 0, log.read_text()[-3000:]
        summaries.append(json.loads(stdout))
    return summaries


def check_each_stage_trained_once(summaries: list[dict], data_dir: Path) -> None:
    trained = [stage["name"] for summary in summaries for stage in summary["stages"] if stage["status"] == "trained"]
    assert sorted(trained) == ["head", "hidden_1", "hidden_2"]
    assert sorted(summary["assembly_status"] for summary in summaries) == ["cached", "trained"]
    first, second = ({stage["name"]: (stage["fingerprint"], stage["model_dir"], stage["feature_files"])
                      for stage in summary["stages"]} for summary in summaries)
    assert first == second
    assert summaries[0]["model_dir"] == summaries[1]["model_dir"]
    assert summaries[0]["evaluation"] == summaries[1]["evaluation"]
    assert len(list((data_dir / "stages").glob("*/*/manifest.json"))) == 3
    assert len(list((data_dir / "assembled").glob("*/*/manifest.json"))) == 1
    assert len(list((data_dir / "datasets").glob("*/manifest.json"))) == 1
    assert len(trusted_artifacts(data_dir)) == 5
    assert untrusted_published(data_dir) == []


def test_two_runs_share_one_server(tmp_path, prefect_api):
    environment = {**base_environment(tmp_path / "client-home"), "PREFECT_API_URL": prefect_api}

    summaries = run_two_at_once(tmp_path, [environment, environment])

    check_each_stage_trained_once(summaries, tmp_path / "data")


def test_two_runs_with_own_servers(tmp_path):
    environments = [base_environment(tmp_path / f"home-{index}") for index in range(2)]

    summaries = run_two_at_once(tmp_path, environments)

    check_each_stage_trained_once(summaries, tmp_path / "data")
