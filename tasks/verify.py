"""Full verification of the artifact store: every sha256 recomputed, one result per artifact.

`stackwise verify` uses these functions. Unlike the quick check that every run makes,
full verification reads every file, so it also finds an edit that kept a file's size
and modification time. Nothing here imports Prefect or TensorFlow.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tasks.gc import references
from tasks.spec import StackSpec
from tasks.store import Store, read_manifest

__all__ = ["DAMAGED", "MISSING", "SOUND", "UNKNOWN", "ArtifactCheck", "check_spec_artifacts", "check_store"]

# Statuses of a checked artifact. Only DAMAGED makes `stackwise verify` fail: a run
# builds a missing artifact, and an unknown one once its parents are trained.
SOUND = "ok"
DAMAGED = "damaged"
MISSING = "missing"
UNKNOWN = "unknown"


@dataclass(frozen=True)
class ArtifactCheck:
    """The outcome of fully verifying one artifact folder.

    `kind` is "dataset", "stage" or "assembled". `name` is the data source of a
    dataset snapshot, the stage of a stage artifact and the stack of an assembled
    one. `fingerprint` is the folder's name (a dataset's digest), or None while it
    cannot be known. `problem` is what is wrong with a damaged artifact, or why an
    artifact is missing or unknown.
    """

    kind: str
    name: str
    fingerprint: str | None
    folder: Path | None
    status: str
    problem: str | None = None

    @property
    def damaged(self) -> bool:
        return self.status == DAMAGED

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "folder": str(self.folder) if self.folder else None}


def check_store(store: Store) -> list[ArtifactCheck]:
    """Fully verify every artifact folder in the store: datasets, stages, assembled models.

    Folders under `staging/` (being written, or left by a killed run) are not checked.
    Neither are folders whose name starts with a dot: old artifacts that a rebuild
    moved aside (`.retired-…`) before deleting them.
    """
    checks = []
    for folder in _children(store.root / "datasets"):
        checks.append(_check(store, "dataset", _dataset_source(folder), folder))
    for kind, parent in (("stage", store.root / "stages"), ("assembled", store.root / "assembled")):
        for group in _children(parent):
            for folder in _children(group):
                checks.append(_check(store, kind, group.name, folder))
    return checks


def check_spec_artifacts(spec: StackSpec, store: Store) -> list[ArtifactCheck]:
    """Fully verify the dataset snapshot, stage artifacts and assembled model that `spec` uses.

    The fingerprints are the ones `stackwise plan` computes. A stage below one that a
    run must train first has no known fingerprint yet, and neither has the assembled
    model then. Both are reported as unknown.
    """
    found = references([spec], store)
    checks = [
        _check(store, "dataset", spec.data.source, store.dataset_dir(digest))
        for digest in sorted(found.datasets)
    ]
    fingerprints = dict(found.stages)
    for stage in spec.topological_order():
        if stage.name in fingerprints:
            checks.append(_check(store, "stage", stage.name, store.stage_dir(stage.name, fingerprints[stage.name])))
        else:
            reason = "fingerprint unknown until its parents are trained"
            checks.append(ArtifactCheck("stage", stage.name, None, None, UNKNOWN, reason))
    for stack, fingerprint in sorted(found.assembled):
        checks.append(_check(store, "assembled", stack, store.assembled_dir(stack, fingerprint)))
    if spec.name in found.unknown_stacks:
        reason = "fingerprint unknown until every stage is trained"
        checks.append(ArtifactCheck("assembled", spec.name, None, None, UNKNOWN, reason))
    return checks


def _check(store: Store, kind: str, name: str, folder: Path) -> ArtifactCheck:
    if not folder.is_dir():
        return ArtifactCheck(kind, name, folder.name, folder, MISSING, "not built yet, so the next run builds it")
    verification = store.verify(folder, full=True)
    if verification.ok:
        return ArtifactCheck(kind, name, folder.name, folder, SOUND)
    return ArtifactCheck(kind, name, folder.name, folder, DAMAGED, verification.problem)


def _dataset_source(folder: Path) -> str:
    manifest = read_manifest(folder)
    source = manifest.get("source") if isinstance(manifest, dict) else None
    return str(source) if source else "(source unknown)"


def _children(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if path.is_dir() and not path.name.startswith("."))
