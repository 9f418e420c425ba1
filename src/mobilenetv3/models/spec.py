"""The paper's architecture tables as data.

Table 1 (MobileNetV3-Large) and Table 2 (MobileNetV3-Small) of Howard et al., "Searching for
MobileNetV3" (arXiv 1905.02244), one frozen dataclass per row.  Everything else about a network
(width multiplier, how channels are rounded, peer-layout quirks) is a `LayoutOptions` value, so one
builder expresses the paper's networks and the torchvision / timm layouts exactly.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from ..errors import UserError


class Activation(str, enum.Enum):
    """The two nonlinearities of the paper ("RE" and "HS" in its tables)."""

    RELU = "relu"
    HARD_SWISH = "hard_swish"


class ExpansionRule(str, enum.Enum):
    """How a block's expanded width is derived at width multipliers other than 1.0."""

    #: TF reference / timm: make_divisible(rounded_input_channels * exp / in).  Reproduces Table 9.
    FROM_ROUNDED_INPUT = "from_rounded_input"
    #: torchvision: make_divisible(exp * width_mult); the last 1x1 conv is 6x the last block's width.
    SCALED_EXPANSION = "scaled_expansion"


class Padding(str, enum.Enum):
    #: PyTorch style: symmetric `dilation * (k - 1) // 2` on every side.
    SYMMETRIC = "symmetric"
    #: TensorFlow 'SAME': asymmetric when the stride does not divide the input (timm's `tf_` ports).
    SAME = "same"


@dataclass(frozen=True)
class BlockSpec:
    """One "bneck" row of Table 1 / Table 2.  Input channels are the previous row's output."""

    kernel_size: int
    expanded_channels: int
    out_channels: int
    squeeze_excite: bool
    activation: Activation
    stride: int


@dataclass(frozen=True)
class NetworkSpec:
    """A whole network of the paper at width 1.0: stem, bneck rows, last conv, pooled head conv."""

    name: str
    stem_channels: int
    stem_activation: Activation
    blocks: tuple[BlockSpec, ...]
    final_conv_channels: int  # the 960 / 576 1x1 conv before pooling (scaled with width)
    final_conv_activation: Activation
    head_channels: int  # the 1280 / 1024 1x1 conv after pooling (no BN; not scaled in the paper)
    head_activation: Activation


@dataclass(frozen=True)
class LayoutOptions:
    """Rules that turn a `NetworkSpec` into concrete channel counts and layers.

    The defaults are the paper's (TF reference) semantics; peers' layouts differ only here.
    """

    width_mult: float = 1.0
    expansion_rule: ExpansionRule = ExpansionRule.FROM_ROUNDED_INPUT
    #: timm keeps the 16-channel stem unscaled below x0.75.
    fix_stem: bool = False
    #: torchvision scales the 1280/1024 head with the width multiplier; the paper does not.
    scale_head: bool = False
    #: timm's mobilenetv3_rw omits the head conv's bias.
    head_bias: bool = True
    #: SE squeeze channels: make_divisible(expanded * ratio, 8) (paper); timm's rw variant rounds plainly.
    se_ratio: float = 0.25
    se_round_to_divisor: bool = True
    padding: Padding = Padding.SYMMETRIC
    divisor: int = 8
    #: How many times each table row is built (None: once each).  Extra copies follow their row with
    #: stride 1 and the row's own expansion ratio, as timm's depth multiplier does (mobilenetv3_large_150d).
    block_repeats: tuple[int, ...] | None = None
    #: The SE block's inner activation: always ReLU (paper, both peers), or the block's own (timm's rw).
    se_activation_from_block: bool = False
    #: timm's mobilenetv3_rw has no residual around its first block ("noskip").
    first_block_residual: bool = True
    #: The paper's §6.1 for dense tasks: the last stage's channels halved (its strided row's output, the
    #: later rows' expansion and output, and the last 1x1 conv and head), as torchvision's `reduced_tail`.
    reduced_tail: bool = False


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round `value` to the nearest multiple of `divisor`, never dropping more than 10% (TF reference)."""
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _rows(*rows: tuple) -> tuple[BlockSpec, ...]:
    # Columns in the order of the paper's tables: kernel, exp size, #out, SE, NL, stride.
    return tuple(
        BlockSpec(kernel_size=k, expanded_channels=e, out_channels=c, squeeze_excite=se, activation=a, stride=s)
        for k, e, c, se, a, s in rows
    )


RE, HS = Activation.RELU, Activation.HARD_SWISH

#: Table 1: MobileNetV3-Large.
LARGE = NetworkSpec(
    name="large",
    stem_channels=16,
    stem_activation=HS,
    blocks=_rows(
        (3, 16, 16, False, RE, 1),
        (3, 64, 24, False, RE, 2),
        (3, 72, 24, False, RE, 1),
        (5, 72, 40, True, RE, 2),
        (5, 120, 40, True, RE, 1),
        (5, 120, 40, True, RE, 1),
        (3, 240, 80, False, HS, 2),
        (3, 200, 80, False, HS, 1),
        (3, 184, 80, False, HS, 1),
        (3, 184, 80, False, HS, 1),
        (3, 480, 112, True, HS, 1),
        (3, 672, 112, True, HS, 1),
        (5, 672, 160, True, HS, 2),
        (5, 960, 160, True, HS, 1),
        (5, 960, 160, True, HS, 1),
    ),
    final_conv_channels=960,
    final_conv_activation=HS,
    head_channels=1280,
    head_activation=HS,
)

#: Table 2: MobileNetV3-Small.
SMALL = NetworkSpec(
    name="small",
    stem_channels=16,
    stem_activation=HS,
    blocks=_rows(
        (3, 16, 16, True, RE, 2),
        (3, 72, 24, False, RE, 2),
        (3, 88, 24, False, RE, 1),
        (5, 96, 40, True, HS, 2),
        (5, 240, 40, True, HS, 1),
        (5, 240, 40, True, HS, 1),
        (5, 120, 48, True, HS, 1),
        (5, 144, 48, True, HS, 1),
        (5, 288, 96, True, HS, 2),
        (5, 576, 96, True, HS, 1),
        (5, 576, 96, True, HS, 1),
    ),
    final_conv_channels=576,
    final_conv_activation=HS,
    head_channels=1024,
    head_activation=HS,
)


def minimalistic(spec: NetworkSpec) -> NetworkSpec:
    """The paper's "minimalistic" variant: no SE, ReLU everywhere, 3x3 depthwise kernels only."""
    return replace(
        spec,
        name=f"{spec.name}_minimal",
        stem_activation=RE,
        blocks=tuple(
            replace(row, kernel_size=3, squeeze_excite=False, activation=RE) for row in spec.blocks
        ),
        final_conv_activation=RE,
        head_activation=RE,
    )


NETWORK_SPECS: dict[str, NetworkSpec] = {
    spec.name: spec for spec in (LARGE, SMALL, minimalistic(LARGE), minimalistic(SMALL))
}


@dataclass(frozen=True)
class ResolvedBlock:
    """A block's concrete channel counts after the layout rules are applied."""

    in_channels: int
    expanded_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    squeeze_channels: int | None
    activation: Activation
    #: the inner activation of the squeeze-excite (when there is one)
    se_activation: Activation = Activation.RELU
    #: whether the block adds its input when shapes allow
    residual: bool = True


@dataclass(frozen=True)
class ResolvedNetwork:
    stem_channels: int
    blocks: tuple[ResolvedBlock, ...]
    final_conv_channels: int
    head_channels: int


def halve_tail(spec: NetworkSpec) -> NetworkSpec:
    """The paper's "reduced tail" (§6.1): every channel count of the last stage divided by 2.

    The last stage starts at the last strided row; that row keeps its expansion (its input is not halved),
    later rows halve expansion and output, and the last 1x1 conv and the pooled head are halved, as
    torchvision's `_mobilenet_v3_conf(reduced_tail=True)` does before its width rounding.
    """
    start = max(i for i, row in enumerate(spec.blocks) if row.stride > 1)
    blocks = tuple(
        row if i < start else replace(
            row, out_channels=row.out_channels // 2,
            expanded_channels=row.expanded_channels if i == start else row.expanded_channels // 2)
        for i, row in enumerate(spec.blocks)
    )
    return replace(spec, blocks=blocks, final_conv_channels=spec.final_conv_channels // 2,
                   head_channels=spec.head_channels // 2)


def _expanded_rows(spec: NetworkSpec, repeats: tuple[int, ...] | None) -> list[tuple[BlockSpec, int]]:
    """(row, the row's paper input width) for every block to build, extra copies after their row.

    A copy runs at stride 1 and keeps its row's expansion ratio (exp / paper input), as timm's depth
    multiplier does when it repeats a block definition.
    """
    repeats = repeats if repeats is not None else (1,) * len(spec.blocks)
    if len(repeats) != len(spec.blocks) or any(int(count) < 1 for count in repeats):
        raise UserError(
            f"block_repeats needs {len(spec.blocks)} counts >= 1 (one per table row), got {list(repeats)}"
        )
    out: list[tuple[BlockSpec, int]] = []
    paper_in = spec.stem_channels
    for row, count in zip(spec.blocks, repeats):
        out.append((row, paper_in))
        out.extend([(replace(row, stride=1), paper_in)] * (int(count) - 1))
        paper_in = row.out_channels
    return out


def resolve(spec: NetworkSpec, options: LayoutOptions) -> ResolvedNetwork:
    """Apply width multiplier and rounding rules to the paper's table."""
    width, div = options.width_mult, options.divisor
    if options.reduced_tail:
        spec = halve_tail(spec)

    def scaled(channels: int) -> int:
        return make_divisible(channels * width, div)

    stem = spec.stem_channels if options.fix_stem else scaled(spec.stem_channels)
    blocks = []
    in_chs = stem
    for row, paper_in in _expanded_rows(spec, options.block_repeats):
        if options.expansion_rule is ExpansionRule.FROM_ROUNDED_INPUT:
            expanded = make_divisible(in_chs * row.expanded_channels / paper_in, div)
        else:
            expanded = scaled(row.expanded_channels)
        squeeze = None
        if row.squeeze_excite:
            raw = expanded * options.se_ratio
            squeeze = make_divisible(raw, div) if options.se_round_to_divisor else round(raw)
        out = scaled(row.out_channels)
        blocks.append(
            ResolvedBlock(
                in_channels=in_chs,
                expanded_channels=expanded,
                out_channels=out,
                kernel_size=row.kernel_size,
                stride=row.stride,
                squeeze_channels=squeeze,
                activation=row.activation,
                se_activation=row.activation if options.se_activation_from_block else Activation.RELU,
                residual=options.first_block_residual or bool(blocks),
            )
        )
        in_chs = out
    head = scaled(spec.head_channels) if options.scale_head else spec.head_channels
    if options.expansion_rule is ExpansionRule.FROM_ROUNDED_INPUT:
        final_conv = scaled(spec.final_conv_channels)
    else:  # torchvision: 6 x the last block's (rounded) output, without further rounding
        final_conv = in_chs * spec.final_conv_channels // spec.blocks[-1].out_channels
    return ResolvedNetwork(
        stem_channels=stem,
        blocks=tuple(blocks),
        final_conv_channels=final_conv,
        head_channels=head,
    )
