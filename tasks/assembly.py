"""Assembly: compose the frozen stages into one model, check it, evaluate it, export it.

The assembled model takes examples exactly as the dataset snapshot stores them and
returns class probabilities. Before it is published, its predictions on the
evaluation split are compared with the head stage's feature file, which the
stage-by-stage path produced; a difference above `MAX_DIFFERENCE` fails the run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, log_loss

from tasks.blocks import keras, load_frozen_stage, predict_in_batches
from tasks.errors import StageFailed
from tasks.features import read_feature_file
from tasks.fingerprint import library_versions
from tasks.jobs import AssemblyJob
from tasks.reporting import write_training_curves
from tasks.store import Store

__all__ = ["MAX_DIFFERENCE", "assemble_stack", "classification_metrics"]

MAX_DIFFERENCE = 1e-4
SPLIT_FILES = {"test": "test.parquet", "validation": "validation.parquet"}


def compose(job: AssemblyJob) -> keras.Model:
    """Build one Keras model from raw input to the head's probabilities, following the DAG."""
    inputs = keras.Input(shape=tuple(job.dataset["shape"]), name="input")
    outputs: dict[str, Any] = {}
    for stage in job.stages:
        frozen = load_frozen_stage(Path(stage["folder"]) / "model", stage["name"])
        if not stage["parents"]:
            stage_input = inputs
        elif len(stage["parents"]) == 1:
            stage_input = outputs[stage["parents"][0]]
        else:
            flat = [keras.layers.Flatten()(outputs[parent]) for parent in stage["parents"]]
            stage_input = keras.layers.Concatenate(name=f"{stage['name']}_merge")(flat)
        outputs[stage["name"]] = frozen(stage_input)
    return keras.Model(inputs, outputs[job.head], name=job.stack)


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict:
    """Return accuracy, macro F1, log loss and the confusion matrix of predicted probabilities."""
    predicted = probabilities.argmax(axis=1)
    every_class = list(range(len(classes)))
    clipped = np.clip(probabilities, 1e-7, 1.0)
    clipped = clipped / clipped.sum(axis=1, keepdims=True)
    return {
        "accuracy": float(accuracy_score(labels, predicted)),
        "macro_f1": float(f1_score(labels, predicted, average="macro", labels=every_class, zero_division=0)),
        "log_loss": float(log_loss(labels, clipped, labels=every_class)),
        "confusion_matrix": confusion_matrix(labels, predicted, labels=every_class).tolist(),
        "rows": int(len(labels)),
    }


def assemble_stack(job: AssemblyJob, emit=lambda event: None) -> dict[str, Any]:
    """Assemble, verify, evaluate and publish the stack; return the assembly's manifest."""
    started = time.time()
    store = Store(job.store_root)
    split_input = read_feature_file(Path(job.dataset["folder"]) / SPLIT_FILES[job.split])
    head = next(stage for stage in job.stages if stage["name"] == job.head)
    staged_path = read_feature_file(Path(head["folder"]) / "features" / f"{job.split}.parquet")

    with store.staging(f"assembled-{job.stack}") as staged:
        compose(job).export(str(staged / "model"), format="tf_saved_model", verbose=False)
        reloaded = load_frozen_stage(staged / "model", "assembled")
        probabilities = np.concatenate(list(predict_in_batches(reloaded, split_input.features)))
        difference = float(np.max(np.abs(probabilities - staged_path.features)))
        if not difference < MAX_DIFFERENCE:
            raise StageFailed(
                f"assembled model of stack '{job.stack}' differs from the stage-by-stage outputs by "
                f"{difference:.3g} (limit {MAX_DIFFERENCE}) on the {job.split} split; the stage "
                "artifacts may be inconsistent, rerun with `--retrain` on the first stage"
            )
        metrics = classification_metrics(split_input.labels, probabilities, job.dataset["classes"])
        curves = write_training_curves({stage["name"]: Path(stage["folder"]) for stage in job.stages}, staged)
        report = {
            "stack": job.stack,
            "fingerprint": job.fingerprint,
            "split": job.split,
            "metrics": metrics,
            "max_abs_difference": difference,
            "classes": job.dataset["classes"],
            "stages": [stage["name"] for stage in job.stages],
            # Stage name to a PNG of its loss and accuracy per epoch, relative to the artifact.
            "curves": curves,
        }
        (staged / "report.json").write_text(json.dumps(report, indent=2))
        emit({"event": "evaluated", "metrics": metrics})
        manifest = {
            "kind": "assembled",
            "stack": job.stack,
            "fingerprint": job.fingerprint,
            "stages": job.stages,
            "report": report,
            "seconds": round(time.time() - started, 3),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "libraries": library_versions(),
        }
        return store.publish(staged, store.assembled_dir(job.stack, job.fingerprint), manifest)
