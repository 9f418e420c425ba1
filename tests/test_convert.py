"""Peer checkpoints: every torchvision / timm MobileNetV3 variant converts to ours with identical outputs
and converts back bit for bit; bad input names the first key that does not fit."""

from __future__ import annotations

import json

import pytest
import torch

from mobilenetv3 import UserError, create_model, load_model
from mobilenetv3.cli import main
from mobilenetv3.weights.convert import (
    convert_state_dict,
    matching_variants,
    peer_variants,
    to_peer,
    to_torchvision,
    unwrap_state_dict,
)
from mobilenetv3.weights.io import read_safetensors

timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny inputs: one intra-op thread is fastest, and it keeps a shared CI machine responsive."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# Odd sizes: TF 'SAME' padding is asymmetric there, so a wrong padding rule changes the outputs.
INPUT_SHAPE = (2, 3, 37, 29)


def peer_model(peer: str, name: str, **kwargs) -> torch.nn.Module:
    if peer == "torchvision":
        return torchvision.models.get_model(name, weights=None, **kwargs)
    return timm.create_model(name, pretrained=False, **kwargs)


def randomize(model: torch.nn.Module, seed: int = 0, calibration_size: int = 64) -> torch.nn.Module:
    """Random weights; BN running statistics measured on random data, then perturbed (nothing is 0 or 1).

    Returns the model in float64 and eval mode, so comparisons are free of float32 rounding.
    """
    generator = torch.Generator().manual_seed(seed)

    def noise(tensor: torch.Tensor) -> torch.Tensor:
        return torch.randn(tensor.shape, generator=generator)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.copy_(noise(module.weight).abs() * 0.5 + 0.5)
                module.bias.copy_(noise(module.bias) * 0.2)
                module.momentum = None  # running stats := the calibration batch's
                module.reset_running_stats()
            elif isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                module.weight.copy_(noise(module.weight) * (2.0 / module.weight[0].numel()) ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(noise(module.bias) * 0.1)
        # 64x64 leaves 2x2 maps at the deepest layers: enough values per channel for a sane variance.
        in_chans = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).in_channels
        model.train()(torch.randn(4, in_chans, calibration_size, calibration_size, generator=generator))
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.clamp_(min=1e-2).mul_(noise(module.running_var).abs() * 0.2 + 0.9)
                module.running_mean.add_(noise(module.running_mean) * 0.1 * module.running_var.sqrt())
    return model.double().eval()


def build_double(converted) -> torch.nn.Module:
    """Our model in float64 holding the converted (float64) tensors unrounded."""
    model = create_model(converted.model_name, **converted.model_kwargs).double()
    model.load_state_dict(converted.state_dict, strict=True)
    return model.eval()


def max_difference(first: torch.nn.Module, second: torch.nn.Module, seed: int = 1) -> float:
    inputs = torch.randn(*INPUT_SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.double)
    with torch.no_grad():
        a, b = first.eval()(inputs), second.eval()(inputs)
    assert a.shape == b.shape
    assert 0.1 < a.abs().max() < 100  # a meaningful comparison: neither all zeros nor blown up
    return (a - b).abs().max().item()


ALL_VARIANTS = [(v.peer, v.name) for v in peer_variants()]


def test_every_published_variant_is_covered():
    published = {("torchvision", n) for n in ("mobilenet_v3_large", "mobilenet_v3_small")}
    published |= {("timm", name.partition(".")[0]) for name in timm.list_models("*mobilenetv3*")}
    assert published == set(ALL_VARIANTS)


@pytest.mark.parametrize("peer,name", ALL_VARIANTS, ids=[name for _, name in ALL_VARIANTS])
def test_peer_equivalence_and_round_trip(peer, name):
    reference = randomize(peer_model(peer, name))
    original = reference.state_dict()
    converted = convert_state_dict(peer, name, original)
    ours = build_double(converted)
    assert max_difference(reference, ours) <= 1e-4
    # ... and back: the peer gets exactly its own tensors.
    back_name, back = to_peer(peer, ours.config, ours.state_dict())
    assert back_name == name
    assert list(back) == list(original)
    assert all(torch.equal(back[k], original[k]) for k in original)


def test_depth_multiplier_matches_timm_block_count():
    converted = convert_state_dict("timm", "mobilenetv3_large_150d", timm.create_model("mobilenetv3_large_150d").state_dict())
    ours = converted.build()
    reference = timm.create_model("mobilenetv3_large_150d")
    # depth 1.2 per timm stage: 1+2+3+4+2+3 rows become 2+3+4+5+3+4 blocks, and two final 1x1 convs
    assert len(ours.blocks) == sum(len(stage) for stage in reference.blocks[:-1]) == 21
    assert len(ours.final_conv) == len(reference.blocks[-1]) == 2
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())


def test_paper_layout_exports_to_both_peers():
    """Our default large_100 (BN eps 1e-3) equals torchvision's net, and timm's after the eps shift."""
    ours = randomize(create_model("mobilenetv3_large_100"), seed=3)
    name, state_dict = to_torchvision(ours.config, ours.state_dict())
    reference = peer_model("torchvision", name).double()
    reference.load_state_dict(state_dict)
    assert max_difference(reference, ours) <= 1e-4
    name, state_dict = to_peer("timm", ours.config, ours.state_dict())
    assert name == "mobilenetv3_large_100"
    reference = peer_model("timm", name).double()
    reference.load_state_dict(state_dict)
    assert max_difference(reference, ours) <= 1e-4


def test_classifier_width_and_input_channels_come_from_the_tensors():
    reference = randomize(timm.create_model("mobilenetv3_small_050", num_classes=7))
    converted = convert_state_dict("timm", "mobilenetv3_small_050", reference.state_dict())
    assert converted.model_kwargs["num_classes"] == 7
    assert max_difference(reference, build_double(converted)) <= 1e-4
    headless = convert_state_dict("timm", "mobilenetv3_small_050",
                                  timm.create_model("mobilenetv3_small_050", num_classes=0).state_dict())
    assert headless.model_kwargs["num_classes"] == 0


def test_tag_selects_preprocessing():
    state_dict = peer_model("torchvision", "mobilenet_v3_large").state_dict()
    v2 = convert_state_dict("torchvision", "mobilenet_v3_large", state_dict).preprocessing
    v1 = convert_state_dict("torchvision", "mobilenet_v3_large.IMAGENET1K_V1", state_dict).preprocessing
    assert (v2.resize_size, v2.input_size, v2.interpolation) == (232, 224, "bilinear")
    assert (v1.resize_size, v1.input_size) == (256, 224)
    tf = convert_state_dict("timm", "tf_mobilenetv3_small_100", timm.create_model("tf_mobilenetv3_small_100").state_dict())
    assert tf.preprocessing.mean == (0.5, 0.5, 0.5) and tf.model_kwargs["padding"] == "same"
    with pytest.raises(UserError, match="no weights tag 'IMAGENET1K_V9'.*IMAGENET1K_V2, IMAGENET1K_V1"):
        convert_state_dict("torchvision", "mobilenet_v3_large.IMAGENET1K_V9", state_dict)


def test_wrong_shape_names_the_first_mismatching_key():
    state_dict = peer_model("torchvision", "mobilenet_v3_large").state_dict()
    state_dict["features.4.block.1.0.weight"] = torch.zeros(72, 1, 3, 3)  # a 5x5 depthwise in the model
    state_dict["features.9.block.0.0.weight"] = torch.zeros(1, 1, 1, 1)
    with pytest.raises(UserError, match=r"shape mismatch for 'features\.4\.block\.1\.0\.weight': the state dict "
                                        r"has \(72, 1, 3, 3\), torchvision mobilenet_v3_large has \(72, 1, 5, 5\)"):
        convert_state_dict("torchvision", "mobilenet_v3_large", state_dict)


def test_wrong_variant_says_which_one_fits():
    state_dict = timm.create_model("mobilenetv3_rw").state_dict()
    with pytest.raises(UserError, match=r"shape mismatch for 'blocks\.2\.0\.se\.conv_reduce\.weight'.*"
                                        r"fit timm mobilenetv3_rw"):
        convert_state_dict("timm", "mobilenetv3_large_100", state_dict)
    with pytest.raises(UserError, match="looks like a timm state dict"):
        convert_state_dict("torchvision", "mobilenet_v3_large", state_dict)
    small = peer_model("torchvision", "mobilenet_v3_small").state_dict()
    with pytest.raises(UserError, match=r"missing key 'features\.1\.block\.1\.0\.weight'.*fit torchvision "
                                        r"mobilenet_v3_small"):
        convert_state_dict("torchvision", "mobilenet_v3_large", small)
    extra = dict(small, **{"features.99.weight": torch.zeros(1)})
    with pytest.raises(UserError, match=r"unexpected key 'features\.99\.weight'"):
        convert_state_dict("torchvision", "mobilenet_v3_small", extra)
    # Same shapes, different padding / BN eps: only --arch can tell tf_ ports from timm's own.
    assert matching_variants("timm", timm.create_model("tf_mobilenetv3_large_100").state_dict()) == [
        "mobilenetv3_large_100", "tf_mobilenetv3_large_100"]


def test_unknown_names_list_the_known_ones():
    with pytest.raises(UserError, match="unknown timm MobileNetV3 'mobilenetv3_huge'; choose from .*mobilenetv3_rw"):
        convert_state_dict("timm", "mobilenetv3_huge", {})
    with pytest.raises(UserError, match="unknown peer 'keras'"):
        convert_state_dict("keras", "x", {})


def test_model_without_peer_equivalent_is_refused():
    model = create_model("mobilenetv3_small_075")  # paper rounding at x0.75: torchvision has no such net
    with pytest.raises(UserError, match="no equivalent in any torchvision MobileNetV3"):
        to_torchvision(model.config, model.state_dict())


def test_unwrap_checkpoint_wrappers_and_prefixes():
    tensor = torch.ones(1)
    assert unwrap_state_dict({"state_dict": {"module.a": tensor}, "epoch": 1}) == {"a": tensor}
    assert unwrap_state_dict({"model": {"module._orig_mod.a": tensor}, "optimizer": {}}) == {"a": tensor}
    assert unwrap_state_dict({"model_ema": {"module.a": tensor, "n_averaged": tensor}}, key="model_ema") == {"a": tensor}
    with pytest.raises(UserError, match="none of the entries state_dict, model.*it has epoch, opt"):
        unwrap_state_dict({"epoch": 1, "opt": {}})
    with pytest.raises(UserError, match="entry 'a' .* is a str, not a tensor"):
        unwrap_state_dict({"a": "x", "b": tensor})


def test_cli_round_trip_torchvision(tmp_path, capsys):
    reference = randomize(peer_model("torchvision", "mobilenet_v3_small")).float()
    wrapped = {"model": {f"module.{k}": v for k, v in reference.state_dict().items()}, "epoch": 9}
    torch.save(wrapped, tmp_path / "peer.pth")
    ours_path = tmp_path / "ours.safetensors"
    assert main(["convert", "--from", "torchvision", "--arch", "mobilenet_v3_small.IMAGENET1K_V1",
                 str(tmp_path / "peer.pth"), str(ours_path), "--verify"]) == 0
    assert "verify: max |peer - ours|" in capsys.readouterr().out
    _, metadata = read_safetensors(ours_path)
    preprocessing = json.loads(metadata["preprocessing"])
    assert (preprocessing["resize_size"], preprocessing["input_size"], preprocessing["interpolation"]) == (
        256, 224, "bilinear")
    assert json.loads(metadata["extra"])["converted_from"]["arch"] == "mobilenet_v3_small"
    ours = load_model(ours_path)
    assert max_difference(reference.double(), ours.double()) <= 1e-4

    assert main(["convert", "--to", "torchvision", str(ours_path), str(tmp_path / "back.pth")]) == 0
    back = peer_model("torchvision", "mobilenet_v3_small")
    back.load_state_dict(torch.load(tmp_path / "back.pth", weights_only=True))
    assert all(torch.equal(back.state_dict()[k], reference.float().state_dict()[k]) for k in back.state_dict())


def test_cli_safetensors_output_and_failed_verify_writes_nothing(tmp_path, capsys):
    from safetensors.torch import load_file

    reference = randomize(peer_model("torchvision", "mobilenet_v3_small")).float()
    torch.save(reference.state_dict(), tmp_path / "peer.pth")
    ours_path = tmp_path / "ours.safetensors"
    argv = ["convert", "--from", "torchvision", "--arch", "mobilenet_v3_small", str(tmp_path / "peer.pth")]
    assert main([*argv, str(ours_path), "--verify", "--tolerance", "-1"]) == 1  # a check that cannot pass
    assert "nothing was written" in capsys.readouterr().out and not ours_path.exists()
    assert main([*argv, str(ours_path)]) == 0

    back = tmp_path / "back.safetensors"
    assert main(["convert", "--to", "torchvision", str(ours_path), str(back), "--verify", "--tolerance", "-1"]) == 1
    assert not back.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ours.safetensors", "peer.pth"]
    assert main(["convert", "--to", "torchvision", str(ours_path), str(back), "--verify"]) == 0
    tensors = load_file(back)  # a real safetensors file, not a pickle
    assert all(torch.equal(tensors[k], v) for k, v in reference.state_dict().items())


def test_cli_errors_are_one_line(tmp_path, capsys):
    torch.save(timm.create_model("tf_mobilenetv3_small_100").state_dict(), tmp_path / "tf.pth")
    assert main(["convert", "--from", "timm", str(tmp_path / "tf.pth"), str(tmp_path / "o.safetensors")]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error
    assert error.endswith("(they fit mobilenetv3_small_100 / tf_mobilenetv3_small_100); pass --arch")
    assert main(["convert", "--from", "timm", "--arch", "tf_mobilenetv3_small_100", str(tmp_path / "tf.pth"),
                 str(tmp_path / "o.pth")]) == 2
    assert "must be a .safetensors file" in capsys.readouterr().err
    assert main(["convert", "--from", "timm", "--arch", "tf_mobilenetv3_small_100", str(tmp_path / "tf.pth"),
                 str(tmp_path / "o.safetensors")]) == 0
    assert load_model(tmp_path / "o.safetensors").config["padding"] == "same"
