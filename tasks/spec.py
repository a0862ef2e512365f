"""The stack spec: YAML in, validated pydantic models out, with one-line errors.

A spec names the data source, the split, training defaults and the stages. Loading
checks the fields (pydantic), then the stage graph (one small function per rule),
so that every mistake is reported before anything trains. This module imports
neither Prefect nor TensorFlow.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BeforeValidator,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from tasks.bases import (
    Adapter,
    BaseSpec,
    check_pretrained_stages,
    pretrained_normalized,
    pretrained_output_shape,
)
from tasks.errors import SpecError
from tasks.layers import (
    LayerSpec,
    Number,
    PositiveInteger,
    ShapeMismatch,
    SpecModel,
    describe_error,
    parse_layer,
    suggest,
)

__all__ = [
    "BUILTIN_SOURCES",
    "DataSpec",
    "EarlyStopping",
    "SplitSpec",
    "StackSpec",
    "StageSpec",
    "TrainingSettings",
    "check_shapes",
    "load_spec",
    "parse_spec",
]

BUILTIN_SOURCES = ("sklearn:digits", "sktime:BasicMotions")
STAGE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
STACK_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
# NumPy and scikit-learn take seeds from 0 to 2**32 - 1.
Seed = Annotated[int, Field(strict=True, ge=0, lt=2**32)]
Flag = Annotated[bool, Field(strict=True)]
Optimizer = Literal["adam", "adamw", "sgd", "rmsprop"]
Objective = Literal["supervised", "autoencoder", "head", "pretrained"]
Merge = Literal["concat", "add", "average", "maximum", "multiply"]


class SplitSpec(SpecModel):
    """How the source rows are divided into train, validation and test splits."""

    test: Number = Field(default=0.2, gt=0.0, lt=1.0)
    validation: Number = Field(default=0.1, gt=0.0, lt=1.0)
    seed: Seed = 0
    stratify: Flag = True


class DataSpec(SpecModel):
    """The data source: a built-in data set, or a Parquet or CSV file with named columns."""

    source: str = Field(min_length=1)
    features: list[str] | None = Field(default=None, min_length=1)
    label: str | None = None
    # Shape of one example; the source's flat feature vector is reshaped to it.
    shape: tuple[PositiveInteger, ...] | None = Field(default=None, min_length=1)
    split: SplitSpec = SplitSpec()

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if ":" in value and not value.startswith(("/", ".")) and value not in BUILTIN_SOURCES:
            raise ValueError(
                f"unknown built-in source '{value}'.{suggest(value, BUILTIN_SOURCES)} "
                f"Built-in sources: {', '.join(BUILTIN_SOURCES)}; or give a .parquet or .csv path"
            )
        if ":" not in value and not value.endswith((".parquet", ".csv")):
            raise ValueError(
                f"data file '{value}' must end in .parquet or .csv; "
                f"or use a built-in source: {', '.join(BUILTIN_SOURCES)}"
            )
        return value

    @model_validator(mode="after")
    def _columns_match_source(self) -> DataSpec:
        if self.is_builtin and (self.features is not None or self.label is not None):
            raise ValueError(
                f"the built-in source '{self.source}' has its own features and label; "
                "remove data.features and data.label"
            )
        if not self.is_builtin and (self.features is None or self.label is None):
            raise ValueError(
                "a file source needs 'features' (a list of column names) and 'label' (a column "
                f"name); got features={self.features!r}, label={self.label!r}"
            )
        return self

    @property
    def is_builtin(self) -> bool:
        return self.source in BUILTIN_SOURCES


class EarlyStopping(SpecModel):
    """Stop training when `monitor` has not improved by `min_delta` for `patience` epochs."""

    monitor: Literal["val_loss", "val_accuracy"] = "val_loss"
    patience: Annotated[int, Field(strict=True, ge=0)] = 5
    min_delta: Number = Field(default=0.0, ge=0.0)
    restore_best_weights: Flag = True


class TrainingSettings(SpecModel):
    """Training settings of a stage. Unset fields fall back to the spec's `defaults`."""

    optimizer: Optimizer | None = None
    learning_rate: Annotated[Number, Field(gt=0.0)] | None = None
    epochs: PositiveInteger | None = None
    batch_size: PositiveInteger | None = None
    early_stopping: EarlyStopping | None = None
    seed: Seed | None = None


DEFAULT_TRAINING = {
    "optimizer": "adam",
    "learning_rate": 0.001,
    "epochs": 20,
    "batch_size": 64,
    "early_stopping": None,
    "seed": 0,
}
TRAINING_FIELDS = tuple(DEFAULT_TRAINING)

Layer = Annotated[SerializeAsAny[LayerSpec], BeforeValidator(parse_layer)]


class StageSpec(TrainingSettings):
    """One stage: its parents, its layers, its objective and its training settings."""

    name: str
    parents: list[str] = Field(default_factory=list)
    objective: Objective = "supervised"
    layers: list[Layer] = Field(default_factory=list)
    # How the outputs of several parents are combined: "concat" flattens and joins
    # them; the element-wise merges need parents with equal output shapes.
    merge: Merge = "concat"
    # Autoencoder stages: the decoder's hidden layers (an output layer that matches the
    # input shape is added), and the stddev of Gaussian noise added to the input while
    # training, which makes it a denoising autoencoder.
    decoder: list[Layer] = Field(default_factory=list)
    noise: Annotated[Number, Field(ge=0.0)] = 0.0
    # A pretrained stage's frozen base and the adapters in front of it (see tasks.bases).
    base: BaseSpec | None = None
    adapters: list[Adapter] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not STAGE_NAME.match(value):
            raise ValueError(
                f"stage name '{value}' is not a valid identifier; use letters, digits and "
                "underscores, starting with a letter, such as 'hidden_1'"
            )
        return value

    def training(self, defaults: TrainingSettings) -> dict[str, Any]:
        """Return the resolved training settings: the stage's own, then `defaults`, then built-ins."""
        resolved = {}
        for field in TRAINING_FIELDS:
            value = getattr(self, field)
            if value is None:
                value = getattr(defaults, field)
            if value is None:
                value = DEFAULT_TRAINING[field]
            if isinstance(value, SpecModel):
                value = value.model_dump(mode="json")
            resolved[field] = value
        return resolved

    def normalized(self, defaults: TrainingSettings, train_classes: list[int] | None = None) -> dict[str, Any]:
        """Return the canonical form of this stage that its fingerprint covers.

        `train_classes` limits training to rows of those label indices (an anomaly
        stack trains its autoencoders on normal rows only).
        """
        normalized = {
            "name": self.name,
            "parents": list(self.parents),
            "objective": self.objective,
            "layers": [layer.model_dump(mode="json") for layer in self.layers],
            "merge": self.merge,
            "training": self.training(defaults),
        }
        if self.objective == "autoencoder":
            normalized["decoder"] = [layer.model_dump(mode="json") for layer in self.decoder]
            normalized["noise"] = self.noise
            normalized["train_classes"] = train_classes
        if self.objective == "pretrained":
            normalized.update(pretrained_normalized(self))
        return normalized

    def preprocessing_count(self) -> int:
        """Return how many leading layers only rescale the input.

        An autoencoder reconstructs its input as it leaves these layers, so that the
        reconstruction target has a sane scale.
        """
        count = 0
        for layer in self.layers:
            if not layer.is_preprocessing:
                break
            count += 1
        return count


class EvaluationSpec(SpecModel):
    """How the assembled model is evaluated, and on which split.

    `classification` scores the head's predicted classes. `anomaly` scores each
    example by the stack's reconstruction error. Rows whose label is in
    `normal_classes` are normal and all others are anomalies. The threshold is
    chosen on the validation split.
    """

    split: Literal["test", "validation"] = "test"
    task: Literal["classification", "anomaly"] = "classification"
    normal_classes: list[str] | None = Field(default=None, min_length=1)


class FineTuneSpec(SpecModel):
    """End-to-end fine-tuning of the assembled model, after every stage is frozen.

    The named stages (or all trained stages) are unfrozen and trained together at a
    low learning rate; BatchNormalization layers stay in inference mode. The stage
    artifacts are never changed: fine-tuning works on copies.
    """

    stages: list[str] | Literal["all"] = "all"
    epochs: PositiveInteger = 10
    learning_rate: Annotated[Number, Field(gt=0.0)] = 1e-4
    batch_size: PositiveInteger = 64
    optimizer: Optimizer = "adam"


class StackSpec(SpecModel):
    """A whole stack: data, defaults and stages, in the order the YAML lists them."""

    name: str
    data: DataSpec
    defaults: TrainingSettings = TrainingSettings()
    stages: list[StageSpec] = Field(min_length=1)
    evaluation: EvaluationSpec = EvaluationSpec()
    fine_tune: FineTuneSpec | None = None
    # "end_to_end" also trains the same architecture from scratch, end to end, on the
    # same splits with the same number of epochs in all, and reports it beside the stack.
    baseline: Literal["end_to_end"] | None = None
    # Folder of the spec file; relative data paths are resolved against it.
    base_dir: Path = Field(default=Path("."), exclude=True)

    @model_validator(mode="after")
    def _bind_base_paths(self) -> StackSpec:
        # Base files are relative to the spec file's folder, like data files.
        for stage in self.stages:
            if stage.base is not None:
                stage.base.bind(self.base_dir)
        return self
    @field_validator("name")
    @classmethod
    def _folder_name(cls, value: str) -> str:
        # The name becomes a folder under assembled/, so '.' and '..' would escape it.
        if not STACK_NAME.match(value) or set(value) == {"."}:
            raise ValueError(
                f"stack name {value!r} is invalid; use letters, digits, '.', '_' and '-' "
                "(not only dots), such as 'digits'"
            )
        return value

    def stage(self, name: str) -> StageSpec:
        return next(stage for stage in self.stages if stage.name == name)

    @property
    def head(self) -> StageSpec:
        """Return the stage whose output the assembled model returns.

        That is the stage with objective head, or in an anomaly stack the last stage
        that no other stage consumes.
        """
        heads = [stage for stage in self.stages if stage.objective == "head"]
        if heads:
            return heads[0]
        consumed = {parent for stage in self.stages for parent in stage.parents}
        return next(stage for stage in reversed(self.stages) if stage.name not in consumed)

    @property
    def is_anomaly(self) -> bool:
        return self.evaluation.task == "anomaly"

    def topological_order(self) -> list[StageSpec]:
        """Return the stages so that every stage comes after its parents."""
        ordered: list[StageSpec] = []
        placed: set[str] = set()
        remaining = list(self.stages)
        while remaining:
            ready = [stage for stage in remaining if set(stage.parents) <= placed]
            ordered.extend(ready)
            placed.update(stage.name for stage in ready)
            remaining = [stage for stage in remaining if stage.name not in placed]
        return ordered

    def descendants(self, names: set[str]) -> set[str]:
        """Return `names` and every stage that depends on one of them."""
        found = set(names)
        for stage in self.topological_order():
            if found.intersection(stage.parents):
                found.add(stage.name)
        return found

    def data_path(self) -> Path | None:
        if self.data.is_builtin:
            return None
        return (self.base_dir / self.data.source).resolve()


# Graph rules, one per function. Each raises SpecError naming the stage and the fix.


def _check_unique_names(spec: StackSpec, where: str) -> None:
    seen: set[str] = set()
    for index, stage in enumerate(spec.stages):
        if stage.name in seen:
            raise SpecError(
                f"{where}: stages[{index}].name: duplicate stage name '{stage.name}'; "
                "give every stage its own name"
            )
        seen.add(stage.name)


def _check_parents_exist(spec: StackSpec, where: str) -> None:
    names = [stage.name for stage in spec.stages]
    for stage in spec.stages:
        for parent in stage.parents:
            if parent not in names:
                raise SpecError(
                    f"{where}: stage '{stage.name}' parents: unknown stage '{parent}'."
                    f"{suggest(parent, names)} Known stages: {', '.join(names)}"
                )
        if len(set(stage.parents)) != len(stage.parents):
            raise SpecError(
                f"{where}: stage '{stage.name}' parents: {stage.parents} lists a stage twice; "
                "list each parent once"
            )


def _check_acyclic(spec: StackSpec, where: str) -> None:
    parents = {stage.name: stage.parents for stage in spec.stages}
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = path[path.index(name):] + [name]
            raise SpecError(
                f"{where}: stage '{name}' parents: the stages form a cycle "
                f"({' -> '.join(cycle)}); remove one of these parent links"
            )
        state[name] = "visiting"
        for parent in parents[name]:
            visit(parent, path + [name])
        state[name] = "done"

    for name in parents:
        visit(name, [])


def _check_one_head(spec: StackSpec, where: str) -> None:
    if spec.is_anomaly:
        return
    heads = [stage.name for stage in spec.stages if stage.objective == "head"]
    if len(heads) != 1:
        found = ", ".join(heads) if heads else "none"
        raise SpecError(
            f"{where}: stages: expected exactly one stage with objective 'head', found {found}; "
            "set objective: head on the final stage only"
        )
    children = [stage.name for stage in spec.stages if heads[0] in stage.parents]
    if children:
        raise SpecError(
            f"{where}: stage '{children[0]}' parents: '{heads[0]}' is the head and cannot be a "
            "parent; make the head the last stage"
        )


def _check_reaches_head(spec: StackSpec, where: str) -> None:
    needed = {spec.head.name}
    for stage in reversed(spec.topological_order()):
        if stage.name in needed:
            needed.update(stage.parents)
    for stage in spec.stages:
        if stage.name not in needed:
            raise SpecError(
                f"{where}: stage '{stage.name}' does not feed the head '{spec.head.name}'; "
                "list it in a later stage's parents or remove it"
            )


def _check_layers(spec: StackSpec, where: str) -> None:
    for stage in spec.stages:
        if stage.objective in {"supervised", "autoencoder"} and not stage.layers:
            raise SpecError(
                f"{where}: stage '{stage.name}' layers: a {stage.objective} stage needs at least "
                "one layer, got none; add layers or remove the stage"
            )
        if stage.objective != "autoencoder" and (stage.decoder or stage.noise):
            raise SpecError(
                f"{where}: stage '{stage.name}': decoder and noise apply to autoencoder stages "
                f"only, but the objective is '{stage.objective}'; set objective: autoencoder or "
                "remove them"
            )


def _check_anomaly(spec: StackSpec, where: str) -> None:
    if not spec.is_anomaly:
        if spec.evaluation.normal_classes is not None:
            raise SpecError(
                f"{where}: evaluation.normal_classes applies to task: anomaly only; "
                "set task: anomaly or remove normal_classes"
            )
        return
    if spec.evaluation.normal_classes is None:
        raise SpecError(
            f"{where}: evaluation.normal_classes: required for task: anomaly; list the label "
            "values of normal rows, such as ['0']"
        )
    for stage in spec.stages:
        if stage.objective != "autoencoder":
            raise SpecError(
                f"{where}: stage '{stage.name}' objective: an anomaly stack scores examples by "
                f"reconstruction error, so every stage must be an autoencoder, got "
                f"'{stage.objective}'"
            )
        if len(stage.parents) > 1:
            raise SpecError(
                f"{where}: stage '{stage.name}' parents: an anomaly stack must be a chain, so a "
                f"stage has at most one parent, got {stage.parents}"
            )
        if stage.parents and stage.preprocessing_count():
            raise SpecError(
                f"{where}: stage '{stage.name}' layers: only the first stage of an anomaly stack "
                "may start with scaling layers (Rescaling, Normalization, LayerNormalization "
                "without center and scale), because each decoder must output "
                "what the stage below it produced; move the scaling to the first stage"
            )
    if spec.fine_tune is not None or spec.baseline is not None:
        raise SpecError(
            f"{where}: fine_tune and baseline apply to classification stacks; remove them "
            "from this anomaly stack"
        )


def _check_fine_tune(spec: StackSpec, where: str) -> None:
    if spec.fine_tune is None or spec.fine_tune.stages == "all":
        return
    names = [stage.name for stage in spec.stages]
    for name in spec.fine_tune.stages:
        if name not in names:
            raise SpecError(
                f"{where}: fine_tune.stages: unknown stage '{name}'.{suggest(name, names)} "
                f"Known stages: {', '.join(names)}"
            )


GRAPH_RULES = (
    _check_unique_names,
    _check_parents_exist,
    _check_acyclic,
    _check_one_head,
    _check_reaches_head,
    _check_layers,
    _check_anomaly,
    _check_fine_tune,
    check_pretrained_stages,
)


def _describe_location(raw: Any, loc: tuple[Any, ...]) -> str:
    """Turn a pydantic error location into "stage 'name' field" or a dotted path."""
    parts: list[str] = []
    index = 0
    if len(loc) >= 2 and loc[0] == "stages" and isinstance(loc[1], int):
        name = None
        try:
            name = raw["stages"][loc[1]].get("name")
        except (KeyError, IndexError, TypeError, AttributeError):
            pass
        parts.append(f"stage '{name}'" if isinstance(name, str) else f"stages[{loc[1]}]")
        index = 2
    path = ""
    for part in loc[index:]:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    if path:
        parts.append(path)
    return " ".join(parts) if parts else "spec"


def _format_validation_error(where: str, raw: Any, exc: ValidationError) -> str:
    error = exc.errors()[0]
    location = _describe_location(raw, tuple(error["loc"]))
    if error["type"] == "missing":
        return f"{where}: {location}: required field is missing; add it to the spec"
    _, message = describe_error({**error, "loc": ()})
    if error["type"] == "value_error":
        return f"{where}: {location}: {message.removesuffix('.')}"
    return f"{where}: {location}: {message} Fix this value in the spec"


def parse_spec(raw: Any, where: str = "spec", base_dir: Path = Path(".")) -> StackSpec:
    """Validate an already-parsed YAML document into a StackSpec, or raise SpecError."""
    if raw is None:
        raise SpecError(f"{where}: the spec is empty; write a stack spec with keys name, data and stages")
    if not isinstance(raw, dict):
        raise SpecError(
            f"{where}: the spec must be a YAML mapping with keys name, data and stages; "
            f"got {type(raw).__name__}"
        )
    try:
        spec = StackSpec.model_validate({**raw, "base_dir": base_dir})
    except ValidationError as exc:
        raise SpecError(_format_validation_error(where, raw, exc)) from None
    for rule in GRAPH_RULES:
        rule(spec, where)
    return spec


class _SpecLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error.

    Plain YAML keeps the last value silently, so `epochs` written twice would train
    with whichever came last.
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)  # resolves `<<` merge keys first
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key, which the base loader reports
                continue
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}; keep one of them", key_node.start_mark
                )
        return super().construct_mapping(node, deep=deep)


def load_spec(path: str | Path) -> StackSpec:
    """Read and validate the stack spec at `path`, or raise SpecError."""
    path = Path(path)
    if path.is_dir():
        raise SpecError(f"{path}: is a folder; give the path of a stack spec YAML file")
    if not path.is_file():
        raise SpecError(f"{path}: spec file not found; check the path")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_SpecLoader)
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the spec file: {exc.strerror}; check its permissions") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise SpecError(f"{path}: invalid YAML{at}: {problem}; fix the syntax") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not a UTF-8 text file; give a YAML stack spec") from None
    return parse_spec(raw, where=str(path), base_dir=path.parent.resolve())


def check_retrain_names(spec: StackSpec, retrain: list[str]) -> None:
    """Raise SpecError if `--retrain` names a stage the spec does not have."""
    names = [stage.name for stage in spec.stages]
    for name in retrain:
        if name not in names:
            raise SpecError(
                f"--retrain: unknown stage '{name}'.{suggest(name, names)} Stages of "
                f"'{spec.name}': {', '.join(names)}"
            )


def stage_input_shape(
    stage: StageSpec, output_shapes: dict[str, tuple[int, ...]], input_shape: tuple[int, ...],
    where: str = "spec",
) -> tuple[int, ...]:
    """Return the shape a stage receives: the data's, one parent's, or its parents' merged."""
    if not stage.parents:
        return input_shape
    shapes = [output_shapes[parent] for parent in stage.parents]
    if len(shapes) == 1:
        return shapes[0]
    if stage.merge == "concat":
        return (sum(_flat_size(shape) for shape in shapes),)
    if len(set(shapes)) > 1:
        listed = ", ".join(f"{parent} {list(shape)}" for parent, shape in zip(stage.parents, shapes))
        raise SpecError(
            f"{where}: stage '{stage.name}' merge: '{stage.merge}' needs parents with equal output "
            f"shapes, got {listed}; use merge: concat or make the shapes equal"
        )
    return shapes[0]


def _flat_size(shape: tuple[int, ...]) -> int:
    size = 1
    for dimension in shape:
        size *= dimension
    return size


def check_shapes(
    spec: StackSpec, input_shape: tuple[int, ...], n_classes: int, where: str = "spec"
) -> dict[str, tuple[int, ...]]:
    """Infer every stage's output shape from the data's example shape, or raise SpecError.

    A head stage ends in a softmax over the classes, so its output shape is (n_classes,).
    """
    output_shapes: dict[str, tuple[int, ...]] = {}
    for stage in spec.topological_order():
        shape = stage_input_shape(stage, output_shapes, input_shape, where)
        if stage.objective == "pretrained":
            shape = pretrained_output_shape(stage, shape, where)
        for index, layer in enumerate(stage.layers):
            try:
                shape = layer.output_shape(shape)
            except ShapeMismatch as exc:
                source = f"parents {stage.parents}" if stage.parents else "the data"
                received = stage_input_shape(stage, output_shapes, input_shape, where)
                raise SpecError(
                    f"{where}: stage '{stage.name}' layers[{index}] ({layer.layer}): {exc}. "
                    f"The stage's input comes from {source}, with shape {list(received)}"
                ) from None
        if stage.objective == "head":
            if len(shape) != 1:
                raise SpecError(
                    f"{where}: stage '{stage.name}': the head's output before its softmax layer "
                    f"has shape {list(shape)}; add a Flatten or GlobalAveragePooling2D layer"
                )
            shape = (n_classes,)
        output_shapes[stage.name] = shape
    return output_shapes
