"""Pretrain the base of a pretrained example stack and save it where the spec expects it.

The examples pretrain their base from random weights on the digits 0 to 4 of the
stack's own train split, seen through the stage's adapters, and then use the frozen
base for all ten digits. The stack's validation and test rows never reach this
script, and digits 5 to 9 are new to the base.

- `digits_convnet.yaml` names a `.keras` file: the script builds a small conv net
  (three convolutions with BatchNormalization, global average pooling, 64 features)
  for the images the adapters make, and saves the whole model.
- `digits_mobilenet.yaml` names a keras.applications architecture and a weights
  file: the script builds that architecture with the spec's arguments and saves its
  weights.

    python stacks/pretrained/make_base.py SPEC [--epochs N]

`--epochs 0` saves the random initial weights, as a baseline without pretraining.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tasks.dataset import read_split, snapshot_dataset
from tasks.spec import load_spec
from tasks.store import Store

DEFAULT_SPEC = Path(__file__).resolve().parent / "digits_convnet.yaml"
# keras.applications sets BatchNormalization momentum to 0.999 and Keras defaults to
# 0.99, which suit long runs. After the few hundred steps here the moving statistics
# would still be close to their initial values, and the frozen base runs on them.
PRETRAINING_MOMENTUM = 0.9
HELD_OUT = 0.15


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spec", nargs="?", default=str(DEFAULT_SPEC),
                        help="stack spec whose pretrained stage names the base file "
                             "(default: digits_convnet.yaml)")
    parser.add_argument("--epochs", type=int, default=30, help="pretraining epochs (default 30)")
    parser.add_argument("--classes", type=int, default=5,
                        help="pretrain on the digits below this value (default 5: digits 0-4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return parser


def _pretraining_rows(spec, classes: int) -> tuple[np.ndarray, np.ndarray]:
    # The stack's own snapshot code splits the data, so these are exactly its train rows.
    with tempfile.TemporaryDirectory() as folder:
        train = read_split(snapshot_dataset(spec, Store(folder)), "train")
    keep = train.labels < classes
    return train.features[keep], train.labels[keep]


def _conv_net(keras, input_shape: tuple[int, ...]):
    """Return a small conv net that maps an image to 64 pooled features."""
    inputs = keras.Input(shape=input_shape, name="image")
    outputs = inputs
    for index, filters in enumerate((32, 64, 64)):
        outputs = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv_{index}")(outputs)
        outputs = keras.layers.BatchNormalization(name=f"bn_{index}")(outputs)
        outputs = keras.layers.ReLU(name=f"relu_{index}")(outputs)
        if index < 2:
            outputs = keras.layers.MaxPooling2D(2, name=f"pool_{index}")(outputs)
    outputs = keras.layers.GlobalAveragePooling2D(name="features")(outputs)
    return keras.Model(inputs, outputs, name="digits04_convnet")


def _make_base(keras, base_spec, input_shape: tuple[int, ...]):
    if base_spec.architecture:
        return getattr(keras.applications, base_spec.architecture)(weights=None, **base_spec.arguments())
    return _conv_net(keras, input_shape)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    spec = load_spec(args.spec)
    stage = next(stage for stage in spec.stages if stage.objective == "pretrained")
    features, labels = _pretraining_rows(spec, args.classes)

    from tasks.blocks import configure_determinism, keras
    from tasks.pretrained import adapted_input

    configure_determinism(args.seed)
    inputs, adapted = adapted_input("pretraining", features.shape[1:],
                                    [adapter.model_dump() for adapter in stage.adapters])
    base = _make_base(keras, stage.base, tuple(adapted.shape[1:]))
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = PRETRAINING_MOMENTUM
    outputs = base(adapted)
    if len(outputs.shape) > 2:
        outputs = keras.layers.Flatten()(outputs)
    outputs = keras.layers.Dense(args.classes, activation="softmax")(outputs)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])

    order = np.random.default_rng(args.seed).permutation(len(labels))
    split = int(HELD_OUT * len(order))
    held_out, training_rows = order[:split], order[split:]
    started = time.time()
    if args.epochs:
        model.fit(features[training_rows], labels[training_rows], epochs=args.epochs, batch_size=32, verbose=0,
                  validation_data=(features[held_out], labels[held_out]))
    _, accuracy = model.evaluate(features[held_out], labels[held_out], verbose=0)

    target = stage.base.file()
    target.parent.mkdir(parents=True, exist_ok=True)
    if stage.base.architecture:
        base.save_weights(str(target))
    else:
        base.save(str(target))
    print(
        f"{base.name}: pretrained for {args.epochs} epochs on {len(training_rows)} train-split images of "
        f"digits 0-{args.classes - 1} in {time.time() - started:.0f} s; accuracy on "
        f"{len(held_out)} held-out images of those digits: {accuracy:.4f}; wrote {target}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
