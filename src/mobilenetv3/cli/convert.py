"""Convert a torchvision / timm MobileNetV3 state dict to our weights file, or ours back to theirs.

  mobilenetv3 convert --from torchvision --arch mobilenet_v3_large IN.pth OUT.safetensors
  mobilenetv3 convert --from timm --arch tf_mobilenetv3_large_100 IN.pth OUT.safetensors --verify
  mobilenetv3 convert --to torchvision OURS.safetensors OUT.pth
  mobilenetv3 convert --from torchvision --arch lraspp_mobilenet_v3_large IN.pth OUT.safetensors
  mobilenetv3 convert --from torchvision --arch ssdlite320_mobilenet_v3_large IN.pth OUT.safetensors

LR-ASPP segmentation networks convert too (torchvision's lraspp_mobilenet_v3_large <-> our
lraspp_mobilenetv3_large_100 with reduced_tail=False); their class names (VOC's for the COCO_WITH_VOC_LABELS_V1
tag) are written into the file.  So do SSDLite detectors (torchvision's ssdlite320_mobilenet_v3_large <->
our ssdlite320_mobilenetv3_large_100, reduced tail; COCO's 91 category names for its COCO_V1 tag); torchvision
has no SSDLite on MobileNetV3-Small, nor on other widths or input sizes, and takes 3 input channels only.

--arch is the peer's own model name, optionally with its weights tag (timm style, e.g.
mobilenetv3_large_100.miil_in21k_ft_in1k or mobilenet_v3_large.IMAGENET1K_V1): the tag selects the
preprocessing written into the file.  Without --arch the variant is recognised from the tensor shapes
when that is unambiguous.  IN may be a plain state dict, a training checkpoint wrapping one
({"state_dict": ...}, {"model": ...}; pick another entry with --key) with or without "module." prefixes,
or a .safetensors file.  Checkpoints are read with torch.load(weights_only=True).

--verify builds the peer's own model (needs the peer library installed) and prints the largest output
difference on a random batch in eval mode (a detector's: its raw head outputs, box regressions and class
logits, on the backbone's maps); it fails above --tolerance, and then nothing is written.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import UserError

HELP = "convert torchvision / timm MobileNetV3 (and LR-ASPP, SSDLite) weights to ours, and back"

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # weights.convert imports torch: loaded when convert's parser is built, not by importing this module
    from ..weights.convert import PEERS

    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="from_peer", choices=PEERS, help="convert a peer's state dict to ours")
    direction.add_argument("--to", dest="to_peer", choices=PEERS, help="convert our weights file to a peer's state dict")
    parser.add_argument("--arch", metavar="PEER_NAME[.TAG]",
                        help="the peer's model name (default: recognised from the tensors / the model's layout)")
    parser.add_argument("--key", metavar="ENTRY", help="checkpoint entry holding the state dict (e.g. state_dict_ema)")
    parser.add_argument("--ema", action="store_true", help="--to: take the EMA weights of a training checkpoint")
    parser.add_argument("--verify", action="store_true", help="compare outputs with the peer's own model")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="--verify: largest allowed |difference| per unit of the largest output (min 1)")
    parser.add_argument("input", type=Path, help="--from: the peer's .pth/.safetensors; --to: our weights file or checkpoint")
    parser.add_argument("output", type=Path, help="--from: OUT.safetensors; --to: OUT.pth or OUT.safetensors")


def run(args: argparse.Namespace) -> int:
    if args.from_peer:
        return _from_peer(args)
    return _to_peer(args)


def _read_peer_input(path: Path, key: str | None) -> dict:
    from ..weights.convert import unwrap_state_dict  # torch on use only (see add_arguments)
    from ..weights.io import load_checkpoint, read_safetensors

    raw = read_safetensors(path)[0] if path.suffix == ".safetensors" else load_checkpoint(path)
    return unwrap_state_dict(raw, key=key, source=str(path))


def _from_peer(args: argparse.Namespace) -> int:
    from ..weights.convert import convert_state_dict, matching_variants  # torch on use only (see add_arguments)
    from ..weights.io import save_model

    if args.output.suffix != ".safetensors":
        raise UserError(f"the output must be a .safetensors file, got {args.output}")
    state_dict = _read_peer_input(args.input, args.key)
    arch = args.arch
    if arch is None:
        fits = matching_variants(args.from_peer, state_dict)
        if len(fits) != 1:
            found = f"they fit {' / '.join(fits)}" if fits else "they fit none of its MobileNetV3s"
            raise UserError(f"cannot tell which {args.from_peer} model {args.input} is from its tensors ({found}); "
                            "pass --arch")
        arch = fits[0]
        logger.info("recognised %s %s from the tensor shapes", args.from_peer, arch)
    converted = convert_state_dict(args.from_peer, arch, state_dict)
    model = converted.build()
    prep = converted.preprocessing
    if args.verify:  # before writing: a failed check leaves no output file
        peer_model = _peer_model(args.from_peer, converted.source["arch"], model.num_classes,
                                 model.config["in_chans"])
        peer_model.load_state_dict(state_dict)
        if _report_difference(peer_model, model, prep.input_size, args.tolerance) != 0:
            print(f"nothing was written to {args.output}")
            return 1
    save_model(model, args.output, preprocessing=converted.preprocessing, class_names=converted.class_names,
               extra={"converted_from": converted.source})
    print(f"wrote {args.output}: {converted.model_name} from {args.from_peer} {converted.source['arch']}"
          f"{'.' + converted.source['tag'] if converted.source['tag'] else ''} "
          f"(num_classes={model.num_classes}; {_eval_preprocessing(model, prep)})")
    return 0


def _to_peer(args: argparse.Namespace) -> int:
    import torch  # torch on use only (see add_arguments)

    from ..weights.convert import to_peer
    from ..weights.io import SAFETENSORS_SUFFIXES, atomic_write, build_model, read_weights

    weights = read_weights(args.input, ema=args.ema)
    model = build_model(weights).eval()  # validates the file (strict load) before anything is written
    peer_arch, state_dict = to_peer(args.to_peer, model.config, model.state_dict(),
                                    peer_arch=args.arch.partition(".")[0] if args.arch else None)
    prep = weights.preprocessing
    if args.verify:  # before writing: a failed check leaves no output file
        peer_model = _peer_model(args.to_peer, peer_arch, model.num_classes, model.config["in_chans"])
        peer_model.load_state_dict(state_dict)
        if _report_difference(peer_model, model, prep.input_size, args.tolerance) != 0:
            print(f"nothing was written to {args.output}")
            return 1
    args.output.parent.mkdir(parents=True, exist_ok=True)
    if args.output.suffix in SAFETENSORS_SUFFIXES:  # a real safetensors file, not a pickle under that name
        from safetensors.torch import save_file  # imports torch: on use only

        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}
        atomic_write(args.output, lambda tmp: save_file(tensors, tmp))
    else:
        atomic_write(args.output, lambda tmp: torch.save(state_dict, tmp))
    loader = (f"torchvision.models.{peer_arch}()" if args.to_peer == "torchvision"
              else f"timm.create_model({peer_arch!r})")
    if peer_arch.startswith("lraspp_"):
        loader = f"torchvision.models.segmentation.{peer_arch}(weights=None, weights_backbone=None)"
    if peer_arch.startswith("ssdlite"):
        from ..weights.convert import torchvision_ssdlite_kwargs

        kwargs = "".join(f", {k}={v!r}" for k, v in torchvision_ssdlite_kwargs(model.config).items())
        loader = f"torchvision.models.detection.{peer_arch}(weights=None, weights_backbone=None{kwargs})"
    print(f"wrote {args.output}: a {args.to_peer} {peer_arch} state dict (num_classes={model.num_classes}); "
          f"load it into {loader}; {_eval_preprocessing(model, prep)}")
    return 0


def _eval_preprocessing(model, prep) -> str:
    if _is_detector(model):  # the model resizes and normalises itself (torchvision's GeneralizedRCNNTransform)
        height, width = model.config["size"]
        return (f"eval: images in [0, 1], resized to {height}x{width} and normalised with mean "
                f"{model.config['image_mean']}, std {model.config['image_std']} inside the model")
    return (f"eval preprocessing: resize {prep.resize_size} {prep.interpolation}, crop {prep.input_size}, "
            f"mean {list(prep.mean)}, std {list(prep.std)}")


def _is_detector(model) -> bool:
    """A torchvision detection model (our SSDLite or torchvision's): `head` and `anchor_generator`."""
    return hasattr(model, "anchor_generator") and hasattr(model, "head")


def _peer_model(peer: str, name: str, num_classes: int, in_chans: int):
    """The peer library's own model (the reference for --verify), built without weights."""
    try:
        if peer == "torchvision":
            import torchvision  # the peer library, optional: --verify only (ImportError -> UserError below)

            if in_chans != 3:
                raise UserError("--verify: torchvision's MobileNetV3 takes 3 input channels only")
            if name.startswith(("lraspp_", "ssdlite")):  # no backbone download: the converted tensors replace it
                return torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=num_classes)
            return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        import timm  # the peer library, optional: --verify only

        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    except ImportError:
        raise UserError(f"--verify needs {peer} installed (pip install {peer})") from None


def _report_difference(peer_model, model, input_size: int, tolerance: float) -> int:
    import torch  # torch on use only (see add_arguments)

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(2, model.config["in_chans"], input_size, input_size, generator=generator)
    with torch.no_grad():
        if _is_detector(model):  # the raw head outputs on the backbone's maps: boxes and logits per anchor
            expected, actual = (torch.cat(list(m.eval().head(list(m.backbone(inputs).values())).values()), dim=-1)
                                for m in (peer_model, model))
        else:
            expected, actual = peer_model.eval()(inputs), model.eval()(inputs)
    if isinstance(expected, dict):  # segmentation networks: {"out": logits}
        expected, actual = expected["out"], actual["out"]
    difference, largest = (expected - actual).abs().max().item(), expected.abs().max().item()
    # float32 rounding grows with the outputs' magnitude: the tolerance is absolute up to |output| 1.
    allowed = tolerance * max(1.0, largest)
    verdict = "ok" if difference <= allowed else "FAILED"
    print(f"verify: max |peer - ours| = {difference:.3g} on a 2x{inputs.shape[1]}x{input_size}x{input_size} "
          f"random batch (outputs up to {largest:.3g}; allowed {allowed:.3g}): {verdict}")
    return 0 if difference <= allowed else 1
