"""Damaged artifacts in the store are detected on reuse, reported by file, and rebuilt.

Each test works on a copy of a store in which `stackwise run` trained the tiny stack.
The quick check compares sizes and modification times and recomputes the sha256 of
a file whose time changed; full verification recomputes every sha256.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from tasks.store import MANIFEST, Store
from tests.conftest import run_cli
from tests.store_checks import statuses, untrusted_published

pytestmark = pytest.mark.slow


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip_byte(path: Path, keep_mtime: bool = False) -> None:
    """Change one byte in the middle of `path`, keeping its size (and its time if asked)."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    else:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def run_json(spec_path: Path, data_dir: Path):
    result = run_cli("run", str(spec_path), "--json", "--data-dir", str(data_dir), cwd=spec_path.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout), result.stderr


def damage_warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "Ignoring a damaged artifact" in line]


# What each kind of damage does to the quick check and to full verification.
DAMAGE = [
    ("truncated feature file", "features/train.parquet", truncate, r"features/train\.parquet: size is \d+ bytes, "
     r"the manifest records \d+", True),
    ("same-size edit, new time", "model/saved_model.pb", flip_byte, r"model/saved_model\.pb: sha256 is", True),
    ("deleted variables file", "model/variables/variables.index", lambda path: path.unlink(),
     r"variables\.index: file missing", True),
    ("deleted manifest", MANIFEST, lambda path: path.unlink(), r"manifest\.json: missing or not valid JSON", True),
    ("garbage manifest", MANIFEST, lambda path: path.write_bytes(b"\x00{not json"),
     r"manifest\.json: missing or not valid JSON", True),
    ("manifest without file list", MANIFEST, lambda path: path.write_text(json.dumps({"files": []})),
     r"manifest\.json: has no file list", True),
    ("manifest pointing outside", MANIFEST, lambda path: path.write_text(json.dumps(
        {"files": {"../../x": {"size": 1, "sha256": "0"}}})), r"lists a file outside the artifact", True),
    ("same-size edit, forged time", "model/saved_model.pb", lambda path: flip_byte(path, keep_mtime=True),
     r"model/saved_model\.pb: sha256 is", False),
]


@pytest.mark.parametrize("label, relative, damage, problem, quick_catches", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damage_detected(trained_copy, label, relative, damage, problem, quick_catches):
    data_dir, _, folders = trained_copy
    store = Store(data_dir)
    folder = folders["hidden_2"]
    damage(folder / relative)

    full = store.verify(folder, full=True)
    quick = store.verify(folder)

    assert not full.ok
    assert full.problem is not None
    assert re.search(problem, full.problem), full.problem
    # NOTE: a same-size edit whose modification time is set back is invisible to the
    # quick check that every run does; only full verification finds it.
    assert quick.ok is not quick_catches


def test_copied_artifact_not_trusted_elsewhere(trained_copy):
    data_dir, _, folders = trained_copy
    impostor = folders["hidden_2"].with_name("0" * 64)
    shutil.copytree(folders["hidden_2"], impostor, copy_function=shutil.copy2)

    result = Store(data_dir).verify(impostor)

    assert not result.ok
    assert "belongs to" in result.problem


def test_truncated_feature_file_rebuilt(trained_copy):
    data_dir, spec_path, folders = trained_copy
    damaged = folders["hidden_2"] / "features" / "train.parquet"
    truncate(damaged)

    summary, stderr = run_json(spec_path, data_dir)

    assert statuses(summary) == {"hidden_1": "cached", "hidden_2": "trained", "head": "cached"}
    warnings = damage_warnings(stderr)
    assert len(warnings) == 1, stderr[-3000:]
    assert f"{damaged}: size is" in warnings[0]
    assert Store(data_dir).verify(folders["hidden_2"], full=True).ok
    assert untrusted_published(data_dir) == []


def test_edited_saved_model_rebuilt(trained_copy):
    data_dir, spec_path, folders = trained_copy
    damaged = folders["hidden_1"] / "model" / "saved_model.pb"
    flip_byte(damaged)

    summary, stderr = run_json(spec_path, data_dir)

    # The rebuilt stage is bit-identical (deterministic training), so its children are reused.
    assert statuses(summary) == {"hidden_1": "trained", "hidden_2": "cached", "head": "cached"}
    warnings = damage_warnings(stderr)
    assert len(warnings) == 1, stderr[-3000:]
    assert f"{damaged}: sha256 is" in warnings[0]
    assert Store(data_dir).verify(folders["hidden_1"], full=True).ok


def test_garbage_manifest_rebuilt(trained_copy):
    data_dir, spec_path, folders = trained_copy
    manifest = folders["head"] / MANIFEST
    manifest.write_text("{ this is not json")

    plan = run_cli("plan", str(spec_path), "--data-dir", str(data_dir), cwd=spec_path.parent)
    summary, stderr = run_json(spec_path, data_dir)

    assert "artifact damaged" in plan.stdout
    assert statuses(summary) == {"hidden_1": "cached", "hidden_2": "cached", "head": "trained"}
    warnings = damage_warnings(stderr)
    assert len(warnings) == 1, stderr[-3000:]
    assert f"{manifest}: missing or not valid JSON" in warnings[0]
    assert Store(data_dir).verify(folders["head"], full=True).ok


def test_forged_time_edit_reused(trained_copy):
    """The known gap: a same-size edit with its old modification time restored is reused."""
    data_dir, spec_path, folders = trained_copy
    flip_byte(folders["hidden_1"] / "model" / "saved_model.pb", keep_mtime=True)

    plan = run_cli("plan", str(spec_path), "--data-dir", str(data_dir), cwd=spec_path.parent)

    assert plan.returncode == 0, plan.stderr[-2000:]
    hidden_1 = next(line for line in plan.stdout.splitlines() if line.split()[:1] == ["hidden_1"])
    assert hidden_1.split()[1] == "reuse"
    assert untrusted_published(data_dir) == [folders["hidden_1"]]
