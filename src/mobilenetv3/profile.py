"""Parameters and multiply-adds, counted by torch's own flop counter, beside the paper's Table 9.

Segmentation networks (LR-ASPP) are counted the same way, at any height x width, beside the paper's Table 7
(1024x2048) and Table 8 (512x1024) for Cityscapes' 19 classes.  Large's MACs equal Table 8's at 512x1024 (2.48B);
at 1024x2048 we count 4x that, 9.92B, where Table 7 prints 9.74B (the paper's two tables differ by the same
amount).  Ours has 0.24M (Large) and 0.05M (Small) more parameters than Table 7: halving the expansion of the
last stage's first block too (672 / 288, which torchvision's reduced tail and ours keep) would give exactly
1.506M and 0.467M, but would also lower Large's MACs to about 2.33B, away from Table 8; the paper's text does not
settle which, and ours converts torchvision's weights exactly.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from .errors import UserError
from .factory import create_model
from .models.registry import get_entry

# (arch, width, resolution) -> (million MACs, million params) as printed in the paper (Table 9 and
# the resolution/minimalistic rows quoted in its text).  None: the paper gives no number.
PAPER: dict[tuple[str, float, int], tuple[float | None, float | None]] = {
    ("large", 1.25, 224): (356, 7.5),
    ("large", 1.0, 224): (217, 5.4),
    ("large", 0.75, 224): (155, 4.0),
    ("large", 0.5, 224): (69, 2.6),
    ("large", 0.35, 224): (40, 2.2),
    # Small x1.25: the paper prints 3.6M params, which its own 1024-wide head cannot give
    # (we count 3.2M with the same rules that reproduce every other cell), so only MACs are kept.
    ("small", 1.25, 224): (91, None),
    ("small", 1.0, 224): (57, 2.5),
    ("small", 0.75, 224): (44, 2.0),
    ("small", 0.5, 224): (21, 1.6),
    ("small", 0.35, 224): (12, 1.4),
    ("large", 1.0, 256): (282, 5.4),
    ("large", 1.0, 192): (160, 5.4),
    ("large", 1.0, 160): (112, 5.4),
    ("large", 1.0, 128): (73, 5.4),
    ("large", 1.0, 96): (43, 5.4),
    ("small", 1.0, 256): (74, 2.5),
    ("small", 1.0, 160): (30, 2.5),
    ("small", 1.0, 128): (20, 2.5),
    ("small", 1.0, 96): (12, 2.5),
    ("large_minimal", 1.0, 224): (209, 3.9),
    ("small_minimal", 1.0, 224): (None, 2.0),
}


def parse_resolution(value: int | str | tuple[int, int]) -> tuple[int, int]:
    """(height, width) from 224, "224", "512x1024" or (512, 1024)."""
    if isinstance(value, tuple):
        return int(value[0]), int(value[1])
    text = str(value).lower()
    try:
        height, _, width = text.partition("x")
        return int(height), int(width or height)
    except ValueError:
        raise UserError(f"resolution must be N or HEIGHTxWIDTH (e.g. 224, 512x1024), got {value!r}") from None


@dataclass(frozen=True)
class Profile:
    model: str
    resolution: int | str  # an int for square inputs, "HxW" otherwise
    params: int
    macs: int
    paper_macs: float | None  # millions
    paper_params: float | None  # millions

    def to_dict(self) -> dict:
        return asdict(self)


#: (arch, width, (height, width)) -> (million MACs, million params): Tables 7 and 8, LR-ASPP with the reduced
#: tail, output stride 16, 128 head filters, 19 classes.  Table 8 gives no parameter count.
PAPER_SEGMENTATION: dict[tuple[str, float, tuple[int, int]], tuple[float | None, float | None]] = {
    ("large", 1.0, (1024, 2048)): (9740, 1.51),
    ("large", 1.0, (512, 1024)): (2480, None),
    ("small", 1.0, (1024, 2048)): (2900, 0.47),
    ("small", 1.0, (512, 1024)): (740, None),
}
#: the settings of the paper's segmentation rows
_PAPER_SEGMENTATION_CONFIG = {"num_classes": 19, "in_chans": 3, "reduced_tail": True, "output_stride": 16,
                              "inter_channels": 128}


def count_macs(model: torch.nn.Module, resolution: int | str | tuple[int, int], in_chans: int = 3) -> int:
    """Multiply-adds of one forward pass at batch 1 (torch's flop counter counts 2 flops per MAC)."""
    height, width = parse_resolution(resolution)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, in_chans, height, width))
    return counter.get_total_flops() // 2


class _RawDetector(torch.nn.Module):
    """A detector's network alone: backbone and head on an input already at its size (what the paper's MAdds
    count; the resize, the anchors, the box decoding and NMS are not multiply-adds of the network)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor):
        return self.model.head(list(self.model.backbone(x).values()))


def profile_model(name: str, resolution: int | str | tuple[int, int] | None = None, **kwargs) -> Profile:
    """Params and MACs of `create_model(name, **kwargs)` at `resolution` (N, "HxW" or (H, W); None: 224, or a
    detector's own size).

    The paper's columns are filled for the classifiers at 1000 classes, 3 channels and a square input, and for
    LR-ASPP in the paper's segmentation settings (`PAPER_SEGMENTATION`).  A detector (SSDLite) is built at
    `resolution` (its `size`) and counted without its pre- and post-processing (`_RawDetector`); its paper column
    stays empty: Table 6's parameter and MAdd counts could not be checked against the paper where this was
    written, so they are not quoted as references.
    """
    entry = get_entry(name)
    if entry.task == "detection":
        if resolution is not None:
            kwargs["size"] = list(parse_resolution(resolution))
        model = create_model(name, **kwargs).eval()
        height, width = model.config["size"]
        counted = _RawDetector(model)
    else:
        height, width = parse_resolution(224 if resolution is None else resolution)
        model = counted = create_model(name, **kwargs).eval()
    params = sum(p.numel() for p in model.parameters())
    macs = count_macs(counted, (height, width), in_chans=model.config["in_chans"])
    multiplier = float(model.config["width_mult"])
    paper = (None, None)
    if entry.task == "classification" and model.config["num_classes"] == 1000 and model.config["in_chans"] == 3 \
            and height == width:
        paper = PAPER.get((entry.arch, multiplier, height), (None, None))
    if entry.task == "segmentation" and "head" not in model.config and all(
            model.config.get(key) == value for key, value in _PAPER_SEGMENTATION_CONFIG.items()):
        paper = PAPER_SEGMENTATION.get((entry.arch, multiplier, (height, width)), (None, None))
    return Profile(name, height if height == width else f"{height}x{width}", params, macs, *paper)
