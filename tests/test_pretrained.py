"""Pretrained stages: frozen bases behind input adapters, on digits reshaped to 8x8x1.

The bases are made here with random weights: a MobileNetV2 from keras.applications
saved as a weights file, a small `.keras` model and a SavedModel folder. Their
BatchNormalization moving statistics are set to random values, so that a frozen
base that updated them, or ran on batch statistics, would be caught.
"""

from __future__ import annotations

import copy
import re
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tasks.dataset import read_split, snapshot_dataset
from tasks.errors import SpecError
from tasks.plan import plan_stack
from tasks.spec import check_shapes, load_spec, parse_spec
from tasks.store import Store
from tests.conftest import run_cli, write_spec

DIGITS_SHAPE = (8, 8, 1)
MOBILENET = {
    "architecture": "MobileNetV2", "weights": "mobilenet.weights.h5", "input_shape": [32, 32, 3],
    "alpha": 0.35, "pooling": "avg",
}
TO_32_RGB = [{"adapter": "resize", "size": [32, 32]}, {"adapter": "repeat_channels", "channels": 3}]


def pretrained_spec() -> dict:
    """Return a stack of three pretrained stages, one per kind of base, under one head."""
    return {
        "name": "pretrained",
        "data": {"source": "sklearn:digits", "shape": list(DIGITS_SHAPE),
                 "split": {"test": 0.2, "validation": 0.1, "seed": 0}},
        "defaults": {"epochs": 3, "batch_size": 64, "learning_rate": 0.005, "seed": 0},
        "stages": [
            {"name": "mobile", "objective": "pretrained", "base": dict(MOBILENET),
             "adapters": copy.deepcopy(TO_32_RGB)},
            {"name": "small", "objective": "pretrained", "base": {"path": "small.keras"},
             "adapters": [{"adapter": "resize", "size": [16, 16]},
                          {"adapter": "repeat_channels", "channels": 3}]},
            {"name": "saved", "objective": "pretrained", "base": {"path": "saved"},
             "adapters": [{"adapter": "rescale", "scale": 0.0625}]},
            {"name": "head", "parents": ["mobile", "small", "saved"], "objective": "head"},
        ],
    }


def _randomize_batch_norm(model, rng: np.random.Generator) -> None:
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(0.0, 0.5, layer.moving_mean.shape).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, layer.moving_variance.shape).astype("float32"))


def make_mobilenet(folder: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Save a random MobileNetV2 weights file in `folder`; return its weights by variable path."""
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.applications.MobileNetV2(
        alpha=0.35, input_shape=(32, 32, 3), weights=None, include_top=False, pooling="avg"
    )
    _randomize_batch_norm(model, np.random.default_rng(seed))
    model.save_weights(str(folder / "mobilenet.weights.h5"))
    return {variable.path: np.array(variable.numpy()) for variable in model.weights}


def make_saved_bases(folder: Path) -> None:
    """Save a small `.keras` model (16x16x3 input) and a SavedModel folder (8x8x1 input)."""
    import keras

    keras.utils.set_random_seed(1)
    inputs = keras.Input((16, 16, 3))
    outputs = keras.layers.Conv2D(8, 3, activation="relu")(inputs)
    outputs = keras.layers.BatchNormalization()(outputs)
    outputs = keras.layers.GlobalAveragePooling2D()(outputs)
    small = keras.Model(inputs, outputs)
    _randomize_batch_norm(small, np.random.default_rng(1))
    small.save(str(folder / "small.keras"))

    inputs = keras.Input(DIGITS_SHAPE)
    outputs = keras.layers.Conv2D(4, 3, padding="same", activation="relu")(inputs)
    outputs = keras.layers.Flatten()(outputs)
    keras.Model(inputs, outputs).export(str(folder / "saved"), verbose=False)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """A folder holding the three bases and the spec that uses them, and MobileNetV2's weights."""
    folder = tmp_path_factory.mktemp("bases")
    weights = make_mobilenet(folder)
    make_saved_bases(folder)
    write_spec(folder, pretrained_spec())
    return folder, weights


def spec_with(folder: Path, change) -> Path:
    """Write a changed copy of the pretrained spec into `folder` and return its path."""
    raw = pretrained_spec()
    change(raw)
    return write_spec(folder, raw, name="changed.yaml")


# Spec validation: one line, before anything trains.


def _only_mobile(raw: dict) -> None:
    raw["stages"] = [raw["stages"][0], {"name": "head", "parents": ["mobile"], "objective": "head"}]


@pytest.mark.parametrize("weights, message", [
    ("imagenet", r"stage 'mobile' base\.weights: 'imagenet' would download weights at run time"),
    ("latest", r"stage 'mobile' base\.weights: 'latest' is not the path of a weights file"),
    (None, r"stage 'mobile' base: architecture MobileNetV2 needs weights"),
])
def test_weights_must_be_local_file(weights, message):
    raw = pretrained_spec()
    raw["stages"][0]["base"]["weights"] = weights
    with pytest.raises(SpecError, match=message) as caught:
        parse_spec(raw)
    assert "\n" not in str(caught.value)


def test_missing_weights_file_names_path(tmp_path):
    spec_path = spec_with(tmp_path, lambda raw: raw["stages"][0]["base"].update(weights="gone/absent.weights.h5"))
    spec = load_spec(spec_path)
    expected = re.escape(str(tmp_path.resolve() / "gone" / "absent.weights.h5"))
    with pytest.raises(SpecError, match=rf"stage 'mobile' base\.weights: weights file '{expected}' not found"):
        check_shapes(spec, DIGITS_SHAPE, 10)


def test_cli_missing_weights_exits_2(tmp_path):
    spec_path = spec_with(tmp_path, _only_mobile)
    result = run_cli("plan", str(spec_path), "--data-dir", str(tmp_path / "data"), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("stackwise: error: ")
    assert "Traceback" not in result.stderr
    assert f"weights file '{tmp_path.resolve() / 'mobilenet.weights.h5'}' not found" in lines[-1]


def test_input_too_small_without_adapters(bases):
    folder, _ = bases

    def change(raw):
        _only_mobile(raw)
        raw["stages"][0]["adapters"] = []

    spec = load_spec(spec_with(folder, change))
    with pytest.raises(SpecError, match=(
        r"stage 'mobile': the base MobileNetV2 needs images of 32x32 pixels with 3 channels, but the "
        r"stage's input after its adapters has shape \[8, 8, 1\]; add the adapters "
        r"\{adapter: resize, size: \[32, 32\]\} and \{adapter: repeat_channels, channels: 3\}$"
    )):
        check_shapes(spec, DIGITS_SHAPE, 10)


def test_minimum_size_without_input_shape(bases):
    folder, _ = bases

    def change(raw):
        _only_mobile(raw)
        del raw["stages"][0]["base"]["input_shape"]
        raw["stages"][0]["adapters"] = []

    spec = load_spec(spec_with(folder, change))
    with pytest.raises(SpecError, match=(
        r"needs images of at least 32x32 pixels with 3 channels, but the stage's input after its "
        r"adapters has shape \[28, 28, 1\]; add the adapters \{adapter: resize, size: \[32, 32\]\}"
    )):
        check_shapes(spec, (28, 28, 1), 10)


def test_wrong_channel_count(bases):
    folder, _ = bases

    def change(raw):
        _only_mobile(raw)
        raw["stages"][0]["adapters"] = [{"adapter": "resize", "size": [32, 32]}]

    spec = load_spec(spec_with(folder, change))
    with pytest.raises(SpecError, match=(
        r"needs images of 32x32 pixels with 3 channels, .* has shape \[32, 32, 1\]; "
        r"add the adapter \{adapter: repeat_channels, channels: 3\}$"
    )):
        check_shapes(spec, DIGITS_SHAPE, 10)


def test_channels_cannot_be_reduced(bases):
    folder, _ = bases

    def change(raw):
        _only_mobile(raw)
        raw["stages"][0]["base"]["input_shape"] = [32, 32, 1]

    spec = load_spec(spec_with(folder, change))
    with pytest.raises(SpecError, match=r"no adapter turns 3 channels into 1; use a base that takes 3 channels"):
        check_shapes(spec, DIGITS_SHAPE, 10)


def test_adapter_needs_image(bases):
    folder, _ = bases

    def change(raw):
        _only_mobile(raw)
        raw["data"].pop("shape")

    spec = load_spec(spec_with(folder, change))
    with pytest.raises(SpecError, match=(
        r"stage 'mobile' adapters\[0\] \(resize\): resize needs an image input of rank 3 .* got shape \[64\]"
    )):
        check_shapes(spec, (64,), 10)


@pytest.mark.parametrize("change, message", [
    (lambda stage: stage["base"].update(architecture="MobileNetV4"),
     r"base\.architecture: unknown architecture 'MobileNetV4'\. Did you mean 'MobileNetV2'\?"),
    (lambda stage: stage["base"].update(architecture="ResNet50"),
     r"base: alpha is not an argument of ResNet50; it accepts none of them"),
    (lambda stage: stage["base"].update(input_shape=[16, 16, 3]),
     r"input_shape \[16, 16, 3\] is too small: MobileNetV2 needs at least 32x32 pixels"),
    (lambda stage: stage["base"].update(path="model.keras"),
     r"give either architecture .* or path .*, not both or neither"),
    (lambda stage: stage.update(layers=[{"layer": "Dense", "units": 4}]),
     r"stage 'mobile' layers: a pretrained stage is never trained, so it takes no layers"),
    (lambda stage: stage.update(epochs=3, seed=1),
     r"stage 'mobile' epochs: a pretrained stage is never trained, so training settings do not "
     r"apply; remove epochs, seed$"),
    (lambda stage: stage.update(objective="supervised", layers=[{"layer": "Dense", "units": 4}]),
     r"stage 'mobile': base and adapters belong to a stage with objective: pretrained"),
    (lambda stage: stage["adapters"].append({"adapter": "repeat_channel"}),
     r"adapters\[2\]: unknown adapter 'repeat_channel'\. Did you mean 'repeat_channels'\?"),
    (lambda stage: stage["adapters"].__setitem__(0, {"adapter": "resize", "size": [32, 0]}),
     r"resize argument 'size\.1': .*greater than 0; received 0"),
])
def test_bad_base_entry(change, message):
    raw = pretrained_spec()
    change(raw["stages"][0])
    with pytest.raises(SpecError, match=message) as caught:
        parse_spec(raw)
    assert "\n" not in str(caught.value)


def test_saved_base_extra_argument():
    raw = pretrained_spec()
    raw["stages"][1]["base"]["pooling"] = "avg"
    with pytest.raises(SpecError, match=r"stage 'small' base: pooling applies to an architecture base only"):
        parse_spec(raw)


@pytest.mark.slow
def test_keras_file_input_checked(bases):
    folder, _ = bases
    spec = load_spec(spec_with(folder, lambda raw: raw["stages"][1].update(adapters=[])))
    with pytest.raises(SpecError, match=(
        r"stage 'small': the base 'small\.keras' needs images of 16x16 pixels with 3 channels, but "
        r"the stage's input after its adapters has shape \[8, 8, 1\]; add the adapters "
        r"\{adapter: resize, size: \[16, 16\]\} and \{adapter: repeat_channels, channels: 3\}$"
    )):
        check_shapes(spec, DIGITS_SHAPE, 10)


@pytest.mark.slow
def test_output_shapes_of_each_base(bases):
    folder, _ = bases
    shapes = check_shapes(load_spec(folder / "stack.yaml"), DIGITS_SHAPE, 10)
    assert shapes == {"mobile": (1280,), "small": (8,), "saved": (256,), "head": (10,)}


def test_fingerprint_covers_base_content(bases, tmp_path):
    folder, _ = bases
    for name in ("mobilenet.weights.h5", "stack.yaml"):
        shutil.copy2(folder / name, tmp_path / name)
    shutil.copytree(folder / "saved", tmp_path / "saved")
    shutil.copy2(folder / "small.keras", tmp_path / "small.keras")

    def fingerprints() -> dict:
        spec = load_spec(tmp_path / "stack.yaml")
        return {stage.name: stage.normalized(spec.defaults) for stage in spec.stages}

    before = fingerprints()
    os.utime(tmp_path / "mobilenet.weights.h5", ns=(1, 1))
    assert fingerprints() == before

    make_mobilenet(tmp_path, seed=7)
    after = fingerprints()
    assert after["mobile"]["base"]["sha256"] != before["mobile"]["base"]["sha256"]
    assert after["small"] == before["small"]

    (tmp_path / "saved" / "fingerprint.pb").write_bytes(b"changed")
    assert fingerprints()["saved"]["base"]["sha256"] != before["saved"]["base"]["sha256"]


def test_defaults_leave_pretrained_fingerprint(bases):
    folder, _ = bases
    before = load_spec(folder / "stack.yaml")
    after = load_spec(spec_with(folder, lambda raw: raw["defaults"].update(epochs=9, seed=4)))
    assert after.stage("mobile").normalized(after.defaults) == before.stage("mobile").normalized(before.defaults)
    assert after.stage("head").normalized(after.defaults) != before.stage("head").normalized(before.defaults)


# The whole flow on digits 8x8x1.


@pytest.fixture(scope="module")
def trained(bases, prefect_server):
    """The pretrained stack trained once into a store beside the bases, and the run's summary."""
    from flows.stack_flow import stack_flow

    folder, _ = bases
    summary = stack_flow(str(folder / "stack.yaml"), data_dir=str(folder / "data"))
    return folder, summary


def _statuses(summary: dict) -> dict[str, str]:
    return {stage["name"]: stage["status"] for stage in summary["stages"]}


def _stage(summary: dict, name: str) -> dict:
    return next(stage for stage in summary["stages"] if stage["name"] == name)


def _saved_variables(model_dir: str) -> dict[str, np.ndarray]:
    import tensorflow as tf

    loaded = tf.saved_model.load(model_dir)
    return {variable.name.removesuffix(":0"): variable.numpy() for variable in loaded.variables}


def _assert_weights_identical(original: dict[str, np.ndarray], saved: dict[str, np.ndarray]) -> None:
    # TFSMLayer keeps a copy of each reloaded variable named with '_' for '/'; both must match.
    for path, value in original.items():
        matches = [saved[name] for name in (path, path.replace("/", "_")) if name in saved]
        assert matches, f"variable {path} missing from the SavedModel"
        for match in matches:
            assert match.dtype == value.dtype, path
            assert match.tobytes() == value.tobytes(), f"variable {path} changed"


@pytest.mark.slow
def test_flow_trains_every_stage(trained):
    _, summary = trained
    assert _statuses(summary) == {"mobile": "trained", "small": "trained", "saved": "trained",
                                  "head": "trained"}
    assert summary["evaluation"]["metrics"]["accuracy"] > 0.5
    for name in ("mobile", "small", "saved"):
        assert 0.0 <= _stage(summary, name)["validation_accuracy"] <= 1.0


@pytest.mark.slow
def test_base_weights_bit_identical(trained, bases):
    """The stage artifact and the assembled model hold the base's weights and BN statistics unchanged."""
    _, summary = trained
    _, original = bases
    batch_norm = {path: value for path, value in original.items() if "moving_" in path}
    assert len(batch_norm) > 40
    _assert_weights_identical(original, _saved_variables(_stage(summary, "mobile")["model_dir"]))
    _assert_weights_identical(batch_norm, _saved_variables(summary["model_dir"]))


@pytest.mark.slow
def test_stage_runs_batch_norm_in_inference_mode(trained, bases):
    import keras

    from tasks.features import read_feature_file

    folder, _ = bases
    _, summary = trained
    model = keras.applications.MobileNetV2(
        alpha=0.35, input_shape=(32, 32, 3), weights=None, include_top=False, pooling="avg"
    )
    model.load_weights(str(folder / "mobilenet.weights.h5"))
    dataset = read_split(snapshot_dataset(load_spec(folder / "stack.yaml"), Store(folder / "data")), "test")
    images = keras.ops.repeat(keras.layers.Resizing(32, 32)(dataset.features[:64]), 3, axis=-1)
    stored = read_feature_file(Path(_stage(summary, "mobile")["feature_files"]["test"])).features[:64]
    inference = np.asarray(model(images, training=False))
    batch_statistics = np.asarray(model(images, training=True))
    assert np.max(np.abs(stored - inference)) < 1e-5
    assert np.max(np.abs(stored - batch_statistics)) > 1e-3


@pytest.mark.slow
def test_assembled_model_reproduces_report(trained):
    import tensorflow as tf

    folder, summary = trained
    dataset = read_split(snapshot_dataset(load_spec(folder / "stack.yaml"), Store(folder / "data")), "test")
    assembled = tf.saved_model.load(summary["model_dir"])
    probabilities = assembled.serve(tf.constant(dataset.features)).numpy()
    report = json.loads(Path(summary["report"]).read_text())
    accuracy = float((probabilities.argmax(axis=1) == dataset.labels).mean())
    assert accuracy == pytest.approx(report["metrics"]["accuracy"], abs=1e-9)
    assert report["max_abs_difference"] < 1e-4


@pytest.mark.slow
def test_rerun_reuses_every_stage(trained, prefect_server):
    from flows.stack_flow import stack_flow

    folder, _ = trained
    summary = stack_flow(str(folder / "stack.yaml"), data_dir=str(folder / "data"))
    assert set(_statuses(summary).values()) == {"cached"}


@pytest.mark.slow
def test_replaced_weights_retrain_stage_and_children(trained, tmp_path):
    folder, _ = trained
    for name in ("stack.yaml", "small.keras"):
        shutil.copy2(folder / name, tmp_path / name)
    shutil.copytree(folder / "saved", tmp_path / "saved")
    make_mobilenet(tmp_path, seed=3)
    spec = load_spec(tmp_path / "stack.yaml")
    store = Store(folder / "data")
    decisions = {decision.stage: decision for decision in plan_stack(spec, snapshot_dataset(spec, store), store)}
    assert decisions["mobile"].action == "train"
    assert decisions["mobile"].reason == "spec changed (base)"
    assert decisions["small"].action == "reuse"
    assert decisions["saved"].action == "reuse"
    assert decisions["head"].action == "train"
    assert decisions["head"].reason.startswith("parent changed (mobile")


# The table of keras.applications facts against Keras itself.


# One width multiplier per MobileNet, and both branches of MobileNetV2's channel rule.
ARCHITECTURE_CASES = [
    ("MobileNet", 0.5), ("MobileNetV2", 0.35), ("MobileNetV2", 1.4), ("MobileNetV3Small", 1.25),
    ("MobileNetV3Large", 0.75), ("ResNet50", None), ("ResNet50V2", None), ("EfficientNetB0", None),
    ("EfficientNetB1", None), ("EfficientNetV2B0", None), ("DenseNet121", None), ("VGG16", None),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, alpha", ARCHITECTURE_CASES)
def test_architecture_table_matches_keras(name, alpha):
    import keras

    from tasks.bases import ARCHITECTURES

    facts = ARCHITECTURES[name]
    arguments = {"alpha": alpha} if alpha else {}
    # Odd and even sizes tell rounding up from rounding down at every stride-2 step.
    for height, width in ((33, 62), (63, 50)):
        model = getattr(keras.applications, name)(
            weights=None, include_top=False, input_shape=(height, width, 3), **arguments
        )
        assert tuple(model.output.shape[1:]) == facts.feature_map(height, width, alpha or 1.0)
    with pytest.raises(ValueError, match=f"at least {facts.min_size}x{facts.min_size}"):
        getattr(keras.applications, name)(
            weights=None, include_top=False, input_shape=(facts.min_size - 1, facts.min_size, 3),
            **arguments,
        )
