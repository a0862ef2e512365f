"""Pretrained stages: load a frozen base, put the input adapters in front, export, extract.

A pretrained stage is never trained. Its exported SavedModel is the adapters
followed by the base, called with `training=False` and marked non-trainable, so
BatchNormalization runs on its moving statistics and the assembled model takes the
data as stored. Its validation accuracy is that of a linear probe on the frozen
features, since the stage has no head of its own.

Like `tasks.training`, this module imports TensorFlow and runs only in stage
processes, and in the short `python -m tasks.pretrained inspect` process that
reads a saved base's input signature for the spec checks.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tasks.adapters import parse_adapter
from tasks.bases import InputRequirement, digest_base
from tasks.blocks import configure_determinism, keras, tf
from tasks.dataset import SPLITS
from tasks.errors import StageFailed
from tasks.features import FeatureTable, read_feature_file
from tasks.jobs import StageJob
from tasks.store import Store
from tasks.stage_input import open_stage_inputs
from tasks.training import _extract_features, stage_manifest

__all__ = [
    "adapted_input",
    "build_pretrained_model",
    "build_pretrained_stage",
    "inspect_saved_base",
    "load_base",
    "probe_features",
]

EventSink = Callable[[dict[str, Any]], None]
PROBE_RIDGE_ALPHA = 1.0


def load_base(base: dict[str, Any], path: Path, name: str) -> keras.layers.Layer:
    """Load a stage's base from its local file, frozen; raise StageFailed naming the file.

    `base` is the normalized base entry of the stage (see `tasks.bases.pretrained_normalized`).
    """
    try:
        if base["kind"] == "architecture":
            arguments = dict(base["arguments"])
            if "input_shape" in arguments:
                arguments["input_shape"] = tuple(arguments["input_shape"])
            model = getattr(keras.applications, base["architecture"])(weights=None, **arguments)
            model.load_weights(str(path))
        elif base["kind"] == "keras":
            model = keras.saving.load_model(str(path), compile=False)
        else:
            model = keras.layers.TFSMLayer(
                str(path), call_endpoint=base["endpoint"], trainable=False, name=f"{name}_base"
            )
    except (ValueError, OSError, KeyError, TypeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StageFailed(
            f"stage '{name}': cannot load the base from '{path}': {first_line}; check that the "
            "file matches the architecture and arguments in the spec"
        ) from None
    # A non-trainable BatchNormalization layer uses its moving statistics in Keras 3.
    model.trainable = False
    return model


def _apply_adapter(entry: dict[str, Any], index: int, tensor):
    adapter = parse_adapter(entry)
    name = f"adapter_{index}_{adapter.adapter}"
    if adapter.adapter == "reshape":
        return keras.layers.Reshape(adapter.target_shape, name=name)(tensor)
    if adapter.adapter == "resize":
        height, width = adapter.size
        return keras.layers.Resizing(height, width, interpolation=adapter.interpolation, name=name)(tensor)
    if adapter.adapter == "repeat_channels":
        return keras.layers.Concatenate(axis=-1, name=name)([tensor] * adapter.channels)
    return keras.layers.Rescaling(adapter.scale, offset=adapter.offset, name=name)(tensor)


def adapted_input(name: str, input_shape: tuple[int, ...], adapters: list[dict[str, Any]]):
    """Return a Keras input of `input_shape` and the tensor the adapters make of it."""
    inputs = keras.Input(shape=input_shape, name=f"{name}_input")
    adapted = inputs
    for index, entry in enumerate(adapters):
        adapted = _apply_adapter(entry, index, adapted)
    return inputs, adapted


def build_pretrained_model(
    name: str, input_shape: tuple[int, ...], adapters: list[dict[str, Any]], base: keras.layers.Layer
) -> keras.Model:
    """Return the stage's model: the adapters, then the base in inference mode."""
    inputs, adapted = adapted_input(name, input_shape, adapters)
    outputs = base(adapted, training=False)
    if isinstance(outputs, dict):
        # A SavedModel signature returns a dict; the spec check allows only one output.
        outputs = next(iter(outputs.values()))
    model = keras.Model(inputs, outputs, name=name)
    model.trainable = False
    return model


def probe_features(train: FeatureTable, validation: FeatureTable) -> dict[str, Any]:
    """Fit a linear probe on the frozen train features; return its train and validation accuracy.

    The probe is a ridge classifier on standardized features: it has a closed-form
    solution, so it costs about a second even where an iterative logistic regression
    would take minutes to converge on nearly constant features.
    """
    from sklearn.linear_model import RidgeClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train_features = train.features.reshape(len(train), -1)
    validation_features = validation.features.reshape(len(validation), -1)
    probe = make_pipeline(StandardScaler(), RidgeClassifier(alpha=PROBE_RIDGE_ALPHA))
    probe.fit(train_features, train.labels)
    return {
        "probe": "ridge classifier on standardized features",
        "train_accuracy": float(probe.score(train_features, train.labels)),
        "validation_accuracy": float(probe.score(validation_features, validation.labels)),
    }


def _check_base_unchanged(job: StageJob, path: Path) -> None:
    expected = job.stage["base"]["sha256"]
    if digest_base(path) != expected:
        raise StageFailed(
            f"stage '{job.stage['name']}': the base '{path}' changed after this run computed the "
            "stage's fingerprint; run the stack again"
        )


def build_pretrained_stage(job: StageJob, emit: EventSink = lambda event: None) -> dict[str, Any]:
    """Export a pretrained stage, write its feature files and publish its artifact.

    Returns the artifact's manifest, like `tasks.training.train_stage`.
    """
    started = time.time()
    stage = job.stage
    path = Path(job.extra["base_path"])
    # Nothing here draws random numbers; deterministic kernels keep the features reproducible.
    configure_determinism(0)
    _check_base_unchanged(job, path)
    inputs = open_stage_inputs(job.parents, SPLITS)
    emit({"event": "start", "stage": stage["name"], "epochs": 0})

    base = load_base(stage["base"], path, stage["name"])
    model = build_pretrained_model(
        stage["name"], inputs["train"].shape, stage["adapters"], base
    )

    store = Store(job.store_root)
    target = store.stage_dir(stage["name"], job.fingerprint)
    with store.staging(f"stage-{stage['name']}") as staged:
        model.export(str(staged / "model"), format="tf_saved_model", verbose=False)
        features = _extract_features(staged / "model", job, inputs, staged / "features")
        metrics = probe_features(
            read_feature_file(staged / features["train"]["file"]),
            read_feature_file(staged / features["validation"]["file"]),
        )
        manifest = stage_manifest(job, staged, features, metrics, started)
        manifest["base"] = {"path": str(path), "sha256": stage["base"]["sha256"]}
        return store.publish(staged, target, manifest)


def inspect_saved_base(path: str, endpoint: str | None, shape: tuple[int, ...]) -> dict[str, Any]:
    """Return a `.keras` or SavedModel base's input shape, and its output shape for `shape`.

    The output shape is None when `shape` does not fit the input. A base that cannot
    be loaded, or that has several inputs or outputs, gives an `error` message instead.
    """
    try:
        if endpoint is None:
            model = keras.saving.load_model(path, compile=False)
            input_specs, call = list(model.inputs), model
        else:
            layer = keras.layers.TFSMLayer(path, call_endpoint=endpoint, trainable=False)
            function = layer.call_endpoint_fn
            concrete = function.concrete_functions[0] if hasattr(function, "concrete_functions") else function
            input_specs, call = tf.nest.flatten(concrete.structured_input_signature), layer
    except (ValueError, OSError, KeyError, TypeError) as exc:
        message = " ".join(str(exc).split())
        return {"error": f"cannot load the base '{path}': {message}"}
    if len(input_specs) != 1:
        return {"error": f"the base '{path}' takes {len(input_specs)} inputs; a base must take one"}
    input_shape = [None if size is None else int(size) for size in list(input_specs[0].shape)[1:]]

    output_shape = None
    if InputRequirement(tuple(input_shape)).fits(tuple(shape)):
        outputs = tf.nest.flatten(call(np.zeros((1, *shape), np.float32), training=False))
        if len(outputs) != 1:
            return {"error": f"the base '{path}' returns {len(outputs)} outputs; a base must return one"}
        output_shape = [int(size) for size in outputs[0].shape[1:]]
    return {"input_shape": input_shape, "output_shape": output_shape}


def _main(arguments: list[str]) -> int:
    if len(arguments) != 2 or arguments[0] != "inspect":
        print("usage: python -m tasks.pretrained inspect REQUEST_JSON", file=sys.stderr)
        return 2
    request = json.loads(arguments[1])
    result = inspect_saved_base(request["path"], request["endpoint"], tuple(request["shape"]))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
