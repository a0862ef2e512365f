"""The `stackwise` command line: run a stack as a local Prefect flow run, plan, collect or verify."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import sys
import threading
from collections import Counter
from pathlib import Path

from flows.environment import apply_prefect_defaults, default_data_dir

apply_prefect_defaults()

from tasks.errors import DataError, StackwiseError  # noqa: E402

__all__ = ["main"]

logger = logging.getLogger("stackwise")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stackwise",
        description="Train a stack of Keras networks stage by stage, each stage a cached Prefect task.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="train the stack (reusing cached stages) and evaluate it")
    run.add_argument("spec", help="path of the stack spec YAML file")
    run.add_argument("--retrain", nargs="+", default=[], metavar="STAGE",
                     help="train these stages again even if their artifacts exist")
    run.add_argument("--json", action="store_true",
                     help="print the run summary as one JSON object on stdout; logs go to stderr")
    run.add_argument("--data-dir", default=None,
                     help="artifact store folder (default: $STACKWISE_DATA_DIR or ./data)")

    plan = commands.add_parser("plan", help="show which stages a run would reuse or train, and why")
    plan.add_argument("spec", help="path of the stack spec YAML file")
    plan.add_argument("--retrain", nargs="+", default=[], metavar="STAGE",
                      help="plan as if these stages were forced to train")
    plan.add_argument("--data-dir", default=None, help="artifact store folder (default: ./data)")

    gc = commands.add_parser(
        "gc", help="remove artifacts that none of the given specs references (a dry run unless --delete)"
    )
    gc.add_argument("specs", nargs="+", metavar="SPEC", help="stack spec YAML files whose artifacts to keep")
    gc.add_argument("--delete", action="store_true", help="remove the listed entries instead of only listing them")
    gc.add_argument("--data-dir", default=None, help="artifact store folder (default: ./data)")

    verify = commands.add_parser(
        "verify", help="recompute the sha256 of every file of every artifact and report damaged ones"
    )
    verify.add_argument("spec", nargs="?", default=None,
                        help="check only the artifacts this stack spec uses (default: the whole store)")
    verify.add_argument("--json", action="store_true", help="print the results as one JSON object on stdout")
    verify.add_argument("--data-dir", default=None,
                        help="artifact store folder (default: $STACKWISE_DATA_DIR or ./data)")
    return parser


def _data_dir(argument: str | None) -> str:
    return argument or default_data_dir()


def _preflight(spec_path: str, retrain: list[str], data_dir: str):
    """Validate the spec and the data before Prefect starts; return the spec, store and dataset."""
    from tasks.dataset import snapshot_dataset
    from tasks.plan import normal_class_indices
    from tasks.spec import check_retrain_names, check_shapes, load_spec
    from tasks.stage_input import memory_budget_bytes
    from tasks.stage_process import memory_limit_mb
    from tasks.store import Store

    memory_limit_mb()
    memory_budget_bytes()
    spec = load_spec(spec_path)
    check_retrain_names(spec, retrain)
    store = Store(data_dir)
    try:
        dataset = snapshot_dataset(spec, store)
    except DataError as exc:
        raise DataError(f"{spec_path}: {exc}") from None
    check_shapes(spec, dataset.shape, dataset.n_classes, where=spec_path)
    normal_class_indices(spec, dataset)
    return spec, store, dataset


class _OneLineErrors(logging.Filter):
    """Drop the traceback from log records of errors that stackwise reports in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], StackwiseError):
            record.exc_info = None
            record.exc_text = None
        return True


def _hide_expected_tracebacks() -> None:
    """Attach `_OneLineErrors` to every logging handler, Prefect's included."""
    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    for handler in {handler for logger in loggers for handler in getattr(logger, "handlers", [])}:
        if not any(isinstance(existing, _OneLineErrors) for existing in handler.filters):
            handler.addFilter(_OneLineErrors())


def _run(args: argparse.Namespace) -> int:
    from tasks.plan import any_stage_trains
    from tasks.stage_process import prewarm

    data_dir = _data_dir(args.data_dir)
    spec, store, dataset = _preflight(args.spec, args.retrain, data_dir)
    if any_stage_trains(spec, dataset, store, set(args.retrain)):
        # Start a stage process now, so that its TensorFlow import overlaps Prefect's
        # import and start and the check of the cached stages.
        prewarm()

    from flows.stack_flow import stack_flow

    # Prefect logs a failed task's exception with its traceback. stackwise's own errors
    # state what failed and what to do in the one line printed at the end.
    _hide_expected_tracebacks()

    # Prefect and TensorFlow may print to stdout; keep it for the JSON summary alone.
    with contextlib.redirect_stdout(sys.stderr):
        state = stack_flow(args.spec, retrain=args.retrain, data_dir=data_dir, return_state=True)
    if state.is_failed() or state.is_crashed() or state.is_cancelled():
        error = state.result(raise_on_failure=False)
        if isinstance(error, StackwiseError):
            raise error
        raise StackwiseError(f"the flow run ended {state.name}: {error}")
    summary = state.result()
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(_format_summary(summary))
    return 0


def _format_summary(summary: dict) -> str:
    from tasks.reporting import headline

    lines = [
        f"stack '{summary['stack']}': {headline(summary['evaluation'])}",
        f"{'stage':<16} {'status':<8} {'seconds':>8}  {'fingerprint':<12}  validation metric",
    ]
    for stage in summary["stages"]:
        if stage["validation_accuracy"] is not None:
            metric = f"accuracy {stage['validation_accuracy']:.4f}"
        else:
            metric = f"loss {stage['validation_loss']:.4f}"
        lines.append(
            f"{stage['name']:<16} {stage['status']:<8} {stage['seconds']:>8.1f}  "
            f"{stage['fingerprint'][:12]:<12}  {metric}"
        )
    lines.append(f"assembled model: {summary['model_dir']}")
    lines.append(f"report: {summary['report']}")
    return "\n".join(lines)


def _plan(args: argparse.Namespace) -> int:
    from tasks.plan import plan_stack

    spec, store, dataset = _preflight(args.spec, args.retrain, _data_dir(args.data_dir))
    print(f"stack '{spec.name}', dataset {dataset.digest[:12]}, store {store.root}")
    for decision in plan_stack(spec, dataset, store, set(args.retrain)):
        fingerprint = decision.fingerprint[:12] if decision.fingerprint else "(after parents)"
        print(f"  {decision.stage:<16} {decision.action:<6} {fingerprint:<16} {decision.reason}")
    return 0


def _gc(args: argparse.Namespace) -> int:
    from tasks.gc import collect, references, remove
    from tasks.spec import load_spec
    from tasks.store import Store

    store = Store(_data_dir(args.data_dir))
    specs = [load_spec(path) for path in args.specs]
    collection = collect(store, references(specs, store))
    if args.delete:
        collection = remove(store, collection)
    verb = "removed" if args.delete else "remove"
    for entry in collection.remove:
        print(f"{verb:<8} {entry.kind:<9} {_megabytes(entry.size):>10}  {entry.path}")
    for entry in collection.keep:
        if entry.reason != "referenced":
            print(f"{'kept':<8} {entry.kind:<9} {_megabytes(entry.size):>10}  {entry.path} ({entry.reason})")
    total = f"total: {len(collection.remove)} entries, {_megabytes(collection.bytes_removed)}"
    if args.delete:
        print(f"{total} removed from {store.root}")
    else:
        print(f"{total} to remove from {store.root}; run again with --delete to remove them")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from tasks.errors import ArtifactError, UsageError
    from tasks.spec import load_spec
    from tasks.store import Store
    from tasks.verify import check_spec_artifacts, check_store

    store = Store(_data_dir(args.data_dir))
    if not store.root.is_dir():
        raise UsageError(
            f"artifact store '{store.root}' not found; pass the folder that `stackwise run` "
            "used with --data-dir or STACKWISE_DATA_DIR"
        )
    spec = load_spec(args.spec) if args.spec else None
    checks = check_spec_artifacts(spec, store) if spec else check_store(store)
    damaged = [check for check in checks if check.damaged]
    if args.json:
        print(json.dumps(_verify_summary(store, args.spec, checks), indent=2))
    else:
        print(_format_checks(store, checks))
    if damaged:
        folders = ", ".join(str(check.folder.relative_to(store.root)) for check in damaged)
        noun, folder_noun = ("artifact", "this folder") if len(damaged) == 1 else ("artifacts", "these folders")
        raise ArtifactError(
            f"{len(damaged)} damaged {noun} in {store.root}: {folders}. Delete {folder_noun}, and the "
            "next `stackwise run` of a spec that uses one rebuilds it. A run finds damage by itself "
            "only when a file's size or modification time changed"
        )
    return 0


def _format_checks(store, checks: list) -> str:
    from tasks.verify import DAMAGED, SOUND

    lines = []
    for check in checks:
        fingerprint = check.fingerprint[:12] if check.fingerprint else "-"
        outcome = check.status if check.problem is None else f"{check.status}: {check.problem}"
        lines.append(f"{check.kind:<9} {check.name:<16} {fingerprint:<12}  {outcome}")
    counts = Counter(check.status for check in checks)
    lines.append(
        f"total: {len(checks)} artifacts in {store.root}, {counts[SOUND]} ok, {counts[DAMAGED]} damaged"
    )
    return "\n".join(lines)


def _verify_summary(store, spec_path: str | None, checks: list) -> dict:
    """Return the JSON output of `stackwise verify`: each artifact and the count per status."""
    return {
        "store": str(store.root),
        "spec": spec_path,
        "artifacts": [check.to_dict() for check in checks],
        "counts": dict(Counter(check.status for check in checks)),
    }


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        # SIGTERM (a process manager, a CI timeout) stops a run as Ctrl-C does, so Prefect's
        # temporary server and the stage processes are shut down too.
        signal.signal(signal.SIGTERM, _interrupt)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # One line per HTTP request to the Prefect API buries the training log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "gc":
            return _gc(args)
        if args.command == "verify":
            return _verify(args)
        return _plan(args)
    except StackwiseError as exc:
        print(f"stackwise: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("stackwise: interrupted; completed stages are kept and reused by the next run", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
