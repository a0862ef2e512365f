"""Measure one stackwise step in a fresh process: train a stage, or extract features.

Run as `python benchmarks/stage_worker.py ACTION SPEC DATA_DIR [OUTPUT]` with the
project root on PYTHONPATH. The store DATA_DIR must contain the spec's dataset
snapshot. ACTION is one of:

- `train`: train the spec's first stage (a root stage) with `train_stage`, as the
  stage process of a run does, and publish it, replacing an earlier artifact.
- `extract`: run the first stage's latest artifact over the train split with the
  extraction code of `train_stage`, writing into the new folder OUTPUT. The input is
  streamed or read into memory as STACKWISE_MEMORY_BUDGET_MB decides.

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


def _first_stage_job(spec_path: str, data_dir: str) -> StageJob:
    """Return the job that trains the spec's first stage as the flow would, forced."""
    spec = load_spec(spec_path)
    store = Store(data_dir)
    dataset = snapshot_dataset(spec, store)
    decision = decide_stage(spec, spec.stages[0], dataset, {}, store, force=True)
    return StageJob(
        stack=spec.name,
        stage=decision.inputs["stage"],
        fingerprint=decision.fingerprint,
        fingerprint_inputs=decision.inputs,
        parents=[dataset_parent(dataset)],
        dataset=dataset.to_dict(),
        store_root=str(store.root),
        force=True,
    )


def train_first_stage(spec_path: str, data_dir: str) -> dict:
    """Train the spec's first stage as the flow would, forced; return its manifest."""
    from tasks.training import train_stage

    return train_stage(_first_stage_job(spec_path, data_dir))


def extract_first_stage(spec_path: str, data_dir: str, output: str) -> int:
    """Write the first stage's train-split features into the folder `output`; return the rows written.

    It runs the extraction that `train_stage` runs after training, on the stage's
    latest artifact, with the input read in memory or streamed as the budget decides.
    """
    from tasks.stage_input import open_stage_inputs
    from tasks.training import _extract_features

    job = _first_stage_job(spec_path, data_dir)
    folders = sorted((Store(data_dir).root / "stages" / job.stage["name"]).iterdir(),
                     key=lambda folder: folder.stat().st_mtime)
    inputs = open_stage_inputs(job.parents, ("train",))
    written = _extract_features(folders[-1] / "model", job, inputs, Path(output))
    return written["train"]["rows"]


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
