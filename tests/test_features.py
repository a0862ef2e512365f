"""Feature files: the Parquet round trip, the schema, and row groups sized by bytes."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.features import (
    FORMAT_VERSION,
    FeatureFileWriter,
    TensorType,
    iter_feature_batches,
    read_feature_file,
    read_feature_metadata,
    read_row_groups,
    row_group_rows,
    write_feature_file,
)


def _write_format_1(path, features, labels, row_ids, metadata):
    """Write a feature file as format version 1 did: Arrow's fixed-shape tensor type."""
    tensor_type = pa.fixed_shape_tensor(pa.float32(), list(features.shape[1:]))
    schema = pa.schema(
        [
            pa.field("row_id", pa.int64(), nullable=False),
            pa.field("label", pa.int64(), nullable=False),
            pa.field("features", tensor_type, nullable=False),
        ],
        metadata={b"stackwise": json.dumps(metadata).encode()},
    )
    values = pa.array(features.reshape(-1), type=pa.float32())
    storage = pa.FixedSizeListArray.from_arrays(values, int(np.prod(features.shape[1:])))
    tensors = pa.ExtensionArray.from_storage(tensor_type, storage)
    table = pa.table([pa.array(row_ids), pa.array(labels), tensors], schema=schema)
    pq.write_table(table, path, compression="none", use_dictionary=False, row_group_size=100)


def _owner(array: np.ndarray) -> object:
    """Follow `array.base` to the object that owns the memory."""
    while isinstance(array, np.ndarray) and array.base is not None:
        array = array.base
    return array


@pytest.mark.parametrize("shape", [(7,), (4, 4, 2)])
def test_round_trip_is_exact(tmp_path, shape):
    rng = np.random.default_rng(0)
    features = rng.normal(size=(301, *shape)).astype(np.float32)
    labels = rng.integers(0, 5, size=301)
    row_ids = np.arange(1000, 1301)
    path = tmp_path / "features.parquet"
    write_feature_file(path, features, labels, row_ids, {"stage": "s1", "fingerprint": "abc"})

    table = read_feature_file(path)
    assert table.features.dtype == np.float32
    assert table.features.shape == (301, *shape)
    assert np.array_equal(table.features, features)
    assert np.array_equal(table.labels, labels)
    assert np.array_equal(table.row_ids, row_ids)


@pytest.mark.parametrize("shape", [(7,), (4, 4, 2)])
def test_round_trip_several_row_groups(tmp_path, shape):
    rng = np.random.default_rng(1)
    features = rng.normal(size=(250, *shape)).astype(np.float32)
    path = tmp_path / "features.parquet"
    row_bytes = 4 * int(np.prod(shape))
    write_feature_file(path, features, np.arange(250) % 4, np.arange(250), {}, row_group_bytes=60 * row_bytes)

    assert row_group_rows(path) == [60, 60, 60, 60, 10]
    table = read_feature_file(path)
    assert table.features.shape == (250, *shape)
    assert np.array_equal(table.features, features)
    assert np.array_equal(table.labels, np.arange(250) % 4)
    assert np.array_equal(table.row_ids, np.arange(250))


def test_schema_is_self_describing(tmp_path):
    path = tmp_path / "features.parquet"
    write_feature_file(path, np.ones((3, 5), np.float32), np.zeros(3), np.arange(3),
                       {"stage": "s1", "fingerprint": "abc"})
    schema = pq.read_schema(path)
    tensor_type = schema.field("features").type
    assert isinstance(tensor_type, TensorType)
    assert tensor_type.extension_name == "stackwise.tensor"
    assert tensor_type.shape == (5,)
    assert tensor_type.storage_type == pa.binary(20)
    assert json.loads(tensor_type.__arrow_ext_serialize__()) == {"dtype": "float32", "shape": [5]}
    assert schema.field("label").type == pa.int64()
    metadata = read_feature_metadata(path)
    assert metadata["stage"] == "s1"
    assert metadata["fingerprint"] == "abc"
    assert metadata["format_version"] == FORMAT_VERSION
    assert metadata["shape"] == [5]
    assert metadata["rows"] == 3


def test_extension_survives_without_registration(tmp_path):
    # A reader without stackwise reads fixed-size binary plus the extension's name and metadata.
    path = tmp_path / "features.parquet"
    write_feature_file(path, np.ones((3, 2, 3), np.float32), np.zeros(3), np.arange(3), {})
    pa.unregister_extension_type("stackwise.tensor")
    try:
        field = pq.read_schema(path).field("features")
    finally:
        pa.register_extension_type(TensorType(()))
    assert field.type == pa.binary(24)
    assert field.metadata[b"ARROW:extension:name"] == b"stackwise.tensor"
    assert json.loads(field.metadata[b"ARROW:extension:metadata"]) == {"dtype": "float32", "shape": [2, 3]}


def test_read_does_not_copy_rows(tmp_path):
    path = tmp_path / "features.parquet"
    write_feature_file(path, np.ones((50, 3), np.float32), np.zeros(50), np.arange(50), {})
    features = read_feature_file(path).features
    # The array is a view of the Arrow buffer Parquet decoded into, not a copy of it.
    owner = _owner(features)
    assert isinstance(owner, pa.Buffer)
    assert np.shares_memory(features, np.frombuffer(owner, np.uint8))
    assert not features.flags.owndata


def test_read_row_groups_does_not_copy_one_group(tmp_path):
    path = tmp_path / "features.parquet"
    features = np.arange(40 * 4, dtype=np.float32).reshape(40, 4)
    write_feature_file(path, features, np.zeros(40), np.arange(40), {}, row_group_bytes=10 * 16)
    parquet = pq.ParquetFile(path)

    group = read_row_groups(parquet, [2])
    assert isinstance(_owner(group.features), pa.Buffer)
    assert np.array_equal(group.features, features[20:30])
    assert np.array_equal(group.row_ids, np.arange(20, 30))

    both = read_row_groups(parquet, [3, 0])
    assert np.array_equal(both.row_ids, [*range(30, 40), *range(0, 10)])
    assert np.array_equal(both.features, np.concatenate([features[30:40], features[:10]]))


def test_empty_file_reads_back(tmp_path):
    path = tmp_path / "features.parquet"
    write_feature_file(path, np.zeros((0, 4, 2), np.float32), np.zeros(0), np.zeros(0), {"stage": "s1"})
    table = read_feature_file(path)
    assert table.features.shape == (0, 4, 2)
    assert table.features.dtype == np.float32
    assert len(table.labels) == 0
    assert len(table.row_ids) == 0
    assert row_group_rows(path) == []
    assert read_feature_metadata(path)["rows"] == 0
    assert list(iter_feature_batches(path)) == []


@pytest.mark.parametrize("shape", [(6,), (3, 2, 2)])
def test_format_1_still_readable(tmp_path, shape):
    rng = np.random.default_rng(2)
    features = rng.normal(size=(230, *shape)).astype(np.float32)
    labels = rng.integers(0, 3, size=230)
    path = tmp_path / "old.parquet"
    _write_format_1(path, features, labels, np.arange(230), {"stage": "s1"})

    table = read_feature_file(path)
    assert table.features.shape == (230, *shape)
    assert np.array_equal(table.features, features)
    assert np.array_equal(table.labels, labels)
    assert np.array_equal(table.row_ids, np.arange(230))
    metadata = read_feature_metadata(path)
    assert metadata["format_version"] == 1
    assert metadata["shape"] == list(shape)
    assert metadata["stage"] == "s1"
    assert row_group_rows(path) == [100, 100, 30]
    group = read_row_groups(pq.ParquetFile(path), [1])
    assert np.array_equal(group.features, features[100:200])
    batches = list(iter_feature_batches(path))
    assert np.array_equal(np.concatenate([batch.features for batch in batches]), features)


def test_row_groups_sized_by_bytes(tmp_path):
    path = tmp_path / "features.parquet"
    # 16 floats are 64 bytes a row, so 640 bytes make a row group of 10 rows.
    with FeatureFileWriter(path, (16,), {}, row_group_bytes=640) as writer:
        for start in range(0, 95, 7):
            rows = np.arange(start, min(start + 7, 95))
            writer.write(np.ones((len(rows), 16), np.float32) * rows[:, None], rows % 3, rows)
    parquet = pq.ParquetFile(path)
    sizes = [parquet.metadata.row_group(i).num_rows for i in range(parquet.num_row_groups)]
    assert sizes == [10] * 9 + [5]
    assert row_group_rows(path) == sizes
    batches = list(iter_feature_batches(path))
    assert [len(batch) for batch in batches] == sizes
    assert np.array_equal(np.concatenate([b.row_ids for b in batches]), np.arange(95))
    assert np.array_equal(np.concatenate([b.features[:, 0] for b in batches]), np.arange(95))


def test_writer_rejects_wrong_shape(tmp_path):
    with FeatureFileWriter(tmp_path / "f.parquet", (4,), {}) as writer:
        with pytest.raises(ValueError, match=r"example shape \(5,\), expected \(4,\)"):
            writer.write(np.ones((2, 5), np.float32), np.zeros(2), np.arange(2))


def test_reader_rejects_foreign_column(tmp_path):
    path = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"row_id": [0], "label": [0], "features": [1.0]}), path)
    with pytest.raises(ValueError, match=r"feature column has type double, expected stackwise.tensor"):
        read_feature_file(path)
