"""A Prefect lock manager whose locks are released when the holding process dies.

Prefect's FileSystemLockManager (3.9) writes a lock file and removes it on release.
A process killed while it holds a lock never removes it, and without an expiration
the next run of the same stage then waits for that lock forever. It also creates the
file empty and writes it afterwards, so a waiting process can read an empty file.

ProcessLockManager keeps Prefect's file format, and the process that writes a lock
file holds an flock on it until release. The kernel drops an flock when its process
exits, however it exits, so a lock file without an flock belongs to a dead process
and is removed. flock works between processes on one machine; on a
network file system it depends on the server.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path

from prefect.locking.filesystem import FileSystemLockManager

__all__ = ["ProcessLockManager", "remove_if_abandoned"]

logger = logging.getLogger(__name__)

POLL_SECONDS = 0.1

# Open descriptors that hold an flock on a lock file, by the file's path. They are
# process-wide because Prefect may release a lock through another manager instance.
_held: dict[str, int] = {}
_held_guard = threading.Lock()


def remove_if_abandoned(path: Path) -> bool:
    """Remove the lock file at `path` if no live process holds its flock; return whether it did."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        # Only a holder unlinks its own file, and the holder is gone, so the file at
        # `path` is still the one opened above unless another remover got there first.
        try:
            if os.stat(path).st_ino != os.fstat(descriptor).st_ino:
                return False
            os.unlink(path)
        except FileNotFoundError:
            return False
        logger.warning("Removed lock file %s: the process that held it has exited", path)
        return True
    finally:
        os.close(descriptor)


class ProcessLockManager(FileSystemLockManager):
    """FileSystemLockManager whose lock files are written whole and die with their process."""

    def acquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        self._ensure_lock_files_directory_exists()
        path = self._lock_path_for_key(key)
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        while True:
            if self._create_lock_file(path, holder):
                self._locks[key] = {"holder": holder, "expiration": None, "path": path}
                return True
            if self.is_lock_holder(key, holder):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(POLL_SECONDS)

    async def aacquire_lock(
        self,
        key: str,
        holder: str,
        acquire_timeout: float | None = None,
        hold_timeout: float | None = None,
    ) -> bool:
        # NOTE: blocks the event loop while waiting; stackwise's tasks are synchronous.
        return self.acquire_lock(key, holder, acquire_timeout, hold_timeout)

    def release_lock(self, key: str, holder: str) -> None:
        if not self.is_lock_holder(key, holder):
            raise ValueError(f"No lock held by {holder} for transaction with key {key}")
        path = self._lock_path_for_key(key)
        Path(path).unlink(missing_ok=True)
        self._locks.pop(key, None)
        with _held_guard:
            descriptor = _held.pop(str(path), None)
        if descriptor is not None:
            os.close(descriptor)

    def is_locked(self, key: str, use_cache: bool = False) -> bool:
        remove_if_abandoned(self._lock_path_for_key(key))
        return super().is_locked(key, use_cache=use_cache)

    def _create_lock_file(self, path: Path, holder: str) -> bool:
        # Write and flock the file under a temporary name, then hard-link it into place:
        # the link fails if another holder's file is there, and otherwise makes the lock
        # file appear complete and already locked.
        remove_if_abandoned(path)
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            os.write(descriptor, json.dumps({"holder": holder, "expiration": None}).encode())
            os.link(temporary, path)
        except FileExistsError:
            os.close(descriptor)
            return False
        except BaseException:
            os.close(descriptor)
            raise
        finally:
            os.unlink(temporary)
        with _held_guard:
            _held[str(path)] = descriptor
        return True
