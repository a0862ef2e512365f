"""Feature files: the Parquet round trip, the schema, and row groups sized by bytes."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.features import (
    FeatureFileWriter,
    iter_feature_batches,
    read_feature_file,
    read_feature_metadata,
    write_feature_file,
)


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


def test_schema_is_self_describing(tmp_path):
    path = tmp_path / "features.parquet"
    write_feature_file(path, np.ones((3, 5), np.float32), np.zeros(3), np.arange(3),
                       {"stage": "s1", "fingerprint": "abc"})
    schema = pq.read_schema(path)
    assert isinstance(schema.field("features").type, pa.FixedShapeTensorType)
    assert schema.field("features").type.value_type == pa.float32()
    assert schema.field("label").type == pa.int64()
    metadata = read_feature_metadata(path)
    assert metadata["stage"] == "s1"
    assert metadata["fingerprint"] == "abc"
    assert metadata["shape"] == [5]
    assert metadata["rows"] == 3


def test_read_is_numeric_not_objects(tmp_path):
    path = tmp_path / "features.parquet"
    write_feature_file(path, np.ones((10, 3), np.float32), np.zeros(10), np.arange(10), {})
    column = pq.read_table(path).column("features")
    array = column.chunk(0).to_numpy_ndarray()
    assert array.dtype == np.float32
    assert array.shape == (10, 3)


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
    batches = list(iter_feature_batches(path))
    assert [len(batch) for batch in batches] == sizes
    assert np.array_equal(np.concatenate([b.row_ids for b in batches]), np.arange(95))


def test_writer_rejects_wrong_shape(tmp_path):
    with FeatureFileWriter(tmp_path / "f.parquet", (4,), {}) as writer:
        with pytest.raises(ValueError, match=r"example shape \(5,\), expected \(4,\)"):
            writer.write(np.ones((2, 5), np.float32), np.zeros(2), np.arange(2))
