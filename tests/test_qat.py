"""Quantization-aware training: `mobilenetv3 train --qat` fine-tunes the fake-quantized graph (PT2E) of a
pretrained network, checkpoints and resumes it like a float run, and ends with an int8 ExecuTorch program;
`mobilenetv3 quantize` converts any of its checkpoints to the same program.

One 2-epoch QAT run on a tiny 2-class folder (the module fixture) is shared by the checks; the resume check
runs it again, kills it in its second epoch, resumes it and must end bit-identical, int8 program included.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("executorch", reason="needs the [mobile] extra")

from mobilenetv3 import save_model  # noqa: E402
from mobilenetv3.cli import main  # noqa: E402
from mobilenetv3.deploy import executorch as executorch_module  # noqa: E402
from mobilenetv3.deploy.executorch import MOBILE_EXTRA_HINT, load_pte, read_pte_metadata  # noqa: E402
from mobilenetv3.deploy.quantize import QAT_SCHEME  # noqa: E402
from mobilenetv3.files import file_sha256  # noqa: E402
from mobilenetv3.preprocessing import Preprocessing  # noqa: E402

from test_predict import tiny_model  # noqa: E402  (tests/ is on sys.path)
from test_train_run import (ENV, assert_same_tensors, kill_when, make_image_folder, run_ok,  # noqa: E402
                            train_command)

SIZE = 32


def qat_command(folder: Path, pretrained: Path, output: Path, *extra: str) -> list[str]:
    return train_command("--data", str(folder), "--pretrained", str(pretrained), "--qat", "--batch-size", "4",
                         "--deterministic", "--seed", "3", "--set", "schedule.name=constant",
                         "--set", "optim.lr=0.01", "--set", "qat.freeze_observers_epoch=1",
                         "--set", "qat.pte_batch=2", "--set", "checkpoint.keep_last_epochs=2",
                         "--output", str(output), *extra)


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("qat")
    folder = make_image_folder(root / "images")
    pretrained = root / "pretrained.safetensors"
    save_model(tiny_model(2), pretrained, preprocessing=Preprocessing(input_size=SIZE, crop_pct=1.0),
               class_names=["bright", "dark"])
    output = root / "run"
    result = run_ok(qat_command(folder, pretrained, output, "--epochs", "2"))
    return {"root": root, "folder": folder, "pretrained": pretrained, "output": output, "log": result.stderr,
            "checkpoints": output / "checkpoints"}


def test_a_qat_run_checkpoints_the_fake_quantized_graph_and_freezes_its_ranges(qat_run):
    checkpoints = qat_run["checkpoints"]
    last = torch.load(checkpoints / "last.pt", weights_only=True)
    assert last["qat"] == {"scheme": QAT_SCHEME, "image_shape": [3, SIZE, SIZE]}
    assert last["model_name"] == "mobilenetv3_small_035" and last["step"] == 12
    state = last["model"]
    ranges = [key for key in state if key.startswith("activation_post_process_") and key.endswith(".scale")]
    assert len(ranges) > 20, "the graph carries its fake quantizers' ranges"
    # the network's own parameters keep their names, and QAT moved them away from the pretrained values
    from mobilenetv3.weights.io import read_safetensors

    pretrained, _ = read_safetensors(qat_run["pretrained"])
    assert state["classifier.weight"].shape == pretrained["classifier.weight"].shape
    assert not torch.equal(state["classifier.weight"], pretrained["classifier.weight"])
    # qat.freeze_observers_epoch=1: ranges were learnt in epoch 1 and frozen for epoch 2
    first = torch.load(checkpoints / "epoch_0001.pt", weights_only=True)["model"]
    enabled = lambda s: {int(v) for k, v in s.items() if k.endswith(".observer_enabled")}  # noqa: E731
    assert enabled(first) == {1} and enabled(state) == {0}
    for key in ranges:
        assert torch.equal(first[key], state[key]), key
    assert "quantization-aware training: the fake-quantized int8 graph of mobilenetv3_small_035" in qat_run["log"]


def test_the_run_ends_with_a_verified_int8_program_that_eval_runs(qat_run, capsys):
    checkpoints = qat_run["checkpoints"]
    program = checkpoints / "int8.pte"
    assert f"wrote {program} (int8 ExecuTorch/XNNPACK, batch 2" in qat_run["log"]
    assert "fake-quantized top-1" in qat_run["log"] and "agreement" in qat_run["log"]
    metadata = read_pte_metadata(program)
    assert metadata["quantization"] == "int8" and metadata["quantization_scheme"] == QAT_SCHEME
    assert metadata["model_name"] == "mobilenetv3_small_035" and "calibration_images" not in metadata
    assert metadata["weights_sha256"] == file_sha256(checkpoints / "last.pt")
    assert load_pte(program).fixed_batch == 2
    assert main(["eval", "--checkpoint", str(program), "--data", str(qat_run["folder"]), "--workers", "0"]) == 0
    assert "top-1" in capsys.readouterr().out


def test_quantize_converts_a_qat_checkpoint_to_the_same_program(qat_run, capsys):
    checkpoints = qat_run["checkpoints"]
    output = qat_run["root"] / "again.pte"
    assert main(["quantize", "--checkpoint", str(checkpoints / "last.pt"), "--output", str(output),
                 "--batch", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "from quantization-aware training" in lines[0]
    assert lines[1].startswith("fake-quantized top-1 ") and lines[2].startswith("int8 agrees with fake-quantized")
    # the graph rebuilt from the checkpoint converts to the very bytes the run wrote
    assert output.read_bytes() == (checkpoints / "int8.pte").read_bytes()


def test_float_commands_refuse_a_qat_checkpoint_in_one_line(qat_run):
    last = qat_run["checkpoints"] / "last.pt"
    result = subprocess.run([sys.executable, "-m", "mobilenetv3", "eval", "--checkpoint", str(last), "--data",
                             str(qat_run["folder"])], capture_output=True, text=True, env=ENV, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "is a quantization-aware training checkpoint" in result.stderr
    assert f"mobilenetv3 quantize --checkpoint {last}" in result.stderr


def test_a_qat_run_killed_mid_epoch_resumes_bit_identical(qat_run):
    output = qat_run["root"] / "killed"
    # in epoch 2, with the ranges frozen
    payload = kill_when(qat_command(qat_run["folder"], qat_run["pretrained"], output, "--epochs", "2",
                                    "--checkpoint-every-steps", "1"),
                        lambda saved: saved["epoch"] == 1 and saved["batch_in_epoch"] > 0)
    last = output / "checkpoints" / "last.pt"
    # killed mid-epoch 2, before the program was written
    assert payload["step"] > 6 and not (output / "checkpoints" / "int8.pte").exists()

    run_ok([sys.executable, "-m", "mobilenetv3", "train", "--output", str(output), "--resume"])
    resumed = torch.load(last, weights_only=True)
    expected = torch.load(qat_run["checkpoints"] / "last.pt", weights_only=True)
    assert resumed["step"] == expected["step"] == 12
    assert_same_tensors(resumed["model"], expected["model"])  # parameters, BN statistics, learnt ranges, flags
    for state_a, state_b in zip(resumed["optimizer"]["state"].values(), expected["optimizer"]["state"].values()):
        assert_same_tensors(state_a, state_b)
    # the same int8 program (its metadata names another last.pt, whose sha256 differs: other paths inside)
    programs = [folder / "checkpoints" / "int8.pte" for folder in (output, qat_run["output"])]
    images = torch.randn(4, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)).numpy()
    assert np.array_equal(load_pte(programs[0])(images), load_pte(programs[1])(images))
    metadata = [read_pte_metadata(program) for program in programs]
    assert metadata[0].pop("weights_sha256") != metadata[1].pop("weights_sha256") and metadata[0] == metadata[1]


@pytest.mark.parametrize("setting", ["--ema", "--amp=bf16", "--compile", "--set=swa.enabled=true",
                                     "--set=model.drop_path_rate=0.1"])
def test_qat_refuses_what_acts_on_the_network_modules(tmp_path, setting, capsys):
    status = main(["train", "--data", "synthetic", "--qat", setting, "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1, err
    assert "qat.enabled (--qat) does not work with" in err
    assert not (tmp_path / "run").exists()


def test_a_qat_checkpoint_neither_resumes_as_float_nor_starts_a_run(qat_run, capsys):
    last = qat_run["checkpoints"] / "last.pt"
    before = last.read_bytes()
    assert main(["train", "--output", str(qat_run["output"]), "--resume", "--no-qat", "--allow-config-change"]) == 2
    assert "is a quantization-aware training checkpoint: resume it with qat.enabled" in capsys.readouterr().err
    assert main(["train", "--data", str(qat_run["folder"]), "--model", "mobilenetv3_small_035", "--batch-size", "4",
                 "--pretrained", str(last), "--output", str(qat_run["root"] / "new")]) == 2
    assert f"continue its run with --resume {last}" in capsys.readouterr().err
    assert last.read_bytes() == before and not (qat_run["root"] / "new").exists()


def test_qat_without_the_mobile_extra_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(executorch_module, "executorch_available", lambda: False)
    status = main(["train", "--data", "synthetic", "--qat", "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and MOBILE_EXTRA_HINT in err, err
    assert "quantization-aware training (--qat)" in err
    assert not (tmp_path / "run").exists()


def test_the_qat_graph_is_the_network_with_fake_quantization_off():
    """`prepare_qat` keeps the network's BatchNorm eps (1e-3) and momentum, which torchao's conv-BN rewrite
    replaces with 1e-5 / 0.1, and its train() / eval() switch the BatchNorm and dropout ops: with fake
    quantization off, the graph computes what the network computes, in both modes."""
    import copy

    from torchao.quantization.pt2e.fake_quantize import disable_fake_quant, disable_observer

    from mobilenetv3 import create_model
    from mobilenetv3.timing import calibrate_batchnorm
    from mobilenetv3.deploy.quantize import prepare_qat

    torch.manual_seed(0)
    network = create_model("mobilenetv3_small_035", num_classes=5, drop_rate=0.0, bn_momentum=0.05)
    calibrate_batchnorm(network, torch.randn(32, 3, SIZE, SIZE))
    graph = prepare_qat(copy.deepcopy(network), (3, SIZE, SIZE))
    graph.apply(disable_fake_quant)
    graph.apply(disable_observer)
    images = torch.randn(8, 3, SIZE, SIZE)
    for mode in ("eval", "train"):
        getattr(network, mode)()
        getattr(graph, mode)()
        with torch.no_grad():
            expected, got = network(images), graph(images)
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max())), mode
    # the train-mode pass updated the running statistics alike (momentum 0.05, not 0.1)
    ours, theirs = network.state_dict(), graph.state_dict()
    for key in (key for key in ours if key.endswith("running_var")):
        assert torch.allclose(theirs[key], ours[key], rtol=1e-5, atol=1e-6), key
    flags = lambda: {n.args[5] for n in graph.graph.nodes if n.target is torch.ops.aten.batch_norm.default}  # noqa: E731
    assert graph.eval() is graph and flags() == {False} and not graph.training
    assert graph.train() is graph and flags() == {True} and graph.training


def test_validation_does_not_move_the_ranges_and_checkpoints_keep_observing():
    """In eval the fake quantizers are paused (ranges from training batches only); the state a checkpoint
    stores (`qat_state_dict`) still says they observe, and train() resumes observing."""
    from mobilenetv3 import create_model
    from mobilenetv3.deploy.quantize import prepare_qat, qat_state_dict

    torch.manual_seed(0)
    graph = prepare_qat(create_model("mobilenetv3_small_035", num_classes=5), (3, SIZE, SIZE))
    images = torch.randn(4, 3, SIZE, SIZE)
    ranges = lambda: {k: v.clone() for k, v in graph.state_dict().items() if k.endswith((".min_val", ".max_val"))}  # noqa: E731
    flags = lambda state: {int(v) for k, v in state.items() if k.endswith(".observer_enabled")}  # noqa: E731
    graph.train()
    graph(images)
    observed = ranges()
    graph.eval()
    with torch.no_grad():
        graph(images * 5)
    assert all(torch.equal(value, ranges()[key]) for key, value in observed.items())
    assert flags(graph.state_dict()) == {0} and flags(qat_state_dict(graph)) == {1}
    graph.train()
    assert flags(graph.state_dict()) == {1}
    graph(images * 5)
    assert any(not torch.equal(value, ranges()[key]) for key, value in observed.items())


def test_lr_find_refuses_a_qat_config_instead_of_measuring_the_float_network(tmp_path, capsys):
    status = main(["lr-find", "--data", "synthetic", "--set", "qat.enabled=true", "--output", str(tmp_path / "lr")])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "lr-find measures the float network" in err, err
    assert not (tmp_path / "lr").exists()
