"""Feature files: Parquet with one float32 tensor column, the label and a row id.

The `features` column has Arrow's fixed-shape tensor type, so a reader gets back the
(n, *shape) float32 array without a per-row copy, and any Arrow reader sees the
example shape in the schema. Schema metadata names the producing stage and its
fingerprint. Row groups are sized by bytes so that readers can stream them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "FeatureFileWriter",
    "FeatureTable",
    "ROW_GROUP_BYTES",
    "iter_feature_batches",
    "read_feature_file",
    "read_feature_metadata",
    "read_row_groups",
    "write_feature_file",
]

# About 32 MiB of feature values per row group: large enough for fast sequential
# reads, small enough that a streaming reader keeps little in memory.
ROW_GROUP_BYTES = 32 << 20
METADATA_KEY = b"stackwise"


@dataclass(frozen=True)
class FeatureTable:
    """The content of a feature file: features (n, *shape) float32, labels and row ids."""

    features: np.ndarray
    labels: np.ndarray
    row_ids: np.ndarray

    def __len__(self) -> int:
        return int(self.features.shape[0])

    def select(self, rows: slice | np.ndarray) -> FeatureTable:
        """Return the rows picked by a slice, an index array or a boolean mask."""
        return FeatureTable(self.features[rows], self.labels[rows], self.row_ids[rows])


def _schema(shape: tuple[int, ...], metadata: dict[str, str]) -> pa.Schema:
    tensor_type = pa.fixed_shape_tensor(pa.float32(), list(shape))
    return pa.schema(
        [
            pa.field("row_id", pa.int64(), nullable=False),
            pa.field("label", pa.int64(), nullable=False),
            pa.field("features", tensor_type, nullable=False),
        ],
        metadata={METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()},
    )


class FeatureFileWriter:
    """Write a feature file batch by batch; each row group has about `row_group_bytes` of values.

    Use as a context manager. Rows are buffered until a row group is full, so memory
    stays bounded by the row group size whatever the file's total size.
    """

    def __init__(
        self,
        path: Path,
        shape: tuple[int, ...],
        metadata: dict[str, str],
        row_group_bytes: int = ROW_GROUP_BYTES,
    ) -> None:
        self.path = Path(path)
        self.shape = tuple(int(dimension) for dimension in shape)
        self.schema = _schema(self.shape, metadata)
        row_bytes = 4 * max(1, int(np.prod(self.shape)))
        self.rows_per_group = max(1, row_group_bytes // row_bytes)
        self.rows_written = 0
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_rows = 0
        self._writer = pq.ParquetWriter(
            self.path,
            self.schema,
            compression="none",
            use_dictionary=False,
            write_statistics=["row_id"],
            store_schema=True,
        )

    def write(self, features: np.ndarray, labels: np.ndarray, row_ids: np.ndarray) -> None:
        features = np.ascontiguousarray(features, dtype=np.float32)
        if features.shape[1:] != self.shape:
            raise ValueError(
                f"feature batch has example shape {features.shape[1:]}, expected {self.shape}"
            )
        self._pending.append((features, np.asarray(labels, np.int64), np.asarray(row_ids, np.int64)))
        self._pending_rows += len(features)
        while self._pending_rows >= self.rows_per_group:
            self._flush(self.rows_per_group)

    def _flush(self, rows: int) -> None:
        features = np.concatenate([part[0] for part in self._pending])
        labels = np.concatenate([part[1] for part in self._pending])
        row_ids = np.concatenate([part[2] for part in self._pending])
        self._write_group(features[:rows], labels[:rows], row_ids[:rows])
        rest = (features[rows:], labels[rows:], row_ids[rows:])
        self._pending = [rest] if len(rest[0]) else []
        self._pending_rows = len(rest[0])

    def _write_group(self, features: np.ndarray, labels: np.ndarray, row_ids: np.ndarray) -> None:
        values = pa.array(features.reshape(-1), type=pa.float32())
        storage = pa.FixedSizeListArray.from_arrays(values, int(np.prod(self.shape)))
        tensors = pa.ExtensionArray.from_storage(self.schema.field("features").type, storage)
        batch = pa.record_batch([pa.array(row_ids), pa.array(labels), tensors], schema=self.schema)
        self._writer.write_batch(batch, row_group_size=len(features))
        self.rows_written += len(features)

    def close(self) -> None:
        if self._pending_rows:
            self._flush(self._pending_rows)
        self._writer.close()

    def __enter__(self) -> FeatureFileWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def write_feature_file(
    path: Path,
    features: np.ndarray,
    labels: np.ndarray,
    row_ids: np.ndarray,
    metadata: dict[str, str],
    row_group_bytes: int = ROW_GROUP_BYTES,
) -> None:
    """Write in-memory arrays as one feature file."""
    with FeatureFileWriter(path, features.shape[1:], metadata, row_group_bytes) as writer:
        writer.write(features, labels, row_ids)


def _tensor_chunk_to_numpy(chunk: pa.ExtensionArray, shape: tuple[int, ...]) -> np.ndarray:
    # The storage is a fixed-size list: its flat child values are the tensor's buffer.
    storage = chunk.storage
    values = storage.values.slice(storage.offset * storage.type.list_size, len(storage) * storage.type.list_size)
    return values.to_numpy(zero_copy_only=True).reshape(len(chunk), *shape)


def _table_to_features(table: pa.Table) -> FeatureTable:
    column = table.column("features")
    shape = tuple(column.type.shape)
    chunks = [_tensor_chunk_to_numpy(chunk, shape) for chunk in column.chunks]
    if len(chunks) == 1:
        features = chunks[0]
    elif chunks:
        features = np.concatenate(chunks)
    else:
        features = np.zeros((0, *shape), np.float32)
    return FeatureTable(
        features=features,
        labels=table.column("label").to_numpy(),
        row_ids=table.column("row_id").to_numpy(),
    )


def read_feature_file(path: Path) -> FeatureTable:
    """Read a whole feature file into memory."""
    table = pq.read_table(path, use_threads=True)
    return _table_to_features(table)


def iter_feature_batches(path: Path) -> Iterator[FeatureTable]:
    """Yield a feature file one row group at a time, for streaming readers."""
    parquet = pq.ParquetFile(path)
    for index in range(parquet.num_row_groups):
        yield _table_to_features(parquet.read_row_group(index))


def read_row_groups(parquet_file: pq.ParquetFile, indices: list[int]) -> FeatureTable:
    """Read some row groups of an open feature file."""
    return _table_to_features(parquet_file.read_row_groups(indices))


def read_feature_metadata(path: Path) -> dict[str, object]:
    """Return a feature file's stackwise metadata, its example shape and its row count."""
    parquet = pq.ParquetFile(path)
    schema = parquet.schema_arrow
    raw = (schema.metadata or {}).get(METADATA_KEY, b"{}")
    return {
        **json.loads(raw),
        "shape": list(schema.field("features").type.shape),
        "rows": parquet.metadata.num_rows,
    }
