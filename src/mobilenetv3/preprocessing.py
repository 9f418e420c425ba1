"""Preprocessing that travels with weights (input size, resize/crop, interpolation, mean/std), and the
torch-free image helpers shared by training data and `predict`: mode conversion and decode failures."""

from __future__ import annotations

import math
import os
import struct
import zlib
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import UserError, first_line

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


@dataclass(frozen=True)
class Preprocessing:
    """How images must be prepared for a set of weights (stored in every weights file's metadata).

    Eval transform: resize the short side to `resize_size`, centre-crop `input_size`, scale to [0, 1],
    normalise with mean/std.  `resize_size` defaults to floor(input_size / crop_pct).

    Segmentation (`eval_transform(crop=False)`): the short side resized to `resize_size` and nothing cropped,
    so the whole image is labelled (torchvision's `SemanticSegmentation` transform); `resized_size` gives
    that size, or with `square=True` (a program of one fixed size, ExecuTorch) input_size x input_size.
    """

    input_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    in_chans: int = 3

    def __post_init__(self) -> None:
        if self.input_size < 8:
            raise UserError(f"input_size must be >= 8, got {self.input_size}")
        if not 0.0 < self.crop_pct <= 1.0:
            raise UserError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.interpolation not in INTERPOLATIONS:
            raise UserError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        if len(self.mean) != self.in_chans or len(self.std) != self.in_chans:
            raise UserError(f"mean/std need {self.in_chans} values each, got {self.mean} / {self.std}")

    @classmethod
    def default(cls, in_chans: int = 3) -> "Preprocessing":
        """What a model without stored preprocessing gets: ImageNet's, or mean/std 0.5 per channel when the
        input does not have ImageNet's 3 channels."""
        return cls().for_channels(in_chans)

    def for_channels(self, in_chans: int) -> "Preprocessing":
        """This preprocessing for `in_chans` input channels: unchanged when it fits, else mean/std 0.5 per channel."""
        if in_chans == self.in_chans:
            return self
        return self.replace(in_chans=in_chans, mean=(0.5,) * in_chans, std=(0.5,) * in_chans)

    @property
    def image_mode(self) -> str:
        """The PIL mode images are converted to before resizing: "L" for one channel, else "RGB"."""
        return "L" if self.in_chans == 1 else "RGB"

    @property
    def resize_size(self) -> int:
        return int(math.floor(self.input_size / self.crop_pct))

    def resized_size(self, width: int, height: int, *, square: bool = False) -> tuple[int, int]:
        """(width, height) after the resize: torchvision's Resize(resize_size) (the short side becomes
        resize_size, the long side is floored), or with `square` (input_size, input_size)."""
        if square:
            return self.input_size, self.input_size
        size = self.resize_size
        if width <= height:
            return size, int(size * height / width)
        return int(size * width / height), size

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        out["resize_size"] = self.resize_size
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Preprocessing":
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        for key in ("mean", "std"):
            if key in kwargs:
                kwargs[key] = tuple(float(v) for v in kwargs[key])
        return cls(**kwargs)

    def replace(self, **changes: Any) -> "Preprocessing":
        return Preprocessing.from_dict({**asdict(self), **{k: v for k, v in changes.items() if v is not None}})

    def eval_transform(self, *, crop: bool = True):
        """torchvision.transforms.v2 pipeline: PIL image (any mode) -> normalised float tensor; `crop=False`:
        resize only (segmentation)."""
        # torch and torchvision stay off `import mobilenetv3` (predict on a cached ONNX export runs without them)
        import torch
        from torchvision.transforms import InterpolationMode, v2

        mode = InterpolationMode(self.interpolation)
        return v2.Compose([
            ConvertMode(self.image_mode),
            v2.Resize(self.resize_size, interpolation=mode, antialias=True),
            *([v2.CenterCrop(self.input_size)] if crop else []),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(self.mean, self.std),
        ])


class ConvertMode:
    """PIL `Image.convert` as a picklable transform: L/RGBA/P/CMYK/16-bit inputs become `mode`."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, image):
        # Tensors pass through unchanged (Tensor.mode is torch.mode, not an image mode).
        if not hasattr(image, "convert") or image.mode == self.mode:
            return image
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16/32-bit integer images: scale to 8 bits before converting, or everything saturates.
            array = np.asarray(image, dtype=np.float64)
            peak = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
            image = Image.fromarray(np.clip(array / peak * 255.0, 0, 255).astype(np.uint8), mode="L")
        return image.convert(self.mode)

    def __repr__(self) -> str:
        return f"ConvertMode({self.mode!r})"


#: What PIL raises for a file it can't decode (open() raises UnidentifiedImageError, an OSError;
#: load() raises OSError for truncation and SyntaxError/struct/zlib errors for corrupt chunks; a header that
#: claims a gigantic size raises DecompressionBombError).
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError
)


def describe_decode_error(path: str | os.PathLike, error: BaseException) -> str:
    """A short reason for a decode failure (PIL's own messages repeat the file object)."""
    if isinstance(error, UnidentifiedImageError):
        return "empty file" if os.path.getsize(path) == 0 else "not an image, or a format PIL can't read"
    return first_line(error)
