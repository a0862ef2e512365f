"""Keras model building: layers from spec entries, stage blocks, heads and frozen stages.

This is the only module besides training and assembly that imports TensorFlow, and
it is imported only in processes that train, extract features or assemble.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tasks.layers import LayerSpec, parse_layer  # noqa: E402

__all__ = [
    "SAVED_MODEL_ENDPOINT",
    "build_block",
    "configure_determinism",
    "load_frozen_stage",
    "make_optimizer",
    "predict_in_batches",
]

SAVED_MODEL_ENDPOINT = "serve"
PREDICT_BATCH = 1024


def configure_determinism(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow and make TensorFlow's kernels deterministic.

    With this, training the same stage on the same data in a new process gives
    bit-identical weights on CPU, so a forced retrain keeps its children's fingerprints.
    """
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def _keras_layer(spec: LayerSpec, index: int) -> keras.layers.Layer:
    arguments = spec.keras_arguments()
    name = f"{spec.layer.lower()}_{index}"
    if spec.layer == "Activation":
        return keras.layers.Activation(arguments["activation"], name=name)
    return getattr(keras.layers, spec.layer)(name=name, **arguments)


def build_block(
    name: str,
    input_shape: tuple[int, ...],
    layers: list[dict[str, Any] | LayerSpec],
    train_inputs: np.ndarray | None = None,
) -> keras.Model:
    """Build a stage's block as a functional model from its layer entries.

    Normalization layers are adapted to `train_inputs` as they arrive at that layer,
    so the statistics live inside the block and travel with its SavedModel.
    """
    inputs = keras.Input(shape=input_shape, name=f"{name}_input")
    outputs = inputs
    for index, entry in enumerate(layers):
        spec = parse_layer(entry)
        layer = _keras_layer(spec, index)
        if spec.layer == "Normalization":
            prefix = keras.Model(inputs, outputs)
            adapted_on = prefix.predict(train_inputs, batch_size=PREDICT_BATCH, verbose=0)
            layer.adapt(adapted_on)
        outputs = layer(outputs)
    return keras.Model(inputs, outputs, name=name)


def make_optimizer(name: str, learning_rate: float) -> keras.optimizers.Optimizer:
    optimizers = {
        "adam": keras.optimizers.Adam,
        "adamw": keras.optimizers.AdamW,
        "sgd": keras.optimizers.SGD,
        "rmsprop": keras.optimizers.RMSprop,
    }
    return optimizers[name](learning_rate=learning_rate)


def classifier(block: keras.Model, n_classes: int, name: str) -> keras.Model:
    """Return `block` followed by a flattening step (if needed) and a softmax Dense layer."""
    outputs = block.output
    if len(outputs.shape) > 2:
        outputs = keras.layers.Flatten(name=f"{name}_flatten")(outputs)
    outputs = keras.layers.Dense(n_classes, activation="softmax", name=f"{name}_softmax")(outputs)
    return keras.Model(block.input, outputs, name=name)


def load_frozen_stage(folder: Path, name: str) -> keras.layers.Layer:
    """Load a stage's exported SavedModel from disk as a non-trainable Keras layer."""
    return keras.layers.TFSMLayer(
        str(folder), call_endpoint=SAVED_MODEL_ENDPOINT, trainable=False, name=name
    )


def predict_in_batches(layer: keras.layers.Layer, inputs: np.ndarray, batch: int = PREDICT_BATCH):
    """Yield `layer`'s float32 outputs for `inputs`, `batch` rows at a time."""
    for start in range(0, len(inputs), batch):
        outputs = layer(tf.constant(inputs[start:start + batch]))
        yield np.asarray(outputs, dtype=np.float32)
