"""The same stack as plain Prefect tasks that pass numpy arrays, cached by input hashing.

Run as `python benchmarks/plain_prefect.py SPEC`. Each stage is a task with
`cache_policy=INPUTS`: Prefect hashes the task's arguments (the arrays and the stage
settings) into the cache key and persists the returned arrays with its default pickle
serializer in its local storage folder (PREFECT_LOCAL_STORAGE_PATH). A rerun with the
same inputs loads the cached arrays; a changed head setting retrains only the head.
The flow uses the Prefect server of PREFECT_API_URL, or else Prefect's temporary local
server.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from plain_keras import train_chain, train_plain_stage  # noqa: E402
from prefect import flow, task  # noqa: E402
from prefect.cache_policies import INPUTS  # noqa: E402


@task(cache_policy=INPUTS, persist_result=True)
def plain_stage_task(stage: dict, defaults: dict, splits: dict, classes: int) -> tuple[dict, float]:
    return train_plain_stage(stage, defaults, splits, classes)


@flow(name="plain-prefect-stack")
def plain_stack_flow(spec_path: str) -> float:
    return train_chain(spec_path, plain_stage_task)


if __name__ == "__main__":
    plain_stack_flow(sys.argv[1])
