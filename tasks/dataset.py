"""Dataset snapshots: the data source read once, checked, split and stored as feature files.

The snapshot's digest covers the source's bytes and the split settings, so an
unchanged source is never parsed twice and any change to it gives a new digest,
which changes every stage's fingerprint.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.errors import DataError
from tasks.features import read_feature_file, write_feature_file
from tasks.fingerprint import digest_file, digest_json
from tasks.sources import load_builtin
from tasks.spec import StackSpec
from tasks.store import Store

__all__ = ["SPLITS", "Dataset", "snapshot_dataset"]

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Dataset:
    """A published snapshot: its digest, folder and the facts stages need."""

    digest: str
    folder: Path
    shape: tuple[int, ...]
    classes: list[str]
    rows: dict[str, int]

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def split_file(self, split: str) -> Path:
        return self.folder / f"{split}.parquet"

    def to_dict(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "folder": str(self.folder),
            "shape": list(self.shape),
            "classes": self.classes,
            "rows": self.rows,
        }

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> Dataset:
        return cls(
            digest=value["digest"],
            folder=Path(value["folder"]),
            shape=tuple(value["shape"]),
            classes=list(value["classes"]),
            rows=dict(value["rows"]),
        )


def _source_digest(spec: StackSpec) -> str:
    if spec.data.is_builtin:
        features, labels, classes, shape = load_builtin(spec.data.source)
        digest = hashlib.sha256(spec.data.source.encode())
        for part in (features, labels.astype(np.int64), np.array(shape)):
            digest.update(np.ascontiguousarray(part).tobytes())
        digest.update(",".join(classes).encode())
        return digest.hexdigest()
    path = spec.data_path()
    if path.is_dir() or not path.exists():
        raise DataError(
            f"data.source: file '{path}' not found; check the path, which is relative to "
            "the spec file's folder"
        )
    return digest_file(path)


def _read_table(path: Path):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if path.suffix == ".parquet":
            return pq.read_table(path)
        return pacsv.read_csv(path)
    except (pa.ArrowInvalid, OSError) as exc:
        first_line = str(exc).splitlines()[0]
        raise DataError(
            f"data.source: cannot read '{path}': {first_line}; fix or re-export the file"
        ) from None


def _load_file(spec: StackSpec) -> tuple[np.ndarray, np.ndarray, list[str]]:
    import pyarrow as pa

    path = spec.data_path()
    if spec.data.features is None or spec.data.label is None:
        raise DataError(
            f"data: a file source needs 'features' (a list of column names) and 'label' "
            f"(a column name); got features={spec.data.features!r}, label={spec.data.label!r}"
        )
    table = _read_table(path)
    columns = table.column_names
    for name in [*spec.data.features, spec.data.label]:
        if name not in columns:
            from tasks.layers import suggest

            field = "data.label" if name == spec.data.label else "data.features"
            raise DataError(
                f"{field}: column '{name}' not found in '{path}'.{suggest(name, columns)} "
                f"Columns: {', '.join(columns)}"
            )
    feature_columns = []
    for name in spec.data.features:
        column = table.column(name)
        if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
            raise DataError(
                f"data.features: column '{name}' has type {column.type}, expected numbers; "
                "encode it as numbers or drop it from data.features"
            )
        if column.null_count:
            raise DataError(
                f"data.features: column '{name}' has {column.null_count} missing values; "
                "fill or drop those rows"
            )
        feature_columns.append(column.to_numpy().astype(np.float32))
    features = np.stack(feature_columns, axis=1)
    labels_column = table.column(spec.data.label)
    if labels_column.null_count:
        raise DataError(
            f"data.label: column '{spec.data.label}' has {labels_column.null_count} missing "
            "values; fill or drop those rows"
        )
    raw_labels = np.asarray(labels_column.to_pylist())
    classes, labels = np.unique(raw_labels, return_inverse=True)
    return features, labels, [str(value) for value in classes]


def _check_values(spec: StackSpec, features: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
    if len(features) == 0:
        raise DataError(f"data.source: '{spec.data.source}' has no rows; give a file with data")
    bad = ~np.isfinite(features)
    if bad.any():
        row, column = np.argwhere(bad.reshape(len(features), -1))[0]
        raise DataError(
            f"data.features: {int(bad.sum())} values are NaN or infinite (first at row {row}, "
            f"feature {column}); clean or impute them before training"
        )
    if len(classes) < 2:
        raise DataError(
            f"data.label: the label has {len(classes)} class ({', '.join(classes) or 'none'}); "
            "a classifier needs at least two"
        )
    if spec.data.shape is not None and math.prod(spec.data.shape) != features.shape[1]:
        raise DataError(
            f"data.shape: {list(spec.data.shape)} holds {math.prod(spec.data.shape)} values but "
            f"each example has {features.shape[1]} features; make the product match"
        )


def _split(spec: StackSpec, labels: np.ndarray) -> dict[str, np.ndarray]:
    from sklearn.model_selection import train_test_split

    settings = spec.data.split
    rows = np.arange(len(labels))
    if settings.test + settings.validation >= 1.0:
        raise DataError(
            f"data.split: test ({settings.test}) plus validation ({settings.validation}) leaves no "
            "training rows; make their sum less than 1"
        )
    stratify = labels if settings.stratify else None
    try:
        rest, test = train_test_split(
            rows, test_size=settings.test, random_state=settings.seed, stratify=stratify
        )
        validation_share = settings.validation / (1.0 - settings.test)
        train, validation = train_test_split(
            rest, test_size=validation_share, random_state=settings.seed,
            stratify=labels[rest] if stratify is not None else None,
        )
    except ValueError as exc:
        raise DataError(
            f"data.split: cannot split {len(labels)} rows into test {settings.test} and "
            f"validation {settings.validation}: {exc}; use more rows, smaller fractions, or "
            "stratify: false"
        ) from None
    splits = {"train": np.sort(train), "validation": np.sort(validation), "test": np.sort(test)}
    for name, indices in splits.items():
        if len(indices) == 0:
            raise DataError(f"data.split: the {name} split is empty; use more rows or a larger fraction")
    unseen = set(np.unique(labels[splits["test"]])) - set(np.unique(labels[splits["train"]]))
    if unseen:
        raise DataError(
            f"data.split: test labels {sorted(int(v) for v in unseen)} never occur in the train "
            "split; set stratify: true or add rows of those classes"
        )
    return splits


def snapshot_dataset(spec: StackSpec, store: Store) -> Dataset:
    """Read, check and split the spec's data source once, storing it under its digest.

    An existing snapshot with the same digest is reused without reading the source.
    """
    digest = digest_json(
        {
            "source": _source_digest(spec),
            "features": spec.data.features,
            "label": spec.data.label,
            "shape": spec.data.shape,
            "split": spec.data.split.model_dump(mode="json"),
        }
    )
    folder = store.dataset_dir(digest)
    manifest = store.lookup(folder)
    if manifest is None:
        manifest = _write_snapshot(spec, store, digest, folder)
    return Dataset(
        digest=digest,
        folder=folder,
        shape=tuple(manifest["shape"]),
        classes=manifest["classes"],
        rows=manifest["rows"],
    )


def _write_snapshot(spec: StackSpec, store: Store, digest: str, folder: Path) -> dict[str, Any]:
    if spec.data.is_builtin:
        features, labels, classes, natural_shape = load_builtin(spec.data.source)
    else:
        features, labels, classes = _load_file(spec)
        natural_shape = (features.shape[1],)
    _check_values(spec, features, labels, classes)
    shape = tuple(spec.data.shape) if spec.data.shape else natural_shape
    features = features.reshape(len(features), *shape)
    splits = _split(spec, labels)
    with store.staging(f"dataset-{digest[:12]}") as staged:
        for name, rows in splits.items():
            write_feature_file(
                staged / f"{name}.parquet", features[rows], labels[rows], rows,
                {"stage": "input", "dataset": digest, "split": name},
            )
        return store.publish(
            staged,
            folder,
            {
                "kind": "dataset",
                "digest": digest,
                "source": spec.data.source,
                "shape": list(shape),
                "classes": classes,
                "rows": {name: int(len(rows)) for name, rows in splits.items()},
            },
        )


def read_split(dataset: Dataset, split: str):
    """Return the input feature table of one split."""
    return read_feature_file(dataset.split_file(split))


