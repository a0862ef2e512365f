"""The benchmark script: a quick run produces the whole table."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import PROJECT

# The measurements every quick run must report, by section number.
EXPECTED_ROWS = {
    1: ["cold run", "all-cached rerun", "head-only rerun", "head training (manifest seconds)",
        "assembly in head-only rerun (manifest seconds)", "all-cached / cold",
        "head-only / (all-cached + head training)", "TensorFlow import in a new process",
        "head-only / (all-cached + TensorFlow import + head training)"],
    2: ["cold run", "all-cached rerun", "head-only rerun", "head training (manifest seconds)",
        "assembly in head-only rerun (manifest seconds)", "all-cached / cold",
        "head-only / (all-cached + head training)", "TensorFlow import in a new process",
        "head-only / (all-cached + TensorFlow import + head training)"],
    3: ["plain Keras script, one edit iteration", "plain Prefect tasks, cold run",
        "plain Prefect tasks, all-cached rerun", "plain Prefect tasks, head-only rerun",
        "stackwise head-only / plain Keras iteration", "stackwise head-only / plain Prefect head-only"],
    4: ["stackwise feature file write+read", "numpy.save + numpy.load",
        "Parquet, one float32 column per feature", "stackwise / one column per feature",
        "stackwise / numpy"],
    5: ["in memory (STACKWISE_MEMORY_BUDGET_MB=100000)", "streamed (STACKWISE_MEMORY_BUDGET_MB=1)",
        "streamed / in memory"],
    6: [f"{step}, {size}" for step in ("training, streamed", "extraction, streamed", "training, in memory")
        for size in ("5,000 rows", "20,000 rows", "4x / 1x")],
}


def _table_rows(report: str) -> dict[int, dict[str, str]]:
    """Map section number to {measurement: value cell} from the report's Markdown table."""
    rows: dict[int, dict[str, str]] = {}
    for line in report.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0][:1].isdigit():
            continue
        section = int(cells[0].split(".", 1)[0])
        rows.setdefault(section, {})[cells[1]] = cells[2]
    return rows


@pytest.mark.slow
def test_quick_benchmark_reports_every_row(tmp_path):
    output = tmp_path / "benchmark.md"
    environment = {
        **os.environ,
        "PYTHONPATH": str(PROJECT),
        "PREFECT_HOME": str(tmp_path / ".prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
    }
    result = subprocess.run(
        [sys.executable, str(PROJECT / "benchmarks" / "run.py"), "--quick", "--output", str(output)],
        cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = output.read_text()
    assert report in result.stdout
    assert "| section | measurement | value | unit | target | status |" in report
    assert "- CPU: " in report

    # Section 5 ran one stage in each input mode, as its manifests record.
    assert "input recorded: memory" in report
    assert "input recorded: stream" in report

    rows = _table_rows(report)
    assert sorted(rows) == sorted(EXPECTED_ROWS)
    for section, names in EXPECTED_ROWS.items():
        for name in names:
            assert name in rows[section], f"section {section} has no row '{name}'"
            value = float(rows[section][name])
            assert value > 0, f"section {section}, '{name}': {value} is not positive"
