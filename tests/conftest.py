"""Shared fixtures: tiny real stacks, a store under tmp_path, and one Prefect test server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PROJECT = Path(__file__).resolve().parent.parent


def tiny_spec(**overrides) -> dict:
    """Return a three-stage digits stack small enough to train in seconds."""
    spec = {
        "name": "tiny",
        "data": {"source": "sklearn:digits", "split": {"test": 0.2, "validation": 0.1, "seed": 0}},
        "defaults": {"epochs": 3, "batch_size": 64, "learning_rate": 0.005, "seed": 0},
        "stages": [
            {"name": "hidden_1", "layers": [
                {"layer": "Rescaling", "scale": 0.0625},
                {"layer": "Dense", "units": 32, "activation": "relu"},
            ]},
            {"name": "hidden_2", "parents": ["hidden_1"], "layers": [
                {"layer": "Dense", "units": 16, "activation": "relu"},
            ]},
            {"name": "head", "parents": ["hidden_2"], "objective": "head"},
        ],
    }
    spec.update(overrides)
    return spec


def diverging_spec() -> dict:
    """Return the tiny stack with a middle stage whose loss becomes NaN in its second batch."""
    spec = tiny_spec()
    # Plain SGD with this learning rate overflows float32 weights in its first update.
    spec["stages"][1].update(optimizer="sgd", learning_rate=1.0e20)
    return spec


def write_spec(folder: Path, spec: dict, name: str = "stack.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_cli(
    *arguments: str, cwd: Path, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run the installed `stackwise` command in a new process, in `env` or this process's environment."""
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *arguments],
        cwd=cwd, capture_output=True, text=True, timeout=timeout,
        env={**(env if env is not None else os.environ), "PYTHONPATH": str(PROJECT)},
    )


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server and database for every flow test in the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def spec_file(tmp_path: Path) -> Path:
    return write_spec(tmp_path, tiny_spec())
