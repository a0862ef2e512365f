"""Spec validation: every mistake is one line naming the field, the value and the fix."""

from __future__ import annotations

import copy

import pytest

from tasks.errors import SpecError
from tasks.spec import check_shapes, load_spec, parse_spec
from tests.conftest import run_cli, tiny_spec, write_spec


def _with(path: list, value) -> dict:
    spec = tiny_spec()
    target = spec
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return spec


BAD_SPECS = [
    ("unknown layer", _with(["stages", 0, "layers", 1, "layer"], "Dence"),
     r"stage 'hidden_1' layers\[1\]: unknown layer 'Dence'\. Did you mean 'Dense'\?"),
    ("unknown parent", _with(["stages", 1, "parents"], ["hiden_1"]),
     r"stage 'hidden_2' parents: unknown stage 'hiden_1'\. Did you mean 'hidden_1'\?"),
    ("duplicate name", _with(["stages", 1, "name"], "hidden_1"),
     r"duplicate stage name 'hidden_1'"),
    ("wrong type", _with(["stages", 0, "epochs"], "ten"),
     r"stage 'hidden_1' epochs: .*valid integer.*received 'ten'"),
    ("negative units", _with(["stages", 0, "layers", 1, "units"], -4),
     r"Dense argument 'units': .*greater than 0; received -4"),
    ("unknown key", _with(["defaults", "epoch"], 3),
     r"defaults: unknown key 'epoch'\. Did you mean 'epochs'\?"),
    ("bad stage name", _with(["stages", 0, "name"], "hidden-1"),
     r"stage name 'hidden-1' is not a valid identifier"),
    ("unknown source", _with(["data", "source"], "sklearn:digit"),
     r"data\.source: unknown built-in source 'sklearn:digit'\. Did you mean 'sklearn:digits'\?"),
    ("unknown activation", _with(["stages", 0, "layers", 1, "activation"], "rellu"),
     r"Dense argument 'activation': .*received 'rellu'"),
]


@pytest.mark.parametrize("label, raw, message", BAD_SPECS, ids=[case[0] for case in BAD_SPECS])
def test_bad_spec_message(label, raw, message):
    with pytest.raises(SpecError, match=message) as caught:
        parse_spec(raw, where="stack.yaml")
    assert "\n" not in str(caught.value)


def test_cycle_names_the_loop():
    raw = tiny_spec()
    raw["stages"][0]["parents"] = ["hidden_2"]
    with pytest.raises(SpecError, match=r"cycle \(hidden_1 -> hidden_2 -> hidden_1\)|cycle"):
        parse_spec(raw)


def test_head_must_be_unique():
    raw = tiny_spec()
    raw["stages"][1]["objective"] = "head"
    with pytest.raises(SpecError, match="expected exactly one stage with objective 'head', found hidden_2, head"):
        parse_spec(raw)


def test_stage_not_feeding_head():
    raw = tiny_spec()
    raw["stages"].insert(1, {"name": "orphan", "layers": [{"layer": "Dense", "units": 4}]})
    with pytest.raises(SpecError, match="stage 'orphan' does not feed the head 'head'"):
        parse_spec(raw)


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "absent.yaml")


def test_spec_path_is_folder(tmp_path):
    with pytest.raises(SpecError, match="is a folder"):
        load_spec(tmp_path)


def test_malformed_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nstages: [\n")
    with pytest.raises(SpecError, match="invalid YAML at line"):
        load_spec(path)


def test_conv_needs_rank_three():
    raw = tiny_spec()
    raw["stages"][0]["layers"] = [{"layer": "Conv2D", "filters": 4, "kernel_size": 3}]
    spec = parse_spec(raw, where="stack.yaml")
    with pytest.raises(SpecError, match=r"stage 'hidden_1' layers\[0\] \(Conv2D\): Conv2D needs an input of rank 3.*add a Reshape"):
        check_shapes(spec, (64,), 10, where="stack.yaml")


def test_shapes_through_reshape_and_pooling():
    raw = tiny_spec()
    raw["stages"][0]["layers"] = [
        {"layer": "Reshape", "target_shape": [8, 8, 1]},
        {"layer": "Conv2D", "filters": 4, "kernel_size": 3, "padding": "same"},
        {"layer": "MaxPooling2D", "pool_size": 2},
    ]
    raw["stages"][1]["layers"] = [{"layer": "Flatten"}, {"layer": "Dense", "units": 8}]
    shapes = check_shapes(parse_spec(raw), (64,), 10)
    assert shapes["hidden_1"] == (4, 4, 4)
    assert shapes["hidden_2"] == (8,)
    assert shapes["head"] == (10,)


def test_defaults_resolve_into_stage():
    spec = parse_spec(tiny_spec())
    training = spec.stage("hidden_1").training(spec.defaults)
    assert training["epochs"] == 3
    assert training["optimizer"] == "adam"
    assert training["seed"] == 0


@pytest.mark.parametrize("label, raw, message", BAD_SPECS[:4], ids=[case[0] for case in BAD_SPECS[:4]])
def test_cli_reports_spec_error(tmp_path, label, raw, message):
    path = write_spec(tmp_path, copy.deepcopy(raw))
    result = run_cli("run", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("stackwise: error:")]
    assert len(errors) == 1
    assert not (tmp_path / "data" / "stages").exists()


def test_cli_rejects_unknown_retrain_stage(spec_file, tmp_path):
    result = run_cli("run", str(spec_file), "--retrain", "hidden_9", cwd=tmp_path)
    assert result.returncode == 2
    assert "--retrain: unknown stage 'hidden_9'" in result.stderr
