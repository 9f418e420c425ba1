"""ExecuTorch (`.pte`): export and verification, embedded metadata, the fixed batch and its padding, reload
equality, `predict` / `eval` / `bench` on programs, and the errors for a missing extra or a wrong file.

Lowering a program to XNNPACK takes ~15 s here, so the module exports one program (through the CLI) and
shares it; `bench` makes the only other ones (one float32, one int8)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("executorch.runtime", reason="the [mobile] extra (ExecuTorch) is not installed")

from mobilenetv3 import save_model  # noqa: E402
from mobilenetv3.cli import main  # noqa: E402
from mobilenetv3.deploy import executorch as executorch_module  # noqa: E402
from mobilenetv3.deploy.bench import benchmark  # noqa: E402
from mobilenetv3.deploy.engines import ExecuTorchEngine, check_weights_file, make_engine  # noqa: E402
from mobilenetv3.deploy.executorch import MOBILE_EXTRA_HINT, load_pte, read_pte_metadata  # noqa: E402
from mobilenetv3.deploy.export import (  # noqa: E402
    ExportFormat,
    ExportVerificationError,
    load_artifact,
    read_artifact_metadata,
    verification_inputs,
    verify_artifact,
)
from mobilenetv3.errors import UserError  # noqa: E402
from mobilenetv3.files import file_sha256  # noqa: E402
from mobilenetv3.preprocessing import Preprocessing  # noqa: E402
from test_export import perturbed  # noqa: E402  (tests/ is on sys.path)
from test_predict import tiny_model  # noqa: E402
from test_train_run import make_image_folder  # noqa: E402

SIZE = 32
BATCH = 3  # the program's fixed batch size
CLASSES = ["bright", "dark"]  # make_image_folder's classes, so `eval` can run on its folder
PREPROCESSING = Preprocessing(input_size=SIZE, crop_pct=0.8)
#: A line of ExecuTorch's C++ logging ("[program.cpp:114] File size is too small ...").
NATIVE_LOG_LINE = re.compile(r"^\[[\w.]+\.(?:cpp|cc|c|h):\d+\] ")


@pytest.fixture(scope="module")
def model():
    net = tiny_model(len(CLASSES), SIZE)
    net.preprocessing = PREPROCESSING
    return net


@pytest.fixture(scope="module")
def weights(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    return save_model(model, path, preprocessing=PREPROCESSING, class_names=CLASSES)


@pytest.fixture(scope="module")
def exported(weights, tmp_path_factory):
    """`export --checkpoint W --output m.pte --batch 3 --json` (the format from the name): (path, report)."""
    path = tmp_path_factory.mktemp("pte") / "tiny.pte"
    code = subprocess.run([sys.executable, "-m", "mobilenetv3", "export", "--checkpoint", str(weights),
                           "--output", str(path), "--batch", str(BATCH), "--json"],
                          capture_output=True, text=True, env=_env())
    assert code.returncode == 0, code.stderr
    # ExecuTorch's own runtime logging is kept out of the command's output (other libraries' warnings may come
    # and go with their versions: not asserted on)
    assert "Traceback" not in code.stderr, code.stderr
    assert [line for line in code.stderr.splitlines() if NATIVE_LOG_LINE.match(line)] == [], code.stderr
    return path, json.loads(code.stdout)


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """train/ and val/ of bright and dark 32 px images (3 val images a class: 6, not a multiple of 4)."""
    return make_image_folder(tmp_path_factory.mktemp("data"), train_per_class=1, val_per_class=3, size=SIZE)


# --- export ------------------------------------------------------------------------------------------------------


def test_export_is_verified_and_carries_the_metadata(exported, weights, model):
    path, report = exported
    assert report["format"] == "executorch" and report["batch"] == BATCH and report["checked_batch_sizes"] == [BATCH]
    assert report["reference"] == "float64" and report["batchnorms_folded"] == 34
    assert report["output_scale"] > 0.5  # logits are O(1): the comparison is not between near-zero numbers
    assert report["max_abs_diff"] <= report["allowed_diff"] <= 1e-4 * max(1.0, report["output_scale"]) * 1.01
    assert path.read_bytes()[4:6] == b"ET"  # an ExecuTorch flatbuffer
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temp files left
    metadata = read_artifact_metadata(path, ExportFormat.EXECUTORCH)
    assert metadata == read_pte_metadata(path)
    assert metadata["model_name"] == "mobilenetv3_small_035" and metadata["quantization"] == "none"
    assert json.loads(metadata["class_names"]) == CLASSES
    assert Preprocessing.from_dict(json.loads(metadata["preprocessing"])) == PREPROCESSING
    assert metadata["weights_sha256"] == file_sha256(weights)
    assert json.loads(metadata["model_kwargs"])["num_classes"] == len(CLASSES)


def test_the_program_matches_eager_and_a_wrong_reference_is_refused(exported, model):
    path, _ = exported
    batches = verification_inputs(PREPROCESSING, SIZE, (BATCH,), seed=5)
    run = load_artifact(path, ExportFormat.EXECUTORCH)
    comparison = verify_artifact(model, run, batches)  # passes against the model it came from
    assert comparison.artifact_diff <= comparison.allowed(1e-4)
    # ... and the same check fails against a model with one weight 1% off: it is not vacuous.
    with pytest.raises(ExportVerificationError, match="does not reproduce the model"):
        verify_artifact(perturbed(model), run, batches)


@pytest.mark.parametrize("name", ["m.pte", "M.PTE", "dir.v2/model.pte"])
def test_format_follows_a_pte_name(name):
    assert ExportFormat.for_output(name) is ExportFormat.EXECUTORCH
    assert ExportFormat.EXECUTORCH.suffix == ".pte"


@pytest.mark.parametrize("argv, message", [
    (["--format", "onnx", "--output", "m.pte"], "--format onnx does not match --output {tmp}/m.pte, whose name says "
                                                "executorch"),
    (["--output", "m.pte", "--batch", "dynamic"], "--format executorch exports a fixed batch size"),
    (["--output", "m.pte", "--batch", "0"], "--batch must be 'dynamic' or a positive integer"),
])
def test_export_user_errors_are_one_line(argv, message, tmp_path, capsys):
    argv = [a.replace("m.pte", str(tmp_path / "m.pte")) for a in argv]
    assert main(["export", "--model", "mobilenetv3_small_035", "--input-size", "32", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message.format(tmp=tmp_path) in err and len(err.splitlines()) == 1
    assert not (tmp_path / "m.pte").exists()


def test_a_pte_is_not_exported_again(exported, tmp_path, capsys):
    path, _ = exported
    assert main(["export", "--checkpoint", str(path), "--output", str(tmp_path / "x.onnx")]) == 2
    assert "is already an ExecuTorch export" in capsys.readouterr().err


# --- running a program: fixed batch, padding, reload equality ------------------------------------------------------


def images(count: int, seed: int = 0) -> np.ndarray:
    return verification_inputs(PREPROCESSING, SIZE, (count,), seed=seed)[0].numpy()


def test_batches_of_any_size_are_padded_to_the_programs_and_match_eager(exported, model):
    path, _ = exported
    program = load_pte(path)
    assert program.fixed_batch == BATCH and program.input_shape == (BATCH, 3, SIZE, SIZE)
    x = images(7)
    with torch.inference_mode():
        expected = model(torch.from_numpy(x)).numpy()
    full = program(x)  # 7 = 3 + 3 + 1 padded with two zero images
    assert full.shape == (7, len(CLASSES))
    np.testing.assert_allclose(full, expected, rtol=0, atol=1e-4 * max(1.0, np.abs(expected).max()))
    for count in (1, 2, 3, 4):  # each row is the same whatever its batch-mates and padding
        assert np.array_equal(program(x[:count]), full[:count])
    assert program(x[:0]).shape == (0, len(CLASSES))
    with pytest.raises(UserError, match=r"takes images of shape \(3, 32, 32\), got \(3, 40, 40\)"):
        program(np.zeros((2, 3, 40, 40), np.float32))


def test_a_program_reloads_bit_for_bit_in_this_and_a_fresh_process(exported, tmp_path):
    path, _ = exported
    x = images(5, seed=3)
    first = load_pte(path)(x)
    copied = tmp_path / "moved.pte"  # metadata is embedded: a copied / renamed program keeps it
    copied.write_bytes(path.read_bytes())
    assert np.array_equal(load_pte(copied)(x), first)
    assert read_pte_metadata(copied) == read_pte_metadata(path)
    np.save(tmp_path / "x.npy", x)
    script = ("import sys, numpy as np; from mobilenetv3.deploy.executorch import load_pte; "
              "np.save(sys.argv[3], load_pte(sys.argv[1])(np.load(sys.argv[2])))")
    subprocess.run([sys.executable, "-c", script, str(copied), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                   check=True, env=_env())
    fresh = np.load(tmp_path / "y.npy")
    assert fresh.dtype == np.float32 and np.array_equal(fresh, first)
    assert not np.array_equal(first[0], first[1])  # distinct inputs give distinct outputs: not a constant


# --- predict, eval, bench ----------------------------------------------------------------------------------------


def test_predict_runs_the_program_with_its_metadata(exported, weights, folder, capsys):
    path, _ = exported
    engine = make_engine("auto", path)
    assert isinstance(engine, ExecuTorchEngine) and engine.name == "executorch" and engine.fixed_batch == BATCH
    assert check_weights_file(path) == "executorch"
    inputs = [str(folder / "val")]
    assert main(["predict", "--checkpoint", str(path), *inputs, "--json", "--topk", "2", "--batch-size", "4"]) == 0
    ours = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main(["predict", "--checkpoint", str(weights), *inputs, "--json", "--topk", "2", "--engine", "torch"]) == 0
    eager = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(ours) == 6 and [r["path"] for r in ours] == [r["path"] for r in eager]
    for mine, theirs in zip(ours, eager):
        assert {t["label"] for t in mine["topk"]} == set(CLASSES)  # the embedded class names
        assert [t["label"] for t in mine["topk"]] == [t["label"] for t in theirs["topk"]]
        for a, b in zip(mine["topk"], theirs["topk"]):
            assert a["prob"] == pytest.approx(b["prob"], abs=1e-4)


def test_eval_evaluates_the_program_itself(exported, weights, folder, capsys):
    path, _ = exported
    common = ["--data", str(folder), "--batch-size", "4", "--workers", "0", "--json"]
    assert main(["eval", "--checkpoint", str(path), *common]) == 0
    lines = capsys.readouterr().out.splitlines()
    ours = json.loads(lines[-1])
    assert lines[0].startswith(f"{path} on {folder} (32px, crop 0.8)")
    assert main(["eval", "--checkpoint", str(weights), *common, "--device", "cpu"]) == 0
    eager = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert ours["samples"] == eager["samples"] == 6  # batches of 4 run as 3 + 3 (the second padded) and 2
    assert ours["top1"] == eager["top1"] and ours["loss"] == pytest.approx(eager["loss"], abs=1e-4)


@pytest.mark.parametrize("extra, message", [
    (["--ema"], "--ema applies to training checkpoints only"),
    (["--amp", "bf16"], "--amp does not apply"),
    (["--input-size", "64"], "was exported for 32px inputs, not 64"),
    (["--device", "cuda"], "runs on the CPU: drop --device cuda"),
])
def test_eval_options_that_cannot_apply_to_a_program_are_one_line(exported, folder, extra, message, capsys):
    path, _ = exported
    assert main(["eval", "--checkpoint", str(path), "--data", str(folder), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_bench_times_float32_and_int8_executorch_programs(exported, monkeypatch):
    """A real float32 program; for int8 the wiring (what `quantize_to_pte` is given, and that its program is
    what is timed): a real int8 program is timed by the next test, through the command."""
    import mobilenetv3.deploy.bench as bench_module

    exports, quantized = [], []
    original = executorch_module.write_pte
    monkeypatch.setattr(executorch_module, "write_pte", lambda *a, **k: (exports.append(a[2]), original(*a, **k)))

    def fake_quantize_to_pte(model, calibration_batches, path, metadata, **options):
        quantized.append((model, [b.shape for b in calibration_batches], options))
        Path(path).write_bytes(exported[0].read_bytes())  # a batch-3 program: the bench's batch of 2 is padded

    monkeypatch.setattr(bench_module, "quantize_to_pte", fake_quantize_to_pte)
    rows = benchmark("mobilenetv3_small_035", batch_sizes=(2,), engines=("eager", "executorch", "executorch-int8"),
                     resolution=32, warmup=1, min_repeats=2, min_seconds=0.0)
    assert [(r.network, r.engine, r.batch_size) for r in rows] == [
        ("ours", "eager", 2), ("ours", "executorch", 2), ("ours", "executorch-int8", 2)]
    assert [m["quantization"] for m in exports] == ["none"]  # one float32 program, at the timed batch size
    [(model, shapes, options)] = quantized
    assert not model.training and shapes == [torch.Size([64, 3, 32, 32])]  # the BN calibration batch: in range
    assert options["batch"] == 2 and options["min_agreement"] == 0.0
    for row in rows[1:]:
        assert row.calls >= 2 and row.p90_ms >= row.median_ms > 0 and row.gflop_per_image == rows[0].gflop_per_image


def test_bench_command_times_a_real_int8_program(capsys):
    """`bench --engines executorch-int8`, end to end: PT2E quantization and an XNNPACK int8 program, timed."""
    argv = ["bench", "--model", "mobilenetv3_small_035", "--engines", "executorch-int8", "--resolution", "32",
            "--batch-size", "1", "--device", "cpu", "--warmup", "1", "--repeats", "3", "--min-time", "0", "--json"]
    assert main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["network"], r["engine"], r["batch_size"], r["mode"]) for r in rows] == [
        ("ours", "executorch-int8", 1, "inference")]
    [row] = rows
    assert row["calls"] >= 3 and row["p90_ms"] >= row["median_ms"] > 0 and row["images_per_s"] > 0


# --- missing extra, wrong files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [
    ["export", "--model", "mobilenetv3_small_035", "--output", "{tmp}/m.pte"],
    ["predict", "--checkpoint", "{pte}", "{data}"],
    ["eval", "--checkpoint", "{pte}", "--data", "{data}"],
    ["bench", "--model", "mobilenetv3_small_035", "--engines", "executorch", "--resolution", "32"],
])
def test_commands_that_need_executorch_say_which_extra(command, exported, folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(executorch_module, "executorch_available", lambda: False)
    argv = [a.format(tmp=tmp_path, pte=exported[0], data=folder) for a in command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "needs ExecuTorch: pip install 'mobilenetv3[mobile]'" in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_the_package_and_other_commands_work_without_executorch(tmp_path):
    """A fresh process where `import executorch` and `import torchao` fail: the package and its deploy modules
    (quantize included) import, `--help` and other commands run, and a .pte export or an int8 quantization is
    one line naming the extra."""
    script = f"""
import contextlib, importlib.abc, io, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("executorch", "torchao"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import mobilenetv3, mobilenetv3.deploy.export, mobilenetv3.deploy.engines, mobilenetv3.deploy.bench
import mobilenetv3.deploy.quantize, mobilenetv3.cli.quantize
import mobilenetv3.train.evaluation
from mobilenetv3.deploy.executorch import executorch_available
from mobilenetv3.cli import main
assert not executorch_available()

def run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = main(argv)
        except SystemExit as exit:  # --help
            status = exit.code
    return {{"status": status, "out": out.getvalue(), "err": err.getvalue()}}

print(json.dumps({{
    "help": run(["--help"]),
    "quantize_help": run(["quantize", "--help"]),
    "list": run(["list"]),
    "export": run(["export", "--model", "mobilenetv3_small_035", "--output", r"{tmp_path}/m.pte"]),
    "quantize": run(["quantize", "--checkpoint", r"{tmp_path}/X.safetensors", "--output", r"{tmp_path}/y.pte"]),
    "blocked_imported": sorted(m for m in sys.modules if m.split(".")[0] in ("executorch", "torchao")),
}}))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env())
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    runs = json.loads(result.stdout.strip().splitlines()[-1])
    assert runs.pop("blocked_imported") == []
    for name, run in runs.items():
        assert "Traceback" not in run["err"], (name, run["err"])
    assert runs["help"]["status"] == 0 and "quantize" in runs["help"]["out"]
    assert runs["quantize_help"]["status"] == 0 and "--calibration-images" in runs["quantize_help"]["out"]
    assert runs["list"]["status"] == 0 and "mobilenetv3_small_035" in runs["list"]["out"]
    export = runs["export"]
    assert export["status"] == 2
    assert export["err"].strip() == f"mobilenetv3 export: error: --format executorch needs ExecuTorch: {MOBILE_EXTRA_HINT}"
    quantize = runs["quantize"]
    assert quantize["status"] == 2 and quantize["out"] == ""
    assert len(quantize["err"].strip().splitlines()) == 1 and "pip install 'mobilenetv3[mobile]'" in quantize["err"]
    assert quantize["err"].startswith("mobilenetv3 quantize: error: ")
    assert list(tmp_path.iterdir()) == []  # neither m.pte nor y.pte


@pytest.fixture(scope="module")
def wrong_files(exported, tmp_path_factory):
    folder = tmp_path_factory.mktemp("wrong")
    (folder / "text.pte").write_text("not a program")
    (folder / "truncated.pte").write_bytes(exported[0].read_bytes()[:4096])
    (folder / "folder.pte").mkdir()
    return folder


@pytest.mark.parametrize("name, message", [
    ("text.pte", "text.pte is not an ExecuTorch program (.pte): no ExecuTorch header"),
    ("truncated.pte", "ExecuTorch cannot load {folder}/truncated.pte: "),
    ("folder.pte", "folder.pte is a directory, not an ExecuTorch program"),
    ("missing.pte", "no such ExecuTorch program: {folder}/missing.pte"),
])
@pytest.mark.parametrize("command", ["predict", "eval"])
def test_a_pte_that_is_not_a_program_is_one_line(wrong_files, folder, name, message, command, capsys):
    path = wrong_files / name
    argv = [str(folder)] if command == "predict" else ["--data", str(folder)]
    assert main([command, "--checkpoint", str(path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message.format(folder=wrong_files) in err and len(err.splitlines()) == 1


def test_a_program_asked_to_run_in_another_engine_is_refused(exported, weights):
    with pytest.raises(UserError, match="is an ExecuTorch program: use --engine executorch"):
        make_engine("onnxruntime", exported[0])
    with pytest.raises(UserError, match="--engine executorch runs .pte programs"):
        make_engine("executorch", weights)
    with pytest.raises(UserError, match="was exported for 32px inputs, not 64"):
        make_engine("executorch", exported[0], input_size=64)
