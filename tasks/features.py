"""Feature files: Parquet with one float32 tensor column, the label and a row id.

The `features` column has the extension type `stackwise.tensor` (`TensorType`): each
row's float32 tensor is stored as one fixed-size binary value of 4 * prod(shape)
bytes, and the extension metadata contains the dtype and the example shape. Parquet
writes such a column as FIXED_LEN_BYTE_ARRAY without repetition or definition
levels, so writing and reading copy whole buffers instead of visiting each value,
and a reader gets the (n, *shape) float32 array straight from the column's data
buffer. A reader that does not know the extension still reads a fixed-size binary
column, with the extension name and metadata in the field's Arrow metadata.

Files written before format version 2 use Arrow's fixed-shape tensor type (a
fixed-size list of float32); `read_feature_file` and the other readers still read
them. Schema metadata names the producing stage, its fingerprint and the format
version. Row groups are sized by bytes so that readers can stream them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "FORMAT_VERSION",
    "FeatureFileWriter",
    "FeatureTable",
    "ROW_GROUP_BYTES",
    "TensorType",
    "iter_feature_batches",
    "read_feature_file",
    "read_feature_metadata",
    "read_row_groups",
    "row_group_rows",
    "write_feature_file",
]

# Version 1 stored the features as Arrow's fixed-shape tensor type; version 2 as
# `stackwise.tensor` over fixed-size binary.
FORMAT_VERSION = 2
# About 32 MiB of feature values per row group: large enough for fast sequential
# reads, small enough that a streaming reader keeps little in memory.
ROW_GROUP_BYTES = 32 << 20
METADATA_KEY = b"stackwise"
TENSOR_EXTENSION_NAME = "stackwise.tensor"


class TensorType(pa.ExtensionType):
    """Arrow extension type of one float32 tensor of a fixed shape per row.

    The storage is fixed_size_binary(4 * prod(shape)), and each value contains the row's
    float32 values in C order. The serialized metadata is JSON: {"dtype": "float32", "shape": [...]}.
    """

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = tuple(int(dimension) for dimension in shape)
        super().__init__(pa.binary(4 * math.prod(self.shape)), TENSOR_EXTENSION_NAME)

    def __arrow_ext_serialize__(self) -> bytes:
        return json.dumps({"dtype": "float32", "shape": list(self.shape)}).encode()

    @classmethod
    def __arrow_ext_deserialize__(cls, storage_type: pa.DataType, serialized: bytes) -> TensorType:
        parameters = json.loads(serialized)
        if parameters.get("dtype") != "float32":
            raise ValueError(
                f"{TENSOR_EXTENSION_NAME} column has dtype {parameters.get('dtype')!r}, expected 'float32'"
            )
        tensor_type = cls(tuple(parameters["shape"]))
        if tensor_type.storage_type != storage_type:
            raise ValueError(
                f"{TENSOR_EXTENSION_NAME} column of shape {tensor_type.shape} needs storage "
                f"{tensor_type.storage_type}, found {storage_type}"
            )
        return tensor_type

    def __reduce__(self):
        return TensorType, (self.shape,)


def _register_tensor_type() -> None:
    try:
        pa.register_extension_type(TensorType(()))
    except pa.ArrowKeyError:
        # Already registered, as after importlib.reload of this module.
        pass


_register_tensor_type()


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
    stored = {**metadata, "format_version": FORMAT_VERSION}
    return pa.schema(
        [
            pa.field("row_id", pa.int64(), nullable=False),
            pa.field("label", pa.int64(), nullable=False),
            pa.field("features", TensorType(shape), nullable=False),
        ],
        metadata={METADATA_KEY: json.dumps(stored, sort_keys=True).encode()},
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
        row_bytes = 4 * max(1, math.prod(self.shape))
        self.rows_per_group = max(1, row_group_bytes // row_bytes)
        self.rows_written = 0
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_rows = 0
        # Statistics on the binary features column would cost a comparison per row
        # and serve no filter, so only row_id gets them.
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
        if len(self._pending) == 1:
            features, labels, row_ids = self._pending[0]
        else:
            features = np.concatenate([part[0] for part in self._pending])
            labels = np.concatenate([part[1] for part in self._pending])
            row_ids = np.concatenate([part[2] for part in self._pending])
        self._write_group(features[:rows], labels[:rows], row_ids[:rows])
        rest = (features[rows:], labels[rows:], row_ids[rows:])
        self._pending = [rest] if len(rest[0]) else []
        self._pending_rows = len(rest[0])

    def _write_group(self, features: np.ndarray, labels: np.ndarray, row_ids: np.ndarray) -> None:
        tensor_type = self.schema.field("features").type
        # The storage wraps the contiguous float32 buffer as it is, without a copy.
        data = pa.py_buffer(np.ascontiguousarray(features))
        storage = pa.FixedSizeBinaryArray.from_buffers(tensor_type.storage_type, len(features), [None, data])
        tensors = pa.ExtensionArray.from_storage(tensor_type, storage)
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


def _example_shape(column_type: pa.DataType) -> tuple[int, ...]:
    if isinstance(column_type, (TensorType, pa.FixedShapeTensorType)):
        return tuple(column_type.shape)
    raise ValueError(
        f"feature column has type {column_type}, expected {TENSOR_EXTENSION_NAME} or "
        "fixed_shape_tensor; the file was not written by stackwise"
    )


def _chunk_to_numpy(chunk: pa.ExtensionArray, shape: tuple[int, ...]) -> np.ndarray:
    """Return a view of one column chunk's values as an (n, *shape) float32 array, without a copy."""
    storage = chunk.storage
    size = math.prod(shape)
    if isinstance(chunk.type, TensorType):
        # Fixed-size binary: buffers are [validity, data], and `offset` counts rows.
        data = storage.buffers()[1]
        if data is None:
            return np.zeros((0, *shape), np.float32)
        values = np.frombuffer(data, np.float32, count=len(storage) * size, offset=storage.offset * 4 * size)
        return values.reshape(len(storage), *shape)
    # Format version 1: a fixed-size list whose flat child values are the tensor's buffer.
    values = storage.values.slice(storage.offset * size, len(storage) * size)
    return values.to_numpy(zero_copy_only=True).reshape(len(storage), *shape)


def _table_to_features(table: pa.Table) -> FeatureTable:
    """Convert a table read from a feature file; a single chunk is returned without a copy."""
    column = table.column("features")
    shape = _example_shape(column.type)
    chunks = [_chunk_to_numpy(chunk, shape) for chunk in column.chunks if len(chunk)]
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
    """Read a whole feature file into memory.

    A file of one row group comes back without a copy: the features array is a view
    of the Arrow buffer that Parquet decoded into. A file of several row groups is
    copied once, row group by row group, into one array, so at most one row group is
    held twice.
    """
    parquet = pq.ParquetFile(path)
    if parquet.num_row_groups <= 1:
        return _table_to_features(parquet.read())
    return _read_into_one_array(parquet)


def _read_into_one_array(parquet: pq.ParquetFile) -> FeatureTable:
    rows = parquet.metadata.num_rows
    shape = _example_shape(parquet.schema_arrow.field("features").type)
    features = np.empty((rows, *shape), np.float32)
    labels = np.empty(rows, np.int64)
    row_ids = np.empty(rows, np.int64)
    start = 0
    for index in range(parquet.num_row_groups):
        group = _table_to_features(parquet.read_row_group(index))
        stop = start + len(group)
        features[start:stop] = group.features
        labels[start:stop] = group.labels
        row_ids[start:stop] = group.row_ids
        start = stop
    return FeatureTable(features, labels, row_ids)


def read_row_groups(parquet_file: pq.ParquetFile, indices: list[int]) -> FeatureTable:
    """Read the given row groups of an open feature file, in the order listed.

    One row group comes back without a copy; several are concatenated once.
    """
    return _table_to_features(parquet_file.read_row_groups(list(indices)))


def row_group_rows(path: Path) -> list[int]:
    """Return the number of rows in each row group of a feature file, in file order."""
    metadata = pq.ParquetFile(path).metadata
    return [metadata.row_group(index).num_rows for index in range(metadata.num_row_groups)]


def iter_feature_batches(path: Path) -> Iterator[FeatureTable]:
    """Yield a feature file one row group at a time, for streaming readers."""
    parquet = pq.ParquetFile(path)
    for index in range(parquet.num_row_groups):
        yield _table_to_features(parquet.read_row_group(index))


def read_feature_metadata(path: Path) -> dict[str, object]:
    """Return a feature file's stackwise metadata, its example shape and its row count.

    Files of format version 1 have no `format_version` entry; it is reported as 1.
    """
    parquet = pq.ParquetFile(path)
    schema = parquet.schema_arrow
    raw = (schema.metadata or {}).get(METADATA_KEY, b"{}")
    return {
        "format_version": 1,
        **json.loads(raw),
        "shape": list(_example_shape(schema.field("features").type)),
        "rows": parquet.metadata.num_rows,
    }
