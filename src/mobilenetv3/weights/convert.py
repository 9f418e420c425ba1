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

Neither peer library is imported here: the tables carry their values.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

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
    #: "" for a classifier, "lraspp" for a segmentation network (our `heads.LRASPP`)
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
    """The peer's variants with this head: "" the classifiers (by default), "lraspp", or None for all."""
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


def _torchvision_module_map(model: MobileNetV3) -> Iterator[tuple[str, str]]:
    """(our module, torchvision module) pairs; torchvision numbers everything in `features`."""
    yield "stem.conv", "features.0.0"
    yield "stem.bn", "features.0.1"
    for index, block in enumerate(model.blocks):
        peer = f"features.{index + 1}.block"
        for position, part in enumerate(_block_parts(block)):
            if part == "se":
                yield f"blocks.{index}.se.fc1", f"{peer}.{position}.fc1"
                yield f"blocks.{index}.se.fc2", f"{peer}.{position}.fc2"
            else:
                yield f"blocks.{index}.{part}.conv", f"{peer}.{position}.0"
                yield f"blocks.{index}.{part}.bn", f"{peer}.{position}.1"
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


_MODULE_MAPS = {"torchvision": _torchvision_module_map, "timm": _timm_module_map}
#: Peer layouts of the dense heads: (peer, head) -> module map.
_HEAD_MODULE_MAPS = {("torchvision", "lraspp"): _torchvision_lraspp_module_map}


def _head_of(model_or_config: Any) -> str:
    """An `LRASPP` model's or config's head ("lraspp" or "conv1x1"; the config is the only one with
    `inter_channels`), else ""."""
    if isinstance(model_or_config, torch.nn.Module):
        return model_or_config.config.get("head", "lraspp") if isinstance(model_or_config, LRASPP) else ""
    return model_or_config.get("head", "lraspp") if "inter_channels" in model_or_config else ""


def key_map(peer: str, model: MobileNetV3 | LRASPP) -> dict[str, str]:
    """Every state-dict key of `model` -> the peer's key holding the same tensor."""
    _check_peer(peer)
    head = _head_of(model)
    if head and (peer, head) not in _HEAD_MODULE_MAPS:
        raise UserError(f"{peer} has no {head} segmentation network to convert to or from")
    modules = dict(_HEAD_MODULE_MAPS[peer, head](model) if head else _MODULE_MAPS[peer](model))
    out = {}
    for key in model.state_dict():
        module, _, leaf = key.rpartition(".")
        out[key] = f"{modules[module]}.{leaf}"
    return out


def _template(model_kwargs: Mapping[str, Any], heads: Mapping[str, Any], head: str = "") -> MobileNetV3 | LRASPP:
    """Our network on the meta device: names and shapes, no memory.  `heads`: num_classes, in_chans (and
    inter_channels for LR-ASPP), as `_infer_heads` reads them off a state dict."""
    kwargs = {k: v for k, v in model_kwargs.items() if k != "arch"}
    with torch.device("meta"):
        return (LRASPP if head == "lraspp" else MobileNetV3)(model_kwargs["arch"], **{**kwargs, **heads})


def _pairs(peer: str, template: MobileNetV3) -> list[tuple[str, str, torch.Size]]:
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
          ("torchvision", "lraspp"): "backbone.0.0.weight"}


def _peer_name(peer: str, head: str) -> str:
    return next(v.name for v in peer_variants(peer, head=None) if v.head == head)


def _infer_heads(peer: str, state_dict: Mapping[str, torch.Tensor], head: str = "") -> dict[str, int]:
    """num_classes and in_chans (and LR-ASPP's inter_channels) of a peer state dict, read off its shapes."""
    stem = _STEMS.get((peer, head))
    if stem is None:
        raise UserError(f"{peer} has no {head} segmentation network to convert to or from")
    if stem not in state_dict:
        other = next(((p, h) for p, h in _STEMS if (p, h) != (peer, head) and _STEMS[p, h] in state_dict), None)
        hint = ""
        if other:
            hint = f"; it looks like a {other[0]} {other[1].upper() + ' ' if other[1] else ''}state dict"
            hint += f" (use --from {other[0]})" if other[0] != peer else f" (use --arch {_peer_name(*other)})"
        raise UserError(f"missing key {stem!r}: not a {peer} {head.upper() or 'MobileNetV3'} state dict{hint}")
    in_chans = int(state_dict[stem].shape[1])
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
    defaults = {name: p.default for cls in ((MobileNetV3, LRASPP) if head else (MobileNetV3,))
                for name, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    full = {**defaults, **config}
    options = _layout(full)
    signature = (head, full["arch"], resolve(NETWORK_SPECS[full["arch"]], options), options.padding,
                 options.head_bias, int(full["final_conv_repeats"]))
    return signature + ((int(full["stem_stride"]), int(full["output_stride"]), bool(full["dilate_strided_block"]))
                        if strides else ())


def peer_variant_for(
    peer: str, config: Mapping[str, Any], peer_arch: str | None = None, *, strides: bool = True,
) -> PeerVariant:
    """The peer variant computing the same function as a model with `config` (or check `peer_arch` does).

    With `strides=False`, a model that differs only in stem_stride / output_stride matches too.
    """
    _check_peer(peer)
    ours = _signature(config, strides=strides)
    candidates = [get_variant(peer, peer_arch)[0]] if peer_arch else peer_variants(peer, head=None)
    for variant in candidates:
        if _signature(variant.model_kwargs, strides=strides, head=variant.head) == ours:
            return variant
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
