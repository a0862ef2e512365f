"""Planning: each stage's fingerprint, whether its artifact can be reused, and why not.

The flow and `stackwise plan` share these functions, so the plan a user reads is
the decision a run makes. Nothing here imports Prefect or TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.dataset import Dataset
from tasks.errors import DataError
from tasks.fingerprint import code_digest, digest_json, fingerprint_inputs, fingerprint_of
from tasks.jobs import AssemblyJob
from tasks.spec import StackSpec, StageSpec, stage_input_shape
from tasks.store import Store, read_manifest

__all__ = ["StageDecision", "assembly_job", "decide_stage", "normalized_stage", "plan_stack"]


@dataclass(frozen=True)
class StageDecision:
    """Whether one stage is reused or trained, with its fingerprint and the reason."""

    stage: str
    action: str  # "reuse" or "train"
    reason: str
    fingerprint: str | None
    inputs: dict[str, Any] | None
    manifest: dict[str, Any] | None
    folder: Path | None


def parent_digests(stage: StageSpec, dataset: Dataset, manifests: dict[str, dict]) -> dict[str, str]:
    """Map each parent to its artifact digest; a root stage's parent is the dataset."""
    if not stage.parents:
        return {"input": dataset.digest}
    return {parent: manifests[parent]["artifact_digest"] for parent in stage.parents}


def normal_class_indices(spec: StackSpec, dataset: Dataset) -> list[int] | None:
    """Return the label indices an anomaly stack treats as normal, or None for other stacks."""
    if not spec.is_anomaly:
        return None
    indices = []
    for name in spec.evaluation.normal_classes:
        if name not in dataset.classes:
            raise DataError(
                f"evaluation.normal_classes: label '{name}' does not occur in the data; "
                f"labels: {', '.join(dataset.classes)}"
            )
        indices.append(dataset.classes.index(name))
    if len(indices) == len(dataset.classes):
        raise DataError(
            "evaluation.normal_classes: every label is listed as normal, so there is no anomaly "
            "to detect; list only the labels of normal rows"
        )
    return sorted(indices)


def normalized_stage(spec: StackSpec, stage: StageSpec, dataset: Dataset) -> dict[str, Any]:
    """Return the normalized stage spec the fingerprint covers and the stage process trains."""
    return stage.normalized(spec.defaults, train_classes=normal_class_indices(spec, dataset))


def decide_stage(
    spec: StackSpec,
    stage: StageSpec,
    dataset: Dataset,
    manifests: dict[str, dict],
    store: Store,
    force: bool = False,
    before_lookup: Callable[[Path], None] | None = None,
) -> StageDecision:
    """Compute a stage's fingerprint from its parents' manifests and look up its artifact.

    `before_lookup`, if given, is called with the artifact folder before it is checked
    (a run takes its lease there, so that `stackwise gc` cannot remove it afterwards).
    """
    inputs = fingerprint_inputs(
        normalized_stage(spec, stage, dataset), parent_digests(stage, dataset, manifests), dataset.digest
    )
    fingerprint = fingerprint_of(inputs)
    folder = store.stage_dir(stage.name, fingerprint)
    if before_lookup is not None:
        before_lookup(folder)
    if force:
        return StageDecision(stage.name, "train", "retrain requested", fingerprint, inputs, None, folder)
    verification = store.verify(folder)
    if verification.ok:
        return StageDecision(
            stage.name, "reuse", "artifact found", fingerprint, inputs, verification.manifest, folder
        )
    if folder.exists():
        reason = f"artifact damaged ({verification.problem})"
    else:
        reason = _what_changed(store, stage.name, inputs)
    return StageDecision(stage.name, "train", reason, fingerprint, inputs, None, folder)


def _latest_manifest(store: Store, stage: str) -> dict[str, Any] | None:
    folder = store.root / "stages" / stage
    if not folder.is_dir():
        return None
    manifests = [read_manifest(path) for path in folder.iterdir() if path.is_dir()]
    manifests = [manifest for manifest in manifests if manifest and "fingerprint_inputs" in manifest]
    return max(manifests, key=lambda manifest: manifest["created_at"], default=None)


def _what_changed(store: Store, stage: str, inputs: dict[str, Any]) -> str:
    previous = _latest_manifest(store, stage)
    if previous is None:
        return "never trained"
    before = previous["fingerprint_inputs"]
    changes = []
    if before["stage"] != inputs["stage"]:
        fields = sorted(
            key for key in set(before["stage"]) | set(inputs["stage"])
            if before["stage"].get(key) != inputs["stage"].get(key)
        )
        changes.append(f"spec changed ({', '.join(fields)})")
    if before["dataset"] != inputs["dataset"]:
        changes.append("data changed")
    elif before["parents"] != inputs["parents"]:
        changed = sorted(
            name for name in set(before["parents"]) | set(inputs["parents"])
            if before["parents"].get(name) != inputs["parents"].get(name)
        )
        changes.append(f"parent changed ({', '.join(changed)})")
    if before["code"] != inputs["code"] or before["libraries"] != inputs["libraries"]:
        changes.append("stackwise code or library versions changed")
    return "; ".join(changes) or "artifact missing"


def plan_stack(
    spec: StackSpec, dataset: Dataset, store: Store, retrain: set[str] | None = None
) -> list[StageDecision]:
    """Decide every stage without training; a stage below a retrained one is marked train."""
    retrain = retrain or set()
    manifests: dict[str, dict] = {}
    decisions = []
    for stage in spec.topological_order():
        changed_parents = [parent for parent in stage.parents if parent not in manifests]
        if changed_parents:
            decisions.append(StageDecision(
                stage.name, "train",
                f"parent changed ({', '.join(changed_parents)} will be trained; this stage is "
                "reused if that artifact comes out identical)",
                None, None, None, None,
            ))
            continue
        decision = decide_stage(spec, stage, dataset, manifests, store, force=stage.name in retrain)
        decisions.append(decision)
        if decision.action == "reuse":
            manifests[stage.name] = decision.manifest
    return decisions


def any_stage_trains(spec: StackSpec, dataset: Dataset, store: Store, retrain: set[str] | None = None) -> bool:
    """Return whether a run of `spec` now would train at least one stage."""
    return any(decision.action == "train" for decision in plan_stack(spec, dataset, store, retrain))


def assembly_job(
    spec: StackSpec,
    dataset: Dataset,
    store: Store,
    manifests: dict[str, dict],
    output_shapes: dict[str, tuple[int, ...]],
) -> AssemblyJob:
    """Describe the assembly of the published stages; its fingerprint covers their digests."""
    stages = []
    for stage in spec.topological_order():
        manifest = manifests[stage.name]
        input_shape = (
            stage_input_shape(stage, output_shapes, dataset.shape) if stage.parents else dataset.shape
        )
        stages.append({
            "name": stage.name,
            "parents": stage.parents,
            "merge": stage.merge,
            "objective": stage.objective,
            "folder": str(store.stage_dir(stage.name, manifest["fingerprint"])),
            "artifact_digest": manifest["artifact_digest"],
            "metrics": {key: manifest["metrics"].get(key) for key in ("validation_accuracy", "validation_loss")},
            "spec": normalized_stage(spec, stage, dataset),
            "input_shape": list(input_shape),
        })
    fine_tune = None
    if spec.fine_tune is not None:
        chosen = spec.fine_tune.stages
        names = [stage.name for stage in spec.stages] if chosen == "all" else list(chosen)
        fine_tune = {**spec.fine_tune.model_dump(mode="json"), "stages": names}
    baseline = None
    if spec.baseline == "end_to_end":
        baseline = _baseline_settings(spec, fine_tune)
    content = {
        "stack": spec.name,
        "head": spec.head.name,
        "split": spec.evaluation.split,
        "seed": spec.head.training(spec.defaults)["seed"],
        "task": spec.evaluation.task,
        "normal_classes": normal_class_indices(spec, dataset),
        "fine_tune": fine_tune,
        "baseline": baseline,
    }
    fingerprint = digest_json({
        **content,
        "stages": [{key: value for key, value in stage.items() if key != "folder"} for stage in stages],
        "dataset": dataset.digest,
        "code": code_digest(),
    })
    return AssemblyJob(
        fingerprint=fingerprint, stages=stages, dataset=dataset.to_dict(), store_root=str(store.root),
        **content,
    )


def _baseline_settings(spec: StackSpec, fine_tune: dict | None) -> dict[str, Any]:
    """Train the baseline with the head's settings for as many epochs as all stages together."""
    head = spec.head.training(spec.defaults)
    epochs = sum(stage.training(spec.defaults)["epochs"] for stage in spec.stages)
    if fine_tune:
        epochs += fine_tune["epochs"]
    return {
        "kind": "end_to_end",
        "optimizer": head["optimizer"],
        "learning_rate": head["learning_rate"],
        "batch_size": head["batch_size"],
        "early_stopping": head["early_stopping"],
        "epochs": epochs,
    }
