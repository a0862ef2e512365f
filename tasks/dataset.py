"""Dataset snapshots: the data source read once, checked, split and stored as feature files.

The snapshot's digest covers the source's bytes and the split settings, so an
unchanged source is never parsed twice and any change to it gives a new digest,
which changes every stage's fingerprint.

Hashing the source on every run would read the whole file (or load the built-in
data set) even when every stage is reused. So the store caches each source's sha256
in `source-digests.json`, keyed by the file's resolved path. A cached digest is used
while the file's size and modification time (`mtime_ns`) are those recorded; for a
built-in source, while the providing package's version, its data files' sizes and
times, and the sha256 of `tasks/sources.py` are. Any difference recomputes it. The
cache is written only after a snapshot of the source exists in the store.

NOTE: like the store's quick check, the cache trusts a file whose size and
modification time are unchanged. An edit that keeps the size and sets the old time
back (`touch -d`, `os.utime`) is not seen. Delete `source-digests.json` to force a
recomputation.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from tasks.errors import DataError
from tasks.features import read_feature_file, write_feature_file
from tasks.fingerprint import digest_file, digest_json
from tasks.sources import builtin_files, load_builtin
from tasks.spec import StackSpec
from tasks.store import Store

__all__ = ["SPLITS", "Dataset", "dataset_digest", "snapshot_dataset"]

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


@dataclass(frozen=True)
class _SourceDigest:
    """A data source's sha256, and the cache key and identity to record it under.

    `key` and `identity` are None for a source whose digest is never cached.
    """

    sha256: str
    key: str | None = None
    identity: dict[str, Any] | None = None


def _source_digest(spec: StackSpec, store: Store | None = None) -> _SourceDigest:
    if not spec.data.is_builtin:
        _check_source_file(spec.data_path())
    # Taken before the source is read, so that a file edited while it is hashed is
    # recorded under its old identity, which no longer matches.
    found = _source_identity(spec)
    if found is None:
        return _SourceDigest(_hash_source(spec))
    if store is not None:
        cached = store.cached_source_digest(*found)
        if cached is not None:
            return _SourceDigest(cached, *found)
    return _SourceDigest(_hash_source(spec), *found)


def _check_source_file(path: Path) -> None:
    if path.is_dir():
        raise DataError(f"data.source: '{path}' is a folder; give a .parquet or .csv file")
    if not path.exists():
        raise DataError(
            f"data.source: file '{path}' not found; check the path, which is relative to "
            "the spec file's folder"
        )


def _source_identity(spec: StackSpec) -> tuple[str, dict[str, Any]] | None:
    """Return the source's cache key and what must stay unchanged for its cached digest to hold.

    Reads no data, only file sizes and times. Returns None when those cannot be read,
    so that the source is hashed and its error reported as usual.
    """
    if not spec.data.is_builtin:
        try:
            stat = spec.data_path().stat()
        except OSError:
            return None
        return f"file:{spec.data_path()}", {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    found = builtin_files(spec.data.source)
    if found is None:
        return None
    distribution, files = found
    sizes_and_times = {}
    try:
        version = metadata.version(distribution)
        for path in files:
            stat = path.stat()
            sizes_and_times[str(path)] = [stat.st_size, stat.st_mtime_ns]
    except (metadata.PackageNotFoundError, OSError):
        return None
    # A built-in digest covers what the loader returns, so the loader's code counts too.
    loader = digest_file(Path(__file__).with_name("sources.py"))
    identity = {"distribution": distribution, "version": version, "files": sizes_and_times, "loader": loader}
    return f"builtin:{spec.data.source}", identity


def _hash_source(spec: StackSpec) -> str:
    if spec.data.is_builtin:
        features, labels, classes, shape = load_builtin(spec.data.source)
        digest = hashlib.sha256(spec.data.source.encode())
        for part in (features, labels.astype(np.int64), np.array(shape)):
            digest.update(np.ascontiguousarray(part).tobytes())
        digest.update(",".join(classes).encode())
        return digest.hexdigest()
    path = spec.data_path()
    try:
        return digest_file(path)
    except OSError as exc:
        raise DataError(f"data.source: cannot read '{path}': {exc.strerror}; check its permissions") from None


def _read_table(path: Path):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    try:
        if path.suffix == ".parquet":
            return pq.read_table(path)
        # An empty cell is a missing value in string columns too, not an empty label.
        return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
    except (pa.ArrowException, OSError) as exc:
        first_line = str(exc).splitlines()[0]
        raise DataError(
            f"data.source: cannot read '{path}': {first_line}; fix or re-export the file"
        ) from None


def _load_file(spec: StackSpec) -> tuple[np.ndarray, np.ndarray, list[str]]:
    import pyarrow as pa

    path = spec.data_path()
    _check_column_names(spec)
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
    if table.num_rows == 0:
        raise DataError(f"data.source: '{path}' has no rows; give a file with data")
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
        values = column.to_numpy().astype(np.float32)
        _check_finite(values, f"data.features: column '{name}' of '{path}'")
        feature_columns.append(values)
    features = np.stack(feature_columns, axis=1)
    labels = _read_labels(table.column(spec.data.label), spec.data.label, path)
    classes, labels = np.unique(labels, return_inverse=True)
    return features, labels, [str(value) for value in classes]


def _check_column_names(spec: StackSpec) -> None:
    features = spec.data.features
    duplicates = sorted({name for name in features if features.count(name) > 1})
    if duplicates:
        raise DataError(
            f"data.features: column {duplicates[0]!r} is listed more than once; list each column once"
        )
    if spec.data.label in features:
        raise DataError(
            f"data.features: lists the label column '{spec.data.label}', which would leak the "
            "answer into the inputs; remove it from data.features"
        )


def _read_labels(column, name: str, path: Path) -> np.ndarray:
    import pyarrow as pa

    kind = column.type
    if not (pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_string(kind)
            or pa.types.is_large_string(kind) or pa.types.is_boolean(kind)):
        raise DataError(
            f"data.label: column '{name}' of '{path}' has type {kind}, expected integers, "
            "strings or booleans; convert the labels to one of these"
        )
    if column.null_count:
        raise DataError(
            f"data.label: column '{name}' of '{path}' has {column.null_count} missing values; "
            "fill or drop those rows"
        )
    labels = column.to_numpy()
    if pa.types.is_floating(kind):
        _check_finite(labels, f"data.label: column '{name}' of '{path}'")
    return labels


def _check_finite(values: np.ndarray, where: str) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        first = int(np.argmax(bad.reshape(-1)))
        raise DataError(
            f"{where}: {int(bad.sum())} values are NaN or infinite (first in row {first}, "
            f"value {values.reshape(-1)[first]}); clean or impute them before training"
        )


def _check_values(spec: StackSpec, features: np.ndarray, labels: np.ndarray, classes: list[str]) -> None:
    if len(features) == 0:
        raise DataError(f"data.source: '{spec.data.source}' has no rows; give a file with data")
    _check_finite(features, f"data.source '{spec.data.source}'")
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


def _split(spec: StackSpec, labels: np.ndarray, classes: list[str]) -> dict[str, np.ndarray]:
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
    # Training rows keep the split's seeded random order. Training shuffles a large
    # input window by window, which mixes well only when each window has rows of many
    # classes and periods of time.
    splits = {"train": train, "validation": np.sort(validation), "test": np.sort(test)}
    for name, indices in splits.items():
        if len(indices) == 0:
            raise DataError(f"data.split: the {name} split is empty; use more rows or a larger fraction")
    trained_on = set(np.unique(labels[splits["train"]]).tolist())
    for name in ("validation", "test"):
        unseen = sorted(set(np.unique(labels[splits[name]]).tolist()) - trained_on)
        if unseen:
            raise DataError(
                f"data.split: {name} labels {[classes[index] for index in unseen]} never occur in "
                "the train split; set stratify: true or add rows of those classes"
            )
    return splits


def dataset_digest(spec: StackSpec, store: Store | None = None) -> str:
    """Return the digest of the spec's dataset snapshot: the source's bytes and the split settings.

    With `store`, an unchanged source's sha256 comes from the store's cache.
    """
    return _snapshot_digest(spec, _source_digest(spec, store).sha256)


def _snapshot_digest(spec: StackSpec, source_sha256: str) -> str:
    return digest_json(
        {
            "source": source_sha256,
            "features": spec.data.features,
            "label": spec.data.label,
            "shape": spec.data.shape,
            "split": spec.data.split.model_dump(mode="json"),
        }
    )


def snapshot_dataset(spec: StackSpec, store: Store) -> Dataset:
    """Read, check and split the spec's data source once, storing it under its digest.

    An existing snapshot with the same digest is reused without reading the source.
    """
    source = _source_digest(spec, store)
    digest = _snapshot_digest(spec, source.sha256)
    folder = store.dataset_dir(digest)
    manifest = store.lookup(folder)
    if manifest is None:
        manifest = _write_snapshot(spec, store, digest, folder)
    # Recorded only now, so that a source rejected as invalid leaves the store untouched.
    if source.key is not None:
        store.record_source_digest(source.key, source.identity, source.sha256)
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
    splits = _split(spec, labels, classes)
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


