"""Training faults through the real command line: a diverging loss and a stage out of memory.

Both start from a copy of a store in which the tiny stack is trained and change a
later stage so that it fails. The run must stop with exit code 1 and one line naming
the stage, and the artifacts of the earlier stages must stay as they were.
"""

from __future__ import annotations

import json
import re

import pytest

from tasks.stage_process import MEMORY_VARIABLE
from tests.conftest import run_cli, tiny_spec, write_spec
from tests.store_checks import error_lines, file_digests, statuses, untrusted_published

pytestmark = pytest.mark.slow

# A limit that the small stages fit under (a stage process peaks near 2.6 GB of
# address space on TensorFlow 2.21) and that a full-batch Dense layer of
# HEAVY_UNITS units exceeds by gigabytes.
MEMORY_LIMIT_MB = 4096
HEAVY_UNITS = 300_000


def test_diverging_stage_stops_run(trained_copy, tmp_path):
    data_dir, _, folders = trained_copy
    hidden_1 = folders["hidden_1"]
    spec = tiny_spec()
    # Inputs near 1e30 overflow float32 in the first batch: the loss becomes NaN or infinite.
    spec["stages"][1]["layers"] = [{"layer": "Rescaling", "scale": 1e30},
                                   {"layer": "Dense", "units": 16, "activation": "relu"}]
    spec_path = write_spec(tmp_path, spec)
    before = file_digests(hidden_1)

    result = run_cli("run", str(spec_path), "--data-dir", str(data_dir), cwd=tmp_path)

    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1, result.stderr[-3000:]
    assert "stage 'hidden_2': training diverged, the loss became" in errors[0]
    assert re.search(r"in epoch 1 \(batch \d+\); lower the learning rate \(now 0\.005\)", errors[0]), errors[0]
    assert file_digests(hidden_1) == before
    assert len(list((data_dir / "stages" / "hidden_2").iterdir())) == 1
    assert list((data_dir / "staging").iterdir()) == []
    assert untrusted_published(data_dir) == []


def test_stage_over_memory_limit_fails_alone(trained_copy, tmp_path):
    data_dir, _, folders = trained_copy
    hidden_1 = folders["hidden_1"]
    spec = tiny_spec()
    spec["stages"][1]["layers"][0]["units"] = 12
    spec["stages"][2].update(
        layers=[{"layer": "Dense", "units": HEAVY_UNITS, "activation": "relu"}], batch_size=4096, epochs=1,
    )
    spec_path = write_spec(tmp_path, spec)
    before = file_digests(hidden_1)

    limited = run_cli("run", str(spec_path), "--json", "--data-dir", str(data_dir), cwd=tmp_path,
                      env={MEMORY_VARIABLE: str(MEMORY_LIMIT_MB)})

    assert limited.returncode == 1, limited.stderr[-3000:]
    assert "Traceback" not in limited.stderr
    errors = error_lines(limited.stderr)
    assert len(errors) == 1, limited.stderr[-3000:]
    assert f"stage 'head' ran out of memory under the limit of {MEMORY_LIMIT_MB} MB set by {MEMORY_VARIABLE}" \
        in errors[0]
    assert file_digests(hidden_1) == before
    hidden_2_folders = list((data_dir / "stages" / "hidden_2").iterdir())
    assert len(hidden_2_folders) == 2  # the trained store's and the one trained under the limit
    assert untrusted_published(data_dir) == []

    lifted = run_cli("run", str(spec_path), "--json", "--data-dir", str(data_dir), cwd=tmp_path,
                     env={MEMORY_VARIABLE: None})

    assert lifted.returncode == 0, lifted.stderr[-3000:]
    assert statuses(json.loads(lifted.stdout)) == {"hidden_1": "cached", "hidden_2": "cached", "head": "trained"}
    assert file_digests(hidden_1) == before


@pytest.mark.parametrize("value", ["lots", "0", "-5", "4.5"])
def test_invalid_memory_limit_rejected(value, spec_file, tmp_path):
    result = run_cli("run", str(spec_file), "--data-dir", str(tmp_path / "data"), cwd=tmp_path,
                     env={MEMORY_VARIABLE: value})

    assert result.returncode == 2
    assert error_lines(result.stderr) == [
        f"stackwise: error: {MEMORY_VARIABLE}={value!r}: expected a positive whole number of megabytes, "
        "such as 4096; unset it for no limit"
    ]
    assert not (tmp_path / "data").exists()
