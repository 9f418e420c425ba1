"""SSDLite detection (the paper's §6.2) on our backbone, against torchvision's `ssdlite320_mobilenet_v3_large`."""

from __future__ import annotations

import dataclasses
import hashlib
import re

import pytest
import torch

from mobilenetv3 import UserError, create_model, load_model, save_model
from mobilenetv3 import cpu_routes
from mobilenetv3.cli import main
from mobilenetv3.weights.convert import (
    convert_state_dict,
    matching_variants,
    to_peer,
    to_torchvision,
    torchvision_ssdlite_kwargs,
)
from mobilenetv3.weights.published import COCO_CATEGORIES, PUBLISHED

torchvision = pytest.importorskip("torchvision")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small inputs: one intra-op thread, which keeps a shared CI machine responsive."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- conversion ---
# torchvision's state dicts -> ours and back (`weights.convert`, `mobilenetv3 convert`), the COCO_V1 row of the
# published weights table and `create_model(..., pretrained="torchvision")`.

TV_NAME = "ssdlite320_mobilenet_v3_large"


def torchvision_ssdlite(num_classes: int = 91, **kwargs) -> torch.nn.Module:
    """torchvision's builder as its COCO weights were trained: no backbone weights, hence the reduced tail."""
    return torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=num_classes, **kwargs)


def calibrated(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights (not torchvision's N(0, 0.03) initialisation) and BN statistics measured on a random batch,
    then perturbed: nothing is 0 or 1, so a tensor in the wrong place changes the outputs.  Eval mode."""
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
            elif isinstance(module, torch.nn.Conv2d):
                module.weight.copy_(noise(module.weight) * (2.0 / module.weight[0].numel()) ** 0.5)
                if module.bias is not None:
                    module.bias.copy_(noise(module.bias) * 0.1)
        model.train()
        model.head(list(model.backbone(torch.randn(2, 3, 320, 320, generator=generator)).values()))
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.clamp_(min=1e-2).mul_(noise(module.running_var).abs() * 0.2 + 0.9)
                module.running_mean.add_(noise(module.running_mean) * 0.1 * module.running_var.sqrt())
    return model.eval()


def raw_outputs(model: torch.nn.Module, inputs: torch.Tensor) -> dict[str, torch.Tensor]:
    """The head's outputs on the backbone's maps: {"bbox_regression", "cls_logits"} per anchor."""
    with torch.no_grad():
        return model.eval().head(list(model.backbone(inputs).values()))


def detections(model: torch.nn.Module, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    with torch.no_grad():
        return model.eval()(images)


def images(seed: int) -> list[torch.Tensor]:
    """Two images in [0, 1] of different sizes (the model resizes both to 320x320 and maps boxes back)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(3, 320, 320, generator=generator), torch.rand(3, 240, 400, generator=generator)]


@pytest.fixture
def plain_kernels():
    """Our CPU routes off: the same kernels in the same order as torchvision, so outputs agree bit for bit."""
    previous = cpu_routes.set_routes(False)
    yield
    cpu_routes.restore(previous)


def assert_same_function(reference: torch.nn.Module, ours: torch.nn.Module, seed: int = 0) -> None:
    """Equal raw head outputs on a random batch, and equal detections (same thresholds) on two images."""
    inputs = torch.randn(2, 3, 320, 320, generator=torch.Generator().manual_seed(seed))
    expected, actual = raw_outputs(reference, inputs), raw_outputs(ours, inputs)
    assert list(actual) == list(expected) == ["bbox_regression", "cls_logits"]
    for key in expected:
        assert 0.5 < expected[key].abs().max() < 1000, key  # a meaningful comparison
        assert torch.equal(actual[key], expected[key]), key
    theirs, mine = detections(reference, images(seed)), detections(ours, images(seed))
    assert len(mine) == len(theirs) == 2
    for one, other in zip(theirs, mine):
        assert list(other) == list(one) == ["boxes", "scores", "labels"]
        assert len(one["boxes"]) > 0  # random weights still score above torchvision's 0.001 threshold
        assert all(torch.equal(other[key], one[key]) for key in one)


def test_parameters_and_state_dict_entries_equal_torchvision():
    ours, reference = create_model("ssdlite320_mobilenetv3_large_100"), torchvision_ssdlite()
    count = lambda model: sum(p.numel() for p in model.parameters())  # noqa: E731
    assert count(ours) == count(reference) == 3_440_060
    assert len(ours.state_dict()) == len(reference.state_dict()) == 476
    # and key for key, the shapes the conversion pairs up
    converted = convert_state_dict("torchvision", TV_NAME, reference.state_dict())
    assert {k: v.shape for k, v in converted.state_dict.items()} == {k: v.shape for k, v in ours.state_dict().items()}


@pytest.mark.parametrize("routes", ["on", "off"])
def test_torchvision_weights_give_torchvision_outputs(routes):
    reference = calibrated(torchvision_ssdlite())
    assert matching_variants("torchvision", reference.state_dict()) == [TV_NAME]
    converted = convert_state_dict("torchvision", TV_NAME, reference.state_dict())
    assert converted.model_name == "ssdlite320_mobilenetv3_large_100"
    assert converted.model_kwargs["reduced_tail"] is True and converted.model_kwargs["num_classes"] == 91
    assert converted.source == {"peer": "torchvision", "arch": TV_NAME, "tag": "COCO_V1"}
    assert converted.class_names == list(COCO_CATEGORIES)
    ours = converted.build()
    assert ours.config["size"] == [320, 320] and ours.backbone.extra[0][0][1].eps == 1e-3
    if routes == "on":  # our default CPU routes: the same function up to float32 rounding
        inputs = torch.randn(2, 3, 320, 320, generator=torch.Generator().manual_seed(1))
        expected, actual = raw_outputs(reference, inputs), raw_outputs(ours, inputs)
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-5)
        return
    previous = cpu_routes.set_routes(False)
    try:
        assert_same_function(reference, ours)
    finally:
        cpu_routes.restore(previous)


def test_cli_converts_both_ways(tmp_path, capsys, plain_kernels):
    reference = calibrated(torchvision_ssdlite(), seed=1)
    torch.save({"model": reference.state_dict()}, tmp_path / "tv.pth")  # a training checkpoint's wrapper too
    ours_path, back_path = tmp_path / "ours.safetensors", tmp_path / "back.pth"
    # no --arch: recognised from the tensors
    assert main(["convert", "--from", "torchvision", str(tmp_path / "tv.pth"), str(ours_path), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "verify: max |peer - ours| = 0 " in out and "ssdlite320_mobilenetv3_large_100 from torchvision " \
        "ssdlite320_mobilenet_v3_large.COCO_V1" in out and "resized to 320x320" in out
    loaded = load_model(ours_path)
    assert loaded.model_name == "ssdlite320_mobilenetv3_large_100" and loaded.class_names == list(COCO_CATEGORIES)
    assert (loaded.preprocessing.input_size, loaded.preprocessing.mean) == (320, (0.5, 0.5, 0.5))
    assert_same_function(reference, loaded)
    assert main(["convert", "--to", "torchvision", str(ours_path), str(back_path), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, " \
        "num_classes=91)" in out
    back = torch.load(back_path, weights_only=True)
    original = reference.state_dict()
    assert list(back) == list(original) and all(torch.equal(back[k], original[k]) for k in original)


def test_our_model_loads_into_torchvision_strictly_with_equal_outputs(plain_kernels):
    ours = calibrated(create_model("ssdlite320_mobilenetv3_large_100"), seed=2)
    name, state_dict = to_torchvision(ours.config, ours.state_dict())
    assert name == TV_NAME
    reference = torchvision_ssdlite()
    reference.load_state_dict(state_dict, strict=True)
    assert_same_function(reference, ours, seed=2)
    # and back again: the same tensors
    again = convert_state_dict("torchvision", TV_NAME, state_dict)
    assert list(again.state_dict) == list(ours.state_dict())
    assert all(torch.equal(again.state_dict[k], v) for k, v in ours.state_dict().items())


def test_another_class_count_and_thresholds_round_trip(tmp_path, plain_kernels):
    settings = {"score_thresh": 0.2, "nms_thresh": 0.4, "detections_per_img": 20, "topk_candidates": 50}
    ours = calibrated(create_model("ssdlite320_mobilenetv3_large_100", num_classes=5, **settings), seed=3)
    assert torchvision_ssdlite_kwargs(ours.config) == {"num_classes": 5, **settings}
    name, state_dict = to_torchvision(ours.config, ours.state_dict())
    reference = torchvision_ssdlite(**torchvision_ssdlite_kwargs(ours.config))
    reference.load_state_dict(state_dict, strict=True)
    assert_same_function(reference, ours, seed=3)
    assert all(len(found["boxes"]) <= 20 for found in detections(ours, images(3)))
    # from torchvision: the class count read off the head, no (COCO) class names for 5 classes
    converted = convert_state_dict("torchvision", TV_NAME, state_dict)
    assert converted.model_kwargs["num_classes"] == 5 and converted.class_names is None
    path = save_model(converted.build(), tmp_path / "five.safetensors")
    assert main(["convert", "--to", "torchvision", str(path), str(tmp_path / "back.pth")]) == 0
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert list(back) == list(state_dict) and all(torch.equal(back[k], v) for k, v in state_dict.items())


CANNOT = "torchvision's ssdlite320_mobilenet_v3_large cannot build this SSDLite: "


@pytest.mark.parametrize("name,kwargs,message", [
    ("ssdlite320_mobilenetv3_small_100", {},
     "torchvision has no SSDLite on MobileNetV3-Small: it builds ssdlite320_mobilenet_v3_large only"),
    ("ssdlite320_mobilenetv3_large_075", {}, CANNOT + "width_mult=0.75 (it has 1.0)"),
    ("ssdlite320_mobilenetv3_large_100", {"reduced_tail": False}, CANNOT + "reduced_tail=False (it has True)"),
    ("ssdlite_mobilenetv3_large", {"size": 512}, CANNOT + "size=[512, 512] (it has 320)"),
    ("ssdlite320_mobilenetv3_large_100", {"in_chans": 1},
     "torchvision's ssdlite320_mobilenet_v3_large takes 3 input channels; this SSDLite has in_chans=1"),
])
def test_what_torchvision_cannot_build_is_refused_in_one_line(tmp_path, capsys, name, kwargs, message):
    model = create_model(name, **kwargs)
    with pytest.raises(UserError, match=f"^{re.escape(message)}$"):
        to_torchvision(model.config, model.state_dict())
    path = save_model(model, tmp_path / "model.safetensors")
    assert main(["convert", "--to", "torchvision", str(path), str(tmp_path / "out.pth")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith(message) and "\n" not in error and not (tmp_path / "out.pth").exists()


def test_other_refusals_name_the_problem():
    model = create_model("ssdlite320_mobilenetv3_large_100")
    with pytest.raises(UserError, match="^timm has no SSDLite detector to convert to or from$"):
        to_peer("timm", model.config, model.state_dict())
    with pytest.raises(UserError, match="^torchvision mobilenet_v3_large is not an SSDLite detector; torchvision's "
                                        "is ssdlite320_mobilenet_v3_large$"):
        to_peer("torchvision", model.config, model.state_dict(), peer_arch="mobilenet_v3_large")
    classifier = torchvision.models.mobilenet_v3_large(weights=None).state_dict()
    with pytest.raises(UserError, match=r"^missing key 'backbone\.features\.0\.0\.0\.weight': not a torchvision "
                                        r"SSDLite state dict; it looks like a torchvision state dict \(use --arch "
                                        r"mobilenet_v3_large\)$"):
        convert_state_dict("torchvision", TV_NAME, classifier)
    detector = torchvision_ssdlite().state_dict()
    with pytest.raises(UserError, match=r"looks like a torchvision SSDLite state dict \(use --arch "
                                        r"ssdlite320_mobilenet_v3_large\)$"):
        convert_state_dict("torchvision", "mobilenet_v3_large", detector)
    with pytest.raises(UserError, match=r"^missing key 'conv_stem\.weight': not a timm MobileNetV3 state dict; it looks "
                                        r"like a torchvision SSDLite state dict \(use --from torchvision\)$"):
        matching_variants("timm", detector)


def test_coco_row_of_the_published_table():
    row = PUBLISHED[("torchvision", TV_NAME, "COCO_V1")]
    weights = torchvision.models.detection.SSDLite320_MobileNet_V3_Large_Weights.COCO_V1
    assert row.url == weights.url == ("https://download.pytorch.org/models/"
                                      "ssdlite320_mobilenet_v3_large_coco-a79551df.pth")
    assert row.sha256 == "a79551df" and row.file_name == "ssdlite320_mobilenet_v3_large_coco-a79551df.pth"
    assert row.metrics == {"coco_val2017_box_map": weights.meta["_metrics"]["COCO-val2017"]["box_map"]} \
        == {"coco_val2017_box_map": 21.3}
    assert row.num_classes == 91 and row.class_names == tuple(weights.meta["categories"]) == COCO_CATEGORIES
    assert COCO_CATEGORIES[0] == "__background__" and COCO_CATEGORIES.count("N/A") == 10
    prep = row.preprocessing
    assert (prep.input_size, prep.crop_pct, prep.mean, prep.std) == (320, 1.0, (0.5,) * 3, (0.5,) * 3)


def test_pretrained_coco_weights_download_and_convert(monkeypatch, tmp_path, plain_kernels):
    previous_hub = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))  # a fresh, private cache
    try:
        reference = calibrated(torchvision_ssdlite(), seed=4)
        key = ("torchvision", TV_NAME, "COCO_V1")
        staging = tmp_path / "staging.pth"
        torch.save(reference.state_dict(), staging)
        digest = hashlib.sha256(staging.read_bytes()).hexdigest()[:8]
        published = tmp_path / f"ssdlite320_mobilenet_v3_large_coco-{digest}.pth"
        staging.rename(published)
        monkeypatch.setitem(PUBLISHED, key, dataclasses.replace(PUBLISHED[key], url=published.as_uri(), sha256=digest))
        model = create_model("ssdlite320_mobilenetv3_large_100", pretrained="torchvision")
        assert (tmp_path / "hub" / "checkpoints" / published.name).is_file()  # downloaded, hash checked
        assert model.config["reduced_tail"] is True and model.config["num_classes"] == 91
        assert model.class_names == list(COCO_CATEGORIES) and model.preprocessing.input_size == 320
        assert_same_function(reference, model, seed=4)
        # the generic name with another class count, input size and channel count: the backbone, extra blocks, box
        # head and the class head's depthwise convs are kept, its logit convs are new, the stem is summed to gray
        five = create_model("ssdlite_mobilenetv3_large", pretrained=True, num_classes=5, in_chans=1, size=256)
        assert five.num_classes == 5 and five.class_names is None and five.config["size"] == [256, 256]
        coco = convert_state_dict("torchvision", TV_NAME, reference.state_dict()).state_dict
        new = [key for key in coco if re.fullmatch(r"head\.classification_head\.module_list\.\d\.1\.\w+", key)]
        assert len(new) == 12  # 6 levels' 1x1 logit convs, weight and bias
        assert all(five.state_dict()[key].shape[0] == 6 * 5 != coco[key].shape[0] for key in new)
        stem = "backbone.body.0.conv.weight"
        assert torch.equal(five.state_dict()[stem], coco[stem].sum(dim=1, keepdim=True))
        assert all(torch.equal(five.state_dict()[key], coco[key]) for key in coco if key not in (*new, stem))
        with torch.no_grad():
            assert five.eval()([torch.rand(1, 100, 150)])[0]["boxes"].shape[1] == 4
        with pytest.raises(UserError, match="no published weights for ssdlite320_mobilenetv3_small_100"):
            create_model("ssdlite320_mobilenetv3_small_100", pretrained=True)
        with pytest.raises(UserError, match="no published weights for ssdlite320_mobilenetv3_large_075"):
            create_model("ssdlite320_mobilenetv3_large_075", pretrained="torchvision")
    finally:
        torch.hub.set_dir(previous_hub)
