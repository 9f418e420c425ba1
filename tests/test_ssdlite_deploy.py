"""SSDLite detection deployment: the raw outputs + anchors + `decode` reproduce the eager model's detections (at
the model's size and at others, 1 and 3 channels); the ONNX export's outputs equal eager's and decode to its
detections; TorchScript and ExportedProgram exports (and ExecuTorch where installed); `predict` drawing
NAME_boxes.png and giving boxes in the original images' pixels; the one-line refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mobilenetv3 import create_model, save_model
from mobilenetv3.cli import main
from mobilenetv3.deploy.detection import (OUTPUT_NAMES, SSDLiteRaw, anchors, decode, decode_settings, image_tensor,
                                          input_size, prepare, run_outputs)
from mobilenetv3.deploy.export import ExportFormat, export_model, load_artifact, read_artifact_metadata
from mobilenetv3.errors import UserError
from mobilenetv3.timing import calibrate_batchnorm

SIZE = 64
CLASSES = ["background", "disc", "bar", "ring"]


def tiny_detector(in_chans: int = 3) -> torch.nn.Module:
    """SSDLite on MobileNetV3-Small x0.35 at 64 px with calibrated BatchNorm statistics and louder prediction
    layers: scores spread over (0, 1), about a hundred detections above 0.3 per image, boxes of many shapes."""
    torch.manual_seed(0)
    model = create_model("ssdlite_mobilenetv3_small", num_classes=len(CLASSES), width_mult=0.35, size=SIZE,
                         in_chans=in_chans)
    calibrate_batchnorm(SSDLiteRaw(model), torch.rand(16, in_chans, SIZE, SIZE))
    with torch.no_grad():
        for block in model.head.classification_head.module_list:
            block[-1].weight.normal_(0, 0.3)
            block[-1].bias.normal_(0, 1.0)
        for block in model.head.regression_head.module_list:
            block[-1].weight.normal_(0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return tiny_detector(3)


@pytest.fixture(scope="module")
def grey_model():
    return tiny_detector(1)


@pytest.fixture(scope="module")
def weights(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "det.safetensors"
    return save_model(model, path, class_names=CLASSES)


@pytest.fixture(scope="module")
def onnx_file(weights, tmp_path_factory):
    output = tmp_path_factory.mktemp("export") / "det.onnx"
    assert main(["export", "--checkpoint", str(weights), "--output", str(output), "--json"]) == 0
    return output


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    (root / "sub").mkdir()
    Image.fromarray(rng.integers(0, 256, (45, 77, 3), dtype=np.uint8)).save(root / "wide.png")
    Image.fromarray(rng.integers(0, 256, (90, 50), dtype=np.uint8)).save(root / "sub" / "tall_grey.png")
    (root / "sub" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def assert_same_detections(actual: dict, expected: dict, *, atol: float = 1e-5, ordered: bool = True) -> None:
    """Equal detections: in the same order, or (`ordered=False`, for another runtime's float rounding, which may
    swap two near-equal scores) each matched to one of equal label, box and score (within `atol`; box coordinates,
    in pixels, at least within 1e-4)."""
    assert len(actual["scores"]) == len(expected["scores"])
    if ordered:
        assert torch.equal(actual["labels"], expected["labels"])
        # boxes in pixels (up to ~100): normalising after the resize rather than before rounds differently
        torch.testing.assert_close(actual["boxes"], expected["boxes"], rtol=0, atol=max(atol, 1e-4))
        torch.testing.assert_close(actual["scores"], expected["scores"], rtol=0, atol=atol)
        return
    unmatched = list(range(len(expected["scores"])))
    for box, label, score in zip(actual["boxes"], actual["labels"], actual["scores"]):
        match = next(j for j in unmatched if expected["labels"][j] == label
                     and abs(float(expected["scores"][j] - score)) <= atol
                     and float((expected["boxes"][j] - box).abs().max()) <= max(atol, 1e-4))
        unmatched.remove(match)


def random_images(in_chans: int, sizes, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(in_chans, height, width, generator=generator) for height, width in sizes]


@pytest.mark.parametrize("in_chans", [1, 3])
def test_decode_of_the_raw_outputs_is_the_eager_models_detections(in_chans, model, grey_model):
    net = grey_model if in_chans == 1 else model
    for sizes in ([(SIZE, SIZE)] * 2, [(45, 77), (90, 50), (SIZE, SIZE)]):  # at the model's size, and others
        images = random_images(in_chans, sizes)
        with torch.inference_mode():
            expected = net(images)
            batch, original = prepare(images, input_size(net))
            outputs = SSDLiteRaw(net)(batch)
        assert original == sizes and batch.shape == (len(sizes), in_chans, SIZE, SIZE)
        assert outputs[0].shape[1] == anchors(net).shape[0] and outputs[1].shape[2] == len(CLASSES)
        detections = decode(*outputs, anchors(net), **decode_settings(net), image_sizes=original)
        for actual, wanted, (height, width) in zip(detections, expected, sizes):
            assert (wanted["scores"] > 0.3).sum() > 10  # a test that can tell detections apart
            assert_same_detections(actual, wanted)
            assert float(actual["boxes"][:, 2].max()) <= width and float(actual["boxes"][:, 3].max()) <= height
        # numpy in (an ONNX Runtime session's outputs), boxes left in the input's pixels without image_sizes
        at_input = decode(*(o.numpy() for o in outputs), anchors(net).numpy(), input_size=SIZE)
        torch.testing.assert_close(at_input[0]["scores"], detections[0]["scores"])
        assert float(at_input[1]["boxes"].max()) <= SIZE


def test_anchors_are_the_ssds_own_and_leave_the_model_as_it_was(model):
    boxes = anchors(model)
    assert boxes.shape[1] == 4 and boxes.dtype == torch.float32
    captured = {}
    handle = model.anchor_generator.register_forward_hook(lambda module, args, output: captured.update(out=output))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    try:
        anchors(model)  # in train mode: BatchNorm statistics untouched, the mode kept
        assert model.training and model.backbone.training
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    finally:
        model.eval()
    with torch.inference_mode():
        model(random_images(3, [(SIZE, SIZE)]))
    handle.remove()
    assert torch.equal(captured["out"][0], boxes)  # what SSD.forward decodes against


def test_onnx_export_outputs_equal_eager_and_decode_to_its_detections(model, onnx_file, weights):
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_file))
    (inp,) = session.get_inputs()
    assert inp.name == "input" and inp.shape == ["batch", 3, SIZE, SIZE]
    count = anchors(model).shape[0]
    assert [(o.name, o.shape) for o in session.get_outputs()] == [
        ("bbox_regression", ["batch", count, 4]), ("cls_logits", ["batch", count, len(CLASSES)]),
        ("anchors", [count, 4])]
    metadata = session.get_modelmeta().custom_metadata_map
    assert metadata["task"] == "detection" and json.loads(metadata["class_names"]) == CLASSES
    assert metadata["weights_sha256"] and metadata["model_name"] == "ssdlite_mobilenetv3_small"
    stored = json.loads(metadata["detection"])
    assert stored["input_size"] == [SIZE, SIZE] and stored["outputs"] == list(OUTPUT_NAMES)
    assert stored["box_coder_weights"] == [10.0, 10.0, 5.0, 5.0] and stored["score_thresh"] == 0.001
    assert decode_settings(metadata) == decode_settings(model)
    preprocessing = json.loads(metadata["preprocessing"])
    assert preprocessing["mean"] == [0.0] * 3 and preprocessing["std"] == [1.0] * 3  # the artifact normalises

    sizes = [(45, 77), (SIZE, SIZE), (90, 50)]  # batch 3: neither checked size nor the traced one
    images = random_images(3, sizes, seed=7)
    batch, original = prepare(images, SIZE)
    with torch.inference_mode():
        eager = SSDLiteRaw(model)(batch)
        expected = model(images)
    outputs = session.run(None, {"input": batch.numpy()})
    for got, want in zip(outputs, eager):
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-4 * max(1.0, float(want.abs().max())))
    np.testing.assert_array_equal(outputs[2], anchors(model).numpy())
    for actual, wanted in zip(decode(*outputs, **decode_settings(metadata), image_sizes=original), expected):
        assert_same_detections(actual, wanted, atol=1e-3, ordered=False)


def test_cli_export_report_and_its_one_line_refusals(weights, tmp_path, capsys):
    output = tmp_path / "det.pt2"
    assert main(["export", "--checkpoint", str(weights), "--output", str(output), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["task"] == "detection" and report["batch"] == "dynamic" and report["checked_sizes"] == [[SIZE, SIZE]]
    assert list(report["outputs"]) == list(OUTPUT_NAMES)
    assert all(part["max_abs_diff"] <= part["allowed_diff"] for part in report["outputs"].values())
    assert report["outputs"]["anchors"]["max_abs_diff"] == 0.0
    assert report["batchnorms_folded"] > 0
    # another input size: one line, nothing written
    other = tmp_path / "other.onnx"
    assert main(["export", "--checkpoint", str(weights), "--output", str(other), "--input-size", "96"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exported at its own size, 64x64" in err[0] and not other.exists()


@pytest.mark.parametrize("fmt,name", [("torchscript", "det.torchscript.pt"), ("exported-program", "det.pt2")])
def test_torchscript_and_exported_program_give_the_raw_outputs_at_any_batch(grey_model, tmp_path, fmt, name):
    report = export_model(grey_model, tmp_path / name, fmt)
    assert report.task == "detection" and report.checked_batch_sizes == (1, 3)
    run = load_artifact(tmp_path / name, ExportFormat(fmt), all_outputs=True)
    batch = torch.rand(2, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        eager = SSDLiteRaw(grey_model, with_anchors=True)(batch)
    for got, want in zip(run(batch.numpy()), eager):
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-4 * max(1.0, float(want.abs().max())))
    assert read_artifact_metadata(tmp_path / name, ExportFormat(fmt))["task"] == "detection"


def _check_predictions(results: list[dict], out_dir, images, model) -> None:
    assert [r["path"] for r in results] == [str(images / "sub" / "tall_grey.png"), str(images / "wide.png")]
    for result, stem, (width, height) in zip(results, ("sub/tall_grey", "wide"), ((50, 90), (77, 45))):
        assert result["boxes_png"] == str(out_dir / f"{stem}_boxes.png")
        with Image.open(result["boxes_png"]) as drawn:
            assert drawn.mode == "RGB" and drawn.size == (width, height)  # the image's own size
            with Image.open(result["path"]) as original:
                assert np.any(np.asarray(drawn) != np.asarray(original.convert("RGB")))  # boxes were drawn
        assert (result["width"], result["height"]) == (width, height)
        # eager on the same pixels, the display threshold as its score threshold: boxes in the original pixels
        with Image.open(result["path"]) as image:
            pixels = image_tensor(image.convert("RGB"))
        model.score_thresh = 0.3
        try:
            with torch.inference_mode():
                (expected,) = model([pixels])
        finally:
            model.score_thresh = 0.001
        detections = result["detections"]
        assert len(detections) > 5 and all(d["score"] > 0.3 for d in detections)
        assert all(d["class_name"] == CLASSES[d["label"]] for d in detections)
        actual = {"boxes": torch.tensor([d["box"] for d in detections]), "scores": torch.tensor([d["score"] for d in detections]),
                  "labels": torch.tensor([d["label"] for d in detections])}
        assert_same_detections(actual, expected, atol=1e-3, ordered=False)
        assert float(actual["boxes"][:, 2].max()) > 0.7 * width  # the image's pixels, not the 64 x 64 input's


@pytest.mark.parametrize("engine", ["torch", "onnxruntime"])
def test_predict_draws_boxes_and_gives_them_in_the_original_pixels(engine, model, weights, images, tmp_path,
                                                                    monkeypatch, capsys, caplog):
    monkeypatch.setenv("MOBILENETV3_CACHE", str(tmp_path / "cache"))  # onnxruntime: a verified cached export
    out_dir = tmp_path / "out"
    code = main(["predict", "--checkpoint", str(weights), "--engine", engine, "--json", "--output-dir",
                 str(out_dir), "--batch-size", "1", str(images / "sub" / "tall_grey.png"), str(images / "wide.png"),
                 str(images / "sub" / "broken.jpg")])
    captured = capsys.readouterr()
    assert code == 1 and "skipped 1 of 3 images" in captured.err
    assert not [r for r in caplog.records if "eager PyTorch instead" in r.getMessage()]  # the export worked
    _check_predictions([json.loads(line) for line in captured.out.splitlines()], out_dir, images, model)


def test_predict_on_the_onnx_export_prints_the_detections(model, onnx_file, images, tmp_path, capsys):
    out_dir = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(onnx_file), "--output-dir", str(out_dir), "--json",
                 str(images / "sub" / "tall_grey.png"), str(images / "wide.png")]) == 0
    _check_predictions([json.loads(line) for line in capsys.readouterr().out.splitlines()], out_dir, images, model)
    assert main(["predict", "--checkpoint", str(onnx_file), "--output-dir", str(out_dir), "--score-thresh", "0.9",
                 str(images / "wide.png")]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    path, png, found = line.split("\t")
    assert (path, png) == (str(images / "wide.png"), str(out_dir / "wide_boxes.png"))
    assert found.split(" ")[1].startswith("detections") and all(float(part.split(" ")[1]) > 0.9
                                                                 for part in found.split(": ", 1)[1].split(" | "))


def test_a_one_channel_detector_takes_colour_images_as_grey(grey_model, images, tmp_path, capsys):
    weights = save_model(grey_model, tmp_path / "grey.safetensors", class_names=CLASSES)
    assert main(["predict", "--checkpoint", str(weights), "--engine", "torch", "--json", "--output-dir",
                 str(tmp_path / "out"), str(images / "wide.png")]) == 0
    (result,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    with Image.open(images / "wide.png") as image:
        pixels = image_tensor(image.convert("L"))
    with torch.inference_mode():
        (expected,) = grey_model([pixels])
    keep = expected["scores"] > 0.3
    assert len(result["detections"]) == int(keep.sum()) > 0
    np.testing.assert_allclose([d["box"] for d in result["detections"]], expected["boxes"][keep].numpy(), atol=1e-3)


def test_one_line_refusals(model, weights, images, tmp_path, capsys):
    classifier = save_model(create_model("mobilenetv3_small_035", num_classes=3).eval(), tmp_path / "cls.safetensors")
    assert main(["predict", "--checkpoint", str(classifier), "--engine", "torch", "--score-thresh", "0.5",
                 str(images / "wide.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--score-thresh applies to detection models" in err[0]
    assert main(["predict", "--checkpoint", str(weights), "--score-thresh", "1.5", str(images / "wide.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--score-thresh is a score in [0, 1)" in err[0]
    from mobilenetv3.deploy.quantize import DETECTOR_REFUSED, quantize_to_pte

    with pytest.raises(UserError, match="int8 quantization does not support detectors"):
        quantize_to_pte(model, [torch.rand(1, 3, SIZE, SIZE)], tmp_path / "det.pte", {})
    assert "\n" not in DETECTOR_REFUSED
    with pytest.raises(UserError, match="exported at its own size"):
        export_model(model, tmp_path / "x.onnx", "onnx", input_size=96)


def test_executorch_program_has_a_fixed_batch_and_predict_pads_to_it(weights, model, images, tmp_path, capsys):
    pytest.importorskip("executorch")
    pte = tmp_path / "det.pte"
    assert main(["export", "--checkpoint", str(weights), "--output", str(pte), "--batch", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["batch"] == 2 and report["task"] == "detection" and list(report["outputs"]) == list(OUTPUT_NAMES)
    from mobilenetv3.deploy.engines import make_engine

    engine = make_engine("auto", pte)
    batch = torch.rand(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(4))  # 3 images: one padded chunk
    boxes, logits, anchor_boxes = run_outputs(engine, batch.numpy())
    with torch.inference_mode():
        eager = SSDLiteRaw(model)(batch)
    np.testing.assert_allclose(boxes, eager[0].numpy(), atol=1e-4)
    np.testing.assert_allclose(logits, eager[1].numpy(), atol=1e-4 * max(1.0, float(eager[1].abs().max())))
    np.testing.assert_array_equal(anchor_boxes, anchors(model).numpy())
    out_dir = tmp_path / "out"
    assert main(["predict", "--checkpoint", str(pte), "--json", "--output-dir", str(out_dir),
                 str(images / "sub" / "tall_grey.png"), str(images / "wide.png")]) == 0
    _check_predictions([json.loads(line) for line in capsys.readouterr().out.splitlines()], out_dir, images, model)
