"""Built-in data sources: real data sets that installed packages ship, read without a network."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from tasks.errors import DataError

__all__ = ["BasicMotionsWindows", "builtin_files", "load_builtin"]

# BasicMotions (UEA archive, as shipped in sktime's datasets/data folder): 80 recordings
# of a smartwatch's 3-axis accelerometer and 3-axis gyroscope at 10 Hz, 100 steps each,
# labelled Standing, Walking, Running or Badminton.
BASIC_MOTIONS_STEPS = 100
BASIC_MOTIONS_CHANNELS = 6


class BasicMotionsWindows:
    """BasicMotions cut into windows of `WINDOW` steps; each window is one (25, 6) example.

    Windows of one recording may land in different splits, so test windows are not
    independent of training windows.
    """

    WINDOW = 25

    @staticmethod
    def folder() -> Path:
        spec = importlib.util.find_spec("sktime")
        if spec is None or not spec.submodule_search_locations:
            raise DataError(
                "data.source: 'sktime:BasicMotions' reads the copy that the sktime package ships, "
                "but sktime is not installed; run `pip install sktime`"
            )
        return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "BasicMotions"

    @classmethod
    def load(cls) -> tuple[np.ndarray, np.ndarray, list[str], tuple[int, ...]]:
        recordings, names = [], []
        for part in ("TRAIN", "TEST"):
            path = cls.folder() / f"BasicMotions_{part}.ts"
            for series, label in _read_ts(path):
                recordings.append(series)
                names.append(label)
        values = np.stack(recordings).astype(np.float32)  # (recordings, steps, channels)
        per_recording = BASIC_MOTIONS_STEPS // cls.WINDOW
        windows = values.reshape(len(values) * per_recording, cls.WINDOW, BASIC_MOTIONS_CHANNELS)
        classes, labels = np.unique(np.repeat(names, per_recording), return_inverse=True)
        shape = (cls.WINDOW, BASIC_MOTIONS_CHANNELS)
        return windows.reshape(len(windows), -1), labels, [str(name) for name in classes], shape


def _read_ts(path: Path):
    """Yield (steps x channels array, label) from a multivariate sktime/UEA .ts file."""
    if not path.is_file():
        raise DataError(f"data.source: {path} not found; reinstall sktime (`pip install --force-reinstall sktime`)")
    in_data = False
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.lower() == "@data":
            in_data = True
            continue
        if not in_data:
            continue
        *channels, label = line.split(":")
        series = np.array([[float(value) for value in channel.split(",")] for channel in channels])
        yield series.T, label


def _load_digits() -> tuple[np.ndarray, np.ndarray, list[str], tuple[int, ...]]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    classes = [str(name) for name in digits.target_names]
    return digits.data.astype(np.float32), digits.target, classes, (64,)


BUILTIN_LOADERS = {
    "sklearn:digits": _load_digits,
    "sktime:BasicMotions": BasicMotionsWindows.load,
}


def builtin_files(source: str) -> tuple[str, list[Path]] | None:
    """Return the distribution that ships a built-in source and the files it is read from.

    Returns None when that distribution is not installed, and for a source not listed
    here, whose digest is then never cached.
    """
    if source == "sklearn:digits":
        spec = importlib.util.find_spec("sklearn")
        if spec is None or not spec.submodule_search_locations:
            return None
        return "scikit-learn", [Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"]
    if source == "sktime:BasicMotions":
        try:
            folder = BasicMotionsWindows.folder()
        except DataError:
            return None
        return "sktime", [folder / f"BasicMotions_{part}.ts" for part in ("TRAIN", "TEST")]
    return None


def load_builtin(source: str) -> tuple[np.ndarray, np.ndarray, list[str], tuple[int, ...]]:
    """Return flat float32 features, integer labels, class names and the example shape."""
    return BUILTIN_LOADERS[source]()
