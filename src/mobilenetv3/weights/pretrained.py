"""Pretrained weights by name: the peers' published files, downloaded through torch.hub's cache.

`create_model(name, pretrained=...)` accepts:

* ``True``: this model's default published weights (torchvision's where it has them, else timm's);
* ``"torchvision"``, ``"timm"`` or ``"tf"`` (timm's ports of the TF reference weights), optionally with a
  weights tag: ``"torchvision.IMAGENET1K_V1"``, ``"timm.miil_in21k_ft_in1k"``;
* a peer's own name, optionally tagged: ``"mobilenetv3_rw"``, ``"tf_mobilenetv3_large_100.in1k"``;
* a path or URL of one of our weights files (``.safetensors``) or training checkpoints.

The published files are the rows of `weights.published`.  They are fetched with
`torch.hub.download_url_to_file` into ``torch.hub.get_dir()/checkpoints`` and checked against the SHA-256
prefix their row carries (torchvision's and timm's file naming), then converted with `weights.convert`.
The model must have the peer's layout: `pretrained_kwargs` gives the constructor kwargs that
`create_model` merges in before building.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.error import URLError
from urllib.parse import urlparse

import torch
from torch import nn

from ..errors import UserError
from ..files import file_sha256, is_url
from ..models.registry import get_entry
from .convert import PEER_VARIANTS, PeerVariant, convert_state_dict, get_variant, peer_variant_for
from .io import LoadedWeights, load_checkpoint, load_state_dict_checked, read_safetensors, read_weights
from .published import PUBLISHED, PublishedWeights

logger = logging.getLogger(__name__)

_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.")  # torch.hub.HASH_REGEX, but at least 8 digits
_SOURCE_ORDER = ("torchvision", "timm", "tf")


@dataclass(frozen=True)
class PretrainedSource:
    """Published weights: which peer network (its layout) and which row of the published weights table."""

    variant: PeerVariant
    weights: PublishedWeights

    @property
    def tag(self) -> str:
        return self.weights.tag

    @property
    def label(self) -> str:
        return self.weights.label


def _kind(variant: PeerVariant) -> str:
    if variant.peer == "torchvision":
        return "torchvision"
    return "tf" if variant.name.startswith("tf_") else "timm"


def _published(variant: PeerVariant, tag: str) -> PretrainedSource | None:
    """The downloadable weights `tag` of `variant`, or None (an unknown tag, or one without a file)."""
    weights = PUBLISHED.get((variant.peer, variant.name, tag))
    return PretrainedSource(variant, weights) if weights is not None and weights.url else None


def _candidates(model_name: str) -> list[PeerVariant]:
    """Peer variants with published weights for this model name, in the order `pretrained=True` tries them."""
    entry = get_entry(model_name)
    arch = entry.arch
    found = [v for v in PEER_VARIANTS.values() if v.head == entry.head and any(_published(v, t) for t in v.tags)]
    exact = [v for v in found if v.model_name == model_name]
    # Same name first (timm's mobilenetv3_large_100 before its mobilenetv3_rw), then by source kind.
    exact.sort(key=lambda v: (_SOURCE_ORDER.index(_kind(v)), v.name != model_name and v.name != f"tf_{model_name}"))
    generic = [v for v in found if v.model_name != model_name and v.arch == arch
               and model_name == f"{entry.head + '_' if entry.head else ''}mobilenetv3_{arch}"]
    return exact + generic


def is_location(pretrained: str) -> bool:
    """Whether `pretrained` names a file (path or URL) rather than published weights."""
    return is_url(pretrained) or os.sep in pretrained or "/" in pretrained or Path(pretrained).suffix in (
        ".safetensors", ".pth", ".pt", ".ckpt", ".bin")


def resolve_source(model_name: str, pretrained: bool | str) -> PretrainedSource:
    """The published weights `pretrained` (True, "torchvision", "timm.TAG", "tf_mobilenetv3_...", ...) selects."""
    candidates = _candidates(model_name)
    if not candidates:
        raise UserError(f"no published weights for {model_name}; pretrained=<path> loads your own weights file")
    choices = sorted({_kind(v) for v in candidates} | {v.name for v in candidates})
    name, tag = ("", "") if pretrained is True else str(pretrained).partition(".")[::2]
    matching = [v for v in candidates if pretrained is True or name in (_kind(v), v.name)]
    if not matching:
        raise UserError(f"no {name!r} weights for {model_name}; choose from {', '.join(choices)} or a path/URL")
    variant = matching[0]
    if tag:
        get_variant(variant.peer, f"{variant.name}.{tag}")  # an unknown tag is an error naming the known ones
    tags = [tag] if tag else list(variant.tags)
    for candidate in tags:
        source = _published(variant, candidate)
        if source is not None:
            return source
    raise UserError(f"{variant.peer} publishes no weights for {variant.name}.{tags[0]}; published: "
                    f"{', '.join(t for t in variant.tags if _published(variant, t)) or 'none'}")


def read_location(pretrained: bool | str) -> LoadedWeights | None:
    """The `LoadedWeights` of a file path or URL given as `pretrained`; None for a tag or True/False.

    `create_model` reads a weights file once and hands the result to both `pretrained_kwargs` and
    `load_pretrained`.
    """
    if isinstance(pretrained, str) and is_location(pretrained):
        return read_weights(fetch(pretrained))
    return None


def pretrained_kwargs(model_name: str, pretrained: bool | str, weights: LoadedWeights | None = None) -> dict[str, Any]:
    """Constructor kwargs the weights need (the peer's layout, BN eps, num_classes), for `create_model`.

    `weights`: `read_location(pretrained)` when the caller already has it.
    """
    if not pretrained:
        return {}
    if isinstance(pretrained, str) and is_location(pretrained):
        weights = weights if weights is not None else read_location(pretrained)
        if get_entry(weights.model_name).arch != get_entry(model_name).arch:
            raise UserError(
                f"{pretrained} holds a {weights.model_name} ({get_entry(weights.model_name).arch}), "
                f"not a {model_name} ({get_entry(model_name).arch})"
            )
        return {k: v for k, v in weights.model_kwargs.items() if k not in ("features_only", "out_indices")}
    source = resolve_source(model_name, pretrained)
    kwargs = {k: v for k, v in source.variant.model_kwargs.items() if k != "arch"}
    kwargs["num_classes"] = source.weights.num_classes
    return kwargs


def fetch(location: str, *, file_name: str | None = None, sha256: str | None = None, progress: bool = True) -> Path:
    """A local path as is, or a URL downloaded once into torch.hub's cache with its hash checked.

    The expected SHA-256 prefix is `sha256` (a published weights row's), else the "-<hex>." in the file name,
    as torch.hub does; a cached file is checked again, so a truncated or tampered cache entry is an error
    instead of a silent bad model.
    """
    if not is_url(location):
        path = Path(location).expanduser()
        if not path.is_file():
            raise UserError(f"pretrained weights file not found: {path}")
        return path
    file_name = file_name or os.path.basename(urlparse(location).path)
    if not file_name:
        raise UserError(f"cannot tell a file name from the URL {location}")
    match = _HASH_IN_NAME.search(file_name)
    hash_prefix = sha256 or (match.group(1) if match else None)
    destination = Path(torch.hub.get_dir()) / "checkpoints" / file_name
    if not destination.is_file():
        destination.parent.mkdir(parents=True, exist_ok=True)
        if hash_prefix is None:
            logger.warning("%s has no published SHA-256: downloading it unverified", location)
        logger.info("downloading %s to %s", location, destination)
        try:
            torch.hub.download_url_to_file(location, str(destination), hash_prefix=hash_prefix, progress=progress)
        except RuntimeError as error:  # torch.hub: 'invalid hash value (expected "...", got "...")'
            raise UserError(f"download of {location} failed its hash check ({error})") from None
        except (URLError, OSError, ValueError) as error:
            raise UserError(f"could not download {location} ({error})") from None
    elif hash_prefix is not None and not file_sha256(destination).startswith(hash_prefix):
        raise UserError(f"cached {destination} does not match its SHA-256 prefix {hash_prefix}; delete it to re-download")
    return destination


#: The stem conv's weight: "stem.conv.weight" ("backbone." in LR-ASPP), or the first of an SSDLite's backbone body.
_STEM_KEYS = ("stem.conv.weight", "backbone.body.0.conv.weight")
#: Where the class-dependent tensors are: the classifier's (LR-ASPP's head is its `classifier`), SSDLite's class head.
_CLASSIFIER_PREFIXES = ("classifier.", "head.classification_head.")


def _read_peer_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return read_safetensors(path)[0]
    return load_checkpoint(path)


def _adapt_stem(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """RGB stem weights for another channel count: summed for 1 channel, else tiled and rescaled (as timm)."""
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_chans // weight.shape[1])
    return weight.repeat(1, repeats, 1, 1)[:, :in_chans] * (weight.shape[1] / in_chans)


def load_pretrained(model: nn.Module, model_name: str, pretrained: bool | str,
                    weights: LoadedWeights | None = None) -> None:
    """Load published (or local) weights into `model`, built with `pretrained_kwargs(model_name, pretrained)`.

    A different `num_classes` keeps the model's freshly initialised classifier; a different `in_chans`
    adapts the stem.  Sets `model.preprocessing` to the weights' preprocessing.  `weights`: as in
    `pretrained_kwargs`.
    """
    if isinstance(pretrained, str) and is_location(pretrained):
        weights = weights if weights is not None else read_location(pretrained)
        state_dict, preprocessing, label = weights.state_dict, weights.preprocessing, str(weights.path)
        source_class_names = weights.class_names
        weights_config = {**weights.model_kwargs, "arch": model.config["arch"]}
    else:
        source = resolve_source(model_name, pretrained)
        path = fetch(source.weights.url, file_name=source.weights.file_name, sha256=source.weights.sha256)
        converted = convert_state_dict(source.variant.peer, f"{source.variant.name}.{source.tag}",
                                       _read_peer_file(path))
        state_dict, preprocessing, label = converted.state_dict, converted.preprocessing, source.label
        source_class_names = source.weights.class_names
        weights_config = {**converted.model_kwargs, "arch": source.variant.arch}
        try:
            peer_variant_for(source.variant.peer, model.config, source.variant.name, strides=False)
        except UserError as error:
            raise UserError(f"{error}; build it with create_model({model_name!r}, pretrained=...) so the "
                            f"layout kwargs of {label} are applied") from None
    own_eps = model.config.get("bn_eps", weights_config.get("bn_eps"))  # LR-ASPP's config: only the kwargs given
    if own_eps is not None and float(weights_config.get("bn_eps", own_eps)) != float(own_eps):
        logger.warning("%s was trained with BN eps %s; this model uses %s", label, weights_config["bn_eps"], own_eps)
    state_dict = dict(state_dict)
    own = model.state_dict()
    stem_key = next(key for key in own if key.endswith(_STEM_KEYS))
    if state_dict[stem_key].shape[1] != own[stem_key].shape[1]:
        logger.info("adapting the %d-channel stem of %s to in_chans=%d", state_dict[stem_key].shape[1], label,
                    own[stem_key].shape[1])
        state_dict[stem_key] = _adapt_stem(state_dict[stem_key], own[stem_key].shape[1])
    classifier_keys = [k for k in own if k.startswith(_CLASSIFIER_PREFIXES)]
    file_classifier = [k for k in state_dict if k.startswith(_CLASSIFIER_PREFIXES)]
    if {k: own[k].shape for k in classifier_keys} != {k: state_dict[k].shape for k in file_classifier}:
        logger.info("%s has another classifier; keeping this model's new one (num_classes=%d)", label,
                    model.num_classes)
        for key in file_classifier:  # LR-ASPP and SSDLite keep their heads' other tensors of the same shape
            if key not in own or own[key].shape != state_dict[key].shape:
                del state_dict[key]
        state_dict.update({k: own[k] for k in classifier_keys if k not in state_dict})
    load_state_dict_checked(model, state_dict, source=label)
    model.preprocessing = preprocessing.for_channels(int(model.config["in_chans"]))
    if source_class_names is not None and len(source_class_names) == model.num_classes:
        model.class_names = list(source_class_names)
    logger.info("loaded pretrained weights %s", label)
