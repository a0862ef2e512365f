"""Store garbage collection: find and remove what none of the given stack specs references.

The fingerprints a spec references are the ones `stackwise plan` computes: every
stage whose parents' artifacts are in the store, and the assembled model when every
stage is. A stage below one that must train has no known fingerprint yet, so all of
its artifacts are kept, as are its stack's assembled models, until a run has trained
the parents. A folder that a running flow holds a lease on is always kept (see
`tasks.leases`), and so is a staging folder that is young or whose writer is alive.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from tasks.dataset import Dataset, dataset_digest
from tasks.errors import DataError
from tasks.leases import exclusive_lease
from tasks.plan import assembly_job, plan_stack
from tasks.spec import StackSpec, check_shapes
from tasks.store import Store

__all__ = ["Collection", "Entry", "References", "collect", "references", "remove"]

# A staging folder younger than this may belong to a run on another machine that
# shares the store, where its writer's process id means nothing here.
STAGING_MIN_AGE_SECONDS = 3600
STAGING_PID = re.compile(r"-pid(\d+)$")
RESULT_PREFIX = "stackwise-"


@dataclass
class References:
    """The artifacts the given specs use: dataset digests, stage and assembled folders, and unknowns."""

    datasets: set[str] = field(default_factory=set)
    stages: set[tuple[str, str]] = field(default_factory=set)
    assembled: set[tuple[str, str]] = field(default_factory=set)
    # Stages (and stacks) whose fingerprint cannot be known until a parent is trained.
    unknown_stages: set[str] = field(default_factory=set)
    unknown_stacks: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Entry:
    """One folder or file of the store, its size in bytes, and why it goes or stays."""

    path: Path
    kind: str
    size: int
    reason: str


@dataclass
class Collection:
    """The outcome of a collection: what to remove and what is kept for a reason worth showing."""

    remove: list[Entry] = field(default_factory=list)
    keep: list[Entry] = field(default_factory=list)

    @property
    def bytes_removed(self) -> int:
        return sum(entry.size for entry in self.remove)


def references(specs: list[StackSpec], store: Store) -> References:
    """Return every artifact the specs reference, computed as `stackwise plan` does."""
    found = References()
    for spec in specs:
        digest = dataset_digest(spec, store)
        found.datasets.add(digest)
        dataset = _snapshot_or_placeholder(store, digest)
        try:
            decisions = plan_stack(spec, dataset, store)
        except DataError:
            # An anomaly stack's fingerprints need the snapshot's classes; without them
            # nothing of this stack can be matched, so everything of it is kept.
            found.unknown_stages.update(stage.name for stage in spec.stages)
            found.unknown_stacks.add(spec.name)
            continue
        manifests = {}
        for decision in decisions:
            if decision.fingerprint is None:
                found.unknown_stages.add(decision.stage)
                continue
            found.stages.add((decision.stage, decision.fingerprint))
            if decision.action == "reuse":
                manifests[decision.stage] = decision.manifest
        if len(manifests) == len(spec.stages) and dataset.shape:
            shapes = check_shapes(spec, dataset.shape, dataset.n_classes)
            job = assembly_job(spec, dataset, store, manifests, shapes)
            found.assembled.add((spec.name, job.fingerprint))
        else:
            found.unknown_stacks.add(spec.name)
    return found


def _snapshot_or_placeholder(store: Store, digest: str) -> Dataset:
    """Return the published snapshot with this digest, or a placeholder with the digest only.

    Stage fingerprints depend on the dataset's digest alone, so they can be computed
    without a snapshot; the assembled fingerprint also needs its shape and classes.
    """
    folder = store.dataset_dir(digest)
    manifest = store.verify(folder).manifest
    if manifest is None:
        return Dataset(digest=digest, folder=folder, shape=(), classes=[], rows={})
    return Dataset(digest=digest, folder=folder, shape=tuple(manifest["shape"]),
                   classes=manifest["classes"], rows=manifest["rows"])


def collect(store: Store, found: References, now: float | None = None) -> Collection:
    """List what a collection would remove, without removing anything."""
    now = time.time() if now is None else now
    collection = Collection()
    kept_fingerprints: set[str] = set()

    for folder in _children(store.root / "datasets"):
        _sort(store, collection, folder, "dataset", folder.name in found.datasets, "referenced")
    for stage_root in _children(store.root / "stages"):
        for folder in _children(stage_root):
            if folder.name.startswith(".retired-"):
                _sort(store, collection, folder, "retired", False, "")
                continue
            referenced = (stage_root.name, folder.name) in found.stages
            unknown = stage_root.name in found.unknown_stages
            reason = "fingerprint unknown until its parents are trained" if unknown else "referenced"
            if _sort(store, collection, folder, "stage", referenced or unknown, reason):
                kept_fingerprints.add(folder.name)
    for stack_root in _children(store.root / "assembled"):
        for folder in _children(stack_root):
            referenced = (stack_root.name, folder.name) in found.assembled
            unknown = stack_root.name in found.unknown_stacks
            reason = "fingerprint unknown until every stage is trained" if unknown else "referenced"
            if _sort(store, collection, folder, "assembled", referenced or unknown, reason):
                kept_fingerprints.add(folder.name)

    for folder in _children(store.staging_dir):
        _sort_staging(collection, folder, now)
    # A process killed while it created a lock file (see tasks.locks) leaves its temporary file.
    for leftover in sorted((store.prefect_dir / "locks").glob(".*.tmp")):
        if now - leftover.stat().st_mtime >= STAGING_MIN_AGE_SECONDS:
            collection.remove.append(Entry(leftover, "lock", _size(leftover), "left by a run that ended"))
    kept_fingerprints |= {fingerprint for _, fingerprint in found.stages | found.assembled}
    for record in _children(store.prefect_dir / "results"):
        fingerprint = record.name.removeprefix(RESULT_PREFIX)
        if record.name.startswith(RESULT_PREFIX) and fingerprint not in kept_fingerprints:
            collection.remove.append(Entry(record, "result", _size(record), "its artifact is removed"))
    return collection


def remove(store: Store, collection: Collection) -> Collection:
    """Remove the collection's entries; an artifact a run took a lease on meanwhile is kept.

    Returns what was removed and what was kept.
    """
    done = Collection(keep=list(collection.keep))
    for entry in collection.remove:
        if entry.kind in {"dataset", "stage", "assembled"}:
            with exclusive_lease(store, entry.path) as free:
                if not free:
                    done.keep.append(Entry(entry.path, entry.kind, entry.size, "held by a running flow"))
                    continue
                shutil.rmtree(entry.path, ignore_errors=True)
        elif entry.path.is_dir():
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            entry.path.unlink(missing_ok=True)
        done.remove.append(entry)
    return done


def _sort(store: Store, collection: Collection, folder: Path, kind: str, referenced: bool, reason: str) -> bool:
    """File `folder` under keep (when referenced or leased) or remove; return whether it is kept."""
    size = _size(folder)
    if referenced:
        collection.keep.append(Entry(folder, kind, size, reason))
        return True
    if kind != "retired":
        with exclusive_lease(store, folder) as free:
            if not free:
                collection.keep.append(Entry(folder, kind, size, "held by a running flow"))
                return True
    collection.remove.append(Entry(folder, kind, size, "not referenced by the given specs"))
    return False


def _sort_staging(collection: Collection, folder: Path, now: float) -> None:
    size = _size(folder)
    age = now - folder.stat().st_mtime
    match = STAGING_PID.search(folder.name.removesuffix(".paused"))
    if match and _process_alive(int(match.group(1))):
        collection.keep.append(Entry(folder, "staging", size, f"written by running process {match.group(1)}"))
    elif age < STAGING_MIN_AGE_SECONDS:
        collection.keep.append(Entry(folder, "staging", size, f"younger than {STAGING_MIN_AGE_SECONDS} s"))
    else:
        collection.remove.append(Entry(folder, "staging", size, "left by a run that ended"))


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _children(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.is_dir() else []


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())
