"""Keras model building: layers from spec entries, stage blocks, heads and frozen stages.

This is the only module besides training and assembly that imports TensorFlow, and
it is imported only in processes that train, extract features or assemble.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tasks.layers import LayerSpec, parse_layer  # noqa: E402

__all__ = [
    "SAVED_MODEL_ENDPOINT",
    "AutoencoderParts",
    "build_autoencoder",
    "merge_tensors",
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


def _keras_layer(spec: LayerSpec, index: int, prefix: str) -> keras.layers.Layer:
    arguments = spec.keras_arguments()
    name = f"{prefix}_{spec.layer.lower()}_{index}"
    if spec.layer == "Activation":
        return keras.layers.Activation(arguments["activation"], name=name)
    return getattr(keras.layers, spec.layer)(name=name, **arguments)


TrainInputs = np.ndarray | tf.data.Dataset | None


def _apply_layers(
    specs: list[LayerSpec], tensor, model_input, train_inputs: TrainInputs, prefix: str, first: int = 0
):
    """Apply layer entries to `tensor`, adapting each Normalization layer to the data reaching it.

    `train_inputs` is the model input's training data: an array, or a dataset of
    batches that is read batch by batch.
    """
    for index, spec in enumerate(specs, start=first):
        layer = _keras_layer(spec, index, prefix)
        if spec.layer == "Normalization":
            if isinstance(train_inputs, np.ndarray):
                train_inputs = tf.data.Dataset.from_tensor_slices(train_inputs).batch(PREDICT_BATCH)
            reaching = keras.Model(model_input, tensor)
            layer.adapt(train_inputs.map(lambda batch: reaching(batch, training=False)))
        tensor = layer(tensor)
    return tensor


def build_block(
    name: str,
    input_shape: tuple[int, ...],
    layers: list[dict[str, Any] | LayerSpec],
    train_inputs: TrainInputs = None,
) -> keras.Model:
    """Build a stage's block as a functional model from its layer entries.

    Normalization layers are adapted to `train_inputs` as they arrive at that layer,
    so the statistics live inside the block and travel with its SavedModel.
    """
    inputs = keras.Input(shape=input_shape, name=f"{name}_input")
    outputs = _apply_layers([parse_layer(entry) for entry in layers], inputs, inputs, train_inputs, name)
    return keras.Model(inputs, outputs, name=name)


@dataclass
class AutoencoderParts:
    """The models of one autoencoder stage; they share their layers."""

    encoder: keras.Model  # input to code; the frozen trunk
    decoder: keras.Model  # code to reconstruction
    target: keras.Model  # input to what is reconstructed: the input after its preprocessing layers
    autoencoder: keras.Model  # input to reconstruction; the model that trains


def build_autoencoder(
    name: str,
    input_shape: tuple[int, ...],
    layers: list[dict[str, Any] | LayerSpec],
    decoder_layers: list[dict[str, Any] | LayerSpec],
    noise: float,
    train_inputs: TrainInputs,
) -> AutoencoderParts:
    """Build an autoencoder whose encoder is the stage's layers and whose decoder mirrors nothing.

    The decoder is `decoder_layers` followed by a linear Dense layer (and a Reshape)
    that produces the target's shape. Gaussian noise with stddev `noise` sits between
    the preprocessing layers and the rest of the encoder; Keras applies it only while
    training, so the exported encoder is deterministic.
    """
    specs = [parse_layer(entry) for entry in layers]
    preprocessing = 0
    while preprocessing < len(specs) and specs[preprocessing].is_preprocessing:
        preprocessing += 1

    inputs = keras.Input(shape=input_shape, name=f"{name}_input")
    target = _apply_layers(specs[:preprocessing], inputs, inputs, train_inputs, name)
    if preprocessing == 0:
        target = keras.layers.Identity(name=f"{name}_identity")(inputs)
    target_model = keras.Model(inputs, target, name=f"{name}_target")
    code = keras.layers.GaussianNoise(noise, name=f"{name}_noise")(target) if noise else target
    code = _apply_layers(specs[preprocessing:], code, inputs, train_inputs, name, first=preprocessing)
    encoder = keras.Model(inputs, code, name=name)

    decoder_input = keras.Input(shape=tuple(code.shape[1:]), name=f"{name}_code")
    decoded = _apply_layers([parse_layer(entry) for entry in decoder_layers], decoder_input,
                            decoder_input, None, f"{name}_decoder")
    if len(decoded.shape) > 2:
        decoded = keras.layers.Flatten(name=f"{name}_decoder_flatten")(decoded)
    target_shape = tuple(target.shape[1:])
    decoded = keras.layers.Dense(math.prod(target_shape), name=f"{name}_decoder_output")(decoded)
    if len(target_shape) > 1:
        decoded = keras.layers.Reshape(target_shape, name=f"{name}_decoder_reshape")(decoded)
    decoder = keras.Model(decoder_input, decoded, name=f"{name}_decoder")

    autoencoder = keras.Model(inputs, decoder(encoder(inputs)), name=f"{name}_autoencoder")
    return AutoencoderParts(encoder, decoder, target_model, autoencoder)


MERGE_LAYERS = {
    "add": keras.layers.Add,
    "average": keras.layers.Average,
    "maximum": keras.layers.Maximum,
    "multiply": keras.layers.Multiply,
}


def merge_tensors(tensors: list, merge: str, name: str):
    """Combine parents' outputs in a Keras graph exactly as `stage_input.merge_features` does."""
    if merge == "concat":
        flat = [keras.layers.Flatten(name=f"{name}_flatten_{i}")(t) for i, t in enumerate(tensors)]
        return keras.layers.Concatenate(name=f"{name}_merge")(flat)
    return MERGE_LAYERS[merge](name=f"{name}_merge")(tensors)


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
