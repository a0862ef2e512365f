"""Bad specs and bad data through the real `stackwise run`: exit code 2, one line, nothing touched.

Every case runs the command line in a new process against a store in which the tiny
stack is already trained. Each must fail before training with exit code 2 and one
`stackwise: error:` line that names the field or file, the value and the fix, and
must leave every file of the store exactly as it was.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import run_cli, tiny_spec
from tests.store_checks import error_lines, file_digests

pytestmark = pytest.mark.slow

FEATURES = ["f0", "f1", "f2", "f3"]


def table_rows(rows: int = 60, classes: int = 3, seed: int = 0) -> dict[str, list]:
    """Return the columns of a small, valid classification table."""
    generator = np.random.default_rng(seed)
    columns = {name: generator.normal(size=rows).round(3).tolist() for name in FEATURES}
    columns["y"] = [f"class_{index % classes}" for index in range(rows)]
    return columns


def csv_text(columns: dict[str, list]) -> str:
    names = list(columns)
    lines = [",".join(names)]
    for row in zip(*(columns[name] for name in names)):
        lines.append(",".join("" if value is None else str(value) for value in row))
    return "\n".join(lines) + "\n"


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def file_spec(source: str = "data.csv", **data) -> dict:
    """Return the tiny stack reading `source` with feature columns f0..f3 and label y."""
    spec = tiny_spec()
    spec["data"] = {"source": source, "features": FEATURES, "label": "y", **data}
    spec["stages"][0]["layers"] = [{"layer": "Dense", "units": 8, "activation": "relu"}]
    return spec


def changed(edit: Callable[[dict], None], spec: dict | None = None) -> dict:
    spec = copy.deepcopy(spec or tiny_spec())
    edit(spec)
    return spec


def setitem(path: list, value) -> Callable[[dict], None]:
    def edit(spec: dict) -> None:
        target = spec
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return edit


def rename_key(path: list, old: str, new: str) -> Callable[[dict], None]:
    def edit(spec: dict) -> None:
        target = spec
        for key in path:
            target = target[key]
        target[new] = target.pop(old)

    return edit


def unseen_test_label_csv() -> str:
    """A table whose only 'rare' row falls into the test split when stratify is off."""
    from sklearn.model_selection import train_test_split

    columns = table_rows(rows=60, classes=2)
    _, test = train_test_split(np.arange(60), test_size=0.2, random_state=0)
    columns["y"][int(test[0])] = "rare"
    return csv_text(columns)


@dataclass
class Case:
    id: str
    # The spec: a mapping written as YAML, raw text, raw bytes, or None for no file.
    spec: dict | str | bytes | None
    match: str
    files: dict[str, str | bytes] = field(default_factory=dict)
    arguments: tuple[str, ...] = ()
    spec_name: str = "stack.yaml"


def with_column(name: str, values: list) -> dict[str, list]:
    columns = table_rows()
    columns[name] = values
    return columns


CASES = [
    # The spec file itself.
    Case("malformed yaml", "name: x\nstages: [\n",
         r"stack\.yaml: invalid YAML at line \d+, column \d+: .*; fix the syntax"),
    Case("yaml list", "- name: x\n- stages: []\n",
         r"stack\.yaml: the spec must be a YAML mapping with keys name, data and stages; got list"),
    Case("empty file", "", r"stack\.yaml: the spec is empty; write a stack spec"),
    Case("duplicate key", yaml.safe_dump(tiny_spec(), sort_keys=False).replace(
        "  epochs: 3\n", "  epochs: 3\n  epochs: 30\n"),
         r"stack\.yaml: invalid YAML at line \d+, column \d+: duplicate key 'epochs'; keep one of them"),
    Case("not utf-8", b"name: \xff\xfe\n", r"stack\.yaml: not a UTF-8 text file"),
    Case("spec is a folder", None, r"stack\.yaml: is a folder; give the path of a stack spec YAML file",
         files={"stack.yaml/placeholder": ""}),
    Case("spec missing", None, r"absent\.yaml: spec file not found; check the path", spec_name="absent.yaml"),
    # Unknown keys, with a suggestion.
    Case("unknown top-level key", changed(rename_key([], "stages", "stage")),
         r"stack\.yaml: spec: unknown key 'stage'\. Did you mean 'stages'\? Valid keys: "),
    Case("unknown defaults key", changed(rename_key(["defaults"], "epochs", "epoch")),
         r"stack\.yaml: defaults: unknown key 'epoch'\. Did you mean 'epochs'\?"),
    Case("unknown stage key", changed(rename_key(["stages", 1], "parents", "parent")),
         r"stack\.yaml: stage 'hidden_2': unknown key 'parent'\. Did you mean 'parents'\?"),
    Case("unknown layer argument", changed(rename_key(["stages", 0, "layers", 1], "units", "unit")),
         r"stage 'hidden_1' layers\[1\]: Dense: unknown key 'unit'\. Did you mean 'units'\?"),
    # Wrong types.
    Case("epochs as text", changed(setitem(["stages", 0, "epochs"], "ten")),
         r"stage 'hidden_1' epochs: Input should be a valid integer; received 'ten'\. Fix this value"),
    Case("units as boolean", changed(setitem(["stages", 0, "layers", 1, "units"], True)),
         r"Dense argument 'units': Input should be a valid integer; received True\. Fix this argument"),
    Case("epochs fractional", changed(setitem(["defaults", "epochs"], 2.5)),
         r"defaults\.epochs: Input should be a valid integer; received 2\.5"),
    Case("parents as text", changed(setitem(["stages", 1, "parents"], "hidden_1")),
         r"stage 'hidden_2' parents: Input should be a valid list; received 'hidden_1'"),
    Case("layers as text", changed(setitem(["stages", 0, "layers"], "Dense")),
         r"stage 'hidden_1' layers: Input should be a valid list; received 'Dense'"),
    Case("layer as text", changed(setitem(["stages", 0, "layers", 1], "Dense")),
         r"stage 'hidden_1' layers\[1\]: a layer must be a mapping such as \{layer: Dense, units: 64\}, got 'Dense'"),
    Case("stages as mapping", changed(setitem(["stages"], {"hidden_1": {}})),
         r"stack\.yaml: stages: Input should be a valid list; received \{'hidden_1': \{\}\}"),
    # Zero, negative and non-finite sizes.
    Case("zero epochs", changed(setitem(["stages", 0, "epochs"], 0)),
         r"stage 'hidden_1' epochs: Input should be greater than 0; received 0"),
    Case("negative batch size", changed(setitem(["defaults", "batch_size"], -8)),
         r"defaults\.batch_size: Input should be greater than 0; received -8"),
    Case("zero units", changed(setitem(["stages", 1, "layers", 0, "units"], 0)),
         r"stage 'hidden_2' layers\[0\]: Dense argument 'units': Input should be greater than 0; received 0"),
    Case("negative learning rate", changed(setitem(["defaults", "learning_rate"], -0.1)),
         r"defaults\.learning_rate: Input should be greater than 0; received -0\.1"),
    Case("infinite learning rate", changed(setitem(["defaults", "learning_rate"], float("inf"))),
         r"defaults\.learning_rate: Input should be a finite number; received inf"),
    Case("zero kernel size", changed(setitem(["stages", 0, "layers"], [
        {"layer": "Reshape", "target_shape": [8, 8, 1]},
        {"layer": "Conv2D", "filters": 4, "kernel_size": 0}])),
         r"Conv2D argument 'kernel_size': expected a positive integer or a list of two, such as 3 or "
         r"\[3, 3\]; received 0"),
    Case("negative seed", changed(setitem(["data", "split", "seed"], -1)),
         r"data\.split\.seed: Input should be greater than or equal to 0; received -1"),
    Case("test fraction one", changed(setitem(["data", "split", "test"], 1.0)),
         r"data\.split\.test: Input should be less than 1; received 1\.0"),
    Case("fractions leave no training rows", changed(setitem(["data", "split"], {"test": 0.6, "validation": 0.5})),
         r"data\.split: test \(0\.6\) plus validation \(0\.5\) leaves no training rows; make their sum less than 1"),
    # Unknown names, with a suggestion.
    Case("unknown layer", changed(setitem(["stages", 0, "layers", 1, "layer"], "Dence")),
         r"stage 'hidden_1' layers\[1\]: unknown layer 'Dence'\. Did you mean 'Dense'\? Supported layers: "),
    Case("unknown activation", changed(setitem(["stages", 0, "layers", 1, "activation"], "rellu")),
         r"Dense argument 'activation': Input should be .*; received 'rellu'\. Did you mean 'relu'\?"),
    Case("unknown optimizer", changed(setitem(["defaults", "optimizer"], "adamm")),
         r"defaults\.optimizer: Input should be 'adam', 'adamw', 'sgd' or 'rmsprop'; received 'adamm'\. "
         r"Did you mean 'adam'\?"),
    Case("unknown evaluation split", changed(setitem(["evaluation"], {"split": "train"})),
         r"evaluation\.split: Input should be 'test' or 'validation'; received 'train'"),
    Case("unknown parent", changed(setitem(["stages", 1, "parents"], ["hiden_1"])),
         r"stage 'hidden_2' parents: unknown stage 'hiden_1'\. Did you mean 'hidden_1'\?"),
    Case("unknown retrain stage", tiny_spec(),
         r"--retrain: unknown stage 'hidden_9'\. Did you mean 'hidden_\d'\? Stages of 'tiny': hidden_1, hidden_2, head",
         arguments=("--retrain", "hidden_9")),
    # The stage graph.
    Case("cycle", changed(setitem(["stages", 0, "parents"], ["hidden_2"])),
         r"the stages form a cycle \(hidden_1 -> hidden_2 -> hidden_1\); remove one of these parent links"),
    Case("two heads", changed(setitem(["stages", 1, "objective"], "head")),
         r"expected exactly one stage with objective 'head', found hidden_2, head"),
    Case("stage without layers", changed(setitem(["stages", 1, "layers"], [])),
         r"stage 'hidden_2' layers: a supervised stage needs at least one layer, got none"),
    Case("stage name with dash", changed(setitem(["stages", 0, "name"], "hidden-1")),
         r"stage name 'hidden-1' is not a valid identifier; use letters, digits and underscores"),
    Case("stage name starting with digit", changed(setitem(["stages", 0, "name"], "1st")),
         r"stage name '1st' is not a valid identifier"),
    Case("duplicate stage name", changed(setitem(["stages", 1, "name"], "hidden_1")),
         r"stages\[1\]\.name: duplicate stage name 'hidden_1'; give every stage its own name"),
    Case("stack name dots", changed(setitem(["name"], "..")),
         r"stack\.yaml: name: stack name '\.\.' is invalid; use letters, digits"),
    # Shapes.
    Case("conv child of dense parent", changed(setitem(["stages", 1, "layers"], [
        {"layer": "Conv2D", "filters": 4, "kernel_size": 3}])),
         r"stage 'hidden_2' layers\[0\] \(Conv2D\): Conv2D needs an input of rank 3 .*got shape \[32\]; "
         r"add a Reshape layer before it\. The stage's input comes from parents \['hidden_1'\], with shape \[32\]"),
    Case("reshape of wrong size", changed(setitem(["stages", 1, "layers"], [
        {"layer": "Reshape", "target_shape": [5, 5]}])),
         r"Reshape cannot turn shape \[32\] \(32 values\) into \[5, 5\] \(25 values\)"),
    Case("pooling larger than input", changed(setitem(["stages", 0, "layers"], [
        {"layer": "Reshape", "target_shape": [8, 8, 1]},
        {"layer": "MaxPooling2D", "pool_size": 9}])),
         r"MaxPooling2D with pool_size \[9, 9\] does not fit an input of shape \[8, 8, 1\]"),
    Case("data shape of wrong size", changed(setitem(["data", "shape"], [8, 9])),
         r"data\.shape: \[8, 9\] holds 72 values but each example has 64 features; make the product match"),
    # The data source.
    Case("unknown built-in source", changed(setitem(["data", "source"], "sklearn:digit")),
         r"data\.source: unknown built-in source 'sklearn:digit'\. Did you mean 'sklearn:digits'\?"),
    Case("built-in source with label", changed(setitem(["data", "label"], "y")),
         r"data: the built-in source 'sklearn:digits' has its own features and label; remove"),
    Case("file without label", changed(lambda spec: spec["data"].pop("label"), file_spec()),
         r"data: a file source needs 'features' .* and 'label' .*; got features=\['f0', .*label=None"),
    Case("wrong file extension", file_spec("data.txt"),
         r"data\.source: data file 'data\.txt' must end in \.parquet or \.csv"),
    Case("data file missing", file_spec("missing.csv"),
         r"data\.source: file '.*missing\.csv' not found; check the path"),
    Case("data source is a folder", file_spec("folder.csv"),
         r"data\.source: '.*folder\.csv' is a folder; give a \.parquet or \.csv file",
         files={"folder.csv/placeholder": ""}),
    Case("ragged csv", file_spec(), r"data\.source: cannot read '.*data\.csv': CSV parse error: .*; fix or re-export",
         files={"data.csv": "f0,f1,f2,f3,y\n1,2,3,4,a\n1,2,3\n"}),
    Case("csv with header only", file_spec(), r"data\.source: '.*data\.csv' has no rows",
         files={"data.csv": "f0,f1,f2,f3,y\n"}),
    Case("not a parquet file", file_spec("data.parquet"),
         r"data\.source: cannot read '.*data\.parquet': .*; fix or re-export the file",
         files={"data.parquet": b"PAR1 this is not parquet"}),
    Case("parquet without label column", file_spec("data.parquet", label="target"),
         r"data\.label: column 'target' not found in '.*data\.parquet'\. Columns: f0, f1, f2, f3, y",
         files={"data.parquet": parquet_bytes(pa.table(table_rows()))}),
    Case("parquet without feature column", file_spec("data.parquet", features=["f0", "f_1"]),
         r"data\.features: column 'f_1' not found in '.*data\.parquet'\. Did you mean 'f1'\?",
         files={"data.parquet": parquet_bytes(pa.table(table_rows()))}),
    Case("label among features", file_spec(features=["f0", "y"]),
         r"data\.features: lists the label column 'y', .*; remove it from data\.features",
         files={"data.csv": csv_text(table_rows())}),
    Case("string features", file_spec(), r"data\.features: column 'f2' has type string, expected numbers",
         files={"data.csv": csv_text(with_column("f2", ["high", "low"] * 30))}),
    Case("nan features", file_spec("data.parquet"),
         r"data\.features: column 'f1' of '.*data\.parquet': 2 values are NaN or infinite \(first in row 3, "
         r"value nan\); clean or impute them",
         files={"data.parquet": parquet_bytes(pa.table(with_column(
             "f1", [float("nan") if index in (3, 7) else 0.5 for index in range(60)])))}),
    Case("infinite features", file_spec(),
         r"data\.features: column 'f0' of '.*data\.csv': 1 values are NaN or infinite \(first in row 5, value inf\)",
         files={"data.csv": csv_text(with_column("f0", [float("inf") if index == 5 else 1.0 for index in range(60)]))}),
    Case("missing feature values", file_spec(), r"data\.features: column 'f3' has 1 missing values; fill or drop",
         files={"data.csv": csv_text(with_column("f3", [None if index == 9 else 1.0 for index in range(60)]))}),
    Case("missing labels", file_spec(), r"data\.label: column 'y' of '.*data\.csv' has 2 missing values",
         files={"data.csv": csv_text(with_column("y", [None, None] + ["a", "b"] * 29))}),
    Case("label of list type", file_spec("data.parquet"),
         r"data\.label: column 'y' of '.*data\.parquet' has type list<.*int64>, expected integers",
         files={"data.parquet": parquet_bytes(pa.table(with_column("y", [[index % 2] for index in range(60)])))}),
    Case("one class", file_spec(), r"data\.label: the label has 1 class \(only\); a classifier needs at least two",
         files={"data.csv": csv_text(with_column("y", ["only"] * 60))}),
    Case("test label unseen in training", file_spec(split={"stratify": False, "seed": 0}),
         r"data\.split: test labels \['rare'\] never occur in the train split; set stratify: true",
         files={"data.csv": unseen_test_label_csv()}),
    Case("too few rows to split", file_spec(),
         r"data\.split: cannot split 4 rows into test 0\.2 and validation 0\.1: .*; use more rows",
         files={"data.csv": csv_text(table_rows(rows=4, classes=2))}),
]


@pytest.fixture(scope="module")
def store_before(trained_store):
    data_dir, _ = trained_store
    return data_dir, file_digests(data_dir)


def write_case(case: Case, folder: Path) -> Path:
    for name, content in case.files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    spec_path = folder / case.spec_name
    if isinstance(case.spec, bytes):
        spec_path.write_bytes(case.spec)
    elif isinstance(case.spec, str):
        spec_path.write_text(case.spec)
    elif case.spec is not None:
        spec_path.write_text(yaml.safe_dump(case.spec, sort_keys=False))
    return spec_path


def test_enough_cases():
    assert len(CASES) >= 30
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_rejected(case: Case, tmp_path: Path, store_before):
    data_dir, before = store_before
    spec_path = write_case(case, tmp_path)

    result = run_cli("run", str(spec_path), *case.arguments, "--data-dir", str(data_dir), cwd=tmp_path)

    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    errors = error_lines(result.stderr)
    assert len(errors) == 1, result.stderr[-2000:]
    assert result.stderr.rstrip().splitlines()[-1] == errors[0]
    assert re.search(case.match, errors[0]), errors[0]
    assert not (tmp_path / "data").exists()
    assert file_digests(data_dir) == before
