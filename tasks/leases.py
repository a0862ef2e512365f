"""Leases: a run's claim on the artifact folders it uses, which `stackwise gc` respects.

A run takes a shared flock on `leases/<folder>.lease` before it checks or uses an
artifact folder, and keeps it until the run ends. The kernel drops the flock when the
process exits, however it exits. `stackwise gc` removes a folder only while it
holds the exclusive flock on the same lease file, so it never removes a folder that
a run has a lease on. A run that starts using a folder during its removal waits,
then finds the folder missing and rebuilds it.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tasks.store import Store

__all__ = ["Leases", "exclusive_lease", "lease_path"]


def lease_path(store: Store, folder: Path) -> Path:
    """Return the lease file of an artifact folder inside the store."""
    relative = Path(folder).resolve().relative_to(store.root)
    return store.root / "leases" / ("__".join(relative.parts) + ".lease")


def _open_locked(path: Path, operation: int) -> int | None:
    """Open `path` (creating it) and flock it; return the descriptor, or None if it is taken.

    Retries when the file was replaced or removed between opening and locking, so the
    descriptor returned always locks the file that is at `path`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, operation)
        except BlockingIOError:
            os.close(descriptor)
            return None
        try:
            if os.stat(path).st_ino == os.fstat(descriptor).st_ino:
                return descriptor
        except FileNotFoundError:
            pass
        os.close(descriptor)


class Leases:
    """The shared leases one run holds, released together by `release` or at process exit."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._held: dict[Path, int] = {}

    def hold(self, folder: Path) -> None:
        """Take a shared lease on `folder`; waits while `stackwise gc` is removing it."""
        path = lease_path(self.store, folder)
        if path not in self._held:
            self._held[path] = _open_locked(path, fcntl.LOCK_SH)

    def release(self) -> None:
        for descriptor in self._held.values():
            os.close(descriptor)
        self._held.clear()

    def __enter__(self) -> Leases:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


@contextmanager
def exclusive_lease(store: Store, folder: Path) -> Iterator[bool]:
    """Yield True while this process holds the exclusive lease on `folder`, False if a run holds it.

    The lease file is removed on exit when it was taken, so removed folders leave none behind.
    """
    path = lease_path(store, folder)
    descriptor = _open_locked(path, fcntl.LOCK_EX | fcntl.LOCK_NB)
    if descriptor is None:
        yield False
        return
    try:
        yield True
    finally:
        path.unlink(missing_ok=True)
        os.close(descriptor)
