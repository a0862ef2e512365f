"""Stage training: read the parents' feature files, train the block, export it frozen.

`train_stage` is a plain function: tests call it directly, and the Prefect stage
task runs it in a child process (see `tasks.stage_process`) so that TensorFlow's
memory and global state stay inside that process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tasks.blocks import (
    build_block,
    classifier,
    configure_determinism,
    keras,
    load_frozen_stage,
    make_optimizer,
    predict_in_batches,
)
from tasks.dataset import SPLITS
from tasks.errors import StageFailed
from tasks.features import FeatureFileWriter, FeatureTable, read_feature_file
from tasks.fingerprint import digest_file, digest_json, library_versions
from tasks.jobs import ParentRef, StageJob
from tasks.store import Store

__all__ = ["load_stage_inputs", "train_stage"]

EventSink = Callable[[dict[str, Any]], None]


def load_stage_inputs(parents: list[ParentRef], split: str) -> FeatureTable:
    """Read a stage's input for one split: one parent's features, or several concatenated.

    Several parents are flattened per example and concatenated in the listed order;
    their row ids must agree.
    """
    tables = [read_feature_file(Path(ref.folder) / ref.feature_files[split]) for ref in parents]
    if len(tables) == 1:
        return tables[0]
    for ref, table in zip(parents[1:], tables[1:]):
        if not np.array_equal(table.row_ids, tables[0].row_ids):
            raise StageFailed(
                f"parent '{ref.name}' feature file for split '{split}' has rows in another order "
                f"than parent '{parents[0].name}'; rebuild both with `stackwise run --retrain`"
            )
    features = np.concatenate([table.features.reshape(len(table), -1) for table in tables], axis=1)
    return FeatureTable(features, tables[0].labels, tables[0].row_ids)


class _EpochReporter(keras.callbacks.Callback):
    """Report every epoch's logs to the event sink, and stop on a NaN or infinite loss."""

    def __init__(self, stage: str, epochs: int, learning_rate: float, emit: EventSink) -> None:
        super().__init__()
        self.stage, self.epochs, self.learning_rate, self.emit = stage, epochs, learning_rate, emit
        self.epoch = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.epoch = epoch + 1

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise StageFailed(
                f"stage '{self.stage}': training diverged, the loss became {float(loss)} in "
                f"epoch {self.epoch} (batch {batch + 1}); lower the learning rate (now "
                f"{self.learning_rate}) or add BatchNormalization, then run again"
            )

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        values = {key: float(value) for key, value in (logs or {}).items()}
        self.emit({"event": "epoch", "epoch": epoch + 1, "epochs": self.epochs, "logs": values})


def _fit(job: StageJob, model: keras.Model, inputs: dict[str, FeatureTable], emit: EventSink) -> dict:
    training = job.stage["training"]
    model.compile(
        optimizer=make_optimizer(training["optimizer"], training["learning_rate"]),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    callbacks: list[keras.callbacks.Callback] = [
        _EpochReporter(job.stage["name"], training["epochs"], training["learning_rate"], emit)
    ]
    if training["early_stopping"]:
        callbacks.append(keras.callbacks.EarlyStopping(**training["early_stopping"]))
    history = model.fit(
        inputs["train"].features,
        inputs["train"].labels,
        validation_data=(inputs["validation"].features, inputs["validation"].labels),
        epochs=training["epochs"],
        batch_size=training["batch_size"],
        shuffle=True,
        callbacks=callbacks,
        verbose=0,
    )
    loss, accuracy = model.evaluate(
        inputs["validation"].features, inputs["validation"].labels, verbose=0,
        batch_size=training["batch_size"],
    )
    return {
        "history": {key: [float(v) for v in values] for key, values in history.history.items()},
        "epochs_run": len(history.history.get("loss", [])),
        "validation_loss": float(loss),
        "validation_accuracy": float(accuracy),
    }


def _extract_features(
    model_dir: Path, job: StageJob, inputs: dict[str, FeatureTable], features_dir: Path
) -> dict[str, dict[str, Any]]:
    """Run the exported SavedModel, loaded back from disk, over every split."""
    frozen = load_frozen_stage(model_dir, job.stage["name"])
    features_dir.mkdir()
    written = {}
    for split, table in inputs.items():
        path = features_dir / f"{split}.parquet"
        metadata = {"stage": job.stage["name"], "fingerprint": job.fingerprint, "split": split}
        writer = None
        for start, outputs in zip(range(0, len(table), 1024), predict_in_batches(frozen, table.features)):
            if writer is None:
                writer = FeatureFileWriter(path, outputs.shape[1:], metadata)
            stop = start + len(outputs)
            writer.write(outputs, table.labels[start:stop], table.row_ids[start:stop])
        writer.close()
        written[split] = {"file": f"features/{split}.parquet", "rows": writer.rows_written,
                          "shape": list(writer.shape)}
    return written


def _weights_digest(model_dir: Path) -> str:
    # The checkpoint files under variables/ hold exactly the weights, in a byte
    # layout that is the same for the same values, unlike saved_model.pb.
    files = sorted((model_dir / "variables").iterdir())

    return digest_json({path.name: digest_file(path) for path in files})


def train_stage(job: StageJob, emit: EventSink = lambda event: None) -> dict[str, Any]:
    """Train one stage and publish its artifact; return the artifact's manifest.

    A supervised stage trains its block under a temporary softmax head that is
    dropped before export. A head stage keeps its softmax layer: its outputs are
    the class probabilities. The exported SavedModel is loaded back from disk to
    write the stage's feature files, so children read exactly what the frozen
    stage computes.
    """
    started = time.time()
    store = Store(job.store_root)
    stage = job.stage
    configure_determinism(stage["training"]["seed"])
    inputs = {split: load_stage_inputs(job.parents, split) for split in SPLITS}
    n_classes = len(job.dataset["classes"])

    block = build_block(stage["name"], inputs["train"].features.shape[1:], stage["layers"],
                        train_inputs=inputs["train"].features)
    trained = classifier(block, n_classes, name=f"{stage['name']}_classifier")
    emit({"event": "start", "stage": stage["name"], "epochs": stage["training"]["epochs"]})
    metrics = _fit(job, trained, inputs, emit)
    frozen = trained if stage["objective"] == "head" else block
    frozen.trainable = False

    target = store.stage_dir(stage["name"], job.fingerprint)
    with store.staging(f"stage-{stage['name']}") as staged:
        frozen.export(str(staged / "model"), format="tf_saved_model", verbose=False)
        features = _extract_features(staged / "model", job, inputs, staged / "features")

        weights_digest = _weights_digest(staged / "model")
        feature_digests = {split: digest_file(staged / entry["file"]) for split, entry in features.items()}
        manifest = {
            "kind": "stage",
            "stack": job.stack,
            "stage": stage["name"],
            "objective": stage["objective"],
            "fingerprint": job.fingerprint,
            "fingerprint_inputs": job.fingerprint_inputs,
            "parents": [parent.name for parent in job.parents],
            "weights_digest": weights_digest,
            "artifact_digest": digest_json({"weights": weights_digest, "features": feature_digests}),
            "feature_files": {split: entry["file"] for split, entry in features.items()},
            "feature_shape": features["train"]["shape"],
            "rows": {split: entry["rows"] for split, entry in features.items()},
            "dtype": "float32",
            "metrics": metrics,
            "seconds": round(time.time() - started, 3),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "libraries": library_versions(),
        }
        return store.publish(staged, target, manifest, replace=job.force)
