"""Export round trips (ONNX / TorchScript / ExportedProgram), BN folding, and the hard-sigmoid trap."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from mobilenetv3 import create_model, save_model
from mobilenetv3.cli import main
from mobilenetv3.deploy.bench import calibrate_batchnorm
from mobilenetv3.deploy.export import (
    ExportFormat,
    ExportVerificationError,
    check_hard_activations,
    export_model,
    load_artifact,
    compare_outputs,
    read_artifact_metadata,
)
from mobilenetv3.deploy.fuse import count_batchnorms, fuse_batchnorm
from mobilenetv3.preprocessing import Preprocessing
from mobilenetv3.weights.io import model_description

SIZE = 32
CLASSES = [f"class {i}" for i in range(7)]


def tiny_model() -> nn.Module:
    """Small x0.35 with BN statistics calibrated on random images and a larger classifier, so logits are
    O(1) (fresh MobileNetV3s have logits near 1e-7, against which 1e-4 would prove nothing)."""
    torch.manual_seed(0)
    model = create_model("mobilenetv3_small_035", num_classes=len(CLASSES))
    calibrate_batchnorm(model, torch.randn(64, 3, SIZE, SIZE))
    with torch.no_grad():
        model.classifier.weight.normal_(0, 0.5)
    model.preprocessing = Preprocessing(input_size=SIZE)
    model.class_names = CLASSES
    return model.eval()


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return tiny_model()


@pytest.fixture(scope="module")
def exports(model, tmp_path_factory):
    """One dynamic-batch export per format, made on first use and shared by the tests."""
    folder, made = tmp_path_factory.mktemp("exports"), {}

    def get(fmt: ExportFormat):
        if fmt not in made:
            path = folder / f"model{fmt.suffix}"
            made[fmt] = (path, export_model(model, path, fmt))
        return made[fmt]

    return get


def test_fused_model_matches_and_has_no_batchnorm(model):
    fused = fuse_batchnorm(model)
    images = torch.randn(3, 3, SIZE, SIZE)
    with torch.inference_mode():
        expected, actual = model(images), fused(images)
    assert count_batchnorms(model) == 34 and count_batchnorms(fused) == 0
    assert expected.abs().max() > 0.5  # the comparison below is not between near-zero numbers
    torch.testing.assert_close(actual, expected, atol=1e-4 * expected.abs().max().item(), rtol=0)
    assert count_batchnorms(model) == 34  # the original is untouched


@pytest.mark.parametrize("fmt", list(ExportFormat))
def test_round_trip_with_dynamic_batch(model, exports, fmt):
    path, report = exports(fmt)
    assert report.batch is None and report.checked_batch_sizes == (1, 3)
    assert report.max_abs_diff <= 1e-4 * report.output_scale and report.batchnorms_folded == 34
    assert report.output_scale > 1  # logits are O(1) or more, so the comparison is not vacuous
    run = load_artifact(path, fmt)
    for batch in (1, 5):  # 5: a size the export never saw
        images = torch.randn(batch, 3, SIZE, SIZE)
        with torch.inference_mode():
            expected = model(images).numpy()
        np.testing.assert_allclose(run(images.numpy()), expected, atol=1e-4 * np.abs(expected).max(), rtol=0)
    metadata = read_artifact_metadata(path, fmt)
    assert metadata["model_name"] == "mobilenetv3_small_035"
    assert json.loads(metadata["class_names"]) == CLASSES
    assert Preprocessing.from_dict(json.loads(metadata["preprocessing"])) == model.preprocessing
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_onnx_graph_dynamic_batch_and_paper_hard_activations(model, exports, tmp_path):
    path, _ = exports(ExportFormat.ONNX)
    proto = onnx.load(str(path))
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value
    ops = [node.op_type for node in proto.graph.node]
    assert "BatchNormalization" not in ops
    assert ops.count("HardSwish") > 0
    gates = [node for node in proto.graph.node if node.op_type == "HardSigmoid"]
    assert len(gates) == 9  # one per SE block of Small
    for node in gates:
        attrs = {a.name: a.f for a in node.attribute}
        assert attrs["alpha"] == pytest.approx(1 / 6) and attrs["beta"] == pytest.approx(0.5)

    # ONNX's default HardSigmoid alpha (0.2), as some converters write it: refused, and 1e-4 catches it.
    for node in gates:
        for attr in node.attribute:
            if attr.name == "alpha":
                attr.f = 0.2
    with pytest.raises(ExportVerificationError, match=r"alpha=0\.2"):
        check_hard_activations(proto)
    wrong = tmp_path / "wrong.onnx"
    onnx.save(proto, str(wrong))
    diff, scale = compare_outputs(model, load_artifact(wrong, ExportFormat.ONNX), 3, SIZE, (1, 3))
    assert diff > 100 * 1e-4 * scale  # far outside the tolerance


def test_static_batch_is_fixed_in_the_graph(model, tmp_path):
    path = tmp_path / "b2.onnx"
    report = export_model(model, path, "onnx", batch=2, input_size=48)
    assert report.checked_batch_sizes == (2,) and report.input_size == 48
    dims = [d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, 48, 48]


def test_export_leaves_the_callers_model_alone(tmp_path):
    model = tiny_model().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    export_model(model, tmp_path / "model.pt", ExportFormat.TORCHSCRIPT)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_failed_verification_writes_nothing(model, tmp_path):
    path = tmp_path / "model.pt"
    with pytest.raises(ExportVerificationError, match="nothing was written"):
        export_model(model, path, ExportFormat.TORCHSCRIPT, tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []


def test_cli_exports_a_training_checkpoint(model, tmp_path, capsys):
    checkpoint = tmp_path / "last.pt"
    name, kwargs = model_description(model)
    torch.save({"model_name": name, "model_kwargs": kwargs, "model": model.state_dict(),
                "preprocessing": model.preprocessing.to_dict()}, checkpoint)
    out = tmp_path / "model.torchscript.pt"
    assert main(["export", "--checkpoint", str(checkpoint), "--format", "torchscript", "--output", str(out),
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "torchscript" and report["batch"] == "dynamic"
    assert report["input_size"] == SIZE and report["max_abs_diff"] <= report["allowed_diff"]
    assert report["allowed_diff"] == pytest.approx(1e-4 * report["output_scale"])
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.inference_mode():
        expected = model(images).numpy()
    np.testing.assert_allclose(load_artifact(out, ExportFormat.TORCHSCRIPT)(images.numpy()), expected,
                               atol=1e-4 * np.abs(expected).max(), rtol=0)


def test_cli_weights_file_and_text_report(model, tmp_path, capsys):
    weights = save_model(model, tmp_path / "tiny.safetensors", preprocessing=model.preprocessing, class_names=CLASSES)
    out = tmp_path / "tiny.pt2"
    assert main(["export", "--checkpoint", str(weights), "--format", "exported-program", "--output", str(out),
                 "--batch", "3"]) == 0
    text = capsys.readouterr().out
    assert "batch 3" in text and "max abs diff" in text
    assert len(read_artifact_metadata(out, ExportFormat.EXPORTED_PROGRAM)["weights_sha256"]) == 64


@pytest.mark.parametrize("argv, message", [
    (["--model", "mobilenetv3_small_035", "--format", "onnx", "--batch", "0"], "--batch must be 'dynamic' or a positive"),
    (["--model", "mobilenetv3_small_035", "--format", "torchscript", "--opset", "17"], "--opset applies to --format onnx"),
    (["--model", "mobilenetv3_smal_035", "--format", "onnx"], "did you mean mobilenetv3_small_035"),
    (["--checkpoint", "missing.safetensors", "--format", "onnx"], "weights file not found"),
])
def test_cli_user_errors_are_one_line(argv, message, tmp_path, capsys):
    assert main(["export", *argv, "--output", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
