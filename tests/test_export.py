"""Export round trips (ONNX / TorchScript / ExportedProgram), BN folding, the float64-referenced check that
refuses wrong graphs (hard-sigmoid trap, a perturbed weight), and the CLI's format inference."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from mobilenetv3 import create_model, save_model
from mobilenetv3.cli import main
from mobilenetv3.timing import calibrate_batchnorm
from mobilenetv3.deploy import export as export_module
from mobilenetv3.deploy.export import (
    EAGER_ERROR_MULTIPLE,
    ExportFormat,
    ExportVerificationError,
    check_hard_activations,
    compare_outputs,
    export_model,
    load_artifact,
    read_artifact_metadata,
    verification_inputs,
    verify_artifact,
)
from mobilenetv3.deploy.fuse import count_batchnorms, fuse_batchnorm
from mobilenetv3.errors import UserError
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


@pytest.mark.parametrize("fmt", [f for f in ExportFormat if f.dynamic_batch])  # .pte: tests/test_executorch.py
def test_round_trip_with_dynamic_batch(model, exports, fmt):
    path, report = exports(fmt)
    assert report.batch is None and report.checked_batch_sizes == (1, 3)
    assert report.max_abs_diff <= 1e-4 * report.output_scale and report.batchnorms_folded == 34
    assert report.output_scale > 1  # logits are O(1) or more, so the comparison is not vacuous
    assert 0 < report.eager_float32_diff < 1e-4 * report.output_scale  # float32 measured, not assumed exact
    summary = report.to_dict()
    assert summary["reference"] == "float64" and summary["inputs"] == {"images": 0, "random_fields": 4}
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

    # ONNX's default HardSigmoid alpha (0.2), as some converters write it: refused by name, and by the
    # numeric check too, far outside what it allows.
    for node in gates:
        for attr in node.attribute:
            if attr.name == "alpha":
                attr.f = 0.2
    with pytest.raises(ExportVerificationError, match=r"alpha=0\.2"):
        check_hard_activations(proto)
    wrong = tmp_path / "wrong.onnx"
    onnx.save(proto, str(wrong))
    batches = verification_inputs(model.preprocessing, SIZE, (1, 3))
    comparison = compare_outputs(model, load_artifact(wrong, ExportFormat.ONNX), batches)
    assert comparison.artifact_diff > 100 * comparison.allowed(1e-4)
    with pytest.raises(ExportVerificationError, match=r"does not reproduce the model: max \|artifact - float64\|"):
        verify_artifact(model, load_artifact(wrong, ExportFormat.ONNX), batches)


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


def perturbed(model: nn.Module, factor: float = 1.01) -> nn.Module:
    """A copy of `model` with one 1x1 conv's weight (a middle block's projection) scaled by `factor`."""
    wrong = copy.deepcopy(model)
    with torch.no_grad():
        wrong.blocks[4].project.conv.weight.mul_(factor)
    return wrong


@pytest.mark.parametrize("fmt", [ExportFormat.ONNX, ExportFormat.TORCHSCRIPT])
def test_a_graph_with_a_perturbed_weight_is_refused_and_nothing_written(model, tmp_path, monkeypatch, fmt):
    # The artifact is built from the folded model: fold, then scale one weight by 1.01, as a broken folding
    # or converter would.  The check compares it with the unperturbed model and refuses it.
    fold = export_module.fuse_batchnorm
    monkeypatch.setattr(export_module, "fuse_batchnorm", lambda m: perturbed(fold(m)))
    path = tmp_path / "new" / "folders" / f"model{fmt.suffix}"
    with pytest.raises(ExportVerificationError) as caught:
        export_model(model, path, fmt)
    message = str(caught.value)
    assert message.startswith(f"the {fmt.value} export does not reproduce the model: max |artifact - float64| ")
    assert message.endswith(f"; nothing was written to {path}") and "\n" not in message
    assert list(tmp_path.iterdir()) == []  # nor the folders the export made for it


def test_the_perturbed_weight_is_far_outside_the_allowance(model, tmp_path):
    path = tmp_path / "wrong.onnx"
    export_model(perturbed(model), path, ExportFormat.ONNX)  # right for itself
    batches = verification_inputs(model.preprocessing, SIZE, (1, 3))
    comparison = compare_outputs(model, load_artifact(path, ExportFormat.ONNX), batches)
    assert comparison.artifact_diff > 10 * comparison.allowed(1e-4)  # measured: ~1000x
    with pytest.raises(ExportVerificationError, match="does not reproduce the model"):
        verify_artifact(model, load_artifact(path, ExportFormat.ONNX), batches)


def test_allowance_is_a_multiple_of_float32_error_with_a_floor():
    assert EAGER_ERROR_MULTIPLE == 4.0
    assert export_module.allowed_difference(1e-4, 0.05, 1e-7) == pytest.approx(1e-4)  # tiny logits: floor
    assert export_module.allowed_difference(1e-4, 50.0, 1e-4) == pytest.approx(5e-3)  # floor relative to scale
    assert export_module.allowed_difference(1e-4, 170.0, 0.09) == pytest.approx(0.36)  # float32's own error
    assert export_module.allowed_difference(1e-4, 1.0, float("nan")) == pytest.approx(1e-4)
    comparison = export_module.Comparison(artifact_diff=float("nan"), eager_diff=1e-6, scale=1.0)
    assert not comparison.passes(1e9)  # NaN never passes


def test_verification_inputs_are_in_the_data_range_and_real_images_come_first():
    prep = Preprocessing(input_size=16, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    real = np.full((2, 3, 16, 16), 7.0, dtype=np.float32)
    batches = verification_inputs(prep, 16, (1, 3), images=real)
    assert [tuple(b.shape) for b in batches] == [(1, 3, 16, 16), (3, 3, 16, 16)]
    everything = torch.cat(batches)
    assert torch.equal(everything[:2], torch.from_numpy(real))
    mean, std = torch.tensor(prep.mean).view(1, 3, 1, 1), torch.tensor(prep.std).view(1, 3, 1, 1)
    pixels = everything[2:] * std + mean  # back to [0, 1] pixels
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6 and pixels.std() > 0.05
    with pytest.raises(ValueError, match="verification images"):
        verification_inputs(prep, 16, (1,), images=np.zeros((1, 3, 8, 8), dtype=np.float32))


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
    assert report["reference"] == "float64" and report["eager_multiple"] == EAGER_ERROR_MULTIPLE
    assert report["allowed_diff"] == pytest.approx(max(1e-4 * max(1, report["output_scale"]),
                                                       EAGER_ERROR_MULTIPLE * report["eager_float32_diff"]))
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
    assert "batch 3" in text and "verified against float64 at batch 3: max abs diff" in text
    assert "float32 eager's own" in text
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


@pytest.mark.parametrize("name, fmt", [("m.onnx", "onnx"), ("m.pt2", "exported-program"),
                                       ("m.torchscript.pt", "torchscript"), ("m.ts", "torchscript"),
                                       ("M.ONNX", "onnx")])
def test_format_follows_the_output_name(name, fmt):
    assert ExportFormat.for_output(name) is ExportFormat(fmt)
    assert ExportFormat.for_output(name, fmt) is ExportFormat(fmt)


def test_cli_infers_the_format_from_the_output(tmp_path, capsys):
    out = tmp_path / "small.onnx"
    argv = ["export", "--model", "mobilenetv3_small_035", "--input-size", "32", "--output", str(out), "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "onnx"
    assert onnx.load(str(out)).graph.node  # really an ONNX file


@pytest.mark.parametrize("argv, message", [
    (["--format", "torchscript", "--output", "x.onnx"],
     "error: --format torchscript does not match --output {tmp}/x.onnx, whose name says onnx; use --format onnx "
     "or an output ending in .torchscript.pt"),
    (["--format", "onnx", "--output", "x.pt2"],
     "error: --format onnx does not match --output {tmp}/x.pt2, whose name says exported-program; "
     "use --format exported-program or an output ending in .onnx"),
    (["--output", "x.pt"],
     "error: cannot tell the export format from {tmp}/x.pt: pass --format or name the output with one of "
     ".torchscript.pt (torchscript), .onnx (onnx), .pt2 (exported-program), .ts (torchscript), .pte (executorch)"),
])
def test_cli_format_and_output_name_must_agree(argv, message, tmp_path, capsys):
    argv = [str(tmp_path / a) if a.startswith("x.") else a for a in argv]
    assert main(["export", "--model", "mobilenetv3_small_035", *argv]) == 2
    assert capsys.readouterr().err == f"mobilenetv3 export: {message.format(tmp=tmp_path)}\n"
    assert list(tmp_path.iterdir()) == []


def test_cli_a_run_folder_as_checkpoint_names_the_file_inside(model, tmp_path, capsys):
    run = tmp_path / "runs" / "x"
    (run / "checkpoints").mkdir(parents=True)
    assert main(["export", "--checkpoint", str(run), "--output", str(tmp_path / "m.onnx")]) == 2
    assert capsys.readouterr().err == f"mobilenetv3 export: error: {run} is a directory; expected a weights file\n"
    name, kwargs = model_description(model)
    torch.save({"model_name": name, "model_kwargs": kwargs, "model": model.state_dict()},
               run / "checkpoints" / "best.pt")
    assert main(["export", "--checkpoint", str(run), "--output", str(tmp_path / "m.onnx")]) == 2
    assert capsys.readouterr().err == (f"mobilenetv3 export: error: {run} is a directory; expected a weights file "
                                       f"(did you mean {run / 'checkpoints' / 'best.pt'}?)\n")
    # The library's own readers say the same (eval, train --resume / --pretrained go through them).
    from mobilenetv3.weights.io import load_model

    expected = rf"^{re.escape(str(run))} is a directory; expected a checkpoint \(did you mean "
    with pytest.raises(UserError, match=expected):
        load_model(run)
    with pytest.raises(UserError, match=r"^weights file not found: \S*nope\.safetensors$"):
        load_model(tmp_path / "nope.safetensors")


def test_cli_an_onnx_file_is_not_exported_again(tmp_path, capsys):
    (tmp_path / "done.onnx").write_bytes(b"\x08\x08")
    assert main(["export", "--checkpoint", str(tmp_path / "done.onnx"), "--output", str(tmp_path / "m.pt2")]) == 2
    assert capsys.readouterr().err == (f"mobilenetv3 export: error: {tmp_path / 'done.onnx'} is already an ONNX "
                                       "export; export a weights file or training checkpoint\n")
