"""Convert torchvision / timm MobileNetV3 state dicts to ours, and back.

Each peer variant is one row of `PEER_VARIANTS`: the peer's own name, the registered model name and
`MobileNetV3` kwargs that express its layout exactly.  Its weights tags (and their preprocessing) are rows
of the published weights table, `weights.published`.  Key maps are not written out per variant: `_module_map`
walks the resolved network once and names, for every module of ours, the peer module holding the same
tensors (one function per peer layout).

    converted = convert_state_dict("timm", "tf_mobilenetv3_large_100", peer_state_dict)
    model = create_model(converted.model_name, **converted.model_kwargs)
    model.load_state_dict(converted.state_dict)

    peer_arch, peer_state_dict = to_peer("torchvision", model.config, model.state_dict())

LR-ASPP is one more torchvision variant (`head="lraspp"`): torchvision's `lraspp_mobilenet_v3_large` is our
`lraspp_mobilenetv3_large_100` with `reduced_tail=False`; its backbone keys are the classifier's map with
`features.N` -> `backbone.N`, and its head (`classifier.*`) has our names.  `peer_variants()` lists the
classifiers; `peer_variants(head=None)` all.

SSDLite is another (`head="ssdlite"`): torchvision's `ssdlite320_mobilenet_v3_large` is our
`ssdlite320_mobilenetv3_large_100` (reduced tail, as torchvision builds it without a pretrained backbone).  Its
`backbone.features.0.N` is our `backbone.body.N` (the stem, the blocks before C4, then C4's expansion as
`features.0.<last>` = our `body.<last>`); its `backbone.features.1.0.P` is our `backbone.tail.0` (the rest of the
C4 block: depthwise, SE, projection at their positions P in torchvision's block), `backbone.features.1.N` our
`backbone.tail.N` (the blocks after it, then the last 1x1 conv); `backbone.extra.*` and `head.*` have our names.

Neither peer library is imported here: the tables carry their values.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch

from ..errors import UserError
from ..models.heads.lraspp import LRASPP
from ..models.mobilenetv3 import MobileNetV3, _layout
from ..models.registry import get_entry, list_models
from ..models.spec import NETWORK_SPECS, resolve
from ..preprocessing import Preprocessing
from .io import load_state_dict_checked
from .published import PublishedWeights, published_tags

PEERS = ("torchvision", "timm")

#: Keys of a `MobileNetV3` config that change which tensors exist or what they compute.
LAYOUT_KWARGS = (
    "width_mult", "expansion_rule", "fix_stem", "scale_head", "head_bias", "se_round_to_divisor",
    "padding", "block_repeats", "se_activation_from_block", "first_block_residual", "final_conv_repeats",
    "reduced_tail", "dilate_strided_block",
)

# timm builds MobileNetV3 from stages of block definitions; each definition covers some rows of the
# paper's table and is what its depth multiplier repeats.  Rows per definition, per stage:
_TIMM_STAGE_DEFS: dict[str, tuple[tuple[int, ...], ...]] = {
    "large": ((1,), (1, 1), (3,), (1, 1, 2), (2,), (3,)),
    "small": ((1,), (1, 1), (1, 2), (2,), (3,)),
}


def _timm_stage_defs(arch: str) -> tuple[tuple[int, ...], ...]:
    return _TIMM_STAGE_DEFS[arch.replace("_minimal", "")]


def timm_block_repeats(arch: str, depth_multiplier: float) -> list[int] | None:
    """Per-row repeats (our `block_repeats`) equal to timm's `decode_arch_def(depth_multiplier=...)`.

    timm scales each stage's total with ceil, then hands the extra blocks out from the last definition
    backwards; a definition's extra blocks are copies of its last row.
    """
    if depth_multiplier == 1.0:
        return None
    if depth_multiplier < 1.0:
        raise UserError("depth multipliers below 1.0 would drop table rows; only >= 1.0 is supported")
    repeats: list[int] = []
    for stage in _timm_stage_defs(arch):
        remaining, remaining_scaled = sum(stage), int(math.ceil(sum(stage) * depth_multiplier))
        scaled_per_def = []
        for rows in reversed(stage):
            count = max(1, round(rows / remaining * remaining_scaled))
            scaled_per_def.append(count)
            remaining, remaining_scaled = remaining - rows, remaining_scaled - count
        for rows, count in zip(stage, reversed(scaled_per_def)):
            repeats.extend([1] * (rows - 1) + [count - rows + 1])
    return repeats


@dataclass(frozen=True)
class PeerVariant:
    """One MobileNetV3 network a peer library defines, expressed as our model name + kwargs."""

    peer: str
    name: str
    model_name: str
    model_kwargs: dict[str, Any]
    #: "" for a classifier, "lraspp" for a segmentation network (our `heads.LRASPP`), "ssdlite" for a detector
    #: (our `heads.ssdlite.SSDLite`)
    head: str = ""

    @property
    def arch(self) -> str:
        return self.model_kwargs["arch"]

    @property
    def tags(self) -> dict[str, PublishedWeights]:
        """Weights tag -> its row of the published weights table (the first is the peer's default)."""
        return {weights.tag: weights for weights in published_tags(self.peer, self.name)}

    @property
    def default_tag(self) -> str | None:
        return next(iter(self.tags), None)


_TORCHVISION_LAYOUT = dict(
    expansion_rule="scaled_expansion", scale_head=True, bn_eps=1e-3, bn_momentum=0.01, drop_rate=0.2,
)


def _torchvision(name: str, arch: str) -> PeerVariant:
    return PeerVariant("torchvision", name, f"mobilenetv3_{arch}_100", {"arch": arch, "width_mult": 1.0,
                       **_TORCHVISION_LAYOUT})


def _torchvision_lraspp(name: str, arch: str) -> PeerVariant:
    """torchvision's LR-ASPP: its MobileNetV3 with `dilated=True` (the strided block dilated too), no reduced
    tail, and the stride-8 features of the first block at that stride (as our `LRASPP` always takes)."""
    layout = {k: v for k, v in _TORCHVISION_LAYOUT.items() if k != "drop_rate"}  # no classifier, no dropout
    return PeerVariant("torchvision", name, f"lraspp_mobilenetv3_{arch}_100",
                       {"arch": arch, "width_mult": 1.0, **layout, "reduced_tail": False, "output_stride": 16,
                        "dilate_strided_block": True}, head="lraspp")


def _torchvision_ssdlite(name: str, arch: str) -> PeerVariant:
    """torchvision's SSDLite320: its MobileNetV3 with the reduced tail (`weights_backbone=None`, as its COCO
    weights were trained), BN eps 0.001 / momentum 0.03 throughout, 320x320, image mean / std 0.5."""
    layout = {k: v for k, v in _TORCHVISION_LAYOUT.items() if k != "drop_rate"}  # no classifier, no dropout
    return PeerVariant("torchvision", name, f"ssdlite320_mobilenetv3_{arch}_100",
                       {"arch": arch, "width_mult": 1.0, **layout, "bn_momentum": 0.03, "reduced_tail": True},
                       head="ssdlite")


def _timm(name: str, arch: str, width: float, *, tf: bool = False, depth_multiplier: float = 1.0,
          **layout: Any) -> PeerVariant:
    kwargs: dict[str, Any] = {
        "arch": arch, "width_mult": width, "expansion_rule": "from_rounded_input",
        "fix_stem": width < 0.75, "scale_head": False, "drop_rate": 0.0,
        # timm: PyTorch's BatchNorm defaults, except TF's eps for the tf_ ports (which also pad like TF).
        "bn_eps": 1e-3 if tf else 1e-5, "bn_momentum": 0.1, "padding": "same" if tf else "symmetric",
    }
    repeats = timm_block_repeats(arch, depth_multiplier)
    if repeats is not None:
        kwargs["block_repeats"] = repeats
        kwargs["final_conv_repeats"] = int(math.ceil(depth_multiplier))  # timm's last stage: one 1x1 conv, scaled
    kwargs.update(layout)
    suffix = f"{round(width * 100):03d}"
    model_name = f"mobilenetv3_{arch}_{suffix}"
    if model_name not in list_models():
        model_name = f"mobilenetv3_{arch}"  # the generic builder (e.g. x1.5): width_mult is in the kwargs
    return PeerVariant("timm", name, model_name, kwargs)


PEER_VARIANTS: dict[tuple[str, str], PeerVariant] = {
    (variant.peer, variant.name): variant
    for variant in (
        _torchvision("mobilenet_v3_large", "large"),
        _torchvision("mobilenet_v3_small", "small"),
        _torchvision_lraspp("lraspp_mobilenet_v3_large", "large"),
        _torchvision_ssdlite("ssdlite320_mobilenet_v3_large", "large"),
        _timm("mobilenetv3_large_075", "large", 0.75),
        _timm("mobilenetv3_large_100", "large", 1.0),
        _timm("mobilenetv3_large_150d", "large", 1.5, depth_multiplier=1.2),
        _timm("mobilenetv3_small_050", "small", 0.5),
        _timm("mobilenetv3_small_075", "small", 0.75),
        _timm("mobilenetv3_small_100", "small", 1.0),
        # Ross Wightman's own first port: SE squeeze widths rounded plainly, the SE's activation is the
        # block's, no residual around the first block, no bias in the head conv, TF's BN eps.
        _timm("mobilenetv3_rw", "large", 1.0, bn_eps=1e-3, head_bias=False, se_round_to_divisor=False,
              se_activation_from_block=True, first_block_residual=False),
        _timm("tf_mobilenetv3_large_075", "large", 0.75, tf=True),
        _timm("tf_mobilenetv3_large_100", "large", 1.0, tf=True),
        _timm("tf_mobilenetv3_large_minimal_100", "large_minimal", 1.0, tf=True),
        _timm("tf_mobilenetv3_small_075", "small", 0.75, tf=True),
        _timm("tf_mobilenetv3_small_100", "small", 1.0, tf=True),
        _timm("tf_mobilenetv3_small_minimal_100", "small_minimal", 1.0, tf=True),
    )
}


def peer_variants(peer: str | None = None, *, head: str | None = "") -> list[PeerVariant]:
    """The peer's variants with this head: "" the classifiers (by default), "lraspp", "ssdlite", or None for all."""
    return [v for v in PEER_VARIANTS.values() if (peer is None or v.peer == peer) and (head is None or v.head == head)]


def _check_peer(peer: str) -> None:
    if peer not in PEERS:
        raise UserError(f"unknown peer {peer!r}; choose from {', '.join(PEERS)}")


def get_variant(peer: str, peer_arch: str) -> tuple[PeerVariant, str | None]:
    """(variant, tag) for "NAME" or "NAME.TAG" (timm's naming; torchvision tags are its Weights names)."""
    _check_peer(peer)
    name, _, tag = peer_arch.partition(".")
    variant = PEER_VARIANTS.get((peer, name))
    if variant is None:
        names = ", ".join(v.name for v in peer_variants(peer, head=None))
        raise UserError(f"unknown {peer} MobileNetV3 {name!r}; choose from {names}")
    if tag and tag not in variant.tags:
        raise UserError(f"{peer} {name} has no weights tag {tag!r}; choose from {', '.join(variant.tags)}")
    return variant, (tag or variant.default_tag)


# --- key maps -------------------------------------------------------------------------------------------

def _block_parts(block: torch.nn.Module) -> list[str]:
    """Our sub-modules of one bneck block that hold tensors, in forward order."""
    parts = ["expand"] if hasattr(block.expand, "conv") else []  # nn.Identity when the block does not expand
    parts.append("depthwise")
    if hasattr(block.se, "fc1"):
        parts.append("se")
    parts.append("project")
    return parts


def _final_convs(model: MobileNetV3) -> list[str]:
    """Our module name(s) of the last 1x1 conv(s): one, or a Sequential of `final_conv_repeats`."""
    if isinstance(model.final_conv, torch.nn.Sequential):
        return [f"final_conv.{index}" for index in range(len(model.final_conv))]
    return ["final_conv"]


def _torchvision_parts(ours: str, parts: list[str], peer: str, start: int = 0) -> Iterator[tuple[str, str]]:
    """One block's parts (`_block_parts`): torchvision numbers them in its `block` Sequential from `start`."""
    for position, part in enumerate(parts, start):
        if part == "se":
            yield f"{ours}.se.fc1", f"{peer}.{position}.fc1"
            yield f"{ours}.se.fc2", f"{peer}.{position}.fc2"
        else:
            yield f"{ours}.{part}.conv", f"{peer}.{position}.0"
            yield f"{ours}.{part}.bn", f"{peer}.{position}.1"


def _torchvision_module_map(model: MobileNetV3) -> Iterator[tuple[str, str]]:
    """(our module, torchvision module) pairs; torchvision numbers everything in `features`."""
    yield "stem.conv", "features.0.0"
    yield "stem.bn", "features.0.1"
    for index, block in enumerate(model.blocks):
        yield from _torchvision_parts(f"blocks.{index}", _block_parts(block), f"features.{index + 1}.block")
    last = len(model.blocks) + 1
    (final_conv,) = _final_convs(model)  # torchvision has exactly one
    yield f"{final_conv}.conv", f"features.{last}.0"
    yield f"{final_conv}.bn", f"features.{last}.1"
    yield "conv_head", "classifier.0"  # a Linear in torchvision: weights are reshaped
    yield "classifier", "classifier.3"


_TIMM_DS = {"depthwise.conv": "conv_dw", "depthwise.bn": "bn1", "project.conv": "conv_pw", "project.bn": "bn2"}
_TIMM_IR = {"expand.conv": "conv_pw", "expand.bn": "bn1", "depthwise.conv": "conv_dw", "depthwise.bn": "bn2",
            "project.conv": "conv_pwl", "project.bn": "bn3"}


def _timm_block_names(model: MobileNetV3) -> list[str]:
    """timm's "blocks.STAGE.INDEX" for each of our blocks (stage sizes follow the repeats)."""
    repeats = model.config.get("block_repeats") or [1] * len(model.spec.blocks)
    names, row = [], 0
    for stage_index, stage in enumerate(_timm_stage_defs(model.config["arch"])):
        count = sum(repeats[row:row + sum(stage)])
        names.extend(f"blocks.{stage_index}.{i}" for i in range(count))
        row += sum(stage)
    return names


def _timm_module_map(model: MobileNetV3) -> Iterator[tuple[str, str]]:
    yield "stem.conv", "conv_stem"
    yield "stem.bn", "bn1"
    names = _timm_block_names(model)
    for index, (block, peer) in enumerate(zip(model.blocks, names)):
        parts = _block_parts(block)
        table = _TIMM_IR if "expand" in parts else _TIMM_DS  # timm: DepthwiseSeparable when not expanding
        for part in parts:
            if part == "se":
                yield f"blocks.{index}.se.fc1", f"{peer}.se.conv_reduce"
                yield f"blocks.{index}.se.fc2", f"{peer}.se.conv_expand"
            else:
                yield f"blocks.{index}.{part}.conv", f"{peer}.{table[part + '.conv']}"
                yield f"blocks.{index}.{part}.bn", f"{peer}.{table[part + '.bn']}"
    last_stage = len(_timm_stage_defs(model.config["arch"]))
    for index, final_conv in enumerate(_final_convs(model)):
        yield f"{final_conv}.conv", f"blocks.{last_stage}.{index}.conv"
        yield f"{final_conv}.bn", f"blocks.{last_stage}.{index}.bn1"
    yield "conv_head", "conv_head"
    yield "classifier", "classifier"


def _torchvision_lraspp_module_map(model: LRASPP) -> Iterator[tuple[str, str]]:
    """torchvision's LRASPP: `backbone.N` is its MobileNetV3's `features.N`; the head has our names."""
    for ours, theirs in _torchvision_module_map(model.backbone):
        if theirs.startswith("features."):
            yield f"backbone.{ours}", f"backbone.{theirs.removeprefix('features.')}"
    for name, module in model.classifier.named_modules():
        if name:
            yield f"classifier.{name}", f"classifier.{name}"


def _torchvision_ssdlite_module_map(model: torch.nn.Module) -> Iterator[tuple[str, str]]:
    """torchvision's SSDLite (`SSDLiteFeatureExtractorMobileNet`): `features.0` is its MobileNetV3's features up
    to the C4 block, then that block's expansion (`block[0]`); `features.1` the rest of that block (`block[1:]`,
    which keeps torchvision's positions 1..), the blocks after it and the last conv.  Ours: `body` and `tail`,
    the same cut.  The extra blocks and the head have our names."""
    body, tail = model.backbone.body, model.backbone.tail
    yield "backbone.body.0.conv", "backbone.features.0.0.0"
    yield "backbone.body.0.bn", "backbone.features.0.0.1"
    c4 = len(body) - 1  # body: stem, the blocks before C4, C4's expansion
    for index in range(1, c4):
        yield from _torchvision_parts(f"backbone.body.{index}", _block_parts(body[index]),
                                      f"backbone.features.0.{index}.block")
    yield f"backbone.body.{c4}.conv", f"backbone.features.0.{c4}.0"
    yield f"backbone.body.{c4}.bn", f"backbone.features.0.{c4}.1"
    after = ["depthwise", *(["se"] if tail[0].has_se else []), "project"]  # C4's block after its expansion
    yield from _torchvision_parts("backbone.tail.0", after, "backbone.features.1.0", start=1)
    last = len(tail) - 1  # tail: C4's remainder, the blocks after it, the last 1x1 conv
    for index in range(1, last):
        yield from _torchvision_parts(f"backbone.tail.{index}", _block_parts(tail[index]),
                                      f"backbone.features.1.{index}.block")
    yield f"backbone.tail.{last}.conv", f"backbone.features.1.{last}.0"
    yield f"backbone.tail.{last}.bn", f"backbone.features.1.{last}.1"
    for prefix in ("backbone.extra", "head"):
        for name, _ in model.get_submodule(prefix).named_modules(prefix=prefix):
            yield name, name


_MODULE_MAPS = {"torchvision": _torchvision_module_map, "timm": _timm_module_map}
#: Peer layouts of the dense heads: (peer, head) -> module map.
_HEAD_MODULE_MAPS = {("torchvision", "lraspp"): _torchvision_lraspp_module_map,
                     ("torchvision", "ssdlite"): _torchvision_ssdlite_module_map}
#: What a head's network is called in messages.
_HEAD_LABELS = {"": "MobileNetV3", "lraspp": "LRASPP", "ssdlite": "SSDLite"}


def _is_ssdlite_config(config: Mapping[str, Any]) -> bool:
    """An `SSDLite` config: the only one with post-processing settings."""
    return "nms_thresh" in config


def _head_of(model_or_config: Any) -> str:
    """An `LRASPP` model's or config's head ("lraspp" or "conv1x1"; the config is the only one with
    `inter_channels`), "ssdlite" for an `SSDLite`'s, else ""."""
    if isinstance(model_or_config, torch.nn.Module):
        if isinstance(model_or_config, LRASPP):
            return model_or_config.config.get("head", "lraspp")
        return "ssdlite" if _is_ssdlite_config(getattr(model_or_config, "config", {})) else ""
    if _is_ssdlite_config(model_or_config):
        return "ssdlite"
    return model_or_config.get("head", "lraspp") if "inter_channels" in model_or_config else ""


def _no_such_network(peer: str, head: str) -> UserError:
    network = "SSDLite detector" if head == "ssdlite" else f"{head} segmentation network"
    return UserError(f"{peer} has no {network} to convert to or from")


def key_map(peer: str, model: torch.nn.Module) -> dict[str, str]:
    """Every state-dict key of `model` (a `MobileNetV3`, `LRASPP` or `SSDLite`) -> the peer's key holding the
    same tensor."""
    _check_peer(peer)
    head = _head_of(model)
    if head and (peer, head) not in _HEAD_MODULE_MAPS:
        raise _no_such_network(peer, head)
    modules = dict(_HEAD_MODULE_MAPS[peer, head](model) if head else _MODULE_MAPS[peer](model))
    out = {}
    for key in model.state_dict():
        module, _, leaf = key.rpartition(".")
        out[key] = f"{modules[module]}.{leaf}"
    return out


def _template(model_kwargs: Mapping[str, Any], heads: Mapping[str, Any], head: str = "") -> torch.nn.Module:
    """Our network on the meta device: names and shapes, no memory.  `heads`: num_classes, in_chans (and
    inter_channels for LR-ASPP), as `_infer_heads` reads them off a state dict."""
    kwargs = {k: v for k, v in model_kwargs.items() if k != "arch"}
    if head == "ssdlite":
        from ..models.heads.ssdlite import SSDLite  # torchvision's detection package: imported on use

        network = SSDLite
    else:
        network = LRASPP if head == "lraspp" else MobileNetV3
    with torch.device("meta"):
        return network(model_kwargs["arch"], **{**kwargs, **heads})


def _pairs(peer: str, template: torch.nn.Module) -> list[tuple[str, str, torch.Size]]:
    """(our key, peer key, our shape) for every tensor, in our state-dict order."""
    shapes = {key: tensor.shape for key, tensor in template.state_dict().items()}
    return [(ours, theirs, shapes[ours]) for ours, theirs in key_map(peer, template).items()]


def _peer_shape(our_key: str, shape: torch.Size, peer: str) -> tuple[int, ...]:
    if peer == "torchvision" and our_key == "conv_head.weight":
        return tuple(shape[:2])  # Linear(960, 1280) in torchvision, a 1x1 conv here
    return tuple(shape)


# --- state-dict hygiene ---------------------------------------------------------------------------------

#: Where training scripts keep the model's weights inside a checkpoint dict (tried in this order).
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module")
_STRIP_PREFIXES = ("module.", "_orig_mod.")


def unwrap_state_dict(obj: Any, *, key: str | None = None, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The plain state dict inside `obj`: unwraps {"state_dict": ...} / {"model": ...} and strips "module.".

    `key` picks a wrapper entry explicitly (e.g. "state_dict_ema" / "model_ema" for EMA weights).
    """
    if not isinstance(obj, Mapping):
        raise UserError(f"{source} holds a {type(obj).__name__}, not a state dict")
    if key is not None:
        if key not in obj:
            raise UserError(f"{source} has no entry {key!r}; it has {', '.join(map(str, obj)) or 'nothing'}")
        obj = obj[key]
    elif not any(isinstance(v, torch.Tensor) for v in obj.values()):
        for candidate in WRAPPER_KEYS:
            if isinstance(obj.get(candidate), Mapping):
                obj = obj[candidate]
                break
        else:
            raise UserError(
                f"{source} is not a state dict and has none of the entries {', '.join(WRAPPER_KEYS)} "
                f"(it has {', '.join(map(str, list(obj)[:8]))}); pick one with --key"
            )
    state_dict = {}
    for name, value in obj.items():
        if name == "n_averaged":  # torch.optim.swa_utils.AveragedModel's counter
            continue
        for prefix in _STRIP_PREFIXES:
            while name.startswith(prefix):
                name = name[len(prefix):]
        if not isinstance(value, torch.Tensor):
            raise UserError(f"entry {name!r} of {source} is a {type(value).__name__}, not a tensor")
        state_dict[name] = value
    return state_dict


_STEMS = {("torchvision", ""): "features.0.0.weight", ("timm", ""): "conv_stem.weight",
          ("torchvision", "lraspp"): "backbone.0.0.weight",
          ("torchvision", "ssdlite"): "backbone.features.0.0.0.weight"}
#: torchvision's SSDLite head: the first level's class logits conv, num_anchors * num_classes outputs
_SSDLITE_LOGITS = "head.classification_head.module_list.0.1.weight"
#: anchors per location of every SSDLite level: `DefaultBoxGenerator([[2, 3]] * 6)`, 2 + 2 * 2 boxes
SSDLITE_ANCHORS = 6


def _peer_name(peer: str, head: str) -> str:
    return next(v.name for v in peer_variants(peer, head=None) if v.head == head)


def _infer_heads(peer: str, state_dict: Mapping[str, torch.Tensor], head: str = "") -> dict[str, int]:
    """num_classes and in_chans (and LR-ASPP's inter_channels) of a peer state dict, read off its shapes."""
    stem = _STEMS.get((peer, head))
    if stem is None:
        raise _no_such_network(peer, head)
    if stem not in state_dict:
        other = next(((p, h) for p, h in _STEMS if (p, h) != (peer, head) and _STEMS[p, h] in state_dict), None)
        hint = ""
        if other:
            hint = f"; it looks like a {other[0]} {_HEAD_LABELS[other[1]] + ' ' if other[1] else ''}state dict"
            hint += f" (use --from {other[0]})" if other[0] != peer else f" (use --arch {_peer_name(*other)})"
        raise UserError(f"missing key {stem!r}: not a {peer} {_HEAD_LABELS[head]} state dict{hint}")
    in_chans = int(state_dict[stem].shape[1])
    if head == "ssdlite":
        if _SSDLITE_LOGITS not in state_dict:
            raise UserError(f"missing key {_SSDLITE_LOGITS!r}: not a {peer} SSDLite state dict")
        outputs = int(state_dict[_SSDLITE_LOGITS].shape[0])
        if outputs % SSDLITE_ANCHORS:
            raise UserError(f"{_SSDLITE_LOGITS!r} has {outputs} outputs: not {SSDLITE_ANCHORS} anchors x num_classes")
        return {"num_classes": outputs // SSDLITE_ANCHORS, "in_chans": in_chans}
    if head == "lraspp":
        low, cbr = "classifier.low_classifier.weight", "classifier.cbr.0.weight"
        if low not in state_dict or cbr not in state_dict:
            raise UserError(f"missing key {low if low not in state_dict else cbr!r}: not a {peer} LR-ASPP state dict")
        return {"num_classes": int(state_dict[low].shape[0]), "in_chans": in_chans,
                "inter_channels": int(state_dict[cbr].shape[0])}
    classifier = {"torchvision": "classifier.3.weight", "timm": "classifier.weight"}[peer]
    num_classes = int(state_dict[classifier].shape[0]) if classifier in state_dict else 0
    return {"num_classes": num_classes, "in_chans": in_chans}


def matching_variants(peer: str, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the peer's variants whose keys and shapes are exactly those of `state_dict`."""
    if not any(_STEMS[p, h] in state_dict for p, h in _STEMS if p == peer):
        _infer_heads(peer, state_dict)  # raises: names the missing stem key and the peer it looks like
    names = []
    for variant in peer_variants(peer, head=None):
        if _STEMS[peer, variant.head] not in state_dict:
            continue
        template = _template(variant.model_kwargs, _infer_heads(peer, state_dict, variant.head), variant.head)
        expected = {peer_key: _peer_shape(our_key, shape, peer) for our_key, peer_key, shape in _pairs(peer, template)}
        if expected == {k: tuple(v.shape) for k, v in state_dict.items()}:
            names.append(variant.name)
    return names


# --- conversion -----------------------------------------------------------------------------------------

@dataclass
class ConvertedWeights:
    """Everything `save_model` needs: how to build the network, its tensors, its preprocessing."""

    model_name: str
    model_kwargs: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    preprocessing: Preprocessing
    source: dict[str, str]
    #: the published tag's class names (e.g. VOC's for torchvision's LR-ASPP), when its class count is kept
    class_names: list[str] | None = None

    def build(self) -> MobileNetV3 | LRASPP:
        """Our model with these weights loaded (strict), in eval mode."""
        model = get_entry(self.model_name).build(**self.model_kwargs)
        load_state_dict_checked(model, self.state_dict, source=f"{self.source['peer']} {self.source['arch']}")
        model.preprocessing = self.preprocessing
        model.class_names = self.class_names
        return model.eval()


def convert_state_dict(peer: str, peer_arch: str, state_dict: Mapping[str, torch.Tensor]) -> ConvertedWeights:
    """A peer's state dict (of the network named `peer_arch`, optionally "NAME.TAG") in our layout.

    Raises `UserError` naming the first peer key that is missing or has another shape than `peer_arch`
    needs, or the first key left over.
    """
    variant, tag = get_variant(peer, peer_arch)
    state_dict = unwrap_state_dict(state_dict, source=f"the {peer} state dict")
    heads = _infer_heads(peer, state_dict, variant.head)
    template = _template(variant.model_kwargs, heads, variant.head)
    converted: dict[str, torch.Tensor] = {}
    pairs = _pairs(peer, template)
    for our_key, peer_key, shape in pairs:
        if peer_key not in state_dict:
            raise UserError(f"missing key {peer_key!r} in the {peer} state dict for {variant.name}"
                            f"{_variant_hint(peer, state_dict, variant.name)}")
        value = state_dict[peer_key]
        if tuple(value.shape) != _peer_shape(our_key, shape, peer):
            raise UserError(
                f"shape mismatch for {peer_key!r}: the state dict has {tuple(value.shape)}, {peer} "
                f"{variant.name} has {_peer_shape(our_key, shape, peer)}"
                f"{_variant_hint(peer, state_dict, variant.name)}"
            )
        converted[our_key] = value.detach().reshape(shape).clone()
    used = {peer_key for _, peer_key, _ in pairs}
    leftover = [key for key in state_dict if key not in used]
    if leftover:
        raise UserError(f"unexpected key {leftover[0]!r} in the {peer} state dict for {variant.name} "
                        f"({len(leftover)} unused in all){_variant_hint(peer, state_dict, variant.name)}")
    kwargs = {k: v for k, v in variant.model_kwargs.items() if k != "arch"}
    kwargs.update(heads)
    preprocessing = variant.tags[tag].preprocessing if tag else Preprocessing()
    preprocessing = preprocessing.for_channels(heads["in_chans"])
    source = {"peer": peer, "arch": variant.name, "tag": tag or ""}
    names = variant.tags[tag].class_names if tag else None
    class_names = list(names) if names and len(names) == heads["num_classes"] else None
    return ConvertedWeights(variant.model_name, kwargs, converted, preprocessing, source, class_names)


def _variant_hint(peer: str, state_dict: Mapping[str, torch.Tensor], wanted: str) -> str:
    try:
        matches = [name for name in matching_variants(peer, state_dict) if name != wanted]
    except UserError:
        return ""
    return f" (the tensors fit {peer} {' / '.join(matches)})" if matches else ""


def _signature(config: Mapping[str, Any], *, strides: bool = True, head: str | None = None) -> tuple:
    """What must agree for two configs to compute the same function from the same tensors (bar BN eps).

    `strides=False` leaves out stem_stride / output_stride: weights still fit a dilated or full-resolution
    copy of the network (e.g. a segmentation backbone), which computes something else on purpose.
    """
    head = _head_of(config) if head is None else head
    full = _full_config(config, head)
    options = _layout(full)
    signature = (head, full["arch"], resolve(NETWORK_SPECS[full["arch"]], options), options.padding,
                 options.head_bias, int(full["final_conv_repeats"]))
    if not strides:
        return signature
    signature += (int(full["stem_stride"]), int(full["output_stride"]), bool(full["dilate_strided_block"]))
    return signature + (_size(full["size"]),) if head == "ssdlite" else signature


def _full_config(config: Mapping[str, Any], head: str) -> dict[str, Any]:
    """`config` with every default it leaves out: `MobileNetV3`'s, under `LRASPP`'s or `SSDLite`'s."""
    classes: tuple[Any, ...] = (MobileNetV3,)
    layout: Mapping[str, Any] = {}
    if head == "ssdlite":
        from ..models.heads.ssdlite import SSDLITE_BACKBONE, SSDLite  # torchvision's detection package: on use

        classes, layout = (MobileNetV3, SSDLite), SSDLITE_BACKBONE  # SSDLite's layout under its own arguments
    elif head:
        classes = (MobileNetV3, LRASPP)
    defaults: dict[str, Any] = {}
    for cls in classes:
        defaults.update({name: p.default for name, p in inspect.signature(cls.__init__).parameters.items()
                         if p.default is not inspect.Parameter.empty})
        if cls is MobileNetV3:
            defaults.update(layout)
    return {**defaults, **config}


def _size(size: int | Sequence[int]) -> tuple[int, int]:
    """An SSDLite's input size, [height, width] in its config or one side as its argument, as (height, width)."""
    return (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))


def _ssdlite_refusal(peer: str, config: Mapping[str, Any], peer_arch: str | None, strides: bool) -> UserError:
    """One line saying why no peer SSDLite computes what our SSDLite of `config` does."""
    if not peer_variants(peer, head="ssdlite"):
        return _no_such_network(peer, "ssdlite")
    variants = [v for v in ([get_variant(peer, peer_arch)[0]] if peer_arch else peer_variants(peer, head="ssdlite"))
                if v.head == "ssdlite"]
    if not variants:
        return UserError(f"{peer} {peer_arch} is not an SSDLite detector; {peer}'s is "
                         f"{', '.join(v.name for v in peer_variants(peer, head='ssdlite'))}")
    arch = str(config.get("arch", "large"))
    same_arch = [v for v in variants if v.arch == arch]
    if not same_arch:
        return UserError(f"{peer} has no SSDLite on MobileNetV3-{arch.replace('_', ' ').title()}: it builds "
                         f"{', '.join(v.name for v in variants)} only")
    variant = same_arch[0]
    ours, theirs = _full_config(config, "ssdlite"), _full_config(variant.model_kwargs, "ssdlite")
    keys = (*LAYOUT_KWARGS, "stem_stride", *(("size",) if strides else ()))
    normal = lambda key, value: _size(value) if key == "size" else value  # noqa: E731
    differences = [f"{key}={ours[key]} (it has {theirs[key]})" for key in keys
                   if normal(key, ours[key]) != normal(key, theirs[key])]
    return UserError(f"{peer}'s {variant.name} cannot build this SSDLite: "
                     f"{', '.join(differences) or 'another layout of the same settings'}")


def peer_variant_for(
    peer: str, config: Mapping[str, Any], peer_arch: str | None = None, *, strides: bool = True,
) -> PeerVariant:
    """The peer variant computing the same function as a model with `config` (or check `peer_arch` does).

    With `strides=False`, a model that differs only in stem_stride / output_stride matches too.
    """
    _check_peer(peer)
    head = _head_of(config)
    ours = _signature(config, strides=strides, head=head)
    candidates = [get_variant(peer, peer_arch)[0]] if peer_arch else peer_variants(peer, head=None)
    for variant in candidates:  # another head never matches (and SSDLite's defaults import torchvision)
        if variant.head == head and _signature(variant.model_kwargs, strides=strides, head=variant.head) == ours:
            return variant
    if head == "ssdlite":
        raise _ssdlite_refusal(peer, config, peer_arch, strides)
    described = ", ".join(f"{k}={config[k]}" for k in ("arch", *LAYOUT_KWARGS, "head") if k in config)
    target = f"{peer} {peer_arch}" if peer_arch else f"any {peer} MobileNetV3"
    raise UserError(f"this model ({described}) has no equivalent in {target}; "
                    f"{peer} defines {', '.join(v.name for v in peer_variants(peer, head=None))}")


def to_peer(
    peer: str, config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor], *, peer_arch: str | None = None,
) -> tuple[str, dict[str, torch.Tensor]]:
    """(peer model name, state dict that the peer's model of that name loads) for one of our models.

    When our BN eps differs from the peer's, running variances are shifted by the difference, so the peer
    computes the same outputs in eval mode.
    """
    variant = peer_variant_for(peer, config, peer_arch)
    num_classes, in_chans = int(config.get("num_classes", 1000)), int(config.get("in_chans", 3))
    if peer == "torchvision" and num_classes == 0:
        raise UserError("torchvision's MobileNetV3 always has a classifier; this model has num_classes=0")
    if variant.head == "ssdlite" and in_chans != 3:
        raise UserError(f"{peer}'s {variant.name} takes 3 input channels; this SSDLite has in_chans={in_chans}")
    heads = {"num_classes": num_classes, "in_chans": in_chans}
    if variant.head == "lraspp":
        heads["inter_channels"] = int(config["inter_channels"])
    template = _template(variant.model_kwargs, heads, variant.head)
    eps_shift = float(config.get("bn_eps", 1e-3)) - float(variant.model_kwargs["bn_eps"])
    out: dict[str, torch.Tensor] = {}
    for our_key, peer_key, shape in _pairs(peer, template):
        if our_key not in state_dict:
            raise UserError(f"missing key {our_key!r} in the model's state dict")
        value = state_dict[our_key].detach()
        if tuple(value.shape) != tuple(shape):
            raise UserError(f"shape mismatch for {our_key!r}: {tuple(value.shape)} vs {tuple(shape)}")
        if our_key.endswith("running_var") and eps_shift:
            value = value + eps_shift
            if (value <= 0).any():
                raise UserError(f"cannot express BN eps {config.get('bn_eps')} as {peer}'s "
                                f"{variant.model_kwargs['bn_eps']}: {our_key} would become non-positive")
        out[peer_key] = value.reshape(_peer_shape(our_key, shape, peer)).clone()
    return variant.name, out


def to_torchvision(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]]:
    """`to_peer("torchvision", ...)`: load the result into `torchvision.models.<name>()`."""
    return to_peer("torchvision", config, state_dict)


def torchvision_ssdlite_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """Arguments of torchvision's `ssdlite320_mobilenet_v3_large` (besides `weights=None, weights_backbone=None`)
    that make its model compute the detections of our SSDLite of `config`: num_classes, and its normalisation and
    post-processing settings where ours are not torchvision's defaults (the builder passes them to `SSD`)."""
    from ..models.heads.ssdlite import SSDLITE_DEFAULTS  # torchvision's detection package: on use

    full = _full_config(config, "ssdlite")
    kwargs: dict[str, Any] = {"num_classes": int(full["num_classes"])}
    settings = {**SSDLITE_DEFAULTS, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    for key, default in settings.items():
        value = full.get(key)
        if value is not None and value != default:
            kwargs[key] = value
    return kwargs
