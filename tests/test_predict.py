"""`predict`: output format, skipped files and exit codes, preprocessing parity, engines and the export cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mobilenetv3 import create_model, save_model
from mobilenetv3.cli import main
from mobilenetv3.deploy import engines as engines_module
from mobilenetv3.deploy.bench import calibrate_batchnorm
from mobilenetv3.deploy.predict import (
    ImageLoader,
    Prediction,
    find_images,
    imagenet_class_names,
    predict_files,
    softmax_topk,
)
from mobilenetv3.preprocessing import Preprocessing

SIZE = 32
PREPROCESSING = Preprocessing(input_size=SIZE, crop_pct=0.8)  # resize 40, crop 32
CLASSES = [f"kind {i}" for i in range(6)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    net = create_model("mobilenetv3_small_035", num_classes=len(CLASSES))
    calibrate_batchnorm(net, torch.randn(64, 3, SIZE, SIZE))
    with torch.no_grad():
        net.classifier.weight.normal_(0, 0.5)
    return net.eval()


@pytest.fixture(scope="module")
def weights(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    return save_model(model, path, preprocessing=PREPROCESSING, class_names=CLASSES)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Four readable images in several modes and sizes (one nested), a broken one, and non-images."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    (root / "nested" / "deeper").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (45, 61, 3), dtype=np.uint8)).save(root / "a.jpg", quality=95)
    Image.fromarray(rng.integers(0, 256, (70, 50), dtype=np.uint8)).save(root / "b_gray.png")
    Image.fromarray(rng.integers(0, 256, (41, 41, 4), dtype=np.uint8), "RGBA").save(root / "nested" / "c.png")
    Image.fromarray(rng.integers(0, 256, (37, 90, 3), dtype=np.uint8)).convert("P").save(
        root / "nested" / "deeper" / "d.bmp")
    (root / "nested" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.jpg").write_bytes(b"")
    return root


READABLE = ["a.jpg", "b_gray.png", "nested/c.png", "nested/deeper/d.bmp"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private export cache, shared by this module's tests (so the ONNX export happens once)."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOBILENETV3_CACHE", str(folder))
        yield folder


def test_find_images_is_recursive_sorted_and_skips_non_images(images):
    found = find_images([images])
    assert [p.relative_to(images).as_posix() for p in found] == ["a.jpg", "b_gray.png", "nested/broken.jpg",
                                                                  *READABLE[2:]]
    assert find_images([images / "notes.txt"]) == [images / "notes.txt"]  # named explicitly: tried anyway


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_loader_reproduces_the_eval_transform(images, interpolation):
    prep = PREPROCESSING.replace(interpolation=interpolation)
    loader, transform = ImageLoader(prep), prep.eval_transform()
    for name in READABLE:
        with Image.open(images / name) as image:
            expected = transform(image).numpy()
        np.testing.assert_allclose(loader(images / name), expected, atol=1e-6, rtol=0)


def test_softmax_topk_matches_torch():
    logits = np.random.default_rng(1).normal(size=(5, 9)).astype(np.float32)
    indices, probs = softmax_topk(logits, 4)
    expected = torch.from_numpy(logits).softmax(1).topk(4)
    np.testing.assert_array_equal(indices, expected.indices.numpy())
    np.testing.assert_allclose(probs, expected.values.numpy(), rtol=1e-6)


def reference_topk(model, images, k):
    transform = PREPROCESSING.eval_transform()
    batch = torch.stack([transform(Image.open(images / name)) for name in READABLE])
    with torch.inference_mode():
        return model(batch).softmax(1).topk(k)


@pytest.mark.parametrize("engine", ["onnxruntime", "torch"])
def test_json_output_skips_broken_files_and_matches_eager(model, weights, images, cache, engine, capsys, caplog):
    code = main(["predict", "--checkpoint", str(weights), "--topk", "3", "--batch-size", "2", "--json",
                 "--engine", engine, str(images)])
    out, err = capsys.readouterr()
    assert code == 1  # some files were skipped
    assert "skipped 1 of 5 images" in err
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "skipping unreadable image" in warnings[0] and "broken.jpg" in warnings[0]
    rows = [json.loads(line) for line in out.splitlines()]
    assert [row["path"] for row in rows] == [str(images / name) for name in READABLE]
    expected = reference_topk(model, images, 3)
    for row, indices, probs in zip(rows, expected.indices.tolist(), expected.values.tolist()):
        assert set(row) == {"path", "topk"}
        assert [set(entry) for entry in row["topk"]] == [{"index", "label", "prob"}] * 3
        assert [entry["index"] for entry in row["topk"]] == indices
        assert [entry["label"] for entry in row["topk"]] == [CLASSES[i] for i in indices]
        np.testing.assert_allclose([entry["prob"] for entry in row["topk"]], probs, atol=1e-4)


def test_text_output_and_clean_exit(weights, images, cache, capsys):
    assert main(["predict", "--checkpoint", str(weights), "--topk", "2", str(images / "a.jpg"),
                 str(images / "nested" / "c.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{images / 'a.jpg'}\t") and lines[0].count(" | ") == 1


def test_export_is_cached_by_weights_hash(weights, images, cache, monkeypatch):
    first = engines_module.cached_onnx_export(weights)
    assert first.parent == cache / "onnx" and first.name.startswith(engines_module.file_sha256(weights)[:24])

    def must_not_export(*args, **kwargs):
        raise AssertionError("exported again despite a cached artifact")

    monkeypatch.setattr("mobilenetv3.deploy.export.export_model", must_not_export)
    assert engines_module.cached_onnx_export(weights) == first
    engine = engines_module.make_engine("auto", weights)
    assert engine.name == "onnxruntime" and engine.path == first
    assert json.loads(engine.metadata["class_names"]) == CLASSES


def test_predict_runs_an_exported_onnx_file_directly(weights, images, cache, capsys):
    onnx_file = engines_module.cached_onnx_export(weights)
    assert main(["predict", "--checkpoint", str(onnx_file), "--topk", "1", "--json", str(images / "a.jpg")]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["topk"][0]["label"] in CLASSES


def test_fixed_batch_onnx_runs_in_chunks(model, weights, images, cache, tmp_path, capsys):
    from mobilenetv3.deploy.export import ExportFormat, artifact_metadata, export_model

    fixed = tmp_path / "b3.onnx"
    export_model(model, fixed, ExportFormat.ONNX, input_size=SIZE, batch=3,
                 metadata=artifact_metadata(model, PREPROCESSING, CLASSES))
    engine = engines_module.make_engine("onnxruntime", fixed)
    assert engine.fixed_batch == 3
    batch = np.random.default_rng(0).standard_normal((7, 3, SIZE, SIZE)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(batch)).numpy()
    for count in (1, 3, 7):
        np.testing.assert_allclose(engine(batch[:count]), expected[:count], rtol=1e-3, atol=1e-3)
    assert main(["predict", "--checkpoint", str(fixed), "--json", *(str(images / name) for name in READABLE)]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == len(READABLE)


def test_imagenet_names_ship_with_the_package():
    from torchvision.models._meta import _IMAGENET_CATEGORIES  # test-time reference only

    assert imagenet_class_names() == list(_IMAGENET_CATEGORIES)


def test_thousand_class_model_without_names_gets_imagenet_labels(images):
    torch.manual_seed(0)
    model = create_model("mobilenetv3_small_035").eval()
    from mobilenetv3.deploy.engines import TorchEngine
    from mobilenetv3.deploy.predict import class_names_for

    names = class_names_for({"num_classes": "1000"})
    results = list(predict_files([images / "a.jpg"], TorchEngine(model), PREPROCESSING, class_names=names, topk=2))
    assert isinstance(results[0], Prediction)
    assert list(results[0].labels) == [names[i] for i in results[0].indices]
    assert class_names_for({"num_classes": "10"}) is None


@pytest.mark.parametrize("argv, message", [
    (["--topk", "0"], "--topk and --batch-size must be positive"),
    (["--engine", "torch", "MISSING_DIR"], "no such file or folder"),
])
def test_user_errors_are_one_line(weights, images, cache, argv, message, capsys):
    inputs = [] if "MISSING_DIR" in argv else [str(images)]
    assert main(["predict", "--checkpoint", str(weights), *argv, *inputs]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_folder_without_images_is_an_error(weights, tmp_path, cache, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["predict", "--checkpoint", str(weights), str(tmp_path / "empty")]) == 2
    assert "no image files found" in capsys.readouterr().err
