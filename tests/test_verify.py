"""`stackwise verify`: every sha256 recomputed, one line per artifact, exit 1 on damage.

Each test works on a copy of a store in which `stackwise run` trained the tiny stack.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.store import Store
from tests.conftest import PROJECT, run_cli, tiny_spec, write_spec
from tests.store_checks import error_lines
from tests.test_corruption import flip_byte

pytestmark = pytest.mark.slow


def verify(*arguments: str, data_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    return run_cli("verify", *arguments, "--data-dir", str(data_dir), cwd=cwd)


def artifact_lines(stdout: str) -> dict[str, str]:
    """Map each artifact line's kind, name and short fingerprint to its outcome."""
    lines = {}
    for line in stdout.splitlines():
        if line.startswith("total:"):
            continue
        kind, name, fingerprint, outcome = line.split(maxsplit=3)
        lines[f"{kind} {name} {fingerprint}"] = outcome
    return lines


def expected_keys(summary: dict, data_dir: Path) -> set[str]:
    """Return the line keys of the tiny stack's dataset, three stages and assembled model."""
    dataset = next((data_dir / "datasets").iterdir()).name
    keys = {f"dataset sklearn:digits {dataset[:12]}"}
    keys |= {f"stage {stage['name']} {stage['fingerprint'][:12]}" for stage in summary["stages"]}
    keys.add(f"assembled tiny {Path(summary['model_dir']).parent.name[:12]}")
    return keys


def test_sound_store_passes(trained_copy, trained_store, tmp_path):
    data_dir, _, _ = trained_copy
    _, summary = trained_store

    result = verify(data_dir=data_dir, cwd=tmp_path)

    assert result.returncode == 0, result.stderr[-2000:]
    lines = artifact_lines(result.stdout)
    assert set(lines) == expected_keys(summary, data_dir)
    assert set(lines.values()) == {"ok"}
    assert result.stdout.splitlines()[-1] == f"total: 5 artifacts in {data_dir}, 5 ok, 0 damaged"


def test_staging_and_retired_folders_skipped(trained_copy, tmp_path):
    data_dir, _, folders = trained_copy
    # A folder a killed run left in staging/, and an old artifact that a rebuild moved
    # aside, both damaged: neither is an artifact that a run reads.
    staged = data_dir / "staging" / "stage-hidden_1-0123456789ab-pid1"
    shutil.copytree(folders["hidden_1"], staged)
    (staged / "features" / "train.parquet").write_bytes(b"partial")
    retired = folders["hidden_1"].with_name(f".retired-{folders['hidden_1'].name}-1234abcd")
    shutil.copytree(folders["hidden_1"], retired)
    (retired / "features" / "train.parquet").write_bytes(b"partial")

    result = verify(data_dir=data_dir, cwd=tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert len(artifact_lines(result.stdout)) == 5
    assert str(data_dir / "staging") not in result.stdout
    assert ".retired-" not in result.stdout


def test_forged_time_edit_caught(trained_copy, tmp_path):
    data_dir, spec_path, folders = trained_copy
    damaged = folders["hidden_1"] / "model" / "saved_model.pb"
    flip_byte(damaged, keep_mtime=True)

    plan = run_cli("plan", str(spec_path), "--data-dir", str(data_dir), cwd=tmp_path)
    result = verify(data_dir=data_dir, cwd=tmp_path)

    # The quick check that `stackwise run` and `stackwise plan` make reuses the stage.
    assert Store(data_dir).verify(folders["hidden_1"]).ok
    hidden_1 = next(line for line in plan.stdout.splitlines() if line.split()[:1] == ["hidden_1"])
    assert hidden_1.split()[1] == "reuse"
    # Full verification finds it and names the file.
    assert result.returncode == 1, result.stderr[-2000:]
    outcomes = {key.split()[1]: outcome for key, outcome in artifact_lines(result.stdout).items()}
    assert outcomes["hidden_1"].startswith(f"damaged: {damaged}: sha256 is")
    assert outcomes["hidden_2"] == "ok"
    assert result.stdout.splitlines()[-1].endswith("4 ok, 1 damaged")
    errors = error_lines(result.stderr)
    assert len(errors) == 1, result.stderr[-2000:]
    assert str(folders["hidden_1"].relative_to(data_dir)) in errors[0]
    assert "Delete this folder" in errors[0]
    assert "Traceback" not in result.stderr


def replace_folder_with_file(folder: Path) -> None:
    shutil.rmtree(folder)
    folder.write_text("x")


def nest_manifest(folder: Path) -> None:
    (folder / "manifest.json").write_text("[" * 200_000)


@pytest.mark.parametrize("damage, problem", [
    (lambda folders: replace_folder_with_file(folders["head"] / "model"), "cannot be read: Not a directory"),
    (lambda folders: nest_manifest(folders["head"]), "missing or not valid JSON"),
], ids=["file in place of folder", "deeply nested manifest"])
def test_odd_damage_reported_not_raised(trained_copy, tmp_path, damage, problem):
    data_dir, spec_path, folders = trained_copy
    damage(folders)

    result = verify(data_dir=data_dir, cwd=tmp_path)
    plan = run_cli("plan", str(spec_path), "--data-dir", str(data_dir), cwd=tmp_path)

    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    outcomes = {key.split()[1]: outcome for key, outcome in artifact_lines(result.stdout).items()}
    assert outcomes["head"].startswith("damaged: ")
    assert problem in outcomes["head"]
    # A run rebuilds what the quick check rejects.
    assert plan.returncode == 0, plan.stderr[-2000:]
    head = next(line for line in plan.stdout.splitlines() if line.split()[:1] == ["head"])
    assert head.split()[1] == "train"


def test_json_output_lists_damage(trained_copy, tmp_path):
    data_dir, spec_path, folders = trained_copy
    flip_byte(folders["head"] / "features" / "test.parquet", keep_mtime=True)

    result = verify(str(spec_path), "--json", data_dir=data_dir, cwd=tmp_path)

    assert result.returncode == 1, result.stderr[-2000:]
    output = json.loads(result.stdout)
    assert output["store"] == str(data_dir)
    assert output["spec"] == str(spec_path)
    assert output["counts"] == {"ok": 4, "damaged": 1}
    head = next(entry for entry in output["artifacts"] if entry["name"] == "head")
    assert head["status"] == "damaged"
    assert head["folder"] == str(folders["head"])
    assert "features/test.parquet: sha256 is" in head["problem"]


def test_spec_lists_only_its_artifacts(trained_copy, trained_store, tmp_path):
    data_dir, spec_path, _ = trained_copy
    _, summary = trained_store
    # Another version of the stack, whose head differs, adds a head and an assembled model.
    changed = tiny_spec()
    changed["stages"][2]["epochs"] = 1
    changed_path = write_spec(tmp_path, changed, "changed.yaml")
    trained = run_cli("run", str(changed_path), "--data-dir", str(data_dir), cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]

    whole = verify(data_dir=data_dir, cwd=tmp_path)
    current = verify(str(spec_path), data_dir=data_dir, cwd=tmp_path)

    assert whole.returncode == 0, whole.stderr[-2000:]
    assert len(artifact_lines(whole.stdout)) == 7
    assert current.returncode == 0, current.stderr[-2000:]
    assert set(artifact_lines(current.stdout)) == expected_keys(summary, data_dir)
    assert current.stdout.splitlines()[-1] == f"total: 5 artifacts in {data_dir}, 5 ok, 0 damaged"


def test_spec_not_yet_trained(trained_copy, tmp_path):
    data_dir, _, _ = trained_copy
    changed = tiny_spec()
    changed["stages"][0]["epochs"] = 1
    changed_path = write_spec(tmp_path, changed, "changed.yaml")

    result = verify(str(changed_path), data_dir=data_dir, cwd=tmp_path)

    # Nothing is damaged: the first stage is missing, and what depends on it is unknown.
    assert result.returncode == 0, result.stderr[-2000:]
    outcomes = {" ".join(key.split()[:2]): outcome for key, outcome in artifact_lines(result.stdout).items()}
    assert outcomes["dataset sklearn:digits"] == "ok"
    assert outcomes["stage hidden_1"].startswith("missing")
    assert outcomes["stage hidden_2"].startswith("unknown")
    assert outcomes["stage head"].startswith("unknown")
    assert outcomes["assembled tiny"].startswith("unknown")


BAD_INPUTS = [
    ("missing store", lambda folder: [], "missing", r"artifact store '\S+/missing' not found"),
    ("missing spec", lambda folder: [str(folder / "absent.yaml")], None, r"absent\.yaml: spec file not found"),
    ("invalid YAML", lambda folder: [str(folder / "bad.yaml")], None, r"invalid YAML"),
    ("unknown parent", lambda folder: [str(folder / "orphan.yaml")], None, r"hidden_9"),
]


@pytest.mark.parametrize("label, arguments, store_name, message", BAD_INPUTS, ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_exits_2(trained_copy, tmp_path, label, arguments, store_name, message):
    data_dir, _, _ = trained_copy
    (tmp_path / "bad.yaml").write_text("name: x\nstages: [\n")
    orphan = tiny_spec()
    orphan["stages"][1]["parents"] = ["hidden_9"]
    write_spec(tmp_path, orphan, "orphan.yaml")
    store = tmp_path / store_name if store_name else data_dir

    result = verify(*arguments(tmp_path), data_dir=store, cwd=tmp_path)

    assert result.returncode == 2, result.stdout + result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1, result.stderr[-2000:]
    assert result.stderr.rstrip().splitlines()[-1] == errors[0]
    assert re.search(message, errors[0]), errors[0]
    assert result.stdout == ""
    assert not (tmp_path / "missing").exists()


IMPORT_CHECK = """
import json, sys
from flows.cli import main
code = main(["verify", sys.argv[1], "--data-dir", sys.argv[2]])
heavy = sorted({name.split(".")[0] for name in sys.modules} & {"tensorflow", "keras", "prefect"})
print(json.dumps({"code": code, "heavy": heavy}))
"""


def test_verify_imports_no_tensorflow(trained_copy, tmp_path):
    data_dir, spec_path, _ = trained_copy

    result = subprocess.run(
        [sys.executable, "-c", IMPORT_CHECK, str(spec_path), str(data_dir)],
        cwd=PROJECT, capture_output=True, text=True, timeout=120,
    )

    assert result.returncode == 0, result.stderr[-2000:]
    output = json.loads(result.stdout.splitlines()[-1])
    assert output["code"] == 0
    assert output["heavy"] == []
