"""Publishing an artifact reads each file once, so every sha256 in its manifest is computed one time."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

import tasks.store
from tasks.fingerprint import digest_file
from tasks.store import MANIFEST, Store, checksum_files
from tests.conftest import tiny_spec, write_spec


def staged_folder(store: Store) -> Path:
    folder = store.staging_dir / "test-artifact"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "weights.bin").write_bytes(b"weights " * 100)
    (folder / "features.parquet").write_bytes(b"features " * 100)
    return folder


def test_publish_reuses_known_entries(tmp_path):
    store = Store(tmp_path / "data")
    staged = staged_folder(store)
    entries = checksum_files(staged)
    stale = "0" * 64
    entries["model/weights.bin"]["sha256"] = stale

    manifest = store.publish(staged, tmp_path / "data" / "published", {"kind": "test", "files": entries})

    # The file is unchanged since the entry was computed, so its sha256 is taken as given,
    # even though it is wrong here. Full verification then reports the mismatch.
    assert manifest["files"]["model/weights.bin"]["sha256"] == stale
    published = tmp_path / "data" / "published"
    assert json.loads((published / MANIFEST).read_text())["files"]["model/weights.bin"]["sha256"] == stale
    verification = store.verify(published, full=True)
    assert not verification.ok
    assert "model/weights.bin: sha256 is" in verification.problem


def test_publish_rehashes_changed_file(tmp_path):
    store = Store(tmp_path / "data")
    staged = staged_folder(store)
    entries = checksum_files(staged)
    changed = staged / "model" / "weights.bin"
    changed.write_bytes(b"other weights " * 100)
    entries["features.parquet"]["sha256"] = "0" * 64
    # The entry of the unchanged file is reused, but the new time of the changed one forces a read.
    os.utime(changed, ns=(changed.stat().st_atime_ns, entries["model/weights.bin"]["mtime_ns"] + 10**9))

    manifest = store.publish(staged, tmp_path / "data" / "published", {"kind": "test", "files": entries})

    assert manifest["files"]["model/weights.bin"]["sha256"] == digest_file(tmp_path / "data" / "published" /
                                                                            "model" / "weights.bin")
    assert manifest["files"]["model/weights.bin"]["size"] == len(b"other weights " * 100)
    assert manifest["files"]["features.parquet"]["sha256"] == "0" * 64


def test_publish_without_entries_hashes_all(tmp_path):
    store = Store(tmp_path / "data")
    staged = staged_folder(store)

    manifest = store.publish(staged, tmp_path / "data" / "published", {"kind": "test"})

    assert set(manifest["files"]) == {"model/weights.bin", "features.parquet"}
    assert store.verify(tmp_path / "data" / "published", full=True).ok


@pytest.mark.slow
def test_stage_artifact_hashes_each_file_once(tmp_path, monkeypatch):
    from tasks.bases import pretrained_job_extra
    from tasks.dataset import snapshot_dataset
    from tasks.jobs import StageJob, dataset_parent
    from tasks.plan import decide_stage
    from tasks.spec import load_spec
    from tasks.training import train_stage, weights_digest

    raw = tiny_spec(defaults={"epochs": 1, "batch_size": 64, "learning_rate": 0.005, "seed": 0})
    spec = load_spec(write_spec(tmp_path, raw))
    store = Store(tmp_path / "data")
    dataset = snapshot_dataset(spec, store)
    stage = spec.stage("hidden_1")
    decision = decide_stage(spec, stage, dataset, {}, store)
    job = StageJob(
        stack=spec.name, stage=decision.inputs["stage"], fingerprint=decision.fingerprint,
        fingerprint_inputs=decision.inputs, parents=[dataset_parent(dataset)],
        dataset=dataset.to_dict(), store_root=str(store.root), extra=pretrained_job_extra(stage),
    )
    hashed: Counter[Path] = Counter()

    def counting_digest_file(path: Path) -> str:
        hashed[Path(path)] += 1
        return digest_file(path)

    # Every sha256 of a file that the store computes goes through this name; the stage code
    # hashes no file itself.
    monkeypatch.setattr(tasks.store, "digest_file", counting_digest_file)
    manifest = train_stage(job)
    monkeypatch.undo()

    # Each file was read in the staging folder, before the rename that published it.
    read_once = {path.relative_to(store.staging_dir).as_posix().split("/", 1)[1]: count
                 for path, count in hashed.items()}
    assert set(read_once) == set(manifest["files"])
    assert set(read_once.values()) == {1}, read_once
    folder = store.stage_dir("hidden_1", decision.fingerprint)
    assert store.verify(folder, full=True).ok
    # The published checkpoint still has the values the manifest's weights digest records.
    assert manifest["weights_digest"] == weights_digest(folder, ["model"])
