"""The source digest cache: reused while a source's size and time are unchanged, recomputed otherwise."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tasks.dataset import dataset_digest, snapshot_dataset
from tasks.errors import DataError
from tasks.fingerprint import digest_file
from tasks.spec import load_spec
from tasks.store import Store
from tests.conftest import tiny_spec, write_spec
from tests.test_bad_inputs import csv_text, file_spec, table_rows


def file_source(folder: Path) -> tuple[Path, Path]:
    """Write a small CSV source and a spec that reads it; return both paths."""
    data = folder / "data.csv"
    data.write_text(csv_text(table_rows()))
    return data, write_spec(folder, file_spec())


def same_size_edit(path: Path) -> None:
    """Change the file's content but keep its size and modification time."""
    stat = path.stat()
    text = path.read_text()
    edited = text.replace("class_0", "class_3")
    assert edited != text
    assert len(edited) == len(text)
    path.write_text(edited)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_snapshot_records_source_digest(tmp_path):
    data, spec_path = file_source(tmp_path)
    store = Store(tmp_path / "store")

    snapshot_dataset(load_spec(spec_path), store)

    recorded = json.loads(store.source_digests_file.read_text())
    entry = recorded[f"file:{data.resolve()}"]
    assert entry["sha256"] == digest_file(data)
    assert entry["identity"] == {"size": data.stat().st_size, "mtime_ns": data.stat().st_mtime_ns}


def snapshot_then_edit(tmp_path):
    """Snapshot a file source, then edit the file keeping its size and time; return what the tests need."""
    data, spec_path = file_source(tmp_path)
    spec = load_spec(spec_path)
    store = Store(tmp_path / "store")
    first = snapshot_dataset(spec, store).digest
    same_size_edit(data)
    return data, spec, store, first


def test_unchanged_stat_uses_cached_digest(tmp_path):
    data, spec, store, first = snapshot_then_edit(tmp_path)

    # The content changed, but its size and time did not, so the cached digest is used:
    # the file was not read. Without the store, the digest comes from the new bytes.
    assert dataset_digest(spec, store) == first
    assert dataset_digest(spec) != first


def test_changed_time_recomputes_digest(tmp_path):
    data, spec, store, first = snapshot_then_edit(tmp_path)
    stat = data.stat()

    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))

    assert dataset_digest(spec, store) != first
    assert dataset_digest(spec, store) == dataset_digest(spec)


def test_changed_file_gives_new_digest(tmp_path):
    data, spec_path = file_source(tmp_path)
    spec = load_spec(spec_path)
    store = Store(tmp_path / "store")
    first = snapshot_dataset(spec, store).digest

    data.write_text(csv_text(table_rows(seed=1)) + "0,0,0,0,class_1\n")
    second = snapshot_dataset(spec, store)

    assert second.digest != first
    recorded = json.loads(store.source_digests_file.read_text())
    assert recorded[f"file:{data.resolve()}"]["sha256"] == digest_file(data)


def test_rejected_source_not_recorded(tmp_path):
    columns = table_rows()
    del columns["y"]
    (tmp_path / "data.csv").write_text(csv_text(columns))
    spec = load_spec(write_spec(tmp_path, file_spec()))
    store = Store(tmp_path / "store")

    with pytest.raises(DataError, match=r"data\.label: column 'y' not found"):
        snapshot_dataset(spec, store)

    assert not store.source_digests_file.exists()


@pytest.mark.slow
def test_builtin_source_uses_cache(tmp_path):
    spec = load_spec(write_spec(tmp_path, tiny_spec()))
    store = Store(tmp_path / "store")
    loaded = snapshot_dataset(spec, store).digest
    recorded = json.loads(store.source_digests_file.read_text())
    entry = recorded["builtin:sklearn:digits"]
    assert entry["identity"]["distribution"] == "scikit-learn"

    # A different sha256 under the same identity is taken as recorded, so nothing was loaded.
    entry["sha256"] = "0" * 64
    store.source_digests_file.write_text(json.dumps(recorded))
    assert dataset_digest(spec, store) != loaded

    # Another package version no longer matches the entry, so the data set is loaded again.
    entry["identity"]["version"] = "0.0"
    store.source_digests_file.write_text(json.dumps(recorded))
    assert dataset_digest(spec, store) == loaded
