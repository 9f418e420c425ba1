"""Segmentation (LR-ASPP) export and predict: ONNX with a dynamic batch, height and width verified at several
sizes and equal to eager at a size never checked; the other formats; `predict` writing class-index masks and
overlays at each image's own size, per-class fractions, broken images skipped and named; the resize-only
preprocessing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mobilenetv3 import create_model, load_model, save_model
from mobilenetv3.cli import main
from mobilenetv3.deploy.export import ExportFormat, export_model, load_artifact, segmentation_check_sizes
from mobilenetv3.deploy.predict import ImageLoader, output_names, palette
from mobilenetv3.deploy.runtime import task_for
from mobilenetv3.preprocessing import Preprocessing
from mobilenetv3.timing import calibrate_batchnorm

SIZE = 64
PREPROCESSING = Preprocessing(input_size=SIZE, crop_pct=1.0)  # short side to 64, nothing cropped
CLASSES = ["background", "disc", "bar"]


def tiny_segmenter() -> torch.nn.Module:
    """LR-ASPP Small x0.5 with calibrated BN statistics and a louder head: logits O(1), masks with several classes."""
    torch.manual_seed(0)
    net = create_model("lraspp_mobilenetv3_small_050", num_classes=len(CLASSES))
    calibrate_batchnorm(net, torch.randn(32, 3, SIZE, SIZE))
    with torch.no_grad():
        net.classifier.low_classifier.weight.normal_(0, 0.5)
        net.classifier.high_classifier.weight.normal_(0, 0.5)
    return net.eval()


@pytest.fixture(scope="module")
def model():
    return tiny_segmenter()


@pytest.fixture(scope="module")
def weights(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "seg.safetensors"
    return save_model(model, path, preprocessing=PREPROCESSING, class_names=CLASSES)


@pytest.fixture(scope="module")
def onnx_file(weights, tmp_path_factory):
    output = tmp_path_factory.mktemp("export") / "seg.onnx"
    assert main(["export", "--checkpoint", str(weights), "--output", str(output), "--json"]) == 0
    return output


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    (root / "sub").mkdir()
    Image.fromarray(rng.integers(0, 256, (45, 77, 3), dtype=np.uint8)).save(root / "wide.png")
    Image.fromarray(rng.integers(0, 256, (90, 50), dtype=np.uint8)).save(root / "sub" / "tall_gray.png")
    (root / "sub" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def test_onnx_export_has_dynamic_batch_height_and_width_and_is_verified_at_two_sizes(model, tmp_path):
    report = export_model(model, tmp_path / "seg.onnx", "onnx", input_size=SIZE)
    assert report.task == "segmentation"
    assert report.checked_sizes == ((SIZE, SIZE), *segmentation_check_sizes(SIZE))
    assert {h for h, w in report.checked_sizes[1:]} == {w for h, w in report.checked_sizes[1:]}  # a wide and a tall
    assert all(h != w for h, w in report.checked_sizes[1:])
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "seg.onnx"))
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert inp.shape == ["batch", 3, "height", "width"] and out.name == "logits"
    assert out.shape == ["batch", len(CLASSES), "height", "width"]
    assert session.get_modelmeta().custom_metadata_map["task"] == "segmentation"
    # sizes no check used: 64x96, 96x64 and an odd 72x100, at batch 2; equal to eager within float32 rounding
    run = load_artifact(tmp_path / "seg.onnx", ExportFormat.ONNX)
    for height, width in ((64, 96), (96, 64), (71, 100)):
        x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(height))
        with torch.inference_mode():
            expected = model(x)["out"].numpy()
        actual = run(x.numpy())
        assert actual.shape == (2, len(CLASSES), height, width)
        np.testing.assert_allclose(actual, expected, rtol=0, atol=1e-4 * max(1.0, np.abs(expected).max()))
        assert (actual.argmax(1) == expected.argmax(1)).mean() > 0.999


def test_the_gate_pools_globally_so_no_traced_size_is_baked_in(model):
    assert isinstance(model.classifier.scale[0], torch.nn.AdaptiveAvgPool2d)
    assert model.classifier.scale[0].output_size in (1, (1, 1))


def test_cli_export_reports_the_checked_sizes(weights, tmp_path, capsys):
    output = tmp_path / "seg.onnx"
    assert main(["export", "--checkpoint", str(weights), "--output", str(output), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["task"] == "segmentation" and report["batch"] == "dynamic"
    assert report["checked_sizes"] == [[SIZE, SIZE], *map(list, segmentation_check_sizes(SIZE))]
    assert report["max_abs_diff"] <= report["allowed_diff"]


@pytest.mark.parametrize("fmt,name", [("torchscript", "seg.torchscript.pt"), ("exported-program", "seg.pt2")])
def test_torchscript_and_exported_program_run_at_other_sizes(model, tmp_path, fmt, name):
    report = export_model(model, tmp_path / name, fmt, input_size=SIZE)
    assert len(report.checked_sizes) == 3
    run = load_artifact(tmp_path / name, ExportFormat(fmt))
    x = torch.randn(1, 3, 80, 48, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = model(x)["out"].numpy()
    np.testing.assert_allclose(run(x.numpy()), expected, rtol=0, atol=1e-4 * max(1.0, np.abs(expected).max()))


def test_resize_only_preprocessing_matches_the_v2_transform(images):
    loader, transform = ImageLoader(PREPROCESSING, crop=False), PREPROCESSING.eval_transform(crop=False)
    for name, size in (("wide.png", (3, 64, 109)), ("sub/tall_gray.png", (3, 115, 64))):
        with Image.open(images / name) as image:
            expected = transform(image).numpy()
        actual = loader(images / name)
        assert actual.shape == expected.shape == size  # the short side resized, nothing cropped
        np.testing.assert_allclose(actual, expected, atol=1e-5)
    square = ImageLoader(PREPROCESSING, crop=False, square=True)(images / "wide.png")
    assert square.shape == (3, SIZE, SIZE)


def _check_outputs(results: list[dict], out_dir, images, model):
    assert [r["path"] for r in results] == [str(images / "wide.png"), str(images / "sub" / "tall_gray.png")]
    for result, stem, (width, height) in zip(results, ("wide", "sub/tall_gray"), ((77, 45), (50, 90))):
        assert result["mask"] == str(out_dir / f"{stem}_mask.png")
        assert result["overlay"] == str(out_dir / f"{stem}_overlay.png")
        with Image.open(result["mask"]) as mask_file:
            assert mask_file.mode == "L" and mask_file.size == (width, height)  # the image's own size
            mask = np.asarray(mask_file)
        with Image.open(result["overlay"]) as overlay:
            assert overlay.mode == "RGB" and overlay.size == (width, height)
        assert mask.max() < len(CLASSES)
        assert list(result["fractions"]) == CLASSES
        assert sum(result["fractions"].values()) == pytest.approx(1.0, abs=1e-9)
        counts = np.bincount(mask.ravel(), minlength=len(CLASSES)) / mask.size
        assert [result["fractions"][c] for c in CLASSES] == pytest.approx(counts.tolist())
        # the mask is eager's: resize-only input, logits resized back to the image's size, argmax
        array = ImageLoader(PREPROCESSING, crop=False)(result["path"])
        with torch.inference_mode():
            logits = model(torch.from_numpy(array)[None])["out"]
            logits = torch.nn.functional.interpolate(logits, size=(height, width), mode="bilinear",
                                                     align_corners=False)
        expected = logits[0].argmax(0).numpy()
        assert len(np.unique(expected)) > 1  # a mask with more than one class: the test can tell them apart
        assert (mask == expected).mean() > 0.995  # ties at float32 rounding may flip a pixel


@pytest.mark.parametrize("engine", ["onnxruntime", "torch"])
def test_predict_writes_masks_and_overlays_and_skips_broken_images(engine, model, weights, images, tmp_path,
                                                                     monkeypatch, capsys, caplog):
    monkeypatch.setenv("MOBILENETV3_CACHE", str(tmp_path / "cache"))
    out_dir = tmp_path / "out"
    code = main(["predict", "--checkpoint", str(weights), "--engine", engine, "--json", "--output-dir",
                 str(out_dir), str(images)])
    assert code == 1  # one image skipped
    captured = capsys.readouterr()
    results = [json.loads(line) for line in captured.out.splitlines()]
    _check_outputs(results, out_dir, images, model)
    assert "skipped 1 of 3 images" in captured.err
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "skipping unreadable image" in warnings[0] and "broken.jpg" in warnings[0]
    assert not (out_dir / "sub" / "broken_mask.png").exists()


def test_predict_on_the_exported_onnx_file(model, onnx_file, images, tmp_path, capsys):
    out_dir = tmp_path / "out"
    code = main(["predict", "--checkpoint", str(onnx_file), "--output-dir", str(out_dir),
                 str(images / "sub" / "tall_gray.png"), str(images / "wide.png")])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(str(images / "sub" / "tall_gray.png"))
    assert (out_dir / "sub" / "tall_gray_mask.png").is_file() and (out_dir / "wide_overlay.png").is_file()


def test_task_is_read_from_the_metadata_or_the_model_name(weights, onnx_file):
    assert task_for({"task": "segmentation"}) == "segmentation"
    assert task_for({"model_name": "lraspp_mobilenetv3_large_100"}) == "segmentation"
    assert task_for({"model_name": "mobilenetv3_large_100"}) == "classification"
    assert load_model(weights).class_names == CLASSES


def test_output_names_mirror_the_input_folders(tmp_path):
    a, b = tmp_path / "x" / "a" / "img.jpg", tmp_path / "x" / "b" / "img.png"
    assert output_names([a, b], tmp_path / "out") == {a: tmp_path / "out" / "a" / "img",
                                                       b: tmp_path / "out" / "b" / "img"}
    assert palette(3) == [(0, 0, 0), (128, 0, 0), (0, 128, 0)]  # Pascal VOC's colours
    c, d = tmp_path / "x" / "a" / "img.png", tmp_path / "x" / "a" / "other.jpg"  # only the extension differs: kept
    assert output_names([a, c, d], tmp_path / "out") == {a: tmp_path / "out" / "img.jpg", c: tmp_path / "out" / "img.png",
                                                          d: tmp_path / "out" / "other"}


def test_executorch_program_has_one_size_and_predict_resizes_to_it(model, weights, images, tmp_path, capsys):
    pytest.importorskip("executorch")
    pte = tmp_path / "seg.pte"
    assert main(["export", "--checkpoint", str(weights), "--output", str(pte), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["checked_sizes"] == [[SIZE, SIZE]] and report["batch"] == 1  # fixed batch and size
    out_dir = tmp_path / "out"
    # eval runs the program on images of its size, and refuses others in one line
    rng = np.random.default_rng(1)
    for root, stems, (height, width) in ((tmp_path / "data", ("a", "b"), (SIZE, SIZE)),
                                         (tmp_path / "wide", ("c",), (45, 77))):
        for kind in ("images", "masks"):
            (root / "val" / kind).mkdir(parents=True)
        for stem in stems:
            Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(
                root / "val" / "images" / f"{stem}.png")
            Image.fromarray(rng.integers(0, 3, (height, width), dtype=np.uint8)).save(root / "val" / "masks" / f"{stem}.png")
        (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    results = []
    for checkpoint in (pte, weights):
        assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "data"), "--json",
                     "--workers", "0"]) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert results[0]["samples"] == results[1]["samples"] == 2
    assert abs(results[0]["pixel_acc"] - results[1]["pixel_acc"]) < 0.5  # the program vs eager: argmax ties only
    assert main(["eval", "--checkpoint", str(pte), "--data", str(tmp_path / "wide"), "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"takes {SIZE}x{SIZE} images, got 64x109" in err[0], err
    assert main(["predict", "--checkpoint", str(pte), "--json", "--output-dir", str(out_dir),
                 str(images / "wide.png")]) == 0
    (result,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    with Image.open(result["mask"]) as mask:
        assert mask.size == (77, 45)  # the image's own size, from a 64x64 program
    assert sum(result["fractions"].values()) == pytest.approx(1.0)
