"""Pretrained bases in a stack spec: where they come from, what they take, what they output.

A stage with `objective: pretrained` wraps a frozen base: a `keras.applications`
architecture with a local weights file, a `.keras` file or a SavedModel folder,
behind the input adapters of `tasks.adapters`. This module validates the spec
entries, checks that the base files exist, digests their content for the
fingerprint and checks shapes before anything trains. Architecture shapes come
from a table of facts, so they need no TensorFlow. A `.keras` or SavedModel base
states its own input signature, which a short child process reads.
"""

from __future__ import annotations

import json
import math
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BeforeValidator,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    SerializeAsAny,
    field_validator,
    model_validator,
)

from tasks.adapters import AdapterSpec, parse_adapter
from tasks.errors import SpecError
from tasks.fingerprint import digest_file, digest_json
from tasks.layers import ShapeMismatch, SpecModel, suggest

if TYPE_CHECKING:
    from tasks.spec import StackSpec, StageSpec

__all__ = [
    "ARCHITECTURES",
    "Adapter",
    "Architecture",
    "BaseSpec",
    "check_pretrained_stages",
    "pretrained_job_extra",
    "pretrained_normalized",
    "pretrained_output_shape",
]

Shape = tuple[int, ...]
Adapter = Annotated[SerializeAsAny[AdapterSpec], BeforeValidator(parse_adapter)]

# keras.applications loads weights from these file types (keras/src/saving/saving_api.py,
# Keras 3.15): `.weights.h5` from `model.save_weights`, `.h5`/`.hdf5` in the legacy
# format of the files that keras.applications itself downloads.
WEIGHTS_SUFFIXES = (".weights.h5", ".h5", ".hdf5")
INSPECT_TIMEOUT_SECONDS = 300
# The training settings of a stage (tasks.spec.TRAINING_FIELDS), none of which a pretrained stage uses.
TRAINING_SETTINGS = frozenset({"optimizer", "learning_rate", "epochs", "batch_size", "early_stopping", "seed"})
# Fields that only an architecture base takes; a saved model fixes all of them itself.
ARCHITECTURE_FIELDS = frozenset({
    "weights", "input_shape", "alpha", "include_top", "pooling", "classes", "minimalistic",
    "include_preprocessing",
})


def _make_divisible(value: float, divisor: int = 8) -> int:
    # Channel rounding of keras.applications' MobileNetV2 (`_make_divisible`) and
    # MobileNetV3 (`_depth`): the nearest multiple of 8, never 10 % below `value`.
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


@dataclass(frozen=True)
class Architecture:
    """Shape facts of one keras.applications architecture with include_top=False.

    `min_size` is the smallest height and width Keras accepts. `steps` gives the
    rounding of each of the five stride-2 steps: "ceil" where the step pads like
    'same', "floor" where it pools or convolves without padding. `channels` maps
    the width multiplier `alpha` to the channels of the last feature map.
    """

    min_size: int
    steps: tuple[str, str, str, str, str]
    channels: Callable[[float], int]
    options: frozenset[str] = frozenset()

    def feature_map(self, height: int, width: int, alpha: float) -> Shape:
        """Return the shape of the last feature map for an input of `height` x `width`."""
        for step in self.steps:
            height = math.ceil(height / 2) if step == "ceil" else height // 2
            width = math.ceil(width / 2) if step == "ceil" else width // 2
        return (height, width, self.channels(alpha))


_CEIL = ("ceil",) * 5
_MOBILENET_V3 = frozenset({"alpha", "minimalistic", "include_preprocessing"})

# Facts read from keras/src/applications/*.py in Keras 3.15: `min_size` is the value
# each model passes to `obtain_input_shape` (MobileNetV3 checks 32 itself), the
# channels are those of the model's last convolution, and the rounding follows each
# stride-2 layer's padding. tests/test_pretrained.py builds every entry and compares.
ARCHITECTURES: dict[str, Architecture] = {
    "MobileNet": Architecture(
        32, ("ceil", "floor", "floor", "floor", "floor"), lambda alpha: int(1024 * alpha),
        frozenset({"alpha"}),
    ),
    "MobileNetV2": Architecture(
        32, _CEIL, lambda alpha: 1280 if alpha <= 1.0 else _make_divisible(1280 * alpha),
        frozenset({"alpha"}),
    ),
    "MobileNetV3Small": Architecture(
        32, _CEIL, lambda alpha: _make_divisible(_make_divisible(96 * alpha) * 6), _MOBILENET_V3,
    ),
    "MobileNetV3Large": Architecture(
        32, _CEIL, lambda alpha: _make_divisible(_make_divisible(160 * alpha) * 6), _MOBILENET_V3,
    ),
    "ResNet50": Architecture(32, _CEIL, lambda alpha: 2048),
    "ResNet50V2": Architecture(32, _CEIL, lambda alpha: 2048),
    "EfficientNetB0": Architecture(32, _CEIL, lambda alpha: 1280),
    "EfficientNetB1": Architecture(32, _CEIL, lambda alpha: 1280),
    "EfficientNetV2B0": Architecture(32, _CEIL, lambda alpha: 1280, frozenset({"include_preprocessing"})),
    "DenseNet121": Architecture(32, ("ceil", "ceil", "floor", "floor", "floor"), lambda alpha: 1024),
    "VGG16": Architecture(32, ("floor",) * 5, lambda alpha: 512),
}


class BaseSpec(SpecModel):
    """The frozen base of a pretrained stage.

    Either `architecture` (a keras.applications model name) with `weights` (a local
    weights file) and the architecture's arguments, or `path` (a `.keras` file or a
    SavedModel folder, whose `endpoint` is called). Paths are relative to the spec
    file's folder.
    """

    architecture: str | None = None
    weights: str | None = None
    path: str | None = None
    endpoint: str | None = None
    input_shape: tuple[PositiveInt | None, PositiveInt | None, PositiveInt] | None = None
    alpha: PositiveFloat | None = None
    include_top: bool = False
    pooling: Literal["avg", "max"] | None = None
    classes: PositiveInt | None = None
    minimalistic: bool | None = None
    include_preprocessing: bool | None = None
    # The spec file's folder, set by StackSpec once the spec is validated.
    _folder: Path = PrivateAttr(default=Path("."))

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, value: str | None) -> str | None:
        if value is not None and value not in ARCHITECTURES:
            raise ValueError(
                f"unknown architecture '{value}'.{suggest(value, tuple(ARCHITECTURES))} "
                f"Supported keras.applications architectures: {', '.join(ARCHITECTURES)}"
            )
        return value

    @field_validator("weights")
    @classmethod
    def _local_weights(cls, value: str | None) -> str | None:
        if value is None or value.endswith(WEIGHTS_SUFFIXES):
            return value
        if value.lower() == "imagenet":
            raise ValueError(
                "'imagenet' would download weights at run time, which stackwise never does; "
                "save the weights once with model.save_weights('NAME.weights.h5') and give "
                "that file's path"
            )
        raise ValueError(
            f"'{value}' is not the path of a weights file; give a local file ending in "
            f"{', '.join(WEIGHTS_SUFFIXES)}, relative to the spec file"
        )

    @model_validator(mode="after")
    def _one_source(self) -> BaseSpec:
        if (self.architecture is None) == (self.path is None):
            raise ValueError(
                "give either architecture (a keras.applications name, with weights) or path "
                "(a .keras file or a SavedModel folder), not both or neither"
            )
        if self.architecture is not None:
            self._check_architecture_arguments()
            return self
        if self.path.endswith(WEIGHTS_SUFFIXES):
            raise ValueError(
                f"path '{self.path}' is a weights file; give it as weights together with the "
                "architecture it belongs to, or save the whole model as .keras"
            )
        architecture_only = sorted(self.model_fields_set & ARCHITECTURE_FIELDS)
        if architecture_only:
            raise ValueError(
                f"{', '.join(architecture_only)} applies to an architecture base only; a .keras file or "
                "SavedModel folder fixes its own input and weights, so remove it"
            )
        if self.endpoint is not None and self.is_keras_file:
            raise ValueError("endpoint applies to a SavedModel folder only; remove it for a .keras file")
        return self

    def _check_architecture_arguments(self) -> None:
        facts = ARCHITECTURES[self.architecture]
        if self.weights is None:
            raise ValueError(
                f"architecture {self.architecture} needs weights: the path of a local weights "
                "file such as base.weights.h5; stackwise never downloads weights"
            )
        if self.endpoint is not None:
            raise ValueError("endpoint applies to a SavedModel folder only; remove it")
        for option in ("alpha", "minimalistic", "include_preprocessing"):
            if getattr(self, option) is not None and option not in facts.options:
                accepted = ", ".join(sorted(facts.options)) or "none of them"
                raise ValueError(
                    f"{option} is not an argument of {self.architecture}; it accepts {accepted}"
                )
        if self.classes is not None and not self.include_top:
            raise ValueError("classes applies only with include_top: true; remove it")
        if self.include_top and (self.input_shape is None or None in self.input_shape):
            raise ValueError(
                "include_top: true needs a complete input_shape such as [32, 32, 3], because "
                "the classifier on top fixes the input size"
            )
        if self.input_shape is not None:
            height, width, _ = self.input_shape
            if any(size is not None and size < facts.min_size for size in (height, width)):
                raise ValueError(
                    f"input_shape {list(self.input_shape)} is too small: {self.architecture} needs "
                    f"at least {facts.min_size}x{facts.min_size} pixels; resize the input with a "
                    f"resize adapter and set input_shape to at least that"
                )

    def bind(self, folder: Path) -> None:
        """Resolve this base's paths against `folder`, the spec file's folder."""
        self._folder = Path(folder)

    @property
    def is_keras_file(self) -> bool:
        return self.path is not None and self.path.endswith(".keras")

    @property
    def field(self) -> str:
        """The spec field that names the base's file, for messages."""
        return "base.weights" if self.architecture else "base.path"

    @property
    def label(self) -> str:
        """A short description of the base for messages."""
        if self.architecture:
            return self.architecture
        return f"'{self.path}'"

    def file(self) -> Path:
        """Return the absolute path of the weights file, `.keras` file or SavedModel folder."""
        return (self._folder / (self.weights or self.path)).resolve()

    def arguments(self) -> dict[str, Any]:
        """Return the keras.applications keyword arguments, without `weights`."""
        arguments = self.model_dump(include=ARCHITECTURE_FIELDS - {"weights"}, exclude_none=True)
        if "input_shape" in arguments:
            arguments["input_shape"] = list(arguments["input_shape"])
        return arguments


def check_pretrained_stages(spec: StackSpec, where: str) -> None:
    """Check that pretrained stages, and only they, have a base, and that they have no layers.

    Whether the base files exist is checked with the shapes (`pretrained_output_shape`),
    so that a script can read the spec before it writes a weights file.
    """
    for stage in spec.stages:
        if stage.objective != "pretrained":
            if stage.base is not None or stage.adapters:
                raise SpecError(
                    f"{where}: stage '{stage.name}': base and adapters belong to a stage with "
                    f"objective: pretrained, this one is '{stage.objective}'; set objective: "
                    "pretrained or remove them"
                )
            continue
        if stage.base is None:
            raise SpecError(
                f"{where}: stage '{stage.name}' base: a pretrained stage needs a base, such as "
                "{architecture: MobileNetV2, weights: base.weights.h5} or {path: model.keras}"
            )
        if stage.layers:
            raise SpecError(
                f"{where}: stage '{stage.name}' layers: a pretrained stage is never trained, so "
                f"it takes no layers (got {len(stage.layers)}); put them in a child stage"
            )
        settings = sorted(stage.model_fields_set & TRAINING_SETTINGS)
        if settings:
            raise SpecError(
                f"{where}: stage '{stage.name}' {settings[0]}: a pretrained stage is never "
                f"trained, so training settings do not apply; remove {', '.join(settings)}"
            )


def _base_file_problem(base: BaseSpec) -> str | None:
    import zipfile

    import h5py

    path = base.file()
    kind = _kind(base)
    if not (path.is_dir() if kind == "saved_model" else path.is_file()):
        noun = {"architecture": "weights file", "keras": ".keras file", "saved_model": "SavedModel folder"}[kind]
        return f"{noun} '{path}' not found; check the path, which is relative to the spec file's folder"
    if kind == "architecture" and not h5py.is_hdf5(path):
        return f"'{path}' is not an HDF5 weights file; save the weights with model.save_weights"
    if kind == "keras" and not zipfile.is_zipfile(path):
        return f"'{path}' is not a .keras archive; save the model with model.save"
    if kind == "saved_model" and not (path / "saved_model.pb").is_file():
        return f"folder '{path}' is not a SavedModel (it has no saved_model.pb); export it with model.export"
    return None


def pretrained_normalized(stage: StageSpec) -> dict[str, Any]:
    """Return the parts of a pretrained stage that its fingerprint covers.

    The base's content digest stands for its file, so replacing the weights changes
    the fingerprint and moving the file does not.
    """
    base = stage.base
    return {
        # Nothing trains, so the training settings are left out: a change to the
        # spec's defaults does not rebuild the stage.
        "training": {},
        "base": {
            "architecture": base.architecture,
            "kind": _kind(base),
            "arguments": base.arguments() if base.architecture else {},
            "endpoint": _endpoint(base),
            "sha256": digest_base(base.file()),
        },
        "adapters": [adapter.model_dump(mode="json") for adapter in stage.adapters],
    }


def pretrained_job_extra(stage: StageSpec) -> dict[str, Any]:
    """Return what a stage process needs beyond the normalized stage: the base file's path."""
    if stage.objective != "pretrained":
        return {}
    return {"base_path": str(stage.base.file())}


def _kind(base: BaseSpec) -> str:
    if base.architecture:
        return "architecture"
    return "keras" if base.is_keras_file else "saved_model"


def _endpoint(base: BaseSpec) -> str | None:
    if _kind(base) != "saved_model":
        return None
    # model.export names its endpoint 'serve'; other SavedModels often use 'serving_default'.
    return base.endpoint or "serve"


def digest_base(path: Path) -> str:
    """Return the sha256 of a base file, or of a SavedModel folder's files and their names."""
    if path.is_dir():
        files = sorted(item for item in path.rglob("*") if item.is_file())
        state = tuple((str(item), *_stat_key(item)) for item in files)
        return _digest_folder(path, state)
    return _digest_one_file(path, *_stat_key(path))


def _stat_key(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


@lru_cache(maxsize=64)
def _digest_one_file(path: Path, size: int, mtime_ns: int) -> str:
    # Size and modification time are in the key, so an edited file is digested again.
    return digest_file(path)


@lru_cache(maxsize=16)
def _digest_folder(folder: Path, state: tuple) -> str:
    return digest_json({
        Path(name).relative_to(folder).as_posix(): digest_file(Path(name)) for name, *_ in state
    })


# Shapes: the adapters' output must fit the base's input.


@dataclass(frozen=True)
class InputRequirement:
    """The input a base takes: a shape whose None entries are free, and a minimum image size."""

    shape: tuple[int | None, ...]
    min_size: int = 1

    def describe(self) -> str:
        if len(self.shape) != 3:
            return f"inputs of shape {list(self.shape)}"
        height, width, channels = self.shape
        if height is not None and width is not None:
            size = f"{height}x{width} pixels"
        elif self.min_size > 1:
            size = f"at least {self.min_size}x{self.min_size} pixels"
        else:
            size = "any size"
        return f"images of {size} with {channels} channel{'s' if channels != 1 else ''}"

    def fits(self, shape: Shape) -> bool:
        if len(shape) != len(self.shape):
            return False
        if any(want is not None and want != got for want, got in zip(self.shape, shape)):
            return False
        return len(shape) != 3 or min(shape[0], shape[1]) >= self.min_size

    def fixes(self, shape: Shape) -> str:
        """Return the adapters that turn `shape` into an input this base takes."""
        if len(shape) != len(self.shape):
            if len(self.shape) == 3:
                return ("set data.shape to the image shape, or add a reshape adapter first, such "
                        "as {adapter: reshape, target_shape: [8, 8, 1]}")
            return f"add a reshape adapter to shape {list(self.shape)}"
        if len(shape) != 3:
            return f"add a reshape adapter to shape {list(self.shape)}"
        fixes = []
        size = [want if want is not None else max(got, self.min_size)
                for want, got in zip(self.shape[:2], shape[:2])]
        if size != list(shape[:2]):
            fixes.append(f"{{adapter: resize, size: [{size[0]}, {size[1]}]}}")
        channels = self.shape[2]
        if channels is not None and channels != shape[2]:
            if shape[2] != 1:
                return (f"no adapter turns {shape[2]} channels into {channels}; use a base that "
                        f"takes {shape[2]} channels")
            fixes.append(f"{{adapter: repeat_channels, channels: {channels}}}")
        noun = "the adapter" if len(fixes) == 1 else "the adapters"
        return f"add {noun} {' and '.join(fixes)}"


def pretrained_output_shape(stage: StageSpec, shape: Shape, where: str) -> Shape:
    """Check the base file and that the adapted input fits the base; return the base's output shape."""
    problem = _base_file_problem(stage.base)
    if problem:
        raise SpecError(f"{where}: stage '{stage.name}' {stage.base.field}: {problem}")
    for index, adapter in enumerate(stage.adapters):
        try:
            shape = adapter.output_shape(shape)
        except ShapeMismatch as exc:
            raise SpecError(f"{where}: stage '{stage.name}' adapters[{index}] ({adapter.adapter}): {exc}") from None
    base = stage.base
    if base.architecture:
        requirement, output = _architecture_shapes(base, shape)
    else:
        requirement, output = _saved_base_shapes(stage, shape, where)
    if not requirement.fits(shape):
        raise SpecError(
            f"{where}: stage '{stage.name}': the base {base.label} needs {requirement.describe()}, "
            f"but the stage's input after its adapters has shape {list(shape)}; "
            f"{requirement.fixes(shape)}"
        )
    return output


def _architecture_shapes(base: BaseSpec, shape: Shape) -> tuple[InputRequirement, Shape]:
    facts = ARCHITECTURES[base.architecture]
    # keras.applications builds an input of (None, None, 3) when input_shape is unset.
    expected_shape = base.input_shape or (None, None, 3)
    requirement = InputRequirement(tuple(expected_shape), facts.min_size)
    if base.include_top:
        return requirement, (base.classes or 1000,)
    if len(shape) != 3:
        return requirement, shape
    feature_map = facts.feature_map(shape[0], shape[1], base.alpha or 1.0)
    if base.pooling:
        return requirement, feature_map[2:]
    return requirement, feature_map


def _saved_base_shapes(stage: StageSpec, shape: Shape, where: str) -> tuple[InputRequirement, Shape]:
    base = stage.base
    found = inspect_saved_base(str(base.file()), digest_base(base.file()), _endpoint(base), tuple(shape))
    if "error" in found:
        raise SpecError(f"{where}: stage '{stage.name}' base.path: {found['error']}")
    requirement = InputRequirement(tuple(found["input_shape"]))
    return requirement, tuple(found["output_shape"] or ())


@lru_cache(maxsize=32)
def inspect_saved_base(path: str, digest: str, endpoint: str | None, shape: Shape) -> dict[str, Any]:
    """Read a `.keras` or SavedModel base's input signature, and its output shape for `shape`.

    TensorFlow loads the base in a child process, so the process that plans the
    stack never imports it. `digest` is part of the cache key only, so a replaced
    file is read again.
    """
    from tasks.stage_process import child_command, child_environment

    request = json.dumps({"path": path, "endpoint": endpoint, "shape": list(shape)})
    result = subprocess.run(
        child_command("tasks.pretrained", "inspect", request),
        capture_output=True, text=True, timeout=INSPECT_TIMEOUT_SECONDS, env=child_environment(),
    )
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        last = " | ".join(result.stderr.strip().splitlines()[-3:])
        return {"error": f"reading the base '{path}' failed with exit code {result.returncode}: {last}"}
    return json.loads(lines[-1])
