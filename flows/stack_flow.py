"""The stack flow: snapshot the data, build every stage in DAG order, assemble, evaluate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flows.environment import apply_prefect_defaults, default_data_dir

apply_prefect_defaults()

from prefect import flow  # noqa: E402
from prefect.context import FlowRunContext  # noqa: E402
from prefect.futures import PrefectFuture, as_completed  # noqa: E402

from tasks.bases import pretrained_job_extra  # noqa: E402
from tasks.dataset import Dataset, dataset_digest  # noqa: E402
from tasks.errors import StageFailed  # noqa: E402
from tasks.leases import Leases  # noqa: E402
from tasks.plan import any_stage_trains, assembly_job, decide_stage  # noqa: E402
from tasks.prefect_tasks import (  # noqa: E402
    assemble_task,
    publish_run_report,
    snapshot_task,
    stage_task,
    task_options,
)
from tasks.spec import StackSpec, check_retrain_names, check_shapes, load_spec  # noqa: E402
from tasks.stage_process import prewarm, release_spare  # noqa: E402
from tasks.store import Store  # noqa: E402
from tasks.jobs import ParentRef, StageJob, dataset_parent  # noqa: E402

__all__ = ["stack_flow", "DEFAULT_DATA_DIR"]

DEFAULT_DATA_DIR = default_data_dir()


@flow(name="stackwise", log_prints=False)
def stack_flow(spec_path: str, retrain: list[str] | None = None, data_dir: str = DEFAULT_DATA_DIR) -> dict:
    """Train the stack described by the spec at `spec_path`, stage by stage.

    Prefect shows the descriptions under Args in a deployment's run form.

    Args:
        spec_path: Path of the stack spec YAML file, such as stacks/digits.yaml.
            A relative path is relative to the folder the flow runs in.
        retrain: Names of stages to train again even if their artifacts exist.
            A stage that depends on them trains again only if the new artifact differs.
        data_dir: Folder of the artifact store (datasets, stages, assembled models
            and Prefect's task results). Relative to the folder the flow runs in.
    """
    store = Store(data_dir)
    spec = load_spec(spec_path)
    check_retrain_names(spec, retrain or [])

    # The run holds a lease on every artifact folder it uses, so `stackwise gc` keeps them.
    with Leases(store) as leases:
        leases.hold(store.dataset_dir(dataset_digest(spec, store)))
        dataset = snapshot_task(spec, str(store.root))
        shapes = check_shapes(spec, dataset.shape, dataset.n_classes, where=spec_path)
        try:
            stages = build_stages(spec, dataset, store, set(retrain or []), leases)

            assembly = assemble(spec, dataset, store, stages, shapes, leases)
        finally:
            release_spare()

    summary = run_summary(spec, stages, assembly)

    publish_run_report(summary)
    return summary


def _submit_stage(
    spec, stage, dataset: Dataset, store: Store, manifests, force: bool, leases: Leases | None
) -> PrefectFuture:
    hold = leases.hold if leases is not None else None
    decision = decide_stage(spec, stage, dataset, manifests, store, force=force, before_lookup=hold)
    if stage.parents:
        parents = [
            ParentRef(name, str(store.stage_dir(name, manifests[name]["fingerprint"])),
                      manifests[name]["feature_files"])
            for name in stage.parents
        ]
    else:
        parents = [dataset_parent(dataset)]
    job = StageJob(
        stack=spec.name,
        stage=decision.inputs["stage"],
        fingerprint=decision.fingerprint,
        fingerprint_inputs=decision.inputs,
        parents=parents,
        dataset=dataset.to_dict(),
        store_root=str(store.root),
        force=force,
        extra=pretrained_job_extra(stage),
    )
    options = task_options(store, refresh=decision.action == "train")
    return stage_task.with_options(task_run_name=stage.name, **options).submit(
        stage.name, decision.fingerprint, job.to_dict()
    )


def build_stages(
    spec: StackSpec, dataset: Dataset, store: Store, retrain: set[str], leases: Leases | None = None
) -> dict[str, dict]:
    """Submit each stage once its parents are done; independent branches run at once.

    A failed stage stops only the stages below it: the others finish and keep their
    artifacts, so a retry of the flow run reuses them. Returns each stage's summary
    in topological order, after raising StageFailed if any stage failed.
    """
    if any_stage_trains(spec, dataset, store, retrain):
        # The first stage to train then finds TensorFlow already imported.
        prewarm()
    pending = spec.topological_order()
    running: dict[PrefectFuture, str] = {}
    summaries: dict[str, dict] = {}
    manifests: dict[str, dict] = {}
    failures: dict[str, BaseException] = {}
    while True:
        # A stage whose parent failed never becomes ready, so it is never submitted.
        for stage in [s for s in pending if all(p in manifests for p in s.parents)]:
            pending.remove(stage)
            future = _submit_stage(spec, stage, dataset, store, manifests, stage.name in retrain, leases)
            running[future] = stage.name
        if not running:
            break
        future = next(as_completed(list(running)))
        name = running.pop(future)
        try:
            summary = future.result()
        except BaseException as exc:  # noqa: BLE001 - reported after the other branches finish.
            failures[name] = exc
            continue
        # The folder comes from this store: a result cached in a store that was since
        # copied or moved names the old location.
        summary = {**summary, "folder": str(store.stage_dir(name, summary["fingerprint"]))}
        manifest = store.lookup(Path(summary["folder"]))
        if manifest is None:
            failures[name] = StageFailed(
                f"stage '{name}': its artifact {summary['folder']} is missing or damaged right "
                "after the stage finished, so another process changed it; retry the flow run to rebuild it"
            )
            continue
        summaries[name] = _mark_cached(future, summary)
        manifests[name] = manifest
    if failures:
        first = next(iter(failures.values()))
        if isinstance(first, StageFailed):
            raise first
        raise StageFailed(
            f"stage '{next(iter(failures))}' failed: {type(first).__name__}: {first}. Fix the cause, "
            "then retry the flow run; stages that finished keep their artifacts and are reused"
        ) from first
    return {stage.name: {**summaries[stage.name], "manifest": manifests[stage.name]}
            for stage in spec.topological_order()}


def _mark_cached(future: PrefectFuture, summary: dict) -> dict:
    """Mark a result that Prefect served from its cache: nothing ran in this flow run."""
    if future.state.name != "Cached":
        return summary
    now = future.state.timestamp.isoformat()
    return {**summary, "status": "cached", "seconds": 0.0, "started_at": now, "finished_at": now}


def assemble(
    spec: StackSpec,
    dataset: Dataset,
    store: Store,
    stages: dict[str, dict],
    shapes: dict[str, tuple],
    leases: Leases | None = None,
) -> dict:
    manifests = {name: stage["manifest"] for name, stage in stages.items()}
    job = assembly_job(spec, dataset, store, manifests, shapes)
    if leases is not None:
        leases.hold(store.assembled_dir(spec.name, job.fingerprint))
    reusable = store.lookup(store.assembled_dir(spec.name, job.fingerprint)) is not None
    options = task_options(store, refresh=not reusable)
    future = assemble_task.with_options(**options).submit(job.fingerprint, job.to_dict())
    folder = store.assembled_dir(spec.name, job.fingerprint)
    return _mark_cached(future, {**future.result(), "folder": str(folder)})


def run_summary(spec: StackSpec, stages: dict[str, dict], assembly: dict) -> dict[str, Any]:
    """Return the run's JSON summary: every stage's status and files, and the evaluation."""
    context = FlowRunContext.get()
    flow_run_id = str(context.flow_run.id) if context and context.flow_run else None
    entries = []
    for name, stage in stages.items():
        folder = Path(stage["folder"])
        entries.append({
            "name": name,
            "status": stage["status"],
            "fingerprint": stage["fingerprint"],
            "seconds": stage["seconds"],
            "started_at": stage["started_at"],
            "finished_at": stage["finished_at"],
            "model_dir": str(folder / "model"),
            "feature_files": {
                split: str(folder / relative)
                for split, relative in stage["manifest"]["feature_files"].items()
            },
            "validation_accuracy": stage["manifest"]["metrics"].get("validation_accuracy"),
            "validation_loss": stage["manifest"]["metrics"].get("validation_loss"),
        })
    report = assembly["report"]
    return {
        "stack": spec.name,
        "flow_run_id": flow_run_id,
        "stages": entries,
        "evaluation": {
            key: report[key] for key in ("task", "split", "metrics", "baseline", "fine_tune") if key in report
        },
        "assembly_status": assembly["status"],
        "model_dir": str(Path(assembly["folder"]) / "model"),
        "report": str(Path(assembly["folder"]) / "report.json"),
        "curves": {
            name: str(Path(assembly["folder"]) / relative)
            for name, relative in report.get("curves", {}).items()
        },
    }
