"""Fingerprints: stable across processes for the same inputs, new for any change that matters."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tasks.fingerprint import fingerprint_inputs, fingerprint_of
from tasks.spec import parse_spec
from tests.conftest import PROJECT, tiny_spec

DATASET = "d" * 64
PARENTS = {"hidden_1": "a" * 64}


def stage_fingerprint(raw: dict, stage: str = "hidden_2", parents=PARENTS, dataset=DATASET) -> str:
    spec = parse_spec(raw)
    inputs = fingerprint_inputs(spec.stage(stage).normalized(spec.defaults), parents, dataset)
    return fingerprint_of(inputs)


def test_same_in_new_process():
    script = (
        "import json, sys; from tests.test_fingerprint import stage_fingerprint; "
        "from tests.conftest import tiny_spec; print(stage_fingerprint(tiny_spec()))"
    )
    outputs = [
        subprocess.run([sys.executable, "-c", script], cwd=PROJECT, capture_output=True,
                       text=True, check=True).stdout.strip()
        for _ in range(2)
    ]
    assert outputs[0] == outputs[1]
    assert outputs[0] == stage_fingerprint(tiny_spec())


def test_explicit_default_is_same():
    raw = tiny_spec()
    raw["stages"][1]["epochs"] = 3  # equal to the spec's default
    raw["stages"][1]["optimizer"] = "adam"  # equal to the built-in default
    assert stage_fingerprint(raw) == stage_fingerprint(tiny_spec())


def test_key_order_is_irrelevant():
    raw = tiny_spec()
    reordered = json.loads(json.dumps(raw))
    reordered["stages"][1] = dict(reversed(list(reordered["stages"][1].items())))
    assert stage_fingerprint(reordered) == stage_fingerprint(raw)


def _edit(path, value):
    raw = tiny_spec()
    target = raw
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return raw


CHANGES = {
    "epochs": _edit(["stages", 1, "epochs"], 4),
    "default epochs": _edit(["defaults", "epochs"], 4),
    "units": _edit(["stages", 1, "layers", 0, "units"], 17),
    "activation": _edit(["stages", 1, "layers", 0, "activation"], "tanh"),
    "seed": _edit(["stages", 1, "seed"], 1),
    "learning rate": _edit(["stages", 1, "learning_rate"], 0.01),
    "batch size": _edit(["defaults", "batch_size"], 32),
}


@pytest.mark.parametrize("change", CHANGES)
def test_change_gives_new_fingerprint(change):
    assert stage_fingerprint(CHANGES[change]) != stage_fingerprint(tiny_spec())


def test_parent_digest_changes_fingerprint():
    changed = {"hidden_1": "b" * 64}
    assert stage_fingerprint(tiny_spec(), parents=changed) != stage_fingerprint(tiny_spec())


def test_dataset_digest_changes_fingerprint():
    assert stage_fingerprint(tiny_spec(), dataset="e" * 64) != stage_fingerprint(tiny_spec())


def test_other_stage_edit_is_irrelevant():
    raw = _edit(["stages", 2, "epochs"], 9)  # the head, not hidden_2
    assert stage_fingerprint(raw) == stage_fingerprint(tiny_spec())
