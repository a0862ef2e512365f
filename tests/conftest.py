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
    *arguments: str, cwd: Path, timeout: float = 600, env: dict[str, str | None] | None = None
) -> subprocess.CompletedProcess:
    """Run the `stackwise` command in a new process, with its own Prefect home under `cwd`.

    `env` sets environment variables for it; a value of None removes the variable.
    """
    environment = {**os.environ, "PYTHONPATH": str(PROJECT), "PREFECT_HOME": str(cwd / ".prefect")}
    for name, value in (env or {}).items():
        if value is None:
            environment.pop(name, None)
        else:
            environment[name] = value
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *arguments],
        cwd=cwd, capture_output=True, text=True, timeout=timeout, env=environment,
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


@pytest.fixture(scope="session")
def trained_store(tmp_path_factory) -> tuple[Path, dict]:
    """A store in which `stackwise run` trained the tiny stack, and that run's JSON summary.

    Tests must not change it; copy it first (see `copy_store`).
    """
    import json

    folder = tmp_path_factory.mktemp("trained-store")
    spec_path = write_spec(folder, tiny_spec())
    result = run_cli("run", str(spec_path), "--json", "--data-dir", str(folder / "data"), cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]
    return folder / "data", json.loads(result.stdout)


@pytest.fixture
def trained_copy(trained_store, tmp_path) -> tuple[Path, Path, dict[str, Path]]:
    """A private copy of the trained store, the tiny spec beside it, and its artifact folders.

    The folders are keyed by stage name, and 'assembled' for the assembled model.
    """
    data_dir, summary = trained_store
    copy = copy_store(data_dir, tmp_path / "data")
    folders = {
        stage["name"]: copy / Path(stage["model_dir"]).parent.relative_to(data_dir)
        for stage in summary["stages"]
    }
    folders["assembled"] = copy / Path(summary["model_dir"]).parent.relative_to(data_dir)
    return copy, write_spec(tmp_path, tiny_spec()), folders


def copy_store(source: Path, target: Path) -> Path:
    """Copy a store with its files' modification times, so that quick verification trusts it."""
    import shutil

    shutil.copytree(source, target, copy_function=shutil.copy2)
    return target
