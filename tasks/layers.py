"""Layer entries of a stack spec: their arguments, validation and output shapes.

Every layer a spec may name is a pydantic model here, so that a wrong argument is
reported before TensorFlow is imported, and so that shapes are checked stage by
stage without building a model. `keras_arguments()` gives the keyword arguments
for the Keras layer class of the same name.
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "ACTIVATIONS",
    "LAYER_TYPES",
    "LayerSpec",
    "Number",
    "PositiveInteger",
    "ShapeMismatch",
    "argument_error",
    "describe_error",
    "parse_entry",
    "parse_layer",
]

Shape = tuple[int, ...]

# Activation names that `keras.activations.get` accepts in Keras 3.15.
ACTIVATIONS = (
    "linear", "relu", "relu6", "leaky_relu", "elu", "selu", "gelu", "silu", "swish",
    "sigmoid", "hard_sigmoid", "tanh", "softmax", "softplus", "softsign", "mish", "exponential",
)
Activation = Literal[
    "linear", "relu", "relu6", "leaky_relu", "elu", "selu", "gelu", "silu", "swish",
    "sigmoid", "hard_sigmoid", "tanh", "softmax", "softplus", "softsign", "mish", "exponential",
]
Padding = Literal["valid", "same"]

# Strict numbers: YAML gives ints and floats their own types, so `units: true`, `units: "8"`
# or `epochs: 2.5` are mistakes to report, not values to coerce.
PositiveInteger = Annotated[int, Field(strict=True, gt=0)]
Number = Annotated[float, Field(strict=True)]


class ShapeMismatch(ValueError):
    """Raised when a layer cannot take the shape its input has."""


def suggest(value: str, choices: list[str] | tuple[str, ...]) -> str:
    """Return " Did you mean 'X'?" for the closest choice, or an empty string."""
    close = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


def describe_error(error: dict[str, Any]) -> tuple[str, str]:
    """Return the dotted field path and the message of one pydantic error.

    A value outside a fixed set of choices gets a " Did you mean 'X'?" suggestion.
    """
    field = ".".join(str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "literal_error" and isinstance(error.get("input"), str):
        choices = re.findall(r"'([^']*)'", str(error.get("ctx", {}).get("expected", "")))
        message += f"; received {error['input']!r}.{suggest(error['input'], choices)}"
    elif error["type"] != "value_error":
        message += f"; received {error.get('input')!r}."
    elif not message.endswith("."):
        message += "."
    return field, message


class SpecModel(BaseModel):
    """Base of every spec model: rejects unknown keys with the valid ones and a suggestion."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        known = set(cls.model_fields)
        for key in data:
            if key not in known:
                hint = suggest(str(key), sorted(known))
                raise ValueError(
                    f"unknown key '{key}'.{hint} Valid keys: {', '.join(sorted(known))}"
                )
        return data


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (value[0], value[1])


def _check_positive_pair(value: Any) -> Any:
    def positive(item: Any) -> bool:
        return isinstance(item, int) and not isinstance(item, bool) and item > 0

    if positive(value) or (isinstance(value, (list, tuple)) and len(value) == 2
                           and all(positive(item) for item in value)):
        return value
    raise ValueError(
        f"expected a positive integer or a list of two, such as 3 or [3, 3]; received {value!r}"
    )


PositiveIntPair = Annotated[int | tuple[int, int], BeforeValidator(_check_positive_pair)]


def _conv_length(size: int, kernel: int, stride: int, padding: str) -> int:
    if padding == "same":
        return math.ceil(size / stride)
    return (size - kernel) // stride + 1


class LayerSpec(SpecModel):
    """One layer of a stage: `layer` names the Keras class, the other keys are its arguments."""

    layer: str
    # Number of input dimensions (without the batch axis) the layer needs, or None for any.
    required_rank: ClassVar[int | None] = None

    @property
    def is_preprocessing(self) -> bool:
        """Whether the layer only rescales its input, with nothing learned by gradient."""
        return False

    def keras_arguments(self) -> dict[str, Any]:
        """Return the keyword arguments for the Keras layer class."""
        return self.model_dump(exclude={"layer"}, exclude_none=True)

    def output_shape(self, shape: Shape) -> Shape:
        """Return the output shape for an input of `shape`, or raise ShapeMismatch."""
        if self.required_rank is not None and len(shape) != self.required_rank:
            raise ShapeMismatch(
                f"{self.layer} needs an input of rank {self.required_rank} "
                f"(height, width, channels), got shape {list(shape)}; "
                "add a Reshape layer before it"
            )
        return self._output_shape(shape)

    def _output_shape(self, shape: Shape) -> Shape:
        return shape


class Dense(LayerSpec):
    layer: Literal["Dense"]
    units: PositiveInteger
    activation: Activation | None = None
    use_bias: Annotated[bool, Field(strict=True)] = True

    def _output_shape(self, shape: Shape) -> Shape:
        return (*shape[:-1], self.units)


class Dropout(LayerSpec):
    layer: Literal["Dropout"]
    rate: Number = Field(ge=0.0, lt=1.0)


class GaussianNoise(LayerSpec):
    layer: Literal["GaussianNoise"]
    stddev: Number = Field(gt=0.0)


class BatchNormalization(LayerSpec):
    layer: Literal["BatchNormalization"]
    momentum: Number = Field(default=0.99, gt=0.0, lt=1.0)
    epsilon: Number = Field(default=0.001, gt=0.0)


class LayerNormalization(LayerSpec):
    """Normalize over `axis` per example; with center and scale off it has no weights.

    On a (time, channels) window, axis 1 standardizes each channel over time.
    """

    layer: Literal["LayerNormalization"]
    axis: int | list[int] = -1
    epsilon: Number = Field(default=0.001, gt=0.0)
    center: bool = True
    scale: bool = True

    @property
    def is_preprocessing(self) -> bool:
        return not self.center and not self.scale


class ActivationLayer(LayerSpec):
    layer: Literal["Activation"]
    activation: Activation


class Rescaling(LayerSpec):
    """Multiply by `scale` and add `offset`, for example 1/16 for digits' 0 to 16 pixels."""

    layer: Literal["Rescaling"]
    scale: Number
    offset: Number = 0.0

    @property
    def is_preprocessing(self) -> bool:
        return True


class Normalization(LayerSpec):
    """Standardize each feature with the mean and variance of the stage's training split."""

    layer: Literal["Normalization"]

    @property
    def is_preprocessing(self) -> bool:
        return True


class Flatten(LayerSpec):
    layer: Literal["Flatten"]

    def _output_shape(self, shape: Shape) -> Shape:
        return (math.prod(shape),)


class Reshape(LayerSpec):
    layer: Literal["Reshape"]
    target_shape: tuple[PositiveInteger, ...] = Field(min_length=1)

    def _output_shape(self, shape: Shape) -> Shape:
        if math.prod(shape) != math.prod(self.target_shape):
            raise ShapeMismatch(
                f"Reshape cannot turn shape {list(shape)} ({math.prod(shape)} values) into "
                f"{list(self.target_shape)} ({math.prod(self.target_shape)} values); "
                "make the target_shape hold the same number of values"
            )
        return tuple(self.target_shape)


class Conv2D(LayerSpec):
    layer: Literal["Conv2D"]
    filters: PositiveInteger
    kernel_size: PositiveIntPair
    strides: PositiveIntPair = 1
    padding: Padding = "valid"
    activation: Activation | None = None
    required_rank: ClassVar[int | None] = 3

    def _output_shape(self, shape: Shape) -> Shape:
        kernel, stride = _pair(self.kernel_size), _pair(self.strides)
        height = _conv_length(shape[0], kernel[0], stride[0], self.padding)
        width = _conv_length(shape[1], kernel[1], stride[1], self.padding)
        if height < 1 or width < 1:
            raise ShapeMismatch(
                f"Conv2D with kernel_size {list(kernel)} does not fit an input of shape "
                f"{list(shape)}; use a smaller kernel_size or padding: same"
            )
        return (height, width, self.filters)


class _Pooling2D(LayerSpec):
    pool_size: PositiveIntPair = 2
    strides: PositiveIntPair | None = None
    padding: Padding = "valid"
    required_rank: ClassVar[int | None] = 3

    def _output_shape(self, shape: Shape) -> Shape:
        pool = _pair(self.pool_size)
        stride = _pair(self.strides) if self.strides is not None else pool
        height = _conv_length(shape[0], pool[0], stride[0], self.padding)
        width = _conv_length(shape[1], pool[1], stride[1], self.padding)
        if height < 1 or width < 1:
            raise ShapeMismatch(
                f"{self.layer} with pool_size {list(pool)} does not fit an input of shape "
                f"{list(shape)}; use a smaller pool_size or padding: same"
            )
        return (height, width, shape[2])


class MaxPooling2D(_Pooling2D):
    layer: Literal["MaxPooling2D"]


class AveragePooling2D(_Pooling2D):
    layer: Literal["AveragePooling2D"]


class _GlobalPooling2D(LayerSpec):
    required_rank: ClassVar[int | None] = 3

    def _output_shape(self, shape: Shape) -> Shape:
        return (shape[2],)


class GlobalAveragePooling2D(_GlobalPooling2D):
    layer: Literal["GlobalAveragePooling2D"]


class GlobalMaxPooling2D(_GlobalPooling2D):
    layer: Literal["GlobalMaxPooling2D"]


LAYER_TYPES: dict[str, type[LayerSpec]] = {
    "Dense": Dense,
    "Dropout": Dropout,
    "GaussianNoise": GaussianNoise,
    "BatchNormalization": BatchNormalization,
    "LayerNormalization": LayerNormalization,
    "Activation": ActivationLayer,
    "Rescaling": Rescaling,
    "Normalization": Normalization,
    "Flatten": Flatten,
    "Reshape": Reshape,
    "Conv2D": Conv2D,
    "MaxPooling2D": MaxPooling2D,
    "AveragePooling2D": AveragePooling2D,
    "GlobalAveragePooling2D": GlobalAveragePooling2D,
    "GlobalMaxPooling2D": GlobalMaxPooling2D,
}


def parse_layer(raw: Any) -> LayerSpec:
    """Validate one raw layer entry into the LayerSpec subclass its `layer` key names."""
    return parse_entry(raw, "layer", LAYER_TYPES, "{layer: Dense, units: 64}", "its Keras class")


def parse_entry(raw: Any, key: str, types: dict[str, type[SpecModel]], example: str, names: str) -> Any:
    """Validate a raw layer or adapter entry into the class of `types` that its `key` names.

    `example` is a valid entry and `names` describes what the key's value names; both appear
    in the error messages.
    """
    if isinstance(raw, SpecModel):
        return raw
    article = "an" if key[0] in "aeiou" else "a"
    if not isinstance(raw, dict):
        raise ValueError(f"{article} {key} must be a mapping such as {example}, got {raw!r}")
    name = raw.get(key)
    if name is None:
        first = next(iter(types))
        raise ValueError(f"{article} {key} needs a '{key}' key naming {names}, such as '{first}'")
    if not isinstance(name, str) or name not in types:
        hint = suggest(name, tuple(types)) if isinstance(name, str) else ""
        raise ValueError(
            f"unknown {key} {name!r}.{hint} Supported {key}s: {', '.join(types)}"
        )
    try:
        return types[name].model_validate(raw)
    except ValidationError as exc:
        raise ValueError(argument_error(name, exc)) from None


def argument_error(name: str, exc: ValidationError) -> str:
    """Return the one-line message for the first invalid argument of the layer or adapter `name`."""
    field, message = describe_error(exc.errors()[0])
    where = f"{name} argument '{field}': " if field else f"{name}: "
    return f"{where}{message} Fix this argument in the spec"
