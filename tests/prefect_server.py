"""A real Prefect server with this checkout's deployments and a process worker, for slow tests.

`prefect server start` listens on a free port of 127.0.0.1, with its own
PREFECT_HOME and SQLite database in a temporary folder. The work pool and the
deployments come from `prefect.yaml`, deployed non-interactively from the
checkout, and a process worker started in the checkout runs the flow runs. Each
process starts in its own session, so stopping it signals its whole process
group, which includes the flow-run and stage processes that a worker started.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest

from tests.conftest import PROJECT, diverging_spec, write_spec

__all__ = [
    "POOL",
    "RUN_SECONDS",
    "PrefectServer",
    "deployed_server",
    "progress_history",
    "retry_flow_run",
    "run_failing_stack",
    "stage_states",
    "start_stack_run",
    "wait_for_final_state",
]

POOL = "stackwise-pool"
DEPLOYMENT = "stackwise/stack"
# Generous limits for a shared 2-core machine; they only stop a hung test, nothing is timed.
STARTUP_SECONDS = 180
RUN_SECONDS = 1500
STOP_GRACE_SECONDS = 20
LOG_TAIL_CHARACTERS = 4000


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that no process listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop_process_group(process: subprocess.Popen, grace: float = STOP_GRACE_SECONDS) -> None:
    """Stop a process started with `start_new_session` and everything in its process group.

    A Prefect worker sometimes ignores SIGTERM for more than ten seconds while it
    shuts down, so the group gets `grace` seconds before SIGKILL.
    """
    group = process.pid
    try:
        os.killpg(group, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    # Children can outlive the group leader (a flow-run process, a stage process).
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-LOG_TAIL_CHARACTERS:]
    except OSError:
        return "(no log)"


@dataclass
class PrefectServer:
    """A running `prefect server start` process and the folder that holds its state and logs."""

    port: int
    folder: Path
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def api_url(self) -> str:
        return f"{self.url}/api"

    @property
    def log(self) -> Path:
        return self.folder / "server.log"

    def environment(self, **extra: str) -> dict[str, str]:
        """Return the environment for a process that talks to this server."""
        return {
            **os.environ,
            "PREFECT_API_URL": self.api_url,
            "PREFECT_HOME": str(self.folder / "client-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "PYTHONPATH": str(PROJECT),
            **extra,
        }

    def cli(self, *arguments: str) -> subprocess.CompletedProcess:
        """Run `prefect ARGUMENTS` in the checkout against this server; fail the test if it fails."""
        result = subprocess.run(
            [sys.executable, "-m", "prefect", *arguments],
            cwd=PROJECT, capture_output=True, text=True, timeout=STARTUP_SECONDS,
            # `prefect deploy` fills `{{ $PWD }}` in prefect.yaml from the environment.
            env=self.environment(PWD=str(PROJECT)),
        )
        assert result.returncode == 0, f"prefect {' '.join(arguments)} failed:\n{result.stdout}\n{result.stderr}"
        return result

    def client(self):
        """Return a synchronous Prefect client bound to this server alone."""
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(self.api_url)


def start_server(folder: Path) -> PrefectServer:
    """Start `prefect server start` on a free port and wait until its API answers."""
    port = free_port()
    database = folder / "prefect.db"
    environment = {
        **os.environ,
        "PREFECT_HOME": str(folder / "server-home"),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{database}",
        # Without it the UI served on this port calls 127.0.0.1:4200 for its API.
        "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        # No runs from schedules: the nightly deployment would train stacks/digits.yaml
        # into the checkout's own data folder.
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
    }
    with open(folder / "server.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            cwd=folder, env=environment, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    server = PrefectServer(port, folder, process)
    try:
        _wait_until_healthy(server)
    except BaseException:
        stop_process_group(process)
        raise
    return server


def _wait_until_healthy(server: PrefectServer) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"prefect server exited with code {server.process.returncode}:\n{_tail(server.log)}")
        try:
            if httpx.get(f"{server.api_url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"prefect server did not answer within {STARTUP_SECONDS} s:\n{_tail(server.log)}")


def start_worker(server: PrefectServer) -> subprocess.Popen:
    """Start a process worker for the pool, in the checkout as the README describes."""
    with open(server.folder / "worker.log", "w") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process"],
            cwd=PROJECT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env=server.environment(
                PREFECT_HOME=str(server.folder / "worker-home"),
                # Poll every second instead of every ten, so runs start sooner.
                PREFECT_WORKER_QUERY_SECONDS="1",
            ),
        )


@pytest.fixture(scope="session")
def deployed_server(tmp_path_factory) -> Iterator[PrefectServer]:
    """A Prefect server with the work pool, the deployments of prefect.yaml and a running worker."""
    folder = tmp_path_factory.mktemp("prefect-server")
    server = start_server(folder)
    try:
        server.cli("work-pool", "create", POOL, "--type", "process")
        server.cli("--no-prompt", "deploy", "--all")
        worker = start_worker(server)
        try:
            yield server
        finally:
            stop_process_group(worker)
    finally:
        stop_process_group(server.process)


def start_stack_run(server: PrefectServer, spec_path: Path, data_dir: Path) -> UUID:
    """Create a flow run of the general deployment with these parameters; return its id."""
    with server.client() as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        run = client.create_flow_run_from_deployment(
            deployment.id, parameters={"spec_path": str(spec_path), "data_dir": str(data_dir)}
        )
    return run.id


def wait_for_final_state(server: PrefectServer, run_id: UUID):
    """Poll the flow run until it reaches a final state; return the flow run."""
    deadline = time.monotonic() + RUN_SECONDS
    with server.client() as client:
        while time.monotonic() < deadline:
            run = client.read_flow_run(run_id)
            if run.state is not None and run.state.is_final():
                return run
            time.sleep(1)
    raise AssertionError(
        f"flow run {run_id} did not finish within {RUN_SECONDS} s; "
        f"worker log:\n{_tail(server.folder / 'worker.log')}"
    )


def run_failing_stack(server: PrefectServer, folder: Path) -> tuple[UUID, Path]:
    """Run the diverging stack through the worker until it fails; return the run id and spec path."""
    spec_path = write_spec(folder, diverging_spec())
    run_id = start_stack_run(server, spec_path, folder / "data")
    run = wait_for_final_state(server, run_id)
    assert run.state.is_failed(), f"expected Failed, got {run.state.name}: {run.state.message}"
    return run_id, spec_path


def retry_flow_run(server: PrefectServer, run_id: UUID) -> None:
    """Retry a finished flow run as the UI's Retry button does: propose AwaitingRetry."""
    from prefect.client.schemas.objects import StateType
    from prefect.states import State

    with server.client() as client:
        result = client.set_flow_run_state(
            run_id,
            State(type=StateType.SCHEDULED, name="AwaitingRetry", message="Retry from the UI"),
            force=False,
        )
    assert result.status.value == "ACCEPT", f"the server rejected the retry: {result.details}"


def stage_states(server: PrefectServer, run_id: UUID, attempt: int) -> dict[str, str]:
    """Map each stage task run of one attempt of the flow run to its state name."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with server.client() as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))
    return {
        task_run.name: task_run.state_name
        for task_run in task_runs
        if task_run.task_key.startswith("stage_task") and task_run.flow_run_run_count == attempt
    }


def progress_history(server: PrefectServer, artifact_id: UUID, expected_updates: int) -> list[float]:
    """Return the values a progress artifact was updated to, oldest first, from the server's events.

    Events reach the server asynchronously, so this polls until `expected_updates`
    updates are stored and then returns whatever is there.
    """
    query = {
        "filter": {
            "event": {"name": ["prefect.artifact.updated"]},
            "resource": {"id": [f"prefect.artifact.{artifact_id}"]},
            "order": "ASC",
        },
        "limit": 50,
    }
    deadline = time.monotonic() + STARTUP_SECONDS
    while True:
        response = httpx.post(f"{server.api_url}/events/filter", json=query, timeout=30)
        response.raise_for_status()
        values = [event["payload"]["data"] for event in response.json()["events"]]
        if len(values) >= expected_updates or time.monotonic() > deadline:
            return values
        time.sleep(1)
