"""Run reports: training progress, the evaluation table, the run summary and training curves.

Plain functions that build the content of Prefect artifacts and the curve images;
`tasks.prefect_tasks` publishes them and tests call them without Prefect. The
curves are drawn with matplotlib's Agg canvas, which needs no display and keeps
no global pyplot state, so stages in other threads cannot interfere.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tasks.store import read_manifest

__all__ = [
    "CURVES_DIR",
    "artifact_key",
    "headline",
    "epoch_progress",
    "evaluation_table",
    "plot_training_curves",
    "run_summary_markdown",
    "write_training_curves",
]

CURVES_DIR = "curves"
# Metric names in a Keras history, drawn as one panel each with their validation twin.
CURVE_PANELS = ("loss", "accuracy")
EVALUATION_ROWS = (
    ("accuracy", "accuracy"),
    ("macro F1", "macro_f1"),
    ("log loss", "log_loss"),
    ("ROC AUC", "roc_auc"),
    ("PR AUC", "pr_auc"),
    ("threshold", "threshold"),
    ("precision", "precision"),
    ("recall", "recall"),
    ("F1", "f1"),
    ("anomalies", "anomalies"),
    ("examples", "rows"),
)


def epoch_progress(epoch: int, epochs: int) -> float:
    """Return the percentage of training done after `epoch` of `epochs`, from 0 to 100."""
    if epochs <= 0:
        return 100.0
    return max(0.0, min(100.0, 100.0 * epoch / epochs))


def artifact_key(*parts: str) -> str:
    """Join `parts` into a Prefect artifact key: lowercase letters, digits and dashes."""
    text = "-".join(parts).lower()
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text)).strip("-")


def evaluation_table(evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    """Return the assembled model's evaluation as table rows with `metric`, `value` and `split`.

    `evaluation` has the `split` and the `metrics` of a run summary's `evaluation`.
    """
    metrics = evaluation["metrics"]
    return [
        {"metric": label, "value": metrics[name], "split": evaluation["split"]}
        for label, name in EVALUATION_ROWS
        if name in metrics
    ]


def run_summary_markdown(summary: dict[str, Any]) -> str:
    """Return a Markdown summary of a run: one table row per stage, then the evaluation.

    `summary` is the flow's return value (see `flows.stack_flow.run_summary`). Curve
    files inside the assembled artifact are shown relative to it, to keep rows short.
    """
    evaluation = summary["evaluation"]
    metrics = evaluation["metrics"]
    curves = summary.get("curves", {})
    assembled = Path(summary["report"]).parent
    lines = [
        f"# Stack `{summary['stack']}`: {headline(evaluation)}",
        "",
        "| stage | status | fingerprint | seconds | validation metric | training curves |",
        "| --- | --- | --- | ---: | ---: | --- |",
    ]
    for stage in summary["stages"]:
        curve = "none"
        if stage["name"] in curves:
            curve = f"`{_relative_to(curves[stage['name']], assembled)}`"
        if stage.get("validation_accuracy") is not None:
            quality = f"accuracy {stage['validation_accuracy']:.4f}"
        else:
            quality = f"loss {stage['validation_loss']:.4f}"
        lines.append(
            f"| {stage['name']} | {stage['status']} | `{stage['fingerprint'][:12]}` "
            f"| {stage['seconds']:.1f} | {quality} | {curve} |"
        )
    lines += [
        "",
        f"Assembly: {summary['assembly_status']}, on {metrics.get('rows', '?')} {evaluation['split']} examples.",
        "",
        f"- assembled artifact: `{assembled}`",
        f"- assembled model: `{summary['model_dir']}`",
        f"- report: `{summary['report']}`",
    ]
    if not curves:
        lines.append("- training curves: none; this assembled model was built before stackwise drew them")
    return "\n".join(lines) + "\n"


def _relative_to(path: str, folder: Path) -> str:
    try:
        return Path(path).relative_to(folder).as_posix()
    except ValueError:
        return path


def plot_training_curves(history: dict[str, list[float]], title: str, path: Path) -> None:
    """Draw loss and accuracy per epoch, training and validation, into a PNG file at `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    panels = [name for name in CURVE_PANELS if history.get(name)]
    figure = Figure(figsize=(4.5 * max(len(panels), 1), 3.5), layout="constrained")
    FigureCanvasAgg(figure)
    for index, name in enumerate(panels, start=1):
        axes = figure.add_subplot(1, len(panels), index)
        for key, label in ((name, "training"), (f"val_{name}", "validation")):
            values = history.get(key)
            if values:
                axes.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=label)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_xlabel("epoch")
        axes.set_ylabel(name)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(f"{title}: loss and accuracy per epoch")
    figure.savefig(path, format="png", dpi=100)


def write_training_curves(stage_folders: dict[str, Path], target: Path) -> dict[str, str]:
    """Draw each stage's training curves from its manifest's `metrics.history` into `target/curves/`.

    Returns a map from stage name to the PNG file's path relative to `target`; a
    stage whose manifest has no history is left out.
    """
    written = {}
    for stage, folder in stage_folders.items():
        manifest = read_manifest(Path(folder)) or {}
        history = manifest.get("metrics", {}).get("history")
        if not history:
            continue
        relative = f"{CURVES_DIR}/{stage}.png"
        (target / CURVES_DIR).mkdir(parents=True, exist_ok=True)
        plot_training_curves(history, f"stage {stage}", target / relative)
        written[stage] = relative
    return written


def headline(report: dict) -> str:
    """Return one line with the report's main metrics, and the baseline's beside them."""
    metrics, split = report["metrics"], report["split"]
    if report.get("task") == "anomaly":
        line = f"{split} ROC AUC {metrics['roc_auc']:.4f}, PR AUC {metrics['pr_auc']:.4f}, F1 {metrics['f1']:.4f}"
        baseline = report.get("baseline")
        if baseline:
            line += f" (PCA baseline ROC AUC {baseline['metrics']['roc_auc']:.4f})"
        return line
    line = f"{split} accuracy {metrics['accuracy']:.4f}, macro F1 {metrics['macro_f1']:.4f}, log loss {metrics['log_loss']:.4f}"
    if "fine_tune" in report:
        line += f" (before fine-tuning {report['fine_tune']['before']['accuracy']:.4f})"
    if "baseline" in report:
        line += f"; end-to-end baseline accuracy {report['baseline']['metrics']['accuracy']:.4f}"
    return line
