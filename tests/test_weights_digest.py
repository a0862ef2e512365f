"""The weights digest: the same values give the same digest, whatever order a checkpoint lists them in."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import run_cli, tiny_spec, write_spec


def write_checkpoint(folder, values: dict[str, np.ndarray]) -> None:
    """Write `values` as the variables of a SavedModel folder `folder/model`, in the given order."""
    import tensorflow as tf

    variables = {name: tf.Variable(value) for name, value in values.items()}
    tf.train.Checkpoint(**variables).write(str(folder / "model" / "variables" / "variables"))


KERNEL = np.arange(12, dtype=np.float32).reshape(3, 4)
BIAS = np.ones(4, dtype=np.float32)


def test_digest_ignores_variable_order(tmp_path):
    from tasks.training import weights_digest

    write_checkpoint(tmp_path / "first", {"a": KERNEL, "b": BIAS})
    write_checkpoint(tmp_path / "second", {"a": BIAS, "b": KERNEL})
    assert weights_digest(tmp_path / "first", ["model"]) == weights_digest(tmp_path / "second", ["model"])


def test_digest_follows_values(tmp_path):
    from tasks.training import weights_digest

    changed = KERNEL.copy()
    changed[0, 0] = np.nextafter(changed[0, 0], np.float32(1))
    write_checkpoint(tmp_path / "first", {"a": KERNEL, "b": BIAS})
    write_checkpoint(tmp_path / "second", {"a": changed, "b": BIAS})
    assert weights_digest(tmp_path / "first", ["model"]) != weights_digest(tmp_path / "second", ["model"])


@pytest.mark.slow
def test_forced_retrain_of_conv_stage_keeps_child(tmp_path):
    spec = tiny_spec()
    spec["stages"][0]["layers"] = [
        {"layer": "Rescaling", "scale": 0.0625},
        {"layer": "Reshape", "target_shape": [8, 8, 1]},
        {"layer": "Conv2D", "filters": 4, "kernel_size": 3, "activation": "relu"},
        {"layer": "Flatten"},
    ]
    spec["stages"][1]["layers"].insert(0, {"layer": "Normalization"})
    spec_path = write_spec(tmp_path, spec)
    first = run_cli("run", str(spec_path), "--json", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]

    again = run_cli("run", str(spec_path), "--json", "--retrain", "hidden_1", cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    statuses = {stage["name"]: stage["status"] for stage in json.loads(again.stdout)["stages"]}
    assert statuses == {"hidden_1": "trained", "hidden_2": "cached", "head": "cached"}
