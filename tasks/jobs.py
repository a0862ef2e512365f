"""Jobs: the JSON-ready descriptions of work that a stage process carries out.

They import nothing heavy, so the flow builds them without loading TensorFlow.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tasks.dataset import SPLITS, Dataset
from tasks.errors import StageFailed

__all__ = ["AssemblyJob", "ParentRef", "StageJob", "dataset_parent"]


@dataclass(frozen=True)
class ParentRef:
    """Reference to one parent's outputs: a stage artifact, or the dataset snapshot."""

    name: str
    folder: str
    # Maps split name to the feature file, relative to `folder`.
    feature_files: dict[str, str]


@dataclass(frozen=True)
class StageJob:
    """Everything a process needs to build one stage's artifact."""

    stack: str
    stage: dict[str, Any]
    fingerprint: str
    fingerprint_inputs: dict[str, Any]
    parents: list[ParentRef]
    dataset: dict[str, Any]
    store_root: str
    force: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> StageJob:
        parents = [ParentRef(**parent) for parent in value["parents"]]
        return cls(**{**value, "parents": parents})

    def check_inputs(self) -> None:
        """Raise StageFailed if a feature file that the stage reads does not exist."""
        for parent in self.parents:
            for relative in parent.feature_files.values():
                path = Path(parent.folder) / relative
                if not path.is_file():
                    raise StageFailed(
                        f"stage '{self.stage['name']}': input feature file {path} of parent "
                        f"'{parent.name}' is missing, so that artifact was deleted or moved during "
                        "the run; retry the flow run or run again, and stackwise rebuilds the "
                        "parent before this stage"
                    )


def dataset_parent(dataset: Dataset) -> ParentRef:
    """Return the reference through which root stages read the dataset snapshot."""
    return ParentRef(
        name="input",
        folder=str(dataset.folder),
        feature_files={split: f"{split}.parquet" for split in SPLITS},
    )


@dataclass(frozen=True)
class AssemblyJob:
    """Everything a process needs to assemble and evaluate a stack."""

    stack: str
    fingerprint: str
    # Stages in topological order: name, parents, merge, objective, artifact folder,
    # the normalized stage spec and its validation metrics.
    stages: list[dict[str, Any]]
    head: str
    dataset: dict[str, Any]
    split: str
    store_root: str
    seed: int = 0
    # "classification", or "anomaly" with the label indices of normal rows.
    task: str = "classification"
    normal_classes: list[int] | None = None
    # Fine-tuning settings (FineTuneSpec as a dict, stages resolved to names), or None.
    fine_tune: dict[str, Any] | None = None
    # End-to-end baseline settings: optimizer, learning_rate, batch_size, epochs, early_stopping.
    baseline: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, value: dict[str, Any]) -> AssemblyJob:
        return cls(**value)
