"""The artifact store: folders published atomically, each with a manifest of checksums.

Layout under the store's root (by default `./data`):

    datasets/<digest>/            the data source's splits as feature files
    stages/<stage>/<fingerprint>/ a stage's SavedModel, feature files and manifest
    assembled/<stack>/<fingerprint>/ the assembled SavedModel and report.json
    staging/                      folders being written; never read as artifacts
    prefect/                      Prefect's persisted task results and lock files
    source-digests.json           cached sha256 of each data source (see `tasks.dataset`)

An artifact is written into a folder under `staging/` and renamed into place only
when complete, so a crash never leaves a partial folder where a later run looks. Its
`manifest.json` is written last and lists the size, modification time and sha256 of
every file. Reuse checks sizes and times, and recomputes a digest only for a file
whose time changed, so an edited or truncated file is caught without rereading the
rest.

NOTE: the quick check trusts a file whose size and modification time both match
the manifest. An edit that keeps the size and then sets the old modification time
back (`touch -d`, `os.utime`) is not caught by it. Only full verification
(`verify(full=True)`) recomputes every digest. `stackwise verify` runs it on every
artifact in the store, or on those one spec uses (see `tasks.verify`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.fingerprint import digest_file

__all__ = ["MANIFEST", "Store", "Verification", "checksum_files", "read_manifest"]

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
SOURCE_DIGESTS = "source-digests.json"

# Test hook: STACKWISE_PAUSE_AT=manifest-written:LABEL makes the process that has just
# written the manifest of a staging folder whose name starts with LABEL (such as
# `stage-hidden_2` or `dataset`) create `<folder>.paused` and sleep until it is killed.
# Tests use it to kill a run at an instant too short to observe from outside. Unset,
# it does nothing.
PAUSE_VARIABLE = "STACKWISE_PAUSE_AT"


@dataclass(frozen=True)
class Verification:
    """The outcome of checking an artifact folder: its manifest, or why it cannot be trusted."""

    manifest: dict[str, Any] | None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.manifest is not None


def checksum_files(
    folder: Path, known: dict[str, dict[str, Any]] | None = None
) -> dict[str, dict[str, Any]]:
    """Return size, modification time and sha256 of every file below `folder` except the manifest.

    A file whose entry in `known` has its current size and modification time keeps that
    entry's sha256 instead of being read again, by the same rule as the quick check.
    """
    known = known or {}
    entries = {}
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.name == MANIFEST and path.parent == folder:
            continue
        relative = path.relative_to(folder).as_posix()
        stat = path.stat()
        previous = known.get(relative, {})
        if previous.get("size") == stat.st_size and previous.get("mtime_ns") == stat.st_mtime_ns:
            sha256 = previous["sha256"]
        else:
            sha256 = digest_file(path)
        entries[relative] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}
    return entries


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """Return the parsed manifest of `folder`, or None if it is missing or unreadable."""
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError, RecursionError):
        # RecursionError: JSON nested deeper than the parser's recursion limit.
        return None


def _write_json_atomically(path: Path, value: Any) -> None:
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(temporary, "w") as handle:
        json.dump(value, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _fsync_tree(folder: Path) -> None:
    # Flush file contents before the rename that publishes them, so that a power loss
    # cannot publish a folder whose files are still empty.
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


class Store:
    """The artifact store rooted at one folder."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()

    def dataset_dir(self, digest: str) -> Path:
        return self.root / "datasets" / digest

    def stage_dir(self, stage: str, fingerprint: str) -> Path:
        return self.root / "stages" / stage / fingerprint

    def assembled_dir(self, stack: str, fingerprint: str) -> Path:
        return self.root / "assembled" / stack / fingerprint

    @property
    def prefect_dir(self) -> Path:
        return self.root / "prefect"

    @property
    def staging_dir(self) -> Path:
        return self.root / "staging"

    @property
    def source_digests_file(self) -> Path:
        return self.root / SOURCE_DIGESTS

    def cached_source_digest(self, key: str, identity: dict[str, Any]) -> str | None:
        """Return the sha256 recorded for the data source `key`, or None if its identity changed.

        `identity` is what must be unchanged for the recorded digest to hold, such as the
        file's size and modification time.
        """
        entry = self._source_digests().get(key)
        if not isinstance(entry, dict) or entry.get("identity") != identity:
            return None
        sha256 = entry.get("sha256")
        return sha256 if isinstance(sha256, str) else None

    def record_source_digest(self, key: str, identity: dict[str, Any], sha256: str) -> None:
        """Record a data source's sha256 with the identity it was computed for.

        Writes nothing if that entry is already recorded. Two processes that record at
        the same moment each replace the whole file, so one entry can be lost. That
        source is then hashed again by the next run.
        """
        digests = self._source_digests()
        entry = {"identity": identity, "sha256": sha256}
        if digests.get(key) == entry:
            return
        digests[key] = entry
        self.root.mkdir(parents=True, exist_ok=True)
        _write_json_atomically(self.source_digests_file, digests)

    def _source_digests(self) -> dict[str, Any]:
        try:
            digests = json.loads(self.source_digests_file.read_text())
        except (OSError, ValueError):
            return {}
        return digests if isinstance(digests, dict) else {}

    @contextmanager
    def staging(self, label: str) -> Iterator[Path]:
        """Yield a fresh folder under `staging/`; remove it if the block raises.

        The folder's name ends in the writing process's id, so that `stackwise gc` can
        tell a folder still being written from one a killed run left behind.
        """
        folder = self.staging_dir / f"{label}-{uuid.uuid4().hex[:12]}-pid{os.getpid()}"
        folder.mkdir(parents=True)
        try:
            yield folder
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def publish(
        self, staged: Path, target: Path, manifest: dict[str, Any], replace: bool = False
    ) -> dict[str, Any]:
        """Write the manifest into `staged`, then rename it to `target`; return the manifest.

        The manifest's `files` entries, if the caller already computed them, are reused
        for every file whose size and modification time are unchanged.

        A damaged `target`, or any `target` when `replace` is set (a forced rebuild), is
        moved aside first and deleted after the new folder is in place. A sound `target`
        that another run published first is kept, and its manifest returned: replacing
        it would pull files from under a run that is reading them.
        """
        manifest = {
            **manifest,
            "manifest_version": MANIFEST_VERSION,
            "files": checksum_files(staged, manifest.get("files")),
        }
        _fsync_tree(staged)
        _write_json_atomically(staged / MANIFEST, manifest)
        _pause_if_requested("manifest-written", staged)
        target.parent.mkdir(parents=True, exist_ok=True)
        retired = None
        if target.exists():
            existing = self.verify(target)
            if existing.ok and not replace:
                shutil.rmtree(staged, ignore_errors=True)
                return existing.manifest
            retired = target.with_name(f".retired-{target.name}-{uuid.uuid4().hex[:8]}")
            os.rename(target, retired)
        try:
            os.rename(staged, target)
        except OSError as exc:
            # Another run renamed its folder into place between the check and the rename.
            existing = self.verify(target)
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not existing.ok:
                raise
            shutil.rmtree(staged, ignore_errors=True)
            manifest = existing.manifest
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
        return manifest

    def verify(self, folder: Path, full: bool = False) -> Verification:
        """Check that `folder` is a complete artifact whose files match its manifest.

        With `full`, every file's sha256 is recomputed; otherwise only files whose size
        or modification time differ from the manifest's are.
        """
        if not folder.is_dir():
            return Verification(None, "artifact missing")
        manifest = read_manifest(folder)
        problem = _manifest_problem(manifest, folder)
        if problem:
            return Verification(None, f"{folder / MANIFEST}: {problem}")
        for relative, expected in manifest["files"].items():
            problem = _check_file(folder / relative, expected, full)
            if problem:
                return Verification(None, f"{folder / relative}: {problem}")
        return Verification(manifest)

    def lookup(self, folder: Path, full: bool = False) -> dict[str, Any] | None:
        """Return the manifest of a trustworthy artifact at `folder`, warning about a corrupt one."""
        result = self.verify(folder, full=full)
        if result.ok:
            return result.manifest
        if folder.exists() and result.problem:
            logger.warning("Ignoring a damaged artifact, it will be rebuilt: %s", result.problem)
        return None


def _manifest_problem(manifest: Any, folder: Path) -> str | None:
    """Return why `manifest` cannot describe the artifact in `folder`, or None."""
    if manifest is None:
        return "missing or not valid JSON"
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        return "has no file list"
    for relative, expected in manifest["files"].items():
        parts = Path(relative).parts
        if Path(relative).is_absolute() or ".." in parts or not parts:
            return f"lists a file outside the artifact: {relative!r}"
        if not (isinstance(expected, dict) and isinstance(expected.get("size"), int)
                and isinstance(expected.get("sha256"), str)):
            return f"the entry for {relative!r} has no size and sha256"
    # A folder copied or renamed to another fingerprint must not pass for that artifact.
    name = manifest.get("fingerprint", manifest.get("digest"))
    if name is not None and name != folder.name:
        return f"belongs to {str(name)[:12]}…, not to this folder"
    return None


def _pause_if_requested(point: str, folder: Path) -> None:
    requested, _, label = os.environ.get(PAUSE_VARIABLE, "").partition(":")
    if requested != point or not folder.name.startswith(label):
        return
    folder.with_name(folder.name + ".paused").touch()
    while True:
        time.sleep(60)


def _check_file(path: Path, expected: dict[str, Any], full: bool) -> str | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return "file missing"
    except OSError as exc:
        # Such as a file where the artifact had a folder (NotADirectoryError).
        return f"cannot be read: {exc.strerror}"
    if not path.is_file():
        return "is not a file"
    if stat.st_size != expected["size"]:
        return f"size is {stat.st_size} bytes, the manifest records {expected['size']}"
    if full or stat.st_mtime_ns != expected.get("mtime_ns"):
        try:
            actual = digest_file(path)
        except OSError as exc:
            return f"cannot be read: {exc.strerror}"
        if actual != expected["sha256"]:
            return f"sha256 is {actual[:12]}…, the manifest records {expected['sha256'][:12]}…"
    return None
