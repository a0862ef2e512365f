"""Benchmark stackwise's edit loop, feature files, streaming training and peak memory.

Run from the repository root:

    python benchmarks/run.py [--quick] [--output FILE]

It prints the machine and one Markdown table of every measurement, and writes the
same text to FILE when given. `--quick` uses tiny data and one epoch per stage, to
check that every section runs, so its numbers mean little.

Every stackwise run is the real command line (`python -m flows.cli run`, the
`stackwise` entry point) in a subprocess against a temporary store. All Prefect
runs, stackwise's and the plain Prefect baseline's, talk to one Prefect server that
this script starts on 127.0.0.1 and stops at the end, so no run pays the temporary
server's start (section 1 measures that start once). Nothing uses the network.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import yaml

PROJECT = Path(__file__).resolve().parent.parent
BENCHMARKS = PROJECT / "benchmarks"
sys.path.insert(0, str(PROJECT))

# Analytics off: this machine has no network, and nothing here should try to send anything.
QUIET_ENVIRONMENT = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
}
os.environ.update(QUIET_ENVIRONMENT)

MEMORY_BUDGET_VARIABLE = "STACKWISE_MEMORY_BUDGET_MB"
SECTIONS = {
    1: "digits stack",
    2: "synthetic stack",
    3: "without stackwise",
    4: "feature files",
    5: "streaming training",
    6: "peak memory",
}
SERVER_START_TIMEOUT = 180
STREAM_REPEATS = 2
RUN_TIMEOUT = 3600


@dataclass(frozen=True)
class Sizes:
    """Data sizes and epochs of one benchmark mode."""

    epochs: int | None  # None keeps the epochs of stacks/digits.yaml
    synthetic_rows: int
    synthetic_wide_units: int
    synthetic_epochs: int  # of the synthetic stack's wide first stage; the others train 2 or fewer
    file_rows: int
    stream_rows: int
    stream_epochs: int
    memory_rows: int  # the 1x size of section 6; the other size is 4x
    memory_budget_mb: int
    time_temporary_server: bool


FULL = Sizes(
    epochs=None, synthetic_rows=300_000, synthetic_wide_units=512, synthetic_epochs=6,
    file_rows=300_000, stream_rows=200_000, stream_epochs=2, memory_rows=100_000, memory_budget_mb=8,
    time_temporary_server=True,
)
QUICK = Sizes(
    epochs=1, synthetic_rows=3_000, synthetic_wide_units=64, synthetic_epochs=1,
    file_rows=20_000, stream_rows=5_000, stream_epochs=1, memory_rows=5_000, memory_budget_mb=1,
    time_temporary_server=False,
)
FEATURES = 64
CLASSES = 4


@dataclass(frozen=True)
class Row:
    """One line of the results table."""

    section: int
    measurement: str
    value: float
    unit: str
    target: str = ""
    note: str = ""


# --- running subprocesses ---------------------------------------------------------------


def _environment(prefect_home: Path, api_url: str | None, **extra: str) -> dict[str, str]:
    """Return the environment of a child process: this project first on the path, its own Prefect home."""
    environment = {
        **os.environ,
        **QUIET_ENVIRONMENT,
        "PYTHONPATH": os.pathsep.join([str(PROJECT), str(BENCHMARKS)]),
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_LOCAL_STORAGE_PATH": str(prefect_home / "storage"),
    }
    # Without an API URL a flow starts Prefect's temporary server on 127.0.0.1.
    environment.pop("PREFECT_API_URL", None)
    if api_url is not None:
        environment["PREFECT_API_URL"] = api_url
    for name in (MEMORY_BUDGET_VARIABLE, "STACKWISE_DATA_DIR"):
        environment.pop(name, None)
    environment.update(extra)
    return environment


def _timed(command: list[str], environment: dict[str, str], cwd: Path) -> tuple[float, str]:
    """Run `command`; return its wall-clock seconds and standard output. Raise if it fails."""
    started = time.perf_counter()
    result = subprocess.run(command, cwd=cwd, env=environment, capture_output=True, text=True,
                            timeout=RUN_TIMEOUT)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(
            f"command {' '.join(command)} failed with exit code {result.returncode}; "
            f"end of its standard error:\n{result.stderr[-3000:]}"
        )
    return seconds, result.stdout


def _last_json_line(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def prefect_server(home: Path) -> Iterator[str]:
    """Start a Prefect server on 127.0.0.1 with its own database; yield its API URL, then stop it."""
    port = _free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    command = [
        sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
        "--no-services", "--no-ui", "--analytics-off",
    ]
    log = open(home / "server.log", "w")
    # A session of its own, so that stopping it also stops the workers it starts.
    server = subprocess.Popen(command, env=_environment(home, None), stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        _wait_for_health(api_url, server)
        yield api_url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, 15)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)
            server.wait()
        log.close()


def _wait_for_health(api_url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the Prefect server exited with code {server.returncode}; see server.log")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"{api_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        time.sleep(0.5)
    raise RuntimeError(f"the Prefect server at {api_url} did not respond to /health within {SERVER_START_TIMEOUT} s; see server.log")


# --- specs and data -----------------------------------------------------------------------


def _write_yaml(path: Path, value: dict) -> Path:
    path.write_text(yaml.safe_dump(value, sort_keys=False))
    return path


def _with_head_edit(spec: dict) -> dict:
    """Return a copy of `spec` whose head stage trains one more epoch, the edit of the loop."""
    edited = json.loads(json.dumps(spec))
    head = next(stage for stage in edited["stages"] if stage.get("objective") == "head")
    head["epochs"] = head.get("epochs", edited["defaults"]["epochs"]) + 1
    return edited


def _digits_spec(sizes: Sizes) -> dict:
    spec = yaml.safe_load((PROJECT / "stacks" / "digits.yaml").read_text())
    if sizes.epochs is not None:
        spec["defaults"]["epochs"] = sizes.epochs
        for stage in spec["stages"]:
            stage.pop("epochs", None)
    return spec


def write_synthetic_data(path: Path, rows: int, seed: int = 0) -> None:
    """Write `rows` examples of FEATURES float features with labels from a fixed random linear teacher."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    teacher = np.random.default_rng(1234).normal(size=(FEATURES, CLASSES))
    features = rng.normal(size=(rows, FEATURES)).astype(np.float32)
    noise = rng.normal(scale=0.5, size=(rows, CLASSES))
    labels = np.argmax(features @ teacher + noise, axis=1)
    columns = {f"x{index:02d}": features[:, index] for index in range(FEATURES)}
    pq.write_table(pa.table({**columns, "label": labels}), path)


def _synthetic_spec(data_file: str, wide_units: int, epochs: int, stages: str = "stack") -> dict:
    """Return a spec over the synthetic file: an expensive wide stage, a narrow one and a head.

    The wide stage trains `epochs` epochs, the others at most 2. With `stages="one"`
    the spec has only the wide stage and the head.
    """
    wide = {"name": "wide", "epochs": epochs, "layers": [
        {"layer": "Dense", "units": wide_units, "activation": "relu"},
        {"layer": "Dense", "units": wide_units, "activation": "relu"},
    ]}
    narrow = {"name": "narrow", "parents": ["wide"], "layers": [
        {"layer": "Dense", "units": 64, "activation": "relu"},
    ]}
    head = {"name": "head", "parents": ["narrow"], "objective": "head"}
    if stages == "one":
        head["parents"] = ["wide"]
        chain = [wide, head]
    else:
        chain = [wide, narrow, head]
    return {
        "name": "synthetic",
        "data": {
            "source": data_file,
            "features": [f"x{index:02d}" for index in range(FEATURES)],
            "label": "label",
            "split": {"test": 0.1, "validation": 0.1, "seed": 0, "stratify": True},
        },
        "defaults": {"optimizer": "adam", "learning_rate": 0.001, "batch_size": 256,
                     "epochs": min(epochs, 2), "seed": 0},
        "stages": chain,
        "evaluation": {"split": "test"},
    }


# --- the edit loop ------------------------------------------------------------------------


@dataclass(frozen=True)
class EditLoop:
    """Seconds of one stack's cold run, all-cached rerun and head-only rerun."""

    cold: float
    cached: float
    head_only: float
    head_training: float  # the head's manifest `seconds` in the head-only rerun
    assembly: float  # the assembled model's manifest `seconds` in the head-only rerun
    test_accuracy: float  # of the assembled stack after the head-only rerun
    tensorflow_import: float  # a new process importing the stage process's modules


def _stackwise_run(spec_path: Path, data_dir: Path, environment: dict[str, str]) -> tuple[float, dict]:
    command = [sys.executable, "-m", "flows.cli", "run", str(spec_path), "--json", "--data-dir", str(data_dir)]
    seconds, output = _timed(command, environment, spec_path.parent)
    return seconds, json.loads(output)


def _check_statuses(summary: dict, expected: dict[str, str], run: str) -> None:
    statuses = {stage["name"]: stage["status"] for stage in summary["stages"]}
    if statuses != expected:
        raise RuntimeError(f"{run}: stage statuses {statuses}, expected {expected}")


def measure_edit_loop(spec: dict, folder: Path, api_url: str) -> EditLoop:
    """Run `spec` cold, again unchanged, and again with only the head edited; check what trained."""
    environment = _environment(folder / "prefect", api_url)
    spec_path = _write_yaml(folder / "stack.yaml", spec)
    edited_path = _write_yaml(folder / "stack-head-edit.yaml", _with_head_edit(spec))
    data_dir = folder / "store"
    names = [stage["name"] for stage in spec["stages"]]

    cold, summary = _stackwise_run(spec_path, data_dir, environment)
    _check_statuses(summary, {name: "trained" for name in names}, "cold run")
    cached, summary = _stackwise_run(spec_path, data_dir, environment)
    _check_statuses(summary, {name: "cached" for name in names}, "all-cached rerun")
    head_only, summary = _stackwise_run(edited_path, data_dir, environment)
    expected = {name: "cached" for name in names} | {names[-1]: "trained"}
    _check_statuses(summary, expected, "head-only rerun")

    head = next(stage for stage in summary["stages"] if stage["name"] == names[-1])
    head_manifest = _read_manifest(Path(head["model_dir"]).parent)
    assembly_manifest = _read_manifest(Path(summary["model_dir"]).parent)
    accuracy = float(summary["evaluation"]["metrics"]["accuracy"])
    return EditLoop(cold, cached, head_only, float(head_manifest["seconds"]),
                    float(assembly_manifest["seconds"]), accuracy, tensorflow_import_seconds(folder))


def _read_manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _edit_loop_rows(section: int, loop: EditLoop, cached_target: str = "", note: str = "") -> list[Row]:
    return [
        Row(section, "cold run", loop.cold, "s", note=f"{note}test accuracy {loop.test_accuracy:.4f}"),
        Row(section, "all-cached rerun", loop.cached, "s"),
        Row(section, "head-only rerun", loop.head_only, "s"),
        Row(section, "head training (manifest seconds)", loop.head_training, "s"),
        Row(section, "assembly in head-only rerun (manifest seconds)", loop.assembly, "s"),
        Row(section, "all-cached / cold", loop.cached / loop.cold, "ratio", cached_target),
        Row(section, "head-only / (all-cached + head training)",
            loop.head_only / (loop.cached + loop.head_training), "ratio", "< 1.2"),
        Row(section, "TensorFlow import in a new process", loop.tensorflow_import, "s",
            note="what any process that trains the head pays first"),
        Row(section, "head-only / (all-cached + TensorFlow import + head training)",
            loop.head_only / (loop.cached + loop.tensorflow_import + loop.head_training), "ratio"),
    ]


def tensorflow_import_seconds(folder: Path) -> float:
    """Time a new Python process that imports what a stage process imports, and exits."""
    command = [sys.executable, "-c", "import tasks.training, tasks.assembly"]
    seconds, _ = _timed(command, _environment(folder / "prefect", None), PROJECT)
    return seconds


def _temporary_server_seconds(folder: Path) -> float:
    """Time an empty flow run on Prefect's temporary server, which a run without PREFECT_API_URL starts."""
    script = folder / "empty_flow.py"
    script.write_text("from prefect import flow\n\n\n@flow\ndef empty():\n    return 1\n\n\nempty()\n")
    seconds, _ = _timed([sys.executable, str(script)], _environment(folder / "prefect", None), folder)
    return seconds


# --- sections -----------------------------------------------------------------------------


def measure_digits_stack(work: Path, sizes: Sizes, api_url: str) -> list[Row]:
    """Section 1: the edit loop of stacks/digits.yaml, and (full mode) the temporary server's start."""
    folder = work / "digits"
    folder.mkdir()
    loop = measure_edit_loop(_digits_spec(sizes), folder, api_url)
    rows = _edit_loop_rows(1, loop)
    if sizes.time_temporary_server:
        rows.append(Row(1, "empty flow on Prefect's temporary server", _temporary_server_seconds(folder), "s",
                        note="added to every run without PREFECT_API_URL"))
    return rows


def measure_synthetic_stack(work: Path, sizes: Sizes, api_url: str) -> tuple[list[Row], EditLoop, Path]:
    """Section 2: the edit loop of a larger synthetic stack; also return its spec for section 3."""
    folder = work / "synthetic"
    folder.mkdir()
    write_synthetic_data(folder / "data.parquet", sizes.synthetic_rows)
    spec = _synthetic_spec("data.parquet", sizes.synthetic_wide_units, sizes.synthetic_epochs)
    loop = measure_edit_loop(spec, folder, api_url)
    note = f"{sizes.synthetic_rows:,} rows x {FEATURES} features, first stage {sizes.synthetic_epochs} epochs; "
    return _edit_loop_rows(2, loop, cached_target="< 0.05", note=note), loop, folder


def measure_without_stackwise(synthetic: Path, stackwise: EditLoop, api_url: str) -> list[Row]:
    """Section 3: the synthetic stack's edit loop as one Keras script and as plain Prefect tasks."""
    spec_path = synthetic / "stack.yaml"
    edited_path = synthetic / "stack-head-edit.yaml"

    keras_environment = _environment(synthetic / "prefect-plain", None)
    keras_seconds, output = _timed([sys.executable, str(BENCHMARKS / "plain_keras.py"), str(edited_path)],
                                   keras_environment, synthetic)
    keras_accuracy = _last_json_line(output)["validation_accuracy"]

    prefect_environment = _environment(synthetic / "prefect-plain", api_url)
    command = [sys.executable, str(BENCHMARKS / "plain_prefect.py")]
    cold, _ = _timed([*command, str(spec_path)], prefect_environment, synthetic)
    rerun, _ = _timed([*command, str(spec_path)], prefect_environment, synthetic)
    head_only, _ = _timed([*command, str(edited_path)], prefect_environment, synthetic)

    return [
        Row(3, "plain Keras script, one edit iteration", keras_seconds, "s",
            note=f"retrains every stage; validation accuracy {keras_accuracy:.4f}"),
        Row(3, "plain Prefect tasks, cold run", cold, "s", note="cache_policy=INPUTS"),
        Row(3, "plain Prefect tasks, all-cached rerun", rerun, "s"),
        Row(3, "plain Prefect tasks, head-only rerun", head_only, "s"),
        Row(3, "stackwise head-only / plain Keras iteration", stackwise.head_only / keras_seconds, "ratio"),
        Row(3, "stackwise head-only / plain Prefect head-only", stackwise.head_only / head_only, "ratio"),
    ]


def _round_trip_seconds(write_and_read, repeats: int) -> float:
    """Return the fastest of `repeats` calls, which is the least disturbed by other work."""
    fastest = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        write_and_read()
        fastest = min(fastest, time.perf_counter() - started)
    return fastest


def measure_feature_files(work: Path, sizes: Sizes) -> list[Row]:
    """Section 4: write+read throughput of one (n, d) float32 array in three file layouts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.features import read_feature_file, write_feature_file

    features = np.random.default_rng(0).normal(size=(sizes.file_rows, FEATURES)).astype(np.float32)
    labels = np.zeros(len(features), np.int64)
    row_ids = np.arange(len(features))
    megabytes = features.nbytes / 1e6
    folder = work / "files"
    folder.mkdir()

    def stackwise_file() -> None:
        write_feature_file(folder / "features.parquet", features, labels, row_ids, {})
        assert read_feature_file(folder / "features.parquet").features.shape == features.shape

    def numpy_file() -> None:
        np.save(folder / "features.npy", features)
        assert np.load(folder / "features.npy").shape == features.shape

    def column_per_feature() -> None:
        table = pa.table({f"x{index:02d}": features[:, index] for index in range(FEATURES)})
        pq.write_table(table, folder / "columns.parquet")
        read = pq.read_table(folder / "columns.parquet")
        assert np.column_stack([column.to_numpy() for column in read.columns]).shape == features.shape

    repeats = 5
    throughput = {
        name: megabytes / _round_trip_seconds(function, repeats)
        for name, function in (("stackwise", stackwise_file), ("numpy", numpy_file),
                               ("columns", column_per_feature))
    }
    note = f"{sizes.file_rows:,} x {FEATURES} float32 ({megabytes:.0f} MB), best of {repeats}"
    return [
        Row(4, "stackwise feature file write+read", throughput["stackwise"], "MB/s", note=note),
        Row(4, "numpy.save + numpy.load", throughput["numpy"], "MB/s"),
        Row(4, "Parquet, one float32 column per feature", throughput["columns"], "MB/s",
            note="pyarrow defaults (snappy)"),
        Row(4, "stackwise / one column per feature", throughput["stackwise"] / throughput["columns"], "ratio",
            ">= 3"),
        Row(4, "stackwise / numpy", throughput["stackwise"] / throughput["numpy"], "ratio", ">= 0.25"),
    ]


def _prepare_stage_store(folder: Path, rows: int, spec: dict) -> tuple[Path, Path, int]:
    """Write data and spec into `folder` and snapshot the dataset into the store `folder/store`.

    Return the spec's path, the store's path and the number of training rows.
    """
    from tasks.dataset import snapshot_dataset
    from tasks.spec import load_spec
    from tasks.store import Store

    folder.mkdir()
    write_synthetic_data(folder / "data.parquet", rows)
    spec_path = _write_yaml(folder / "stack.yaml", spec)
    data_dir = folder / "store"
    dataset = snapshot_dataset(load_spec(spec_path), Store(data_dir))
    return spec_path, data_dir, dataset.rows["train"]


def _worker(action: str, spec_path: Path, data_dir: Path, output: Path | None = None,
            **environment: str) -> dict:
    command = [sys.executable, str(BENCHMARKS / "stage_worker.py"), action, str(spec_path), str(data_dir)]
    if output is not None:
        command.append(str(output))
    _, stdout = _timed(command, _environment(spec_path.parent / "prefect", None, **environment),
                       spec_path.parent)
    return _last_json_line(stdout)


def _training_rate(manifest: dict, train_rows: int) -> tuple[float, str]:
    """Return training rows per second and the input mode that the manifest records.

    Falls back to the manifest's `seconds` (the whole stage, export and extraction
    included) when the metrics have no `train_seconds`.
    """
    metrics = manifest.get("metrics", {})
    seconds = metrics.get("train_seconds", manifest["seconds"])
    epochs = metrics.get("epochs_run", 1)
    mode = metrics.get("input", "not recorded")
    return train_rows * epochs / seconds, mode


def measure_streaming_training(work: Path, sizes: Sizes) -> list[Row]:
    """Section 5: one stage trained from memory, then streamed from feature files (budget 1 MB)."""
    spec = _synthetic_spec("data.parquet", 256, sizes.stream_epochs, stages="one")
    spec_path, data_dir, train_rows = _prepare_stage_store(work / "streaming", sizes.stream_rows, spec)

    # The modes alternate and each keeps its fastest run, so a burst of other work on
    # the machine does not count against one mode alone.
    rates, modes = {"memory": 0.0, "stream": 0.0}, {}
    for _ in range(STREAM_REPEATS):
        for name, budget in (("memory", "100000"), ("stream", "1")):
            manifest = _worker("train", spec_path, data_dir, **{MEMORY_BUDGET_VARIABLE: budget})["manifest"]
            rate, modes[name] = _training_rate(manifest, train_rows)
            rates[name] = max(rates[name], rate)
    note = (f"{train_rows:,} train rows, {sizes.stream_epochs} epochs, fastest of {STREAM_REPEATS}; "
            "input recorded: {}")
    return [
        Row(5, f"in memory ({MEMORY_BUDGET_VARIABLE}=100000)", rates["memory"], "rows/s",
            note=note.format(modes["memory"])),
        Row(5, f"streamed ({MEMORY_BUDGET_VARIABLE}=1)", rates["stream"], "rows/s",
            note=note.format(modes["stream"])),
        Row(5, "streamed / in memory", rates["stream"] / rates["memory"], "ratio", ">= 0.8"),
    ]


def measure_peak_memory(work: Path, sizes: Sizes) -> list[Row]:
    """Section 6: peak RSS of training a stage and of extracting features, at 1x and 4x the rows.

    Training is measured streamed (a small budget) and, for contrast, in memory.
    """
    spec = _synthetic_spec("data.parquet", 64, 1, stages="one")
    streamed = {MEMORY_BUDGET_VARIABLE: str(sizes.memory_budget_mb)}
    in_memory = {MEMORY_BUDGET_VARIABLE: "100000"}
    steps = {
        "training, streamed": ("train", streamed),
        "extraction, streamed": ("extract", streamed),
        "training, in memory": ("train", in_memory),
    }
    peaks: dict[str, dict[int, float]] = {step: {} for step in steps}
    for factor in (1, 4):
        folder = work / f"memory-{factor}x"
        spec_path, data_dir, _ = _prepare_stage_store(folder, factor * sizes.memory_rows, spec)
        for step, (action, budget) in steps.items():
            output = folder / f"extracted-{len(peaks[step])}" if action == "extract" else None
            peaks[step][factor] = _worker(action, spec_path, data_dir, output, **budget)["max_rss_mb"]
    rows = []
    for step, (_, budget) in steps.items():
        rows += [
            Row(6, f"{step}, {sizes.memory_rows:,} rows", peaks[step][1], "MB",
                note=f"{MEMORY_BUDGET_VARIABLE}={budget[MEMORY_BUDGET_VARIABLE]}"),
            Row(6, f"{step}, {4 * sizes.memory_rows:,} rows", peaks[step][4], "MB"),
            Row(6, f"{step}, 4x / 1x", peaks[step][4] / peaks[step][1], "ratio",
                "" if step.endswith("in memory") else "< 1.25"),
        ]
    return rows


# --- report -------------------------------------------------------------------------------


def machine_description() -> list[str]:
    """Return lines naming the CPU, cores, memory, library versions and load average."""
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = "unknown"
    with contextlib.suppress(OSError, ValueError, IndexError):
        total_kb = int(Path("/proc/meminfo").read_text().splitlines()[0].split()[1])
        memory = f"{total_kb / 1024 ** 2:.1f} GiB"
    versions = []
    for package in ("tensorflow-cpu", "tensorflow", "keras", "prefect", "pyarrow", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(f"{package} {metadata.version(package)}")
    return [
        f"- CPU: {cpu}, {os.cpu_count()} logical cores, {memory} RAM",
        f"- Python {platform.python_version()}; {', '.join(versions)}",
        f"- load average (1, 5, 15 min) at the end: {', '.join(f'{value:.2f}' for value in os.getloadavg())}",
    ]


def target_status(value: float, target: str) -> str:
    """Return "met" or "missed" for a target written as "< X" or ">= X", or "" without a target."""
    if not target:
        return ""
    operator, bound = target.split()
    met = value < float(bound) if operator == "<" else value >= float(bound)
    return "met" if met else "missed"


def format_table(rows: list[tuple[Row, float]]) -> str:
    """Format (row, 1-minute load average when it was measured) pairs as a Markdown table."""
    lines = [
        "| section | measurement | value | unit | target | status | load | note |",
        "| --- | --- | ---: | --- | --- | --- | ---: | --- |",
    ]
    for row, load in rows:
        value = f"{row.value:.3f}" if row.unit == "ratio" else f"{row.value:.1f}"
        lines.append(
            f"| {row.section}. {SECTIONS[row.section]} | {row.measurement} | {value} | {row.unit} | "
            f"{row.target} | {target_status(row.value, row.target)} | {load:.2f} | {row.note} |"
        )
    return "\n".join(lines)


def run_benchmark(sizes: Sizes, work: Path, log=print) -> list[tuple[Row, float]]:
    """Run every section; return each row with the 1-minute load average when its section ended."""
    results: list[tuple[Row, float]] = []

    def record(rows: list[Row]) -> None:
        load = os.getloadavg()[0]
        results.extend((row, load) for row in rows)
        for row in rows:
            log(f"  {SECTIONS[row.section]}: {row.measurement}: {row.value:.3f} {row.unit}")

    (work / "server").mkdir()
    with prefect_server(work / "server") as api_url:
        log("section 1: digits stack")
        record(measure_digits_stack(work, sizes, api_url))
        log("section 2: synthetic stack")
        rows, synthetic_loop, synthetic_folder = measure_synthetic_stack(work, sizes, api_url)
        record(rows)
        log("section 3: without stackwise")
        record(measure_without_stackwise(synthetic_folder, synthetic_loop, api_url))
    log("section 4: feature files")
    record(measure_feature_files(work, sizes))
    log("section 5: streaming training")
    record(measure_streaming_training(work, sizes))
    log("section 6: peak memory")
    record(measure_peak_memory(work, sizes))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny data and one epoch per stage, to check that every section runs")
    parser.add_argument("--output", type=Path, default=None, help="also write the report to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder of stores and data")
    args = parser.parse_args(argv)

    sizes = QUICK if args.quick else FULL
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="stackwise-bench-"))

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log(f"working in {work}; load average {os.getloadavg()[0]:.2f}")
    try:
        results = run_benchmark(sizes, work, log)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    report = "\n".join([
        f"stackwise benchmark ({'quick' if args.quick else 'full'}), "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {time.perf_counter() - started:.0f} s in all",
        "",
        *machine_description(),
        "",
        format_table(results),
        "",
    ])
    print(report)
    if args.output is not None:
        args.output.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
