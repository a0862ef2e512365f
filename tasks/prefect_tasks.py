"""The Prefect tasks: snapshot the dataset, build a stage, assemble the stack.

A stage task's cache key is the stage's fingerprint, and its persisted result is a
small JSON summary, never arrays. Runs of the same stage at once are serialized by
a SERIALIZABLE cache isolation with a file lock, so the second waits and comes
back Cached. The store stays the source of truth: the flow sets `refresh_cache`
when the artifact behind a fingerprint is missing or damaged, and the task body
checks the store again under the lock before it trains.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import CachePolicy
from prefect.transactions import IsolationLevel

from tasks.dataset import Dataset, snapshot_dataset
from tasks.reporting import headline
from tasks.locks import ProcessLockManager
from tasks.jobs import StageJob
from tasks.reporting import artifact_key, epoch_progress, evaluation_table, run_summary_markdown
from tasks.spec import StackSpec
from tasks.stage_process import run_job
from tasks.store import Store

__all__ = [
    "FingerprintPolicy",
    "assemble_task",
    "publish_run_report",
    "snapshot_task",
    "stage_task",
    "task_options",
]


@dataclass
class FingerprintPolicy(CachePolicy):
    """Cache policy whose key is the task's `fingerprint` argument."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters, **kwargs) -> str:
        return f"stackwise-{inputs['fingerprint']}"


def task_options(store: Store, refresh: bool) -> dict[str, Any]:
    """Return the `with_options` arguments that put results and locks in the store."""
    policy = FingerprintPolicy().configure(
        lock_manager=ProcessLockManager(lock_files_directory=store.prefect_dir / "locks"),
        isolation_level=IsolationLevel.SERIALIZABLE,
    )
    return {
        "cache_policy": policy,
        "result_storage": store.prefect_dir / "results",
        "refresh_cache": refresh,
    }


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"


def _log_stderr(logger, label: str, event: dict[str, Any]) -> None:
    if event["event"] == "stderr" and event["lines"]:
        logger.error("%s: last lines of the process's standard error:\n%s", label, "\n".join(event["lines"]))


class _TrainingProgress:
    """Relay a stage process's events to the task log and a progress artifact."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.logger = get_run_logger()
        self.artifact_id = create_progress_artifact(
            progress=0.0, description=f"Training stage '{stage}'"
        )

    def __call__(self, event: dict[str, Any]) -> None:
        _log_stderr(self.logger, f"stage {self.stage}", event)
        if event["event"] != "epoch":
            return
        logs = ", ".join(f"{key}={value:.4f}" for key, value in sorted(event["logs"].items()))
        self.logger.info("stage %s epoch %d/%d: %s", self.stage, event["epoch"], event["epochs"], logs)
        update_progress_artifact(self.artifact_id, progress=epoch_progress(event["epoch"], event["epochs"]))

    def finish(self) -> None:
        update_progress_artifact(self.artifact_id, progress=100.0)


def _summary(manifest: dict[str, Any], folder: Path, status: str, started: str, begun: float) -> dict:
    return {
        "name": manifest["stage"],
        "status": status,
        "fingerprint": manifest["fingerprint"],
        "artifact_digest": manifest["artifact_digest"],
        "folder": str(folder),
        "started_at": started,
        "finished_at": _now(),
        "seconds": round(time.time() - begun, 3),
    }


@task(name="snapshot-dataset", cache_policy=None, persist_result=False)
def snapshot_task(spec: StackSpec, store_root: str) -> Dataset:
    """Read the data source into Parquet splits once; reuse the snapshot afterwards."""
    return snapshot_dataset(spec, Store(store_root))


@task(name="stage", persist_result=True, result_serializer="json")
def stage_task(stage_name: str, fingerprint: str, job: dict[str, Any]) -> dict[str, Any]:
    """Build one stage's artifact, or reuse it if another run published it meanwhile."""
    started, begun = _now(), time.time()
    logger = get_run_logger()
    store = Store(job["store_root"])
    folder = store.stage_dir(stage_name, fingerprint)
    if not job["force"]:
        manifest = store.lookup(folder)
        if manifest is not None:
            logger.info("stage %s: reusing artifact %s", stage_name, folder)
            return _summary(manifest, folder, "cached", started, begun)

    StageJob.from_dict(job).check_inputs()
    logger.info("stage %s: training, fingerprint %s", stage_name, fingerprint[:12])
    progress = _TrainingProgress(stage_name)
    manifest = run_job("train", job, f"stage '{stage_name}'", on_event=progress)
    progress.finish()
    metrics = manifest["metrics"]
    if metrics.get("validation_accuracy") is not None:
        quality = f"validation accuracy {metrics['validation_accuracy']:.4f}"
    else:
        quality = f"validation loss {metrics['validation_loss']:.4f}"
    logger.info("stage %s: trained in %.1f s, %s", stage_name, manifest["seconds"], quality)
    return _summary(manifest, folder, "trained", started, begun)


@task(name="assemble-and-evaluate", persist_result=True, result_serializer="json")
def assemble_task(fingerprint: str, job: dict[str, Any]) -> dict[str, Any]:
    """Assemble the frozen stages into one model, check it and evaluate it."""
    started, begun = _now(), time.time()
    logger = get_run_logger()
    store = Store(job["store_root"])
    folder = store.assembled_dir(job["stack"], fingerprint)
    manifest = store.lookup(folder)
    status = "cached"
    if manifest is None:
        label = f"assembly of stack '{job['stack']}'"
        manifest = run_job("assemble", job, label, on_event=lambda event: _log_stderr(logger, label, event))
        status = "trained"
    logger.info("stack %s: %s", job["stack"], headline(manifest["report"]))
    return {
        "status": status,
        "fingerprint": fingerprint,
        "folder": str(folder),
        "report": manifest["report"],
        "started_at": started,
        "finished_at": _now(),
        "seconds": round(time.time() - begun, 3),
    }


def publish_run_report(summary: dict[str, Any]) -> None:
    """Publish the run's evaluation table and Markdown summary as artifacts of the flow run."""
    create_table_artifact(
        evaluation_table(summary["evaluation"]),
        key=artifact_key(summary["stack"], "evaluation"),
        description=f"Evaluation of the assembled stack '{summary['stack']}'",
    )
    create_markdown_artifact(
        run_summary_markdown(summary),
        key=artifact_key(summary["stack"], "run-summary"),
        description=f"Stages of stack '{summary['stack']}' in this run: trained or cached",
    )
