"""`stackwise gc`: removes what no given spec references, and nothing a running flow holds."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.gc import STAGING_MIN_AGE_SECONDS, collect, references
from tasks.leases import Leases
from tasks.spec import load_spec
from tasks.store import Store
from tests.conftest import PROJECT, run_cli, tiny_spec, write_spec
from tests.store_checks import artifact_folders, trusted_artifacts

pytestmark = pytest.mark.slow


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def make_staging(store: Store, name: str, age_seconds: float) -> Path:
    folder = store.staging_dir / name
    folder.mkdir(parents=True)
    (folder / "partial.parquet").write_bytes(b"x" * 1000)
    then = time.time() - age_seconds
    os.utime(folder, (then, then))
    return folder


def gc(*arguments: str, data_dir: Path, cwd: Path):
    return run_cli("gc", *arguments, "--data-dir", str(data_dir), cwd=cwd)


def other_stack(folder: Path) -> Path:
    """Write a spec of another stack whose stages share no name with the tiny stack's."""
    spec = tiny_spec(name="other")
    for stage in spec["stages"]:
        stage["name"] = "other_" + stage["name"]
        stage["parents"] = ["other_" + parent for parent in stage.get("parents", [])]
    return write_spec(folder, spec, "other.yaml")


def changed_first_stage(folder: Path) -> Path:
    spec = tiny_spec()
    spec["stages"][0]["epochs"] = 4
    return write_spec(folder, spec, "changed.yaml")


def test_current_spec_keeps_every_artifact(trained_copy, tmp_path):
    data_dir, spec_path, _ = trained_copy
    before = artifact_folders(data_dir)

    result = gc(str(spec_path), "--delete", data_dir=data_dir, cwd=tmp_path)

    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1].startswith("total: 0 entries, 0.0 MB removed")
    assert artifact_folders(data_dir) == before
    assert len(trusted_artifacts(data_dir)) == 5


def test_dry_run_lists_and_delete_removes(trained_copy, tmp_path):
    data_dir, _, folders = trained_copy
    store = Store(data_dir)
    stale = make_staging(store, f"stage-hidden_1-0123456789ab-pid{dead_pid()}", STAGING_MIN_AGE_SECONDS * 2)
    young = make_staging(store, f"stage-hidden_1-ba9876543210-pid{dead_pid()}", 0)
    writing = make_staging(store, f"stage-head-aaaaaaaaaaaa-pid{os.getpid()}", STAGING_MIN_AGE_SECONDS * 2)
    retired = folders["hidden_1"].with_name(f".retired-{folders['hidden_1'].name}-1234abcd")
    shutil.copytree(folders["hidden_1"], retired)
    old_result = data_dir / "prefect" / "results" / f"stackwise-{folders['hidden_1'].name}"
    assert old_result.is_file()
    spec_path = changed_first_stage(tmp_path)

    dry = gc(str(spec_path), data_dir=data_dir, cwd=tmp_path)

    assert dry.returncode == 0, dry.stderr[-2000:]
    listed = {line.split()[-1]: line for line in dry.stdout.splitlines() if line.startswith("remove ")}
    assert set(listed) == {str(folders["hidden_1"]), str(stale), str(retired), str(old_result)}
    assert " MB  " in listed[str(folders["hidden_1"])]
    assert "fingerprint unknown until its parents are trained" in dry.stdout
    assert f"{writing} (written by running process {os.getpid()})" in dry.stdout
    assert "run again with --delete to remove them" in dry.stdout.splitlines()[-1]
    assert folders["hidden_1"].exists()
    assert stale.exists()
    assert retired.exists()

    deleted = gc(str(spec_path), "--delete", data_dir=data_dir, cwd=tmp_path)

    assert deleted.returncode == 0, deleted.stderr[-2000:]
    assert not folders["hidden_1"].exists()
    assert not stale.exists()
    assert not retired.exists()
    assert not old_result.exists()
    for kept in (young, writing, folders["hidden_2"], folders["head"], folders["assembled"]):
        assert kept.exists(), kept
    assert deleted.stdout.splitlines()[-1].startswith("total: 4 entries")


def test_other_stack_removes_all_stages(trained_copy, tmp_path):
    data_dir, spec_path, folders = trained_copy
    other_path = other_stack(tmp_path)

    result = gc(str(other_path), "--delete", data_dir=data_dir, cwd=tmp_path)

    assert result.returncode == 0, result.stderr[-2000:]
    assert [folder.parent.name for folder in artifact_folders(data_dir)] == ["datasets"]
    assert not list((data_dir / "prefect" / "results").iterdir())

    both = gc(str(spec_path), str(other_path), data_dir=data_dir, cwd=tmp_path)
    assert both.stdout.splitlines()[-1].startswith("total: 0 entries")


def test_leased_folder_kept(trained_copy):
    data_dir, _, folders = trained_copy
    store = Store(data_dir)
    found = references([load_spec(other_stack(data_dir.parent))], store)

    with Leases(store) as leases:
        leases.hold(folders["hidden_2"])
        collection = collect(store, found)

    held = [entry.path for entry in collection.keep if entry.reason == "held by a running flow"]
    assert held == [folders["hidden_2"]]
    assert folders["hidden_1"] in [entry.path for entry in collection.remove]


def test_running_flow_artifacts_kept(trained_copy, tmp_path):
    """A real run paused while it retrains hidden_2 keeps its leases; gc skips those folders until it ends."""
    data_dir, spec_path, folders = trained_copy
    other_path = other_stack(tmp_path)
    run = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "run", str(spec_path), "--retrain", "hidden_2",
         "--data-dir", str(data_dir)],
        cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(PROJECT), "STACKWISE_PAUSE_AT": "manifest-written:stage-hidden_2"},
    )
    try:
        while not list(store_staging_markers(data_dir)):
            assert run.poll() is None, "the run ended before it paused"
            time.sleep(0.1)

        during = gc(str(other_path), "--delete", data_dir=data_dir, cwd=tmp_path)
    finally:
        os.killpg(run.pid, signal.SIGKILL)
        run.wait()

    assert during.returncode == 0, during.stderr[-2000:]
    for name in ("hidden_1", "hidden_2"):
        assert folders[name].exists()
        assert f"{folders[name]} (held by a running flow)" in during.stdout
    assert not folders["head"].exists()
    assert not folders["assembled"].exists()

    after = gc(str(other_path), "--delete", data_dir=data_dir, cwd=tmp_path)

    assert after.returncode == 0, after.stderr[-2000:]
    assert not folders["hidden_1"].exists()
    assert not folders["hidden_2"].exists()
    removed = [line.split()[-1] for line in after.stdout.splitlines() if line.startswith("removed ")]
    assert str(folders["hidden_1"]) in removed
    assert str(folders["hidden_2"]) in removed


def store_staging_markers(data_dir: Path):
    return (data_dir / "staging").glob("*.paused")


def test_gc_rejects_bad_spec(trained_copy, tmp_path):
    data_dir, _, _ = trained_copy
    before = artifact_folders(data_dir)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages: [\n")

    result = gc(str(bad), "--delete", data_dir=data_dir, cwd=tmp_path)

    assert result.returncode == 2
    assert "invalid YAML" in result.stderr
    assert artifact_folders(data_dir) == before
