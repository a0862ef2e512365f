"""Input adapters of a pretrained stage: reshape, resize, repeat channels and rescale.

An adapter turns the stage's input into what its pretrained base takes, for
example 8x8 grayscale digits into the 32x32 three-channel images of a
`keras.applications` model. Adapters run inside the stage's exported SavedModel,
in front of the base, so the assembled model still takes the data as stored.
This module checks their arguments and output shapes without TensorFlow; the
Keras layers are built in `tasks.pretrained`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PositiveInt

from tasks import layers
from tasks.layers import ShapeMismatch, SpecModel, parse_entry

__all__ = ["ADAPTER_TYPES", "AdapterSpec", "parse_adapter"]

Shape = tuple[int, ...]

# The interpolations that keras.layers.Resizing accepts on the TensorFlow backend
# (RESIZE_INTERPOLATIONS in keras/src/backend/tensorflow/image.py, Keras 3.15).
Interpolation = Literal["bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5"]


class AdapterSpec(SpecModel):
    """One adapter: `adapter` names the kind, the other keys are its arguments."""

    adapter: str

    def output_shape(self, shape: Shape) -> Shape:
        """Return the output shape for an input of `shape`, or raise ShapeMismatch."""
        return shape


def _require_image(adapter: str, shape: Shape) -> None:
    if len(shape) != 3:
        raise ShapeMismatch(
            f"{adapter} needs an image input of rank 3 (height, width, channels), got shape "
            f"{list(shape)}; put a reshape adapter before it, such as "
            "{adapter: reshape, target_shape: [8, 8, 1]}"
        )


class Reshape(AdapterSpec):
    """Reshape each example, for example a flat vector of 64 pixels into [8, 8, 1]."""

    adapter: Literal["reshape"]
    target_shape: tuple[PositiveInt, ...] = Field(min_length=1)

    def output_shape(self, shape: Shape) -> Shape:
        # The same rule as the Reshape layer of a stage.
        return layers.Reshape(layer="Reshape", target_shape=self.target_shape).output_shape(shape)


class Resize(AdapterSpec):
    """Resize images to `size` (height, width) with keras.layers.Resizing."""

    adapter: Literal["resize"]
    size: tuple[PositiveInt, PositiveInt]
    interpolation: Interpolation = "bilinear"

    def output_shape(self, shape: Shape) -> Shape:
        _require_image("resize", shape)
        return (self.size[0], self.size[1], shape[2])


class RepeatChannels(AdapterSpec):
    """Repeat a single-channel image `channels` times, for example grayscale into RGB."""

    adapter: Literal["repeat_channels"]
    channels: int = Field(ge=2)

    def output_shape(self, shape: Shape) -> Shape:
        _require_image("repeat_channels", shape)
        if shape[2] != 1:
            raise ShapeMismatch(
                f"repeat_channels needs a single-channel input, got {shape[2]} channels in shape "
                f"{list(shape)}; remove this adapter or feed it a one-channel image"
            )
        return (shape[0], shape[1], self.channels)


class Rescale(AdapterSpec):
    """Multiply by `scale` and add `offset` (keras.layers.Rescaling)."""

    adapter: Literal["rescale"]
    scale: float
    offset: float = 0.0


ADAPTER_TYPES: dict[str, type[AdapterSpec]] = {
    "reshape": Reshape,
    "resize": Resize,
    "repeat_channels": RepeatChannels,
    "rescale": Rescale,
}


def parse_adapter(raw: Any) -> AdapterSpec:
    """Validate one raw adapter entry into the AdapterSpec subclass its `adapter` key names."""
    return parse_entry(raw, "adapter", ADAPTER_TYPES, "{adapter: resize, size: [32, 32]}", "its kind")
