"""Random specs either validate or fail with a one-line SpecError that names a field.

The specs are random mutations of a valid one: keys dropped, values replaced by
values of random types, layer lists replaced by random layers. Nothing else may
escape: no other exception type, no multi-line message.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks.errors import SpecError
from tasks.layers import LAYER_TYPES
from tasks.spec import check_shapes, parse_spec
from tests.conftest import run_cli, tiny_spec
from tests.store_checks import error_lines

# A message starts with the spec's name, then where the problem is: the whole spec, a
# stage, a list entry or a dotted field path.
LOCATED = re.compile(r"^stack\.yaml: (spec|stage '[^']*'|stages(\[\d+\])?|[a-z_]+(\.[a-z_]+|\[\d+\])*)[ .:\[]")

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["relu", "Dense", "head", "hidden_1", "same", "sklearn:digits", "x.csv"]),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.sampled_from(["layer", "units", "name", "parents", "rate", "x"]), children, max_size=4),
    ),
    max_leaves=8,
)
layer_arguments = st.dictionaries(
    st.sampled_from([
        "units", "activation", "rate", "stddev", "filters", "kernel_size", "strides", "padding",
        "pool_size", "target_shape", "scale", "offset", "momentum", "epsilon", "use_bias", "unit",
    ]),
    st.one_of(
        st.integers(min_value=-2, max_value=9),
        st.floats(min_value=-1, max_value=2),
        st.sampled_from(["relu", "rellu", "same", "valid", None]),
        st.lists(st.integers(min_value=-1, max_value=9), min_size=1, max_size=3),
    ),
    max_size=3,
)
random_layer = st.builds(
    lambda name, arguments: {"layer": name, **arguments},
    st.sampled_from([*LAYER_TYPES, "Dence", "Conv3D"]),
    layer_arguments,
)


def paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Return the path of every node below `node` in a nested spec."""
    found = []
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return found
    for key, child in items:
        found.append((*prefix, key))
        found.extend(paths(child, (*prefix, key)))
    return found


def parent_of(spec: dict, path: tuple) -> Any:
    target = spec
    for key in path[:-1]:
        target = target[key]
    return target


@st.composite
def mutated_specs(draw) -> dict:
    """Apply one to three random mutations to the valid tiny spec."""
    spec = copy.deepcopy(tiny_spec())
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        candidates = paths(spec)
        if not candidates:
            break
        path = draw(st.sampled_from(candidates))
        parent = parent_of(spec, path)
        action = draw(st.sampled_from(["drop", "replace", "layers"]))
        if action == "drop":
            del parent[path[-1]]
        elif action == "replace":
            parent[path[-1]] = draw(values)
        else:
            stages = spec.get("stages")
            # An earlier mutation may have emptied the stage list or replaced it.
            stage = draw(st.sampled_from(stages)) if isinstance(stages, list) and stages else None
            if isinstance(stage, dict):
                stage["layers"] = draw(st.lists(random_layer, max_size=4))
    return spec


def check_spec(raw: dict) -> None:
    """Validate `raw` and its shapes; raise only SpecError, with a one-line located message."""
    try:
        spec = parse_spec(raw, where="stack.yaml")
        for input_shape in [(64,), (8, 8, 1)]:
            check_shapes(spec, input_shape, 10, where="stack.yaml")
    except SpecError as exc:
        message = str(exc)
        assert "\n" not in message
        assert LOCATED.match(message), message
        assert "Traceback" not in message


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_specs())
def test_mutated_spec_validates_or_names_field(raw):
    check_spec(raw)


@settings(max_examples=200, deadline=None)
@given(st.lists(random_layer, min_size=1, max_size=5), st.lists(random_layer, max_size=3))
def test_random_layers_validate_or_name_field(first_layers, head_layers):
    raw = tiny_spec()
    raw["stages"][0]["layers"] = first_layers
    raw["stages"][2]["layers"] = head_layers
    check_spec(raw)


@pytest.mark.slow
@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutated_specs())
def test_mutated_spec_through_cli(tmp_path_factory, raw):
    folder = tmp_path_factory.mktemp("mutated")
    try:
        text = yaml.safe_dump(raw, sort_keys=False)
    except yaml.YAMLError:
        return
    (folder / "stack.yaml").write_text(text)

    # `plan` validates exactly as `run` does, without training a spec that happens to be valid.
    result = run_cli("plan", "stack.yaml", "--data-dir", str(folder / "data"), cwd=folder)

    assert "Traceback" not in result.stderr
    if result.returncode == 0:
        return
    assert result.returncode == 2, result.stderr[-2000:]
    errors = error_lines(result.stderr)
    assert len(errors) == 1, result.stderr[-2000:]
    assert not (folder / "data" / "stages").exists()
