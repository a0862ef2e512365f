"""Helpers that inspect a store the way a later run would: digests, statuses, verification."""

from __future__ import annotations

import hashlib
from pathlib import Path

from tasks.store import MANIFEST, Store


def file_digests(root: Path) -> dict[str, tuple[int, int, str]]:
    """Map every file below `root` to its size, modification time and sha256."""
    digests = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            stat = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            digests[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns, digest)
    return digests


def artifact_folders(root: Path) -> list[Path]:
    """Return every folder where a run looks for an artifact: datasets, stages, assembled."""
    folders = [path for path in (root / "datasets").glob("*") if path.is_dir()]
    folders += [path for path in (root / "stages").glob("*/*") if path.is_dir()]
    folders += [path for path in (root / "assembled").glob("*/*") if path.is_dir()]
    return sorted(folders)


def trusted_artifacts(root: Path) -> list[Path]:
    """Return the artifact folders that pass full verification (every sha256 recomputed)."""
    store = Store(root)
    return [folder for folder in artifact_folders(root) if store.verify(folder, full=True).ok]


def untrusted_published(root: Path) -> list[Path]:
    """Return artifact folders that carry a manifest but fail full verification."""
    store = Store(root)
    return [
        folder for folder in artifact_folders(root)
        if (folder / MANIFEST).exists() and not store.verify(folder, full=True).ok
    ]


def statuses(summary: dict) -> dict[str, str]:
    return {stage["name"]: stage["status"] for stage in summary["stages"]}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("stackwise: error:")]
