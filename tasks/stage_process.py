"""Run stage training or assembly in a child process and relay its events.

Each stage trains in its own Python process. TensorFlow's memory is returned when
the process exits, an out-of-memory kill fails that stage alone, global seeds
cannot leak between stages that run at once, and a run that reuses every stage
never imports TensorFlow.

STACKWISE_STAGE_MEMORY_MB, when set, caps each stage process's address space
(RLIMIT_AS) at that many megabytes; a stage that needs more fails alone with a
message that names the limit. TensorFlow 2.21 reserves about 2.5 GB of address space
in a process that trains and exports a small model, so useful limits start near 3000.

Protocol: the parent starts `python -P -m tasks.stage_process`, writes a JSON job
file and sends its path as one line on the child's standard input. The child
imports TensorFlow before it reads that line, so a process started ahead of time
(a spare, see `prewarm`) takes a job without that wait. The child writes one JSON
event per line to its standard output (anything else it would print goes to
standard error) and ends with a `result` or an `error` event. A child whose
standard input closes without a job exits at once.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.errors import SpecError, StageFailed, StackwiseError

__all__ = [
    "MEMORY_VARIABLE",
    "child_command",
    "child_environment",
    "memory_limit_mb",
    "prewarm",
    "release_spare",
    "run_job",
]

logger = logging.getLogger(__name__)

STDERR_LINES_KEPT = 30
MEMORY_VARIABLE = "STACKWISE_STAGE_MEMORY_MB"
# Text in a stage process's standard error after an allocation failed under RLIMIT_AS.
MEMORY_SYMPTOMS = ("MemoryError", "ResourceExhausted", "bad_alloc", "pthread_create", "Cannot allocate memory")


def memory_limit_mb() -> int | None:
    """Return the stage processes' memory limit in megabytes, or None when unset."""
    value = os.environ.get(MEMORY_VARIABLE, "").strip()
    if not value:
        return None
    if not (value.isascii() and value.isdigit()) or int(value) == 0:
        raise SpecError(
            f"{MEMORY_VARIABLE}={value!r}: expected a positive whole number of megabytes, such as "
            "4096; unset it for no limit"
        )
    return int(value)


def child_environment() -> dict[str, str]:
    """Return the environment of a stackwise child process: this checkout first on the path."""
    project_root = str(Path(__file__).resolve().parent.parent)
    python_path = os.pathsep.join(filter(None, [project_root, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1", "PYTHONPATH": python_path}


def child_command(module: str, *arguments: str) -> list[str]:
    """Return the command that runs `module` of this checkout in a new Python process.

    `-P` keeps the working folder off the module path, so a `tasks` folder of the
    user's own there cannot take the place of stackwise's.
    """
    return [sys.executable, "-P", "-m", module, *arguments]


def _start_process(environment: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        child_command("tasks.stage_process"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
    )


class _Spare:
    """At most one stage process started ahead of time, with the environment it started with."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._environment: dict[str, str] = {}

    def start(self) -> None:
        with self._lock:
            if self._process is None or self._process.poll() is not None:
                self._environment = child_environment()
                self._process = _start_process(self._environment)

    def take(self, environment: dict[str, str]) -> subprocess.Popen | None:
        """Return the spare if it is alive and started with `environment`, else None."""
        with self._lock:
            process, self._process = self._process, None
            matches = self._environment == environment
        if process is None or (process.poll() is None and matches):
            return process
        _dismiss(process)
        return None

    def release(self) -> None:
        with self._lock:
            process, self._process = self._process, None
        if process is not None:
            _dismiss(process)


def _dismiss(process: subprocess.Popen) -> None:
    """Close an unused process's standard input: it exits as soon as its imports finish."""
    try:
        process.stdin.close()
    except OSError:
        pass


_SPARE = _Spare()
atexit.register(_SPARE.release)


def prewarm() -> None:
    """Start a spare stage process now, so that the next job skips TensorFlow's import."""
    _SPARE.start()


def release_spare() -> None:
    """Let the spare stage process, if any, exit."""
    _SPARE.release()


def run_job(
    action: str,
    job: dict[str, Any],
    label: str,
    on_event: Callable[[dict[str, Any]], None] = lambda event: None,
) -> dict[str, Any]:
    """Run `action` ("train" or "assemble") on `job` in a child process; return its result.

    The child is the spare process when there is one, and a stage's job starts the
    next spare, since an assembly or another stage follows it. `on_event` receives
    every progress event. When the child fails without a message of its own, it
    also receives a `stderr` event with the last lines of standard error. Raises
    StageFailed with the child's own message, or with the end of its standard
    error if it died without one (for example when the kernel killed it for memory).
    """
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="stackwise-job-", delete=False) as handle:
        json.dump({"action": action, "job": job}, handle)
    environment = child_environment()
    try:
        process = _SPARE.take(environment)
        logger.info("%s: %s", label, "started ahead of time" if process else "starting a stage process")
        process = process or _start_process(environment)
        if action == "train":
            prewarm()
        stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_LINES_KEPT)
        reader = threading.Thread(target=_drain, args=(process.stderr, stderr_tail, label), daemon=True)
        reader.start()
        try:
            process.stdin.write(handle.name + "\n")
            process.stdin.close()
        except BrokenPipeError:
            pass  # The child died while starting, so its exit code and stderr show the cause.
        outcome = _relay_events(process, on_event)
        process.wait()
        reader.join(timeout=5)
    finally:
        os.unlink(handle.name)
    if not (outcome and (outcome["event"] == "result" or outcome.get("expected"))):
        # An unexpected failure: hand the traceback to the caller's log before raising.
        on_event({"event": "stderr", "lines": list(stderr_tail)})
    return _result_or_raise(outcome, process.returncode, stderr_tail, label)


def _drain(stream, tail: collections.deque[str], label: str) -> None:
    for line in stream:
        tail.append(line.rstrip())
        logger.debug("%s: %s", label, line.rstrip())


def _relay_events(process: subprocess.Popen, on_event) -> dict[str, Any] | None:
    outcome = None
    for line in process.stdout:
        try:
            event = json.loads(line)
        except ValueError:
            logger.debug("non-event output from a stage process: %s", line.rstrip())
            continue
        if event.get("event") in {"result", "error"}:
            outcome = event
        else:
            on_event(event)
    return outcome


def _result_or_raise(outcome, returncode: int, stderr_tail, label: str) -> dict[str, Any]:
    if outcome and outcome["event"] == "result" and returncode == 0:
        return outcome["value"]
    limit = memory_limit_mb()
    if _ran_out_of_memory(outcome, returncode, stderr_tail, limit):
        if outcome:
            detail = outcome["message"]
        elif returncode < 0:
            detail = f"killed by {signal.Signals(-returncode).name}"
        else:
            detail = " | ".join(list(stderr_tail)[-2:])
        where = f"under the limit of {limit} MB set by {MEMORY_VARIABLE}" if limit else ""
        raise StageFailed(
            f"{label} ran out of memory {where} ({detail[:200]}); raise {MEMORY_VARIABLE} or lower "
            "batch_size or the layer sizes, then run again; completed stages are kept"
        )
    if outcome and outcome["event"] == "error":
        if outcome.get("expected"):
            raise StageFailed(outcome["message"])
        last = " | ".join(list(stderr_tail)[-3:])
        raise StageFailed(
            f"{label} failed: {outcome['message']} ({last}). The log above shows the end of the "
            "training process's traceback; fix its cause, then run again or retry the flow run"
        )
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (the kernel kills processes this way when memory runs out)" if name == "SIGKILL" else ""
        raise StageFailed(
            f"{label}: the training process was killed by {name}{hint}; "
            "lower the batch size or the data size, then run again"
        )
    last = " | ".join(list(stderr_tail)[-5:])
    raise StageFailed(
        f"{label}: the training process exited with code {returncode}: {last}. Fix the cause "
        "that the log above shows, then run again or retry the flow run"
    )


def _ran_out_of_memory(outcome, returncode: int, stderr_tail, limit: int | None) -> bool:
    if outcome and outcome.get("kind") == "memory":
        return True
    if outcome and outcome["event"] == "result":
        return False
    if limit is None:
        return False
    # Under RLIMIT_AS, TensorFlow may abort (SIGABRT), or crash (SIGSEGV) in one of its
    # input threads, when a thread or buffer cannot be allocated.
    crashed = returncode in (-signal.SIGABRT, -signal.SIGSEGV)
    return crashed or any(symptom in line for line in stderr_tail for symptom in MEMORY_SYMPTOMS)


def _apply_memory_limit() -> None:
    limit = memory_limit_mb()
    if limit is not None:
        resource.setrlimit(resource.RLIMIT_AS, (limit << 20, limit << 20))


def _main() -> int:
    # Keep stdout for events: anything that libraries print goes to stderr instead.
    events = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    def emit(event: dict[str, Any]) -> None:
        events.write(json.dumps(event) + "\n")

    try:
        _apply_memory_limit()
        # Import TensorFlow before the job arrives: a spare process does this ahead of time.
        from tasks.assembly import AssemblyJob, assemble_stack
        from tasks.training import StageJob, train_stage

        job_file = sys.stdin.readline().strip()
        if not job_file:
            return 0
        request = json.loads(Path(job_file).read_text())
        emit({"event": "started", "pid": os.getpid()})
        if request["action"] == "train":
            value = train_stage(StageJob.from_dict(request["job"]), emit)
        else:
            value = assemble_stack(AssemblyJob.from_dict(request["job"]), emit)
    except StackwiseError as exc:
        emit({"event": "error", "message": str(exc), "expected": True})
        return 1
    except Exception as exc:  # noqa: BLE001 - the parent needs every failure as a message.
        if isinstance(exc, MemoryError) or type(exc).__name__ == "ResourceExhaustedError":
            # TensorFlow's message starts with a generic line; the allocation that failed is further down.
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [""]
            detail = next((line for line in lines if "alloc" in line), lines[0])
            emit({"event": "error", "kind": "memory", "message": f"{type(exc).__name__}: {detail}"})
            return 1
        import traceback

        traceback.print_exc()
        emit({"event": "error", "message": f"{type(exc).__name__}: {exc}"})
        return 1
    emit({"event": "result", "value": value})
    return 0


if __name__ == "__main__":
    status = _main()
    sys.stdout.flush()
    sys.stderr.flush()
    # TensorFlow's shutdown takes about a second, and the job's files are already
    # written, synced and published, so the process skips it.
    os._exit(status)
