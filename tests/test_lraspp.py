"""LR-ASPP (the paper's §6.3) on our backbone: every variant builds and answers at the input size, the reduced
tail and the output strides are what the paper and torchvision say, torchvision's `lraspp_mobilenet_v3_large`
converts both ways with equal outputs, and the model round-trips through a weights file."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json

import pytest
import torch

from mobilenetv3 import UserError, create_model, list_models, load_model, save_model
from mobilenetv3 import cpu_routes
from mobilenetv3.cli import main
from mobilenetv3.models.heads import LRASPP
from mobilenetv3.weights.convert import convert_state_dict, matching_variants, to_peer, to_torchvision
from mobilenetv3.weights.published import PUBLISHED, VOC_CLASSES

torchvision = pytest.importorskip("torchvision")

# tests/ is on sys.path; one_thread is test_convert's autouse fixture, used here too
from test_convert import one_thread, randomize  # noqa: E402, F401


def torchvision_lraspp(num_classes: int = 21) -> torch.nn.Module:
    return torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=num_classes)


def calibrated(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights and BN statistics that are neither 0 nor 1 (test_convert.randomize), in float32."""
    return randomize(model, seed=seed).float().eval()


def outputs(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(inputs)["out"]


SEGMENTATION_MODELS = list_models("lraspp_*")


def test_every_width_and_both_generic_builders_are_registered():
    widths = ("035", "050", "075", "100", "125")
    assert set(SEGMENTATION_MODELS) == {f"lraspp_mobilenetv3_{arch}{suffix}" for arch in ("large", "small")
                                        for suffix in ["", *(f"_{w}" for w in widths)]}


@pytest.mark.parametrize("name", SEGMENTATION_MODELS)
def test_every_variant_answers_at_the_input_size(name):
    kwargs = {"width_mult": 0.6} if name.endswith(("large", "small")) else {}
    model = create_model(name, num_classes=5, **kwargs).eval()
    assert model.model_name == name and isinstance(model, LRASPP)
    assert model.config["reduced_tail"] is True and model.config["output_stride"] == 16
    inputs = torch.randn(2, 3, 97, 131)  # odd: neither stride divides it
    with torch.no_grad():
        result = model(inputs)
    assert list(result) == ["out"]
    assert result["out"].shape == (2, 5, 97, 131)
    assert torch.isfinite(result["out"]).all()


def test_options_in_chans_inter_channels_and_errors():
    model = create_model("lraspp_mobilenetv3_small_050", num_classes=3, in_chans=1, inter_channels=32).eval()
    assert model.classifier.cbr[0].out_channels == 32 and model.backbone.stem.conv.in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(1, 1, 40, 56))["out"].shape == (1, 3, 40, 56)
    with pytest.raises(UserError, match="LR-ASPP needs output_stride 16 or 8, got 32"):
        create_model("lraspp_mobilenetv3_small_100", output_stride=32)
    with pytest.raises(UserError, match="num_classes and inter_channels must be >= 1"):
        create_model("lraspp_mobilenetv3_small_100", num_classes=0)


def test_the_plain_1x1_head_for_the_ablation(tmp_path):
    # head="conv1x1": the same backbone, one 1x1 conv from the stride-16 features; kept through save / load, and
    # refused by the torchvision conversion (torchvision has no such network)
    plain = create_model("lraspp_mobilenetv3_small_050", num_classes=3, in_chans=1, head="conv1x1").eval()
    full = create_model("lraspp_mobilenetv3_small_050", num_classes=3, in_chans=1).eval()
    assert [name for name, _ in plain.classifier.named_children()] == ["high_classifier"]
    assert plain.classifier.high_classifier.in_channels == full.classifier.cbr[0].in_channels
    assert {k for k in plain.state_dict() if not k.startswith("classifier.")} == \
        {k for k in full.state_dict() if not k.startswith("classifier.")}
    assert plain.config["head"] == "conv1x1" and "head" not in full.config
    with torch.no_grad():
        assert plain(torch.randn(2, 1, 40, 56))["out"].shape == (2, 3, 40, 56)
    save_model(plain, tmp_path / "plain.safetensors")
    again = load_model(tmp_path / "plain.safetensors").eval()
    inputs = torch.randn(1, 1, 48, 48)
    with torch.no_grad():
        assert torch.equal(again(inputs)["out"], plain(inputs)["out"])
    large = create_model("lraspp_mobilenetv3_large_100", reduced_tail=False, head="conv1x1")  # else torchvision's
    with pytest.raises(UserError, match=r"dilate_strided_block=True, head=conv1x1\) has no equivalent in any "
                                        r"torchvision MobileNetV3"):
        to_peer("torchvision", large.config, large.state_dict())
    with pytest.raises(UserError, match="head must be one of lraspp, conv1x1, got 'aspp'"):
        create_model("lraspp_mobilenetv3_small_100", head="aspp")


def _channels(model) -> list[tuple[int, int, int]]:
    """(expanded, out) per block of the last stage, and the last 1x1 conv's width."""
    blocks = model.backbone.blocks
    return [(b.depthwise.conv.out_channels, b.project.conv.out_channels) for b in blocks], \
        model.backbone.final_conv.conv.out_channels


def test_reduced_tail_halves_the_last_stage():
    # Large, Table 1's last stage: 672 -> 160, 960 -> 160 twice, then the 960 conv.  Halved: 80, 480 -> 80, 480.
    full_blocks, full_last = _channels(create_model("lraspp_mobilenetv3_large_100", reduced_tail=False))
    blocks, last = _channels(create_model("lraspp_mobilenetv3_large_100"))
    assert full_blocks[12:] == [(672, 160), (960, 160), (960, 160)] and full_last == 960
    assert blocks[12:] == [(672, 80), (480, 80), (480, 80)] and last == 480
    assert blocks[:12] == full_blocks[:12]
    # Small, Table 2's last stage: 288 -> 96, 576 -> 96 twice, the 576 conv.  Halved: 48, 288 -> 48, 288.
    blocks, last = _channels(create_model("lraspp_mobilenetv3_small_100"))
    assert blocks[8:] == [(288, 48), (288, 48), (288, 48)] and last == 288


@pytest.mark.parametrize("arch", ["large", "small"])
def test_reduced_tail_matches_torchvision_reduced_tail(arch):
    """torchvision's own `reduced_tail=True, dilated=True` backbone has exactly our tensors' shapes."""
    reference = getattr(torchvision.models, f"mobilenet_v3_{arch}")(weights=None, reduced_tail=True, dilated=True)
    ours = create_model(f"lraspp_mobilenetv3_{arch}_100")
    theirs = [tuple(m.weight.shape) for m in reference.features.modules() if isinstance(m, torch.nn.Conv2d)]
    mine = [tuple(m.weight.shape) for m in ours.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert mine == theirs
    dilations = [m.dilation for m in reference.features.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [m.dilation for m in ours.backbone.modules() if isinstance(m, torch.nn.Conv2d)] == dilations


@pytest.mark.parametrize("output_stride", [16, 8])
def test_output_stride_sets_the_high_level_stride(output_stride):
    model = create_model("lraspp_mobilenetv3_large_075", output_stride=output_stride).eval()
    assert model.feature_info.reduction() == [8, output_stride]
    with torch.no_grad():
        low, high = model.backbone(torch.randn(1, 3, 64, 96))
    assert low.shape[-2:] == (8, 12)
    assert high.shape[-2:] == (64 // output_stride, 96 // output_stride)
    dilated = [b.depthwise.conv.dilation[0] for b in model.backbone.blocks]
    # torchvision's convention: the block whose stride is removed is dilated too
    assert dilated == ([1] * 12 + [2] * 3 if output_stride == 16 else [1] * 6 + [2] * 6 + [4] * 3)


@pytest.mark.parametrize("routes", ["on", "off"])
def test_torchvision_weights_give_torchvision_outputs(routes):
    reference = calibrated(torchvision_lraspp())
    assert matching_variants("torchvision", reference.state_dict()) == ["lraspp_mobilenet_v3_large"]
    converted = convert_state_dict("torchvision", "lraspp_mobilenet_v3_large", reference.state_dict())
    assert converted.model_name == "lraspp_mobilenetv3_large_100"
    assert converted.model_kwargs["reduced_tail"] is False and converted.model_kwargs["num_classes"] == 21
    ours = converted.build()
    exact = copy.deepcopy(reference).double()  # the float64 truth that float32 rounds
    previous = cpu_routes.set_routes(routes == "on")
    try:
        for size in ((224, 224), (160, 288)):
            inputs = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(sum(size)))
            expected, actual = outputs(reference, inputs), outputs(ours, inputs)
            assert 0.1 < expected.abs().max() < 1000
            if routes == "off":  # the same kernels in the same order: bit for bit
                assert torch.equal(actual, expected)
            else:  # channels-last inference sums in another order: float32 rounding, as large as torchvision's own
                truth = outputs(exact, inputs.double())
                theirs, ours_error = (expected - truth).abs().max(), (actual - truth).abs().max()
                assert ours_error <= 2 * theirs + 1e-6 * truth.abs().max(), (ours_error, theirs)
    finally:
        cpu_routes.restore(previous)


def test_our_model_loads_into_torchvision_strictly_with_equal_outputs():
    ours = calibrated(create_model("lraspp_mobilenetv3_large_100", reduced_tail=False, num_classes=7), seed=4)
    name, state_dict = to_torchvision(ours.config, ours.state_dict())
    assert name == "lraspp_mobilenet_v3_large"
    reference = torchvision_lraspp(num_classes=7)
    reference.load_state_dict(state_dict, strict=True)
    inputs = torch.randn(1, 3, 160, 288)
    previous = cpu_routes.set_routes(False)
    try:
        assert torch.equal(outputs(reference, inputs), outputs(ours, inputs))
    finally:
        cpu_routes.restore(previous)
    # and back again: the same tensors
    again = convert_state_dict("torchvision", "lraspp_mobilenet_v3_large", state_dict)
    assert all(torch.equal(again.state_dict[k], v) for k, v in ours.state_dict().items())


def test_models_torchvision_lacks_say_so():
    with pytest.raises(UserError, match="no equivalent in any torchvision MobileNetV3"):
        to_peer("torchvision", create_model("lraspp_mobilenetv3_large_100").config, {})  # reduced tail
    with pytest.raises(UserError, match="no equivalent in any timm MobileNetV3"):
        model = create_model("lraspp_mobilenetv3_large_100")
        to_peer("timm", model.config, model.state_dict())
    classifier = torchvision.models.mobilenet_v3_large(weights=None).state_dict()
    with pytest.raises(UserError, match=r"missing key 'backbone\.0\.0\.weight'.*looks like a torchvision state "
                                        r"dict \(use --arch mobilenet_v3_large\)"):
        convert_state_dict("torchvision", "lraspp_mobilenet_v3_large", classifier)


def test_cli_converts_both_ways(tmp_path, capsys):
    reference = calibrated(torchvision_lraspp())
    torch.save(reference.state_dict(), tmp_path / "tv.pth")
    ours_path, back_path = tmp_path / "ours.safetensors", tmp_path / "back.pth"
    assert main(["convert", "--from", "torchvision", "--arch", "lraspp_mobilenet_v3_large.COCO_WITH_VOC_LABELS_V1",
                 str(tmp_path / "tv.pth"), str(ours_path), "--verify"]) == 0
    assert "verify:" in capsys.readouterr().out
    loaded = load_model(ours_path)
    assert loaded.model_name == "lraspp_mobilenetv3_large_100" and loaded.class_names == list(VOC_CLASSES)
    assert (loaded.preprocessing.input_size, loaded.preprocessing.resize_size) == (520, 520)
    assert main(["convert", "--to", "torchvision", str(ours_path), str(back_path), "--verify"]) == 0
    back = torch.load(back_path, weights_only=True)
    original = reference.state_dict()
    assert list(back) == list(original) and all(torch.equal(back[k], original[k]) for k in original)


def test_save_and_load_round_trip(tmp_path):
    model = calibrated(create_model("lraspp_mobilenetv3_small_075", num_classes=4, in_chans=1, output_stride=8,
                                    inter_channels=64), seed=2)
    path = save_model(model, tmp_path / "seg.safetensors", class_names=["bg", "a", "b", "c"])
    loaded = load_model(path)
    assert isinstance(loaded, LRASPP) and loaded.model_name == "lraspp_mobilenetv3_small_075"
    assert loaded.config == model.config and loaded.class_names == ["bg", "a", "b", "c"]
    inputs = torch.randn(2, 1, 45, 70)
    assert torch.equal(outputs(loaded, inputs), outputs(model, inputs))
    generic = create_model("lraspp_mobilenetv3_small", width_mult=0.6)
    assert load_model(save_model(generic, tmp_path / "generic.safetensors")).config == generic.config


def test_pretrained_coco_voc_weights_download_and_convert(monkeypatch, tmp_path):
    torch.hub.set_dir(str(tmp_path / "hub"))  # test_pretrained's hub_dir fixture: a fresh, private cache
    reference = calibrated(torchvision_lraspp())
    key = ("torchvision", "lraspp_mobilenet_v3_large", "COCO_WITH_VOC_LABELS_V1")
    row = PUBLISHED[key]
    assert row.url == "https://download.pytorch.org/models/lraspp_mobilenet_v3_large-d234d4ea.pth"
    assert row.sha256 == "d234d4ea" and row.class_names == tuple(VOC_CLASSES) and row.num_classes == 21
    assert row.metrics == {"coco_val2017_voc_labels_miou": 57.9, "coco_val2017_voc_labels_pixel_acc": 91.2}
    staging = tmp_path / "staging.pth"
    torch.save(reference.state_dict(), staging)
    digest = hashlib.sha256(staging.read_bytes()).hexdigest()[:8]
    published = tmp_path / f"lraspp_mobilenet_v3_large-{digest}.pth"
    staging.rename(published)
    monkeypatch.setitem(PUBLISHED, key, dataclasses.replace(row, url=published.as_uri(), sha256=digest))
    model = create_model("lraspp_mobilenetv3_large_100", pretrained="torchvision").eval()
    assert model.class_names == list(VOC_CLASSES) and model.config["reduced_tail"] is False
    assert (model.preprocessing.input_size, model.preprocessing.mean) == (520, (0.485, 0.456, 0.406))
    inputs = torch.randn(1, 3, 96, 128)
    previous = cpu_routes.set_routes(False)  # torchvision's kernels: bit for bit
    try:
        assert torch.equal(outputs(model, inputs), outputs(reference, inputs))
    finally:
        cpu_routes.restore(previous)
    # another class count keeps the backbone and the head's gate, with new logit layers
    five = create_model("lraspp_mobilenetv3_large_100", pretrained=True, num_classes=5)
    assert five.classifier.low_classifier.out_channels == 5 and five.class_names is None
    assert torch.equal(five.classifier.cbr[0].weight, reference.classifier.cbr[0].weight)
    assert torch.equal(five.backbone.blocks[14].project.conv.weight, reference.backbone["15"].block[3][0].weight)


def test_profile_takes_height_by_width(capsys):
    assert main(["profile", "--model", "lraspp_mobilenetv3_small_100", "--resolution", "64x128", "64", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["resolution"] for r in rows] == ["64x128", 64]
    params = sum(p.numel() for p in create_model("lraspp_mobilenetv3_small_100").parameters())
    assert all(r["params"] == params and r["paper_macs"] is None for r in rows)
    assert rows[0]["macs"] > 1.9 * rows[1]["macs"]  # twice the pixels (the gate's pooled branch is tiny)
    assert main(["profile", "--model", "lraspp_mobilenetv3_small_100", "--resolution", "64by128"]) != 0
    assert "--resolution takes N or HEIGHTxWIDTH" in capsys.readouterr().err


def test_profile_puts_the_papers_table_7_beside_ours():
    # Cityscapes' 19 classes at 1024x2048: ours has 0.24M / 0.05M more parameters than Table 7, exactly what
    # halving the expansion of the last stage's first block (kept at 672 / 288 by torchvision's reduced tail, and
    # so ours) would remove; Large's MACs at 512x1024 equal Table 8's
    from mobilenetv3.profile import profile_model

    for arch, paper_params, kept, halved in (("large", 1.51, 672, 336), ("small", 0.47, 288, 144)):
        row = profile_model(f"lraspp_mobilenetv3_{arch}_100", (1024, 2048), num_classes=19)
        assert (row.paper_params, row.resolution) == (paper_params, "1024x2048") and row.paper_macs is not None
        model = create_model(f"lraspp_mobilenetv3_{arch}_100", num_classes=19)
        first = model.backbone.blocks[-3]
        assert first.depthwise.conv.out_channels == kept
        se_squeeze = {672: 168, 336: 88, 288: 72, 144: 40}  # make_divisible(expanded / 4, 8)
        inputs, outputs = first.expand.conv.in_channels, first.project.conv.out_channels

        def block_params(expanded: int) -> int:  # expand + BN, depthwise 5x5 + BN, SE (with biases), project + BN
            squeeze = se_squeeze[expanded]
            return (inputs * expanded + 2 * expanded + 25 * expanded + 2 * expanded
                    + 2 * expanded * squeeze + squeeze + expanded + expanded * outputs + 2 * outputs)

        assert block_params(kept) == sum(p.numel() for p in first.parameters())
        assert round((row.params - block_params(kept) + block_params(halved)) / 1e6, 2) == paper_params
    half = profile_model("lraspp_mobilenetv3_large_100", "512x1024", num_classes=19)
    assert half.paper_macs == 2480 and round(half.macs / 1e7) == 248  # 2479.5M
    # another class count or head is not the paper's row
    assert profile_model("lraspp_mobilenetv3_small_100", (1024, 2048)).paper_params is None


def test_list_shows_the_segmentation_models(capsys):
    assert main(["list", "lraspp*"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == SEGMENTATION_MODELS
    assert all("LR-ASPP segmentation" in line for line in lines)
