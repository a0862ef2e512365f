"""Stage training: read the parents' feature files, train the block, export it frozen.

`train_stage` is a plain function: tests call it directly, and the Prefect stage
task runs it in a child process (see `tasks.stage_process`) so that TensorFlow's
memory and global state stay inside that process.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from tasks.blocks import (
    PREDICT_BATCH,
    build_autoencoder,
    build_block,
    classifier,
    configure_determinism,
    keras,
    load_frozen_stage,
    make_optimizer,
    predict_in_batches,
    tf,
)
from tasks.dataset import SPLITS
from tasks.errors import StageFailed
from tasks.features import FeatureFileWriter
from tasks.fingerprint import digest_json, library_versions
from tasks.jobs import StageJob
from tasks.stage_input import StageInput, open_stage_inputs
from tasks.store import Store, checksum_files

__all__ = ["batches", "stage_manifest", "train_stage", "weights_digest"]

EventSink = Callable[[dict[str, Any]], None]


def batches(
    source: StageInput,
    batch_size: int,
    seed: int | None = None,
    classes: list[int] | None = None,
) -> tf.data.Dataset:
    """Return a dataset of (features, labels) batches read window by window from `source`.

    With `seed`, every pass over the dataset (every epoch) visits the rows in a new
    order drawn from (seed, pass number). Batches do not cross windows, so they are
    the same whether `source` is in memory or streamed.
    """
    passes = itertools.count()

    def windows():
        rng = None if seed is None else np.random.default_rng([seed, next(passes)])
        for table in source.windows(rng, classes):
            yield table.features, table.labels

    signature = (tf.TensorSpec((None, *source.shape), tf.float32), tf.TensorSpec((None,), tf.int64))
    dataset = tf.data.Dataset.from_generator(windows, output_signature=signature)
    dataset = dataset.flat_map(lambda x, y: tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size))
    # A known length lets Keras end every epoch without probing for the end of the data.
    dataset = dataset.apply(tf.data.experimental.assert_cardinality(source.count_batches(batch_size, classes)))
    return dataset.prefetch(2)


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


def _fit(
    job: StageJob,
    model: keras.Model,
    data: dict[str, tf.data.Dataset],
    emit: EventSink,
    loss: str = "sparse_categorical_crossentropy",
) -> dict:
    """Train `model` on the batches data["train"], validating on data["validation"]."""
    training = job.stage["training"]
    classifying = loss == "sparse_categorical_crossentropy"
    model.compile(
        optimizer=make_optimizer(training["optimizer"], training["learning_rate"]),
        loss=loss,
        metrics=["accuracy"] if classifying else [],
    )
    callbacks: list[keras.callbacks.Callback] = [
        _EpochReporter(job.stage["name"], training["epochs"], training["learning_rate"], emit)
    ]
    if training["early_stopping"]:
        callbacks.append(keras.callbacks.EarlyStopping(**training["early_stopping"]))
    started = time.perf_counter()
    history = model.fit(
        data["train"], validation_data=data["validation"], epochs=training["epochs"],
        shuffle=False, callbacks=callbacks, verbose=0,
    )
    train_seconds = time.perf_counter() - started
    evaluated = model.evaluate(data["validation"], verbose=0, return_dict=True)
    return {
        "train_seconds": round(train_seconds, 3),
        "history": {key: [float(v) for v in values] for key, values in history.history.items()},
        "epochs_run": len(history.history.get("loss", [])),
        "validation_loss": float(evaluated["loss"]),
        "validation_accuracy": float(evaluated["accuracy"]) if classifying else None,
    }


def _extract_features(
    model_dir: Path, job: StageJob, inputs: dict[str, StageInput], features_dir: Path
) -> dict[str, dict[str, Any]]:
    """Run the exported SavedModel, loaded back from disk, over every split, window by window."""
    frozen = load_frozen_stage(model_dir, job.stage["name"])
    features_dir.mkdir()
    written = {}
    for split, source in inputs.items():
        path = features_dir / f"{split}.parquet"
        metadata = {"stage": job.stage["name"], "fingerprint": job.fingerprint, "split": split}
        writer = None
        for table in source.windows():
            for start, outputs in zip(range(0, len(table), PREDICT_BATCH),
                                      predict_in_batches(frozen, table.features)):
                if writer is None:
                    writer = FeatureFileWriter(path, outputs.shape[1:], metadata)
                stop = start + len(outputs)
                writer.write(outputs, table.labels[start:stop], table.row_ids[start:stop])
        writer.close()
        written[split] = {"file": f"features/{split}.parquet", "rows": writer.rows_written,
                          "shape": list(writer.shape)}
    return written


def weights_digest(folder: Path, saved_models: list[str]) -> str:
    """Return a digest of the weight values of the SavedModels `saved_models` under `folder`.

    It covers every variable's dtype, shape and bytes, in sorted order. The
    checkpoint files themselves are not hashed: two exports of the same weights can
    list the variables in a different order.
    """
    digests = {}
    for name in saved_models:
        prefix = folder / name / "variables" / "variables"
        values = []
        if prefix.with_suffix(".index").is_file():
            reader = tf.train.load_checkpoint(str(prefix))
            for key in reader.get_variable_to_shape_map():
                # The object graph records where each variable sits, not its value.
                if key != "_CHECKPOINTABLE_OBJECT_GRAPH":
                    values.append(_value_digest(reader.get_tensor(key)))
        digests[name] = sorted(values)
    return digest_json(digests)


def _value_digest(value) -> str:
    array = np.asarray(value)
    digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    if array.dtype.kind == "O":
        # String tensors come back as arrays of bytes objects.
        digest.update(b"\0".join(item if isinstance(item, bytes) else str(item).encode()
                                   for item in array.ravel()))
    else:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _train_classifier(job: StageJob, inputs: dict[str, StageInput], emit: EventSink):
    """Train a supervised or head stage; return the model to freeze, extra models, metrics.

    A supervised stage trains its block under a temporary softmax head that is
    dropped before export. A head stage keeps its softmax layer: its outputs are
    the class probabilities.
    """
    stage, training = job.stage, job.stage["training"]
    block = build_block(stage["name"], inputs["train"].shape, stage["layers"],
                        train_inputs=_unlabelled(batches(inputs["train"], PREDICT_BATCH)))
    trained = classifier(block, len(job.dataset["classes"]), name=f"{stage['name']}_classifier")
    data = {
        "train": batches(inputs["train"], training["batch_size"], seed=training["seed"]),
        "validation": batches(inputs["validation"], training["batch_size"]),
    }
    metrics = _fit(job, trained, data, emit)
    return (trained if stage["objective"] == "head" else block), {}, metrics


def _train_autoencoder(job: StageJob, inputs: dict[str, StageInput], emit: EventSink):
    """Train an autoencoder stage; return the encoder to freeze, its decoder and target model, metrics.

    The reconstruction target is the stage's input after its leading Rescaling or
    Normalization layers. With `noise` > 0, Gaussian noise is added to that input
    while training only (a denoising autoencoder).
    """
    stage, training = job.stage, job.stage["training"]
    classes = stage.get("train_classes")
    parts = build_autoencoder(
        stage["name"], inputs["train"].shape, stage["layers"], stage["decoder"], stage["noise"],
        train_inputs=_unlabelled(batches(inputs["train"], PREDICT_BATCH, classes=classes)),
    )

    def with_targets(dataset: tf.data.Dataset) -> tf.data.Dataset:
        return dataset.map(lambda x, y: (x, parts.target(x, training=False)))

    data = {
        "train": with_targets(batches(inputs["train"], training["batch_size"], training["seed"], classes)),
        "validation": with_targets(batches(inputs["validation"], training["batch_size"], classes=classes)),
    }
    metrics = _fit(job, parts.autoencoder, data, emit, loss="mean_squared_error")
    metrics["trained_rows"] = inputs["train"].count_rows(classes)
    return parts.encoder, {"decoder": parts.decoder, "target": parts.target}, metrics


def _unlabelled(dataset: tf.data.Dataset) -> tf.data.Dataset:
    return dataset.map(lambda x, y: x)


TRAINERS = {
    "supervised": _train_classifier,
    "head": _train_classifier,
    "autoencoder": _train_autoencoder,
}


def train_stage(job: StageJob, emit: EventSink = lambda event: None) -> dict[str, Any]:
    """Train one stage and publish its artifact; return the artifact's manifest.

    The trunk is exported as the SavedModel `model/` (and saved as `model.keras` for
    fine-tuning). The exported SavedModel is loaded back from disk to write the
    stage's feature files, so children read exactly what the frozen stage computes.
    """
    if job.stage["objective"] == "pretrained":
        from tasks.pretrained import build_pretrained_stage

        return build_pretrained_stage(job, emit)
    started = time.time()
    store = Store(job.store_root)
    stage = job.stage
    configure_determinism(stage["training"]["seed"])
    inputs = open_stage_inputs(job.parents, SPLITS, stage["merge"])

    emit({"event": "start", "stage": stage["name"], "epochs": stage["training"]["epochs"]})
    frozen, extra_models, metrics = TRAINERS[stage["objective"]](job, inputs, emit)
    metrics["input"] = "stream" if inputs["train"].stream else "memory"
    for model in (frozen, *extra_models.values()):
        model.trainable = False

    target = store.stage_dir(stage["name"], job.fingerprint)
    with store.staging(f"stage-{stage['name']}") as staged:
        frozen.export(str(staged / "model"), format="tf_saved_model", verbose=False)
        frozen.save(staged / "model.keras")
        for name, model in extra_models.items():
            model.export(str(staged / name), format="tf_saved_model", verbose=False)
        features = _extract_features(staged / "model", job, inputs, staged / "features")
        metrics["peak_rss_mb"] = peak_rss_mb()
        manifest = stage_manifest(job, staged, features, metrics, started, ["model", *extra_models])
        return store.publish(staged, target, manifest, replace=job.force)


def peak_rss_mb() -> float:
    """Return this process's peak resident memory so far, in megabytes (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def stage_manifest(
    job: StageJob,
    staged: Path,
    features: dict[str, dict[str, Any]],
    metrics: dict,
    started: float,
    saved_models: list[str] = ("model",),
) -> dict[str, Any]:
    """Return the manifest of a stage artifact staged in `staged`, with its digests.

    Each file is hashed once: the feature digests come from the manifest's `files`
    entries, which `Store.publish` reuses instead of hashing the files again. The
    weights digest reads the checkpoint's values (see `weights_digest`).
    """
    files = checksum_files(staged)
    weights = weights_digest(staged, list(saved_models))
    feature_digests = {split: files[entry["file"]]["sha256"] for split, entry in features.items()}
    return {
        "kind": "stage",
        "stack": job.stack,
        "stage": job.stage["name"],
        "objective": job.stage["objective"],
        "fingerprint": job.fingerprint,
        "fingerprint_inputs": job.fingerprint_inputs,
        "parents": [parent.name for parent in job.parents],
        "weights_digest": weights,
        "artifact_digest": digest_json({"weights": weights, "features": feature_digests}),
        "saved_models": list(saved_models),
        "feature_files": {split: entry["file"] for split, entry in features.items()},
        "feature_shape": features["train"]["shape"],
        "rows": {split: entry["rows"] for split, entry in features.items()},
        "dtype": "float32",
        "metrics": metrics,
        "seconds": round(time.time() - started, 3),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "libraries": library_versions(),
        "files": files,
    }
