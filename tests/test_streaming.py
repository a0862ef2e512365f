"""Stage inputs streamed from feature files: same rows, same order, same weights as in memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.errors import SpecError
from tasks.features import read_feature_file, write_feature_file
from tasks.jobs import ParentRef, StageJob
from tasks.spec import StageSpec, TrainingSettings
from tasks.stage_input import BUDGET_VARIABLE, StageInput, memory_budget_bytes, open_stage_inputs

SPLIT_ROWS = {"train": 700, "validation": 150, "test": 150}
# Small row groups, so that a few hundred rows span many windows. The second
# parent's row groups then end at other rows than the first's.
ROW_GROUP_BYTES = 2_000


def write_parent(folder: Path, name: str, width: int, seed: int) -> ParentRef:
    """Write feature files of a learnable three-class problem: labels from a fixed linear teacher."""
    rng = np.random.default_rng(seed)
    teacher = np.random.default_rng(99).normal(size=(width, 3))
    (folder / name).mkdir()
    files, first_row = {}, 0
    for split, rows in SPLIT_ROWS.items():
        features = rng.normal(size=(rows, width)).astype(np.float32)
        labels = np.argmax(features @ teacher, axis=1)
        row_ids = np.arange(first_row, first_row + rows)
        first_row += rows
        write_feature_file(folder / name / f"{split}.parquet", features, labels, row_ids,
                           {"stage": name}, row_group_bytes=ROW_GROUP_BYTES)
        files[split] = f"{split}.parquet"
    return ParentRef(name, str(folder / name), files)


@pytest.fixture
def parents(tmp_path):
    return [write_parent(tmp_path, "left", 12, seed=1), write_parent(tmp_path, "right", 4, seed=2)]


def windows_of(source: StageInput, seed: int | None, classes=None) -> list:
    rng = None if seed is None else np.random.default_rng(seed)
    return list(source.windows(rng, classes))


@pytest.mark.parametrize("merge", ["concat", "add"])
def test_streamed_windows_match_in_memory_windows(parents, merge):
    chosen = parents if merge == "concat" else [parents[1], parents[1]]
    in_memory = StageInput(chosen, "train", merge, stream=False)
    streamed = StageInput(chosen, "train", merge, stream=True)
    assert streamed.shape == in_memory.shape == ((16,) if merge == "concat" else (4,))
    for seed in (None, 0, 1):
        expected, actual = windows_of(in_memory, seed), windows_of(streamed, seed)
        assert len(expected) == len(actual) > 5
        for one, other in zip(expected, actual):
            np.testing.assert_array_equal(one.features, other.features)
            np.testing.assert_array_equal(one.labels, other.labels)
            np.testing.assert_array_equal(one.row_ids, other.row_ids)


def test_windows_hold_whole_batches_and_every_row_once(parents):
    source = StageInput(parents, "train", "concat", stream=True)
    first, second = windows_of(source, 0), windows_of(source, 1)
    assert [len(window) for window in windows_of(source, None)] == np.diff(source.starts).tolist()
    assert source.count_batches(16) == sum(-(-len(window) // 16) for window in first)
    for epoch in (first, second):
        row_ids = np.concatenate([window.row_ids for window in epoch])
        assert sorted(row_ids.tolist()) == list(range(SPLIT_ROWS["train"]))
    assert not np.array_equal(first[0].row_ids, second[0].row_ids)


def test_class_filter_keeps_only_those_labels(parents):
    source = StageInput(parents[:1], "train", stream=True)
    kept = np.concatenate([window.labels for window in windows_of(source, 0, classes=[0, 2])])
    expected = read_feature_file(Path(parents[0].folder) / "train.parquet").labels
    assert set(kept.tolist()) == {0, 2}
    assert len(kept) == int(np.isin(expected, [0, 2]).sum())


def test_streamed_reads_across_row_groups(parents):
    path = Path(parents[0].folder) / "validation.parquet"
    whole = read_feature_file(path)
    source = StageInput(parents[:1], "validation", stream=True)
    for start, stop in [(0, 1), (0, 150), (37, 38), (20, 121), (149, 150)]:
        part = source.read(start, stop)
        np.testing.assert_array_equal(part.features, whole.features[start:stop])
        np.testing.assert_array_equal(part.row_ids, whole.row_ids[start:stop])


def test_budget_decides_streaming(parents, monkeypatch):
    splits = tuple(SPLIT_ROWS)
    monkeypatch.setenv(BUDGET_VARIABLE, "0")
    assert all(source.stream for source in open_stage_inputs(parents, splits).values())
    monkeypatch.setenv(BUDGET_VARIABLE, "64")
    assert not any(source.stream for source in open_stage_inputs(parents, splits).values())
    monkeypatch.delenv(BUDGET_VARIABLE)
    assert memory_budget_bytes() == 1024 << 20


@pytest.mark.parametrize("value", ["lots", "-5", "1.5", "²", "١٠"])
def test_bad_budget_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(BUDGET_VARIABLE, value)
    with pytest.raises(SpecError, match=rf"^{BUDGET_VARIABLE}='{value}': expected a whole number"):
        memory_budget_bytes()


STAGES = {
    "supervised": {"name": "wide", "parents": ["left", "right"], "layers": [
        {"layer": "Normalization"}, {"layer": "Dense", "units": 8, "activation": "relu"}]},
    "autoencoder": {"name": "squeeze", "parents": ["left", "right"], "objective": "autoencoder",
                    "noise": 0.1, "layers": [
                        {"layer": "Normalization"}, {"layer": "Dense", "units": 6, "activation": "relu"}]},
}


def stage_job(stage_name: str, parents: list[ParentRef], store: Path) -> StageJob:
    defaults = TrainingSettings(epochs=2, batch_size=16, seed=3)
    stage = StageSpec.model_validate(STAGES[stage_name]).normalized(
        defaults, [0, 1] if stage_name == "autoencoder" else None)
    return StageJob(
        stack="streaming", stage=stage, fingerprint=f"{stage_name}-fingerprint", fingerprint_inputs={},
        parents=parents, dataset={"classes": ["a", "b", "c"]}, store_root=str(store),
    )


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["supervised", "autoencoder"])
def test_same_training_streamed_or_in_memory(parents, tmp_path, monkeypatch, objective):
    from tasks.training import train_stage

    manifests = {}
    for budget in ("0", "1024"):
        monkeypatch.setenv(BUDGET_VARIABLE, budget)
        manifests[budget] = train_stage(stage_job(objective, parents, tmp_path / f"store-{budget}"))
    streamed, in_memory = manifests["0"], manifests["1024"]
    assert streamed["metrics"]["input"] == "stream"
    assert in_memory["metrics"]["input"] == "memory"
    assert streamed["metrics"]["history"] == in_memory["metrics"]["history"]
    for split in SPLIT_ROWS:
        path = f"features/{split}.parquet"
        assert streamed["files"][path]["sha256"] == in_memory["files"][path]["sha256"]
    if objective == "supervised":
        # An encoder with a noise layer also checkpoints its seed generator under a name
        # that carries a per-process counter, so only the supervised block's weights
        # compare byte for byte within one test process.
        assert streamed["weights_digest"] == in_memory["weights_digest"]
    assert streamed["rows"] == {split: rows for split, rows in SPLIT_ROWS.items()}
    assert len(streamed["metrics"]["history"]["loss"]) == 2
