"""Measure one stackwise step in a fresh process: train a stage, or extract features.

Run as `python benchmarks/stage_worker.py ACTION SPEC DATA_DIR [OUTPUT]` with the
project root on PYTHONPATH. The store DATA_DIR must contain the spec's dataset
snapshot. ACTION is one of:

- `train`: train the spec's first stage (a root stage) with `train_stage`, as the
  stage process of a run does, and publish it, replacing an earlier artifact.
- `extract`: stream the train split through the frozen model of the first stage's
  latest artifact and write the outputs as a feature file at OUTPUT. It uses the same
  model calls and writer as the extraction in `train_stage`, but reads its input one
  row group at a time, where `train_stage` now reads the whole input into memory.

It prints one JSON object: the process's peak resident set size in megabytes
(`ru_maxrss`), and for `train` the stage manifest.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tasks.dataset import snapshot_dataset  # noqa: E402
from tasks.jobs import StageJob, dataset_parent  # noqa: E402
from tasks.plan import decide_stage  # noqa: E402
from tasks.spec import load_spec  # noqa: E402
from tasks.store import Store  # noqa: E402


def train_first_stage(spec_path: str, data_dir: str) -> dict:
    """Train the spec's first stage as the flow would, forced; return its manifest."""
    from tasks.training import train_stage

    spec = load_spec(spec_path)
    store = Store(data_dir)
    dataset = snapshot_dataset(spec, store)
    stage = spec.stages[0]
    decision = decide_stage(spec, stage, dataset, {}, store, force=True)
    job = StageJob(
        stack=spec.name,
        stage=decision.inputs["stage"],
        fingerprint=decision.fingerprint,
        fingerprint_inputs=decision.inputs,
        parents=[dataset_parent(dataset)],
        dataset=dataset.to_dict(),
        store_root=str(store.root),
        force=True,
    )
    return train_stage(job)


def extract_first_stage(spec_path: str, data_dir: str, output: str) -> int:
    """Write the first stage's outputs for the train split to `output`; return the rows written."""
    from tasks.blocks import load_frozen_stage, predict_in_batches
    from tasks.features import FeatureFileWriter, iter_feature_batches

    spec = load_spec(spec_path)
    store = Store(data_dir)
    dataset = snapshot_dataset(spec, store)
    stage = spec.stages[0].name
    folders = sorted((store.root / "stages" / stage).iterdir(), key=lambda folder: folder.stat().st_mtime)
    frozen = load_frozen_stage(folders[-1] / "model", stage)
    writer = None
    for batch in iter_feature_batches(dataset.split_file("train")):
        start = 0
        for outputs in predict_in_batches(frozen, batch.features):
            if writer is None:
                writer = FeatureFileWriter(Path(output), outputs.shape[1:], {"stage": stage})
            stop = start + len(outputs)
            writer.write(outputs, batch.labels[start:stop], batch.row_ids[start:stop])
            start = stop
    writer.close()
    return writer.rows_written


def main(action: str, spec_path: str, data_dir: str, output: str | None = None) -> None:
    result: dict = {}
    if action == "train":
        result["manifest"] = train_first_stage(spec_path, data_dir)
    elif action == "extract":
        result["rows"] = extract_first_stage(spec_path, data_dir, output)
    else:
        raise SystemExit(f"unknown action {action!r}; expected train or extract")
    # On Linux ru_maxrss is in kilobytes.
    result["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
