"""A stage's input: its parents' feature files for one split, merged per example.

Training and feature extraction read the input in windows of rows: the row groups
of the first parent's feature file, which the writer sizes by bytes (about 32 MiB).
For training, each epoch visits the windows in a seeded random order and shuffles
the rows inside each window.

When the stage's whole input (every parent, every split) is larger than the memory
budget, every window is read from the feature files when it is needed, so memory
contains a few windows whatever the data's size. Otherwise the files are read into
memory once, and windows are slices of those arrays. Both ways yield the same rows
in the same order, so a stage trains to the same weights under any budget.

The budget is STACKWISE_MEMORY_BUDGET_MB, in megabytes; it defaults to 1024.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from tasks.errors import SpecError, StageFailed
from tasks.features import (
    FeatureTable,
    read_feature_file,
    read_feature_metadata,
    read_row_groups,
    row_group_rows,
)
from tasks.jobs import ParentRef

__all__ = [
    "BUDGET_VARIABLE",
    "StageInput",
    "input_bytes",
    "merge_features",
    "memory_budget_bytes",
    "open_stage_inputs",
]

BUDGET_VARIABLE = "STACKWISE_MEMORY_BUDGET_MB"
DEFAULT_BUDGET_MB = 1024
# Row groups kept per parent file while streaming. Another parent's row groups need
# not line up with the windows, so one window can span two of them.
CACHED_ROW_GROUPS = 2


def memory_budget_bytes() -> int:
    """Return the memory budget for one stage's input, in bytes."""
    value = os.environ.get(BUDGET_VARIABLE, "").strip()
    if not value:
        return DEFAULT_BUDGET_MB << 20
    if not (value.isascii() and value.isdigit()):
        raise SpecError(
            f"{BUDGET_VARIABLE}={value!r}: expected a whole number of megabytes, such as 1024; "
            f"unset it for the default of {DEFAULT_BUDGET_MB}"
        )
    return int(value) << 20


MERGES = {
    "add": lambda arrays: np.sum(arrays, axis=0, dtype=np.float32),
    "average": lambda arrays: np.mean(arrays, axis=0, dtype=np.float32),
    "maximum": lambda arrays: np.max(arrays, axis=0),
    "multiply": lambda arrays: np.prod(arrays, axis=0, dtype=np.float32),
}


def merge_features(arrays: list[np.ndarray], merge: str) -> np.ndarray:
    """Combine several parents' features per example, as the assembled model's merge layer does."""
    if merge == "concat":
        return np.concatenate([array.reshape(len(array), -1) for array in arrays], axis=1)
    return MERGES[merge](np.stack(arrays)).astype(np.float32)


def _row_group_starts(path: Path) -> np.ndarray:
    """Return the first row of every row group of a feature file, and its row count at the end."""
    return np.concatenate([[0], np.cumsum(row_group_rows(path), dtype=np.int64)])


class _RowGroupReader:
    """Read any range of rows of one feature file, keeping the last row groups it read."""

    def __init__(self, path: Path) -> None:
        self.file = pq.ParquetFile(path)
        self.starts = _row_group_starts(path)
        self._cache: OrderedDict[int, FeatureTable] = OrderedDict()

    def _group(self, index: int) -> FeatureTable:
        if index in self._cache:
            self._cache.move_to_end(index)
        else:
            self._cache[index] = read_row_groups(self.file, [index])
            if len(self._cache) > CACHED_ROW_GROUPS:
                self._cache.popitem(last=False)
        return self._cache[index]

    def read(self, start: int, stop: int) -> FeatureTable:
        first = int(np.searchsorted(self.starts, start, side="right")) - 1
        last = int(np.searchsorted(self.starts, stop - 1, side="right")) - 1
        parts = []
        for index in range(first, last + 1):
            offset = int(self.starts[index])
            table = self._group(index)
            rows = slice(max(start, offset) - offset, min(stop, int(self.starts[index + 1])) - offset)
            parts.append(table.select(rows))
        if len(parts) == 1:
            return parts[0]
        return FeatureTable(*(np.concatenate(columns) for columns in zip(*(
            (part.features, part.labels, part.row_ids) for part in parts))))


class StageInput:
    """One split of a stage's input, in memory or streamed from the parents' feature files."""

    def __init__(self, parents: list[ParentRef], split: str, merge: str = "concat", stream: bool = False):
        self.parents, self.split, self.merge, self.stream = parents, split, merge, stream
        self.paths = [Path(ref.folder) / ref.feature_files[split] for ref in parents]

        shapes, counts = [], []
        for path in self.paths:
            metadata = read_feature_metadata(path)
            shapes.append(tuple(metadata["shape"]))
            counts.append(int(metadata["rows"]))
        for ref, count in zip(parents[1:], counts[1:]):
            if count != counts[0]:
                raise StageFailed(
                    f"parent '{ref.name}' feature file for split '{split}' has {count} rows and "
                    f"parent '{parents[0].name}' has {counts[0]}; rebuild both with "
                    "`stackwise run --retrain`"
                )
        self.rows = counts[0]

        # Window boundaries: the first parent's row groups, in either mode.
        self.starts = _row_group_starts(self.paths[0])
        if merge == "concat" and len(shapes) > 1:
            self.shape: tuple[int, ...] = (sum(math.prod(shape) for shape in shapes),)
        else:
            self.shape = shapes[0]

        self._table: FeatureTable | None = None
        self._readers: list[_RowGroupReader] = []
        if stream:
            self._readers = [_RowGroupReader(path) for path in self.paths]
            # Eight bytes a row: small enough to keep whatever the data's size.
            self.labels = pq.read_table(self.paths[0], columns=["label"]).column("label").to_numpy()
        else:
            tables = [read_feature_file(path) for path in self.paths]
            self._table = self._merged(tables)
            self.labels = self._table.labels

    def __len__(self) -> int:
        return self.rows

    def _merged(self, tables: list[FeatureTable]) -> FeatureTable:
        if len(tables) == 1:
            return tables[0]
        for ref, table in zip(self.parents[1:], tables[1:]):
            if not np.array_equal(table.row_ids, tables[0].row_ids):
                raise StageFailed(
                    f"parent '{ref.name}' feature file for split '{self.split}' has rows in another "
                    f"order than parent '{self.parents[0].name}'; rebuild both with "
                    "`stackwise run --retrain`"
                )
        features = merge_features([table.features for table in tables], self.merge)
        return FeatureTable(features, tables[0].labels, tables[0].row_ids)

    def read(self, start: int, stop: int) -> FeatureTable:
        """Return rows [start, stop), merged."""
        if self._table is not None:
            return self._table.select(slice(start, stop))
        return self._merged([reader.read(start, stop) for reader in self._readers])

    def table(self) -> FeatureTable:
        """Return the whole split in memory; only for inputs that fit the budget."""
        return self._table if self._table is not None else self.read(0, self.rows)

    def count_rows(self, classes: list[int] | None = None) -> int:
        """Return how many rows have one of `classes` as label; all rows when `classes` is None."""
        return self.rows if classes is None else int(np.isin(self.labels, classes).sum())

    def count_batches(self, batch_size: int, classes: list[int] | None = None) -> int:
        """Return how many batches of `batch_size` the windows give in one pass, in any order."""
        total = 0
        for start, stop in zip(self.starts[:-1], self.starts[1:]):
            labels = self.labels[start:stop]
            rows = len(labels) if classes is None else int(np.isin(labels, classes).sum())
            total += math.ceil(rows / batch_size)
        return total

    def windows(
        self,
        rng: np.random.Generator | None = None,
        classes: list[int] | None = None,
    ) -> Iterator[FeatureTable]:
        """Yield the split window by window.

        With `rng`, windows come in a random order and rows are shuffled inside each
        window. With `classes`, only rows whose label is one of them are kept.
        """
        order = np.arange(len(self.starts) - 1)
        if rng is not None:
            order = rng.permutation(order)
        for index in order:
            table = self.read(int(self.starts[index]), int(self.starts[index + 1]))
            if rng is not None:
                table = table.select(rng.permutation(len(table)))
            if classes is not None:
                table = table.select(np.isin(table.labels, classes))
            yield table


def input_bytes(parents: list[ParentRef], splits: tuple[str, ...]) -> int:
    """Return how many bytes of feature values the parents' files hold for `splits`."""
    total = 0
    for ref in parents:
        for split in splits:
            metadata = read_feature_metadata(Path(ref.folder) / ref.feature_files[split])
            total += 4 * int(metadata["rows"]) * max(1, math.prod(metadata["shape"]))
    return total


def open_stage_inputs(parents: list[ParentRef], splits: tuple[str, ...], merge: str = "concat"):
    """Return {split: StageInput}, streamed when the splits together exceed the memory budget."""
    stream = input_bytes(parents, splits) > memory_budget_bytes()
    return {split: StageInput(parents, split, merge, stream) for split in splits}
