"""Assembly: compose the frozen stages into one model, check it, evaluate it, export it.

The assembled model takes examples exactly as the dataset snapshot stores them. A
classification stack returns class probabilities; an anomaly stack returns each
example's reconstruction error. Before anything is published, the assembled
model's outputs on the evaluation split are compared with the stage-by-stage
path, which reads the stages' feature files. A difference above `MAX_DIFFERENCE`
fails the run. Optional end-to-end fine-tuning and an end-to-end baseline are evaluated on
the same split and reported beside the stage-wise result.
"""

from __future__ import annotations

import json
import time
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
    merge_tensors,
    predict_in_batches,
)
from tasks.errors import StageFailed
from tasks.evaluation import anomaly_metrics, classification_metrics, pca_baseline_scores
from tasks.features import FeatureTable, read_feature_file
from tasks.fingerprint import library_versions
from tasks.jobs import AssemblyJob
from tasks.reporting import write_training_curves
from tasks.store import Store
from tasks.stage_input import merge_features

__all__ = ["MAX_DIFFERENCE", "assemble_stack", "compose"]

MAX_DIFFERENCE = 1e-4
SPLIT_FILES = {"train": "train.parquet", "test": "test.parquet", "validation": "validation.parquet"}


def _split(job: AssemblyJob, split: str) -> FeatureTable:
    return read_feature_file(Path(job.dataset["folder"]) / SPLIT_FILES[split])


def _stage_features(stage: dict[str, Any], split: str) -> np.ndarray:
    return read_feature_file(Path(stage["folder"]) / "features" / f"{split}.parquet").features


def _predict(model_dir: Path, inputs: np.ndarray) -> np.ndarray:
    reloaded = load_frozen_stage(model_dir, "reloaded")
    return np.concatenate(list(predict_in_batches(reloaded, inputs)))


def _stage_input(stage: dict[str, Any], inputs, outputs: dict[str, Any]):
    if not stage["parents"]:
        return inputs
    if len(stage["parents"]) == 1:
        return outputs[stage["parents"][0]]
    return merge_tensors([outputs[parent] for parent in stage["parents"]], stage["merge"], stage["name"])


def compose(job: AssemblyJob, load_stage=None) -> keras.Model:
    """Build one Keras model from raw input to the head's output, following the DAG.

    `load_stage(stage)` returns the layer or model for one stage; by default its
    frozen SavedModel loaded from disk.
    """
    load_stage = load_stage or (lambda stage: load_frozen_stage(Path(stage["folder"]) / "model", stage["name"]))
    inputs = keras.Input(shape=tuple(job.dataset["shape"]), name="input")
    outputs: dict[str, Any] = {}
    for stage in job.stages:
        outputs[stage["name"]] = load_stage(stage)(_stage_input(stage, inputs, outputs))
    return keras.Model(inputs, outputs[job.head], name=job.stack)


def _check_against_stages(job: AssemblyJob, assembled: np.ndarray, staged: np.ndarray) -> float:
    difference = float(np.max(np.abs(assembled - staged))) if len(staged) else 0.0
    if not difference < MAX_DIFFERENCE:
        raise StageFailed(
            f"assembled model of stack '{job.stack}' differs from the stage-by-stage outputs by "
            f"{difference:.3g} (limit {MAX_DIFFERENCE}) on the {job.split} split; the stage "
            "artifacts may be inconsistent, rerun with `--retrain` on the first stage"
        )
    return difference


# Classification stacks.


def _assemble_classifier(job: AssemblyJob, staged: Path, emit) -> dict[str, Any]:
    evaluation = _split(job, job.split)
    stagewise_dir = staged / ("stagewise" if job.fine_tune else "model")
    compose(job).export(str(stagewise_dir), format="tf_saved_model", verbose=False)
    probabilities = _predict(stagewise_dir, evaluation.features)
    head = next(stage for stage in job.stages if stage["name"] == job.head)
    difference = _check_against_stages(job, probabilities, _stage_features(head, job.split))
    metrics = classification_metrics(evaluation.labels, probabilities, job.dataset["classes"])
    report: dict[str, Any] = {"metrics": metrics, "max_abs_difference": difference}
    emit({"event": "evaluated", "metrics": metrics})

    if job.fine_tune:
        tuned = fine_tune(job, emit)
        tuned.export(str(staged / "model"), format="tf_saved_model", verbose=False)
        after = classification_metrics(
            evaluation.labels, _predict(staged / "model", evaluation.features), job.dataset["classes"]
        )
        report["fine_tune"] = {**job.fine_tune, "before": metrics, "after": after}
        report["metrics"] = after
    if job.baseline:
        report["baseline"] = train_baseline(job, emit)
    return report


def _trainable_stage(stage: dict[str, Any], unfreeze: set[str]):
    """Load a stage's Keras model for fine-tuning; BatchNormalization stays in inference mode."""
    keras_file = Path(stage["folder"]) / "model.keras"
    if not keras_file.is_file():
        return load_frozen_stage(Path(stage["folder"]) / "model", stage["name"])
    model = keras.saving.load_model(keras_file)
    model.trainable = stage["name"] in unfreeze
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    return model


def _all_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """Return every layer of `model`, including those of nested models."""
    found = []
    for layer in model.layers:
        found.append(layer)
        if isinstance(layer, keras.Model):
            found.extend(_all_layers(layer))
    return found


def fine_tune(job: AssemblyJob, emit) -> keras.Model:
    """Unfreeze the chosen stages of copies of the stage models and train them end to end."""
    settings = job.fine_tune
    configure_determinism(job.seed)
    unfreeze = set(settings["stages"])
    model = compose(job, load_stage=lambda stage: _trainable_stage(stage, unfreeze))
    model.compile(
        optimizer=make_optimizer(settings["optimizer"], settings["learning_rate"]),
        loss="sparse_categorical_crossentropy", metrics=["accuracy"],
    )
    train, validation = _split(job, "train"), _split(job, "validation")
    history = model.fit(
        train.features, train.labels, validation_data=(validation.features, validation.labels),
        epochs=settings["epochs"], batch_size=settings["batch_size"], verbose=0,
        callbacks=[_epoch_events("fine_tune", settings["epochs"], emit)],
    )
    emit({"event": "fine_tuned", "epochs": len(history.history["loss"])})
    return model


def train_baseline(job: AssemblyJob, emit) -> dict[str, Any]:
    """Train the stack's architecture from scratch, end to end, and evaluate it."""
    settings = job.baseline
    configure_determinism(job.seed)
    train, validation = _split(job, "train"), _split(job, "validation")
    evaluation = _split(job, job.split)

    def fresh_block(stage):
        spec = stage["spec"]
        if spec["objective"] == "pretrained":
            # A pretrained base is never trained, in the baseline either.
            return load_frozen_stage(Path(stage["folder"]) / "model", stage["name"])
        # Normalization layers adapt to the raw training data reaching them before training.
        block = build_block(stage["name"], tuple(stage["input_shape"]), spec["layers"], train.features
                            if not stage["parents"] else None)
        if spec["objective"] == "head":
            return classifier(block, len(job.dataset["classes"]), name=f"{stage['name']}_classifier")
        return block

    model = compose(job, load_stage=fresh_block)
    model.compile(
        optimizer=make_optimizer(settings["optimizer"], settings["learning_rate"]),
        loss="sparse_categorical_crossentropy", metrics=["accuracy"],
    )
    callbacks = [_epoch_events("baseline", settings["epochs"], emit)]
    if settings["early_stopping"]:
        callbacks.append(keras.callbacks.EarlyStopping(**settings["early_stopping"]))
    history = model.fit(
        train.features, train.labels, validation_data=(validation.features, validation.labels),
        epochs=settings["epochs"], batch_size=settings["batch_size"], verbose=0, callbacks=callbacks,
    )
    probabilities = model.predict(evaluation.features, batch_size=1024, verbose=0)
    return {
        **settings,
        "epochs_run": len(history.history["loss"]),
        "metrics": classification_metrics(evaluation.labels, probabilities, job.dataset["classes"]),
    }


def _epoch_events(label: str, epochs: int, emit) -> keras.callbacks.Callback:
    def on_epoch_end(epoch, logs=None):
        emit({"event": "epoch", "stage": label, "epoch": epoch + 1, "epochs": epochs,
              "logs": {key: float(value) for key, value in (logs or {}).items()}})

    return keras.callbacks.LambdaCallback(on_epoch_end=on_epoch_end)


# Anomaly stacks.


def _anomaly_model(job: AssemblyJob) -> keras.Model:
    """Compose target, encoders and decoders into a model that returns reconstruction errors."""
    def saved_model(stage: dict[str, Any], name: str):
        return load_frozen_stage(Path(stage["folder"]) / name, f"{stage['name']}_{name}")

    inputs = keras.Input(shape=tuple(job.dataset["shape"]), name="input")
    target = saved_model(job.stages[0], "target")(inputs)
    code = inputs
    for stage in job.stages:
        code = saved_model(stage, "model")(code)
    reconstruction = code
    for stage in reversed(job.stages):
        reconstruction = saved_model(stage, "decoder")(reconstruction)
    squared = keras.layers.Flatten()(keras.ops.square(target - reconstruction))
    score = keras.ops.mean(squared, axis=1)
    return keras.Model(inputs, score, name=job.stack)


def _stagewise_scores(job: AssemblyJob, split: str, raw: np.ndarray) -> np.ndarray:
    """Score a split through the stages' feature files and separately loaded decoders."""
    first, last = job.stages[0], job.stages[-1]
    target = _predict(Path(first["folder"]) / "target", raw)
    reconstruction = _stage_features(last, split)
    for stage in reversed(job.stages):
        reconstruction = _predict(Path(stage["folder"]) / "decoder", reconstruction)
    return ((target - reconstruction) ** 2).reshape(len(raw), -1).mean(axis=1)


def _assemble_anomaly(job: AssemblyJob, staged: Path, emit) -> dict[str, Any]:
    _anomaly_model(job).export(str(staged / "model"), format="tf_saved_model", verbose=False)
    splits = {name: _split(job, name) for name in ("train", "validation", job.split)}
    scores = {name: _predict(staged / "model", table.features) for name, table in splits.items()}
    difference = _check_against_stages(
        job, scores[job.split], _stagewise_scores(job, job.split, splits[job.split].features)
    )
    normal = job.normal_classes
    is_anomaly = {name: ~np.isin(table.labels, normal) for name, table in splits.items()}
    metrics = anomaly_metrics(is_anomaly["validation"], scores["validation"],
                              is_anomaly[job.split], scores[job.split])
    emit({"event": "evaluated", "metrics": metrics})

    # The baseline reconstructs the same preprocessed inputs with as many principal
    # components as the stack's code has values.
    target_model = Path(job.stages[0]["folder"]) / "target"
    targets = {name: _predict(target_model, table.features).reshape(len(table), -1)
               for name, table in splits.items()}
    code_size = int(np.prod(_stage_features(job.stages[-1], "train").shape[1:]))
    baseline_scores = pca_baseline_scores(
        targets["train"][~is_anomaly["train"]], {name: targets[name] for name in ("validation", job.split)},
        code_size,
    )
    baseline = anomaly_metrics(is_anomaly["validation"], baseline_scores["validation"],
                               is_anomaly[job.split], baseline_scores[job.split])
    return {
        "metrics": metrics,
        "max_abs_difference": difference,
        "baseline": {"kind": "pca", "components": code_size, "metrics": baseline},
    }


def _stage_quality(job: AssemblyJob) -> list[dict[str, Any]]:
    return [
        {
            "name": stage["name"],
            "objective": stage["objective"],
            "validation_accuracy": stage["metrics"].get("validation_accuracy"),
            "validation_loss": stage["metrics"].get("validation_loss"),
        }
        for stage in job.stages
    ]


def assemble_stack(job: AssemblyJob, emit=lambda event: None) -> dict[str, Any]:
    """Assemble, verify, evaluate and publish the stack; return the assembly's manifest."""
    started = time.time()
    store = Store(job.store_root)
    with store.staging(f"assembled-{job.stack}") as staged:
        if job.task == "anomaly":
            report = _assemble_anomaly(job, staged, emit)
        else:
            report = _assemble_classifier(job, staged, emit)
        curves = write_training_curves({stage["name"]: Path(stage["folder"]) for stage in job.stages}, staged)
        report = {
            "stack": job.stack,
            "fingerprint": job.fingerprint,
            "task": job.task,
            "split": job.split,
            **report,
            "classes": job.dataset["classes"],
            "stages": _stage_quality(job),
            # Stage name to a PNG of its loss and accuracy per epoch, relative to the artifact.
            "curves": curves,
        }
        (staged / "report.json").write_text(json.dumps(report, indent=2))
        manifest = {
            "kind": "assembled",
            "stack": job.stack,
            "fingerprint": job.fingerprint,
            "stages": [{"name": stage["name"], "folder": stage["folder"]} for stage in job.stages],
            "report": report,
            "seconds": round(time.time() - started, 3),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "libraries": library_versions(),
        }
        return store.publish(staged, store.assembled_dir(job.stack, job.fingerprint), manifest)
