"""The edit loop without stackwise: one Keras script that trains every stage of a stack.

Run as `python benchmarks/plain_keras.py SPEC`. It reads the spec's Parquet data file,
splits it, and trains the stages in the listed order. Each stage has the same layers,
epochs, batch size and learning rate as in stackwise. A hidden stage trains under a
temporary softmax head, and the next stage trains on the hidden stage's outputs.
Every run trains every stage, as a script without a cache does after each edit. It
prints one JSON object with the head's validation accuracy.

`benchmarks/plain_prefect.py` reuses `train_plain_stage` and `train_chain`. Only
chains of single-parent stages are supported, which is what the benchmark's stacks are.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def load_splits(spec: dict, spec_dir: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Read the spec's data file and split it into train, validation and test (features, labels)."""
    from sklearn.model_selection import train_test_split

    data = spec["data"]
    table = pq.read_table(spec_dir / data["source"], columns=[*data["features"], data["label"]])
    features = np.stack([table.column(name).to_numpy() for name in data["features"]], axis=1)
    features = features.astype(np.float32)
    labels = table.column(data["label"]).to_numpy().astype(np.int64)
    split = data["split"]
    rest, test = train_test_split(np.arange(len(labels)), test_size=split["test"],
                                  random_state=split["seed"], stratify=labels)
    train, validation = train_test_split(rest, test_size=split["validation"] / (1 - split["test"]),
                                         random_state=split["seed"], stratify=labels[rest])
    return {name: (features[rows], labels[rows]) for name, rows in
            (("train", train), ("validation", validation), ("test", test))}


def train_plain_stage(
    stage: dict, defaults: dict, splits: dict[str, tuple[np.ndarray, np.ndarray]], classes: int
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], float]:
    """Train one stage; return its outputs for every split and its validation accuracy.

    A hidden stage's outputs are its block's activations; a head's are class probabilities.
    """
    import keras

    settings = {**defaults, **{key: value for key, value in stage.items() if key in defaults}}
    keras.utils.set_random_seed(settings["seed"])
    inputs = keras.Input(shape=splits["train"][0].shape[1:])
    tensor = inputs
    for layer in stage.get("layers", []):
        arguments = {key: value for key, value in layer.items() if key != "layer"}
        tensor = getattr(keras.layers, layer["layer"])(**arguments)(tensor)
    block = keras.Model(inputs, tensor)
    probabilities = keras.layers.Dense(classes, activation="softmax")(tensor)
    model = keras.Model(inputs, probabilities)
    model.compile(optimizer=keras.optimizers.Adam(settings["learning_rate"]),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(*splits["train"], validation_data=splits["validation"], epochs=settings["epochs"],
              batch_size=settings["batch_size"], shuffle=True, verbose=0)
    accuracy = model.evaluate(*splits["validation"], batch_size=settings["batch_size"], verbose=0,
                              return_dict=True)["accuracy"]
    output_model = model if stage.get("objective") == "head" else block
    outputs = {name: (output_model.predict(x, batch_size=1024, verbose=0), y)
               for name, (x, y) in splits.items()}
    return outputs, float(accuracy)


def train_chain(spec_path: str, train_stage: Callable = train_plain_stage) -> float:
    """Train every stage of the spec in order with `train_stage`; return the last one's validation accuracy."""
    spec_file = Path(spec_path)
    spec = yaml.safe_load(spec_file.read_text())
    splits = load_splits(spec, spec_file.parent)
    classes = int(splits["train"][1].max()) + 1
    outputs: dict[str, dict] = {}
    accuracy = 0.0
    for stage in spec["stages"]:
        parents = stage.get("parents")
        stage_inputs = outputs[parents[0]] if parents else splits
        outputs[stage["name"]], accuracy = train_stage(stage, spec["defaults"], stage_inputs, classes)
    return accuracy


def main(spec_path: str) -> None:
    print(json.dumps({"validation_accuracy": train_chain(spec_path)}))


if __name__ == "__main__":
    main(sys.argv[1])
