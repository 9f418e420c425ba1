"""Everyday use of `train` and `lr-find` (issue 22, section 3): progress output in log files, naming the data,
`--resume` refusing changed settings, Ctrl-C, no empty run folders after a failure, lr-find's flags and JSON.

Runs are tiny (2 classes of 8 synthetic 16 px images, 2 steps per epoch) and go through the CLI in this
process, except where the output must be a real pipe.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mobilenetv3 import cli
from mobilenetv3.cli.train import DATA_REQUIRED
from mobilenetv3.train.loop import progress_enabled
from mobilenetv3.train.metrics import read_rows
from mobilenetv3.train.run import Trainer

#: 8 training images, batch 4: 2 steps per epoch.
TINY = (
    "--data", "synthetic", "--model", "mobilenetv3_small_035", "--input-size", "16", "--device", "cpu",
    "--workers", "0", "--batch-size", "4", "--sched", "constant",
    "--set", "data.synthetic_train_samples=8", "--set", "data.synthetic_val_samples=4",
    "--set", "data.synthetic_classes=2", "--set", "schedule.warmup_epochs=0", "--set", "threads=1",
)


@pytest.fixture
def mobilenetv3(capsys, caplog):
    """Run `mobilenetv3 ARGS...` in this process -> (exit status, stdout, stderr); its log records are in caplog."""
    caplog.set_level("INFO", logger="mobilenetv3")
    threads, rng = torch.get_num_threads(), torch.get_rng_state()

    def run(*argv) -> tuple[int, str, str]:
        capsys.readouterr()
        caplog.clear()
        status = cli.main([str(a) for a in argv])
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    yield run
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)


def logged(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records]


def error_line(status: int, stderr: str) -> str:
    assert status == 2, stderr
    assert "Traceback" not in stderr
    return stderr.strip().splitlines()[-1]


# --- progress bars: a terminal gets them, a log file one line per epoch --------------------------------------


class _Stream:
    def __init__(self, tty: bool) -> None:
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_bars_only_on_a_terminal_unless_asked_or_tqdm_disable(monkeypatch):
    terminal, log_file = _Stream(True), _Stream(False)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert progress_enabled(None, terminal) and not progress_enabled(None, log_file)
    assert progress_enabled(True, log_file) and not progress_enabled(False, terminal)  # --progress / --no-progress
    for value in ("1", "true", "yes"):
        monkeypatch.setenv("TQDM_DISABLE", value)
        assert not progress_enabled(None, terminal), value
        assert progress_enabled(True, terminal), value  # an explicit flag wins
    for value in ("", "0", "false"):
        monkeypatch.setenv("TQDM_DISABLE", value)
        assert progress_enabled(None, terminal), value


def test_a_log_file_gets_one_line_per_epoch_and_no_bar_frames(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TQDM_DISABLE"}
    result = subprocess.run([sys.executable, "-m", "mobilenetv3", "train", *TINY, "--epochs", "2",
                             "--output", str(tmp_path / "run")],
                            capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\r" not in result.stderr
    assert "step/s" not in result.stderr and "s/step" not in result.stderr  # no tqdm rate, not even once
    epochs = [line for line in result.stderr.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"]
    assert all(" img/s | " in line for line in epochs)  # the bar's throughput, once per epoch


def test_progress_flag_draws_bars_also_without_a_terminal(tmp_path, mobilenetv3, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")  # --progress wins over it too
    status, _, stderr = mobilenetv3("train", *TINY, "--epochs", 1, "--progress", "--output", tmp_path / "run")
    assert status == 0, stderr
    assert "\r" in stderr and "epoch 1/1" in stderr and "validate" in stderr


# --- the data must be named ----------------------------------------------------------------------------------


def test_train_and_lr_find_without_data_stop_naming_the_choices(tmp_path, mobilenetv3):
    for command in ("train", "lr-find"):
        status, _, stderr = mobilenetv3(command, "--output", tmp_path / "runs" / "x")
        assert error_line(status, stderr) == f"mobilenetv3 {command}: error: {DATA_REQUIRED}"
    assert "--data synthetic" in DATA_REQUIRED and "--data fashion-mnist" in DATA_REQUIRED
    assert not (tmp_path / "runs").exists()
    (tmp_path / "no_data.yaml").write_text("epochs: 1\n")
    status, _, stderr = mobilenetv3("train", "--config", tmp_path / "no_data.yaml", "--output", tmp_path / "runs" / "x")
    assert error_line(status, stderr) == f"mobilenetv3 train: error: {DATA_REQUIRED}"
    # printing a config needs no data
    assert mobilenetv3("train", "--config", tmp_path / "no_data.yaml", "--print-config")[0] == 0


def test_a_recipe_config_file_or_set_names_the_data():
    from mobilenetv3.cli.train import require_data_source

    def check(*argv: str) -> None:
        require_data_source(cli.build_parser().parse_args(["train", *argv]))

    check("--recipe", "fashion-mnist")
    check("--set", "data.dataset=synthetic")
    check("--data", "synthetic")
    check("--output", "somewhere", "--resume")  # the run's own data


def test_train_help_says_what_data_accepts(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "500")  # no wrapping inside 'fashion-mnist'
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ("--data DATASET [data.dataset] what to train on: a folder in ImageNet layout (DIR/train/<class>/*, "
            "DIR/val/<class>/*), 'fashion-mnist', or 'synthetic' (random tensors: speed tests only); required "
            "unless --recipe, --config or --resume sets it") in text
    assert "--progress, --no-progress" in text and "--allow-config-change" in text


# --- --resume refuses settings that break an exact resume ----------------------------------------------------


def test_resume_refuses_changed_settings_unless_allowed(tmp_path, mobilenetv3, caplog):
    run = tmp_path / "run"
    status, _, stderr = mobilenetv3("train", *TINY, "--epochs", 1, "--output", run)
    assert status == 0, stderr
    last = run / "checkpoints" / "last.pt"
    config_before, checkpoint_before = (run / "config.yaml").read_bytes(), last.read_bytes()

    status, _, stderr = mobilenetv3("train", "--output", run, "--resume", "--epochs", 2, "--input-size", 24,
                                    "--lr", "0.01", "--batch-size", 2, "--limit-train-batches", 1)
    assert error_line(status, stderr) == (
        f"mobilenetv3 train: error: cannot resume {last} exactly: the config differs from the checkpoint's in "
        "data.input_size 16 -> 24, optim.lr 0.002 -> 0.01, batch_size 4 -> 2, limit_train_batches None -> 1; "
        "drop those settings, or pass --allow-config-change to continue with the new values (config.yaml is then "
        "rewritten with them)")
    assert (run / "config.yaml").read_bytes() == config_before and last.read_bytes() == checkpoint_before

    # more epochs, and settings of where and how the same computation runs, are an exact resume
    status, _, stderr = mobilenetv3("train", "--output", run, "--resume", "--epochs", 2, "--workers", 0,
                                    "--device", "cpu", "--checkpoint-every-steps", 1, "--no-progress")
    assert status == 0, stderr
    assert not [message for message in logged(caplog) if "changed config" in message]

    status, _, stderr = mobilenetv3("train", "--output", run, "--resume", "--epochs", 3, "--lr", "0.01",
                                    "--allow-config-change")
    assert status == 0, stderr
    assert f"resuming {last} with a changed config (not an exact resume): optim.lr 0.002 -> 0.01" in logged(caplog)
    rows = read_rows(run / "metrics.jsonl")
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert rows[1]["lr"] == pytest.approx(0.002 * 4 / 256) and rows[2]["lr"] == pytest.approx(0.01 * 4 / 256)
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 0.01


def test_a_plain_resume_after_an_allowed_change_resumes_the_checkpoint(tmp_path, mobilenetv3, caplog):
    """config.yaml holds an allowed change before any checkpoint does: the plain resume (the command Ctrl-C
    suggests) takes the checkpoint's own config, not config.yaml's, so it is exact and not refused."""
    run = tmp_path / "run"
    assert mobilenetv3("train", *TINY, "--epochs", 1, "--output", run)[0] == 0
    # all epochs are done: the allowed change rewrites config.yaml but saves no checkpoint
    status, _, stderr = mobilenetv3("train", "--output", run, "--resume", "--lr", "0.01", "--allow-config-change")
    assert status == 0, stderr
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 0.01
    caplog.clear()
    status, _, stderr = mobilenetv3("train", "--output", run, "--resume", "--epochs", 2)
    assert status == 0, stderr
    assert not [message for message in logged(caplog) if "changed config" in message]
    assert read_rows(run / "metrics.jsonl")[-1]["lr"] == pytest.approx(0.002 * 4 / 256)


def test_the_same_folder_spelt_another_way_is_not_a_data_change(tmp_path, mobilenetv3, monkeypatch):
    from test_train_run import make_image_folder  # noqa: E402  (tests/ is on sys.path)

    monkeypatch.chdir(tmp_path)
    make_image_folder(tmp_path / "imgs", train_per_class=2, val_per_class=1, size=16)
    folder_run = [*TINY[2:], "--output", "run"]  # TINY without its --data synthetic
    assert mobilenetv3("train", "--data", "imgs", *folder_run, "--epochs", 1, "--num-classes", 2)[0] == 0
    status, _, stderr = mobilenetv3("train", "--data", "./imgs/", "--output", "run", "--resume", "--epochs", 2)
    assert status == 0, stderr
    status, _, stderr = mobilenetv3("train", "--data", "synthetic", "--output", "run", "--resume", "--epochs", 3)
    assert status == 2 and "data.dataset './imgs/' -> 'synthetic'" in stderr  # the resumed run's spelling


def test_allow_config_change_without_resume_is_refused(tmp_path, mobilenetv3):
    status, _, stderr = mobilenetv3("train", *TINY, "--output", tmp_path / "run", "--allow-config-change")
    assert error_line(status, stderr) == "mobilenetv3 train: error: --allow-config-change applies to --resume only"
    assert not (tmp_path / "run").exists()


# --- Ctrl-C -----------------------------------------------------------------------------------------------------


def _interrupt_at(monkeypatch, step: int) -> None:
    """Ctrl-C right after optimizer step `step` (and its checkpoint, if one is due)."""
    save_mid_epoch = Trainer._save_mid_epoch

    def save_then_interrupt(self, state):
        save_mid_epoch(self, state)
        if state.step == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_save_mid_epoch", save_then_interrupt)


def test_ctrl_c_names_what_was_saved_and_the_command_that_resumes(tmp_path, mobilenetv3, monkeypatch, caplog):
    run, last = tmp_path / "run", tmp_path / "run" / "checkpoints" / "last.pt"
    _interrupt_at(monkeypatch, 3)
    status, _, stderr = mobilenetv3("train", *TINY, "--epochs", 2, "--checkpoint-every-steps", 1, "--output", run)
    assert status == 130 and stderr.strip().splitlines()[-1] == "mobilenetv3 train: interrupted"
    command = f"mobilenetv3 train --output {shlex.quote(str(run))} --resume"
    # step 3 = the first batch of epoch 2, counted from 1 as the epoch lines count
    assert f"interrupted: {last} holds epoch 2/2, batch 1/2, step 3; resume with: {command}" in logged(caplog)
    assert [line for line in logged(caplog) if line.startswith("epoch ")][0].startswith("epoch 1/2: ")

    monkeypatch.undo()
    status, _, stderr = mobilenetv3(*shlex.split(command)[1:])
    assert status == 0, stderr
    assert (f"resumed from {last} (saved at epoch 2/2, batch 1/2, step 3): continuing with batch 2 of epoch 2"
            in logged(caplog))
    assert torch.load(last, weights_only=True)["step"] == 4


def test_ctrl_c_before_the_first_checkpoint_leaves_no_folder(tmp_path, mobilenetv3, monkeypatch, caplog):
    run = tmp_path / "runs" / "x"
    _interrupt_at(monkeypatch, 1)
    status, _, stderr = mobilenetv3("train", *TINY, "--epochs", 2, "--output", run)
    assert status == 130, stderr
    assert (f"interrupted before the first checkpoint: nothing was saved; removed {run} (a checkpoint is written at "
            "the end of each epoch, and every N steps with --checkpoint-every-steps N)") in logged(caplog)
    assert not (tmp_path / "runs").exists()


# --- a command that fails leaves no run folder -------------------------------------------------------------


def test_failed_commands_leave_no_run_folder(tmp_path, mobilenetv3):
    run = tmp_path / "runs" / "x"
    status, _, stderr = mobilenetv3("train", "--output", run, "--resume")
    assert error_line(status, stderr) == (f"mobilenetv3 train: error: cannot resume: {run / 'checkpoints' / 'last.pt'} "
                                          f"does not exist (no run has saved a checkpoint in {run})")
    status, _, stderr = mobilenetv3("train", *TINY, "--data", tmp_path / "imagenett", "--output", run)
    assert "data folder not found" in error_line(status, stderr)
    assert not (tmp_path / "runs").exists()

    existing = tmp_path / "existing"  # a folder that was there before is left as it was
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    status, _, stderr = mobilenetv3("train", *TINY, "--data", tmp_path / "imagenett", "--output", existing)
    assert status == 2 and [path.name for path in existing.iterdir()] == ["notes.txt"]


# --- lr-find ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--resume", "--epochs=3", "--lr=0.1", "--sched=step", "--ema",
                                  "--limit-train-batches=2", "--checkpoint-every-steps=5", "--list-keys"])
def test_lr_find_does_not_take_train_only_flags(flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args(["lr-find", "--data", "synthetic", flag])
    assert exit_info.value.code == 2
    assert f"unrecognized arguments: {flag}" in capsys.readouterr().err


def test_lr_find_help_shows_the_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "500")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["lr-find", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--start-lr LR learning rate of the first step (default: 1e-06)" in text
    assert "--end-lr LR learning rate of the last step, reached unless the loss diverges first (default: 1)" in text
    assert "--steps STEPS optimizer steps from --start-lr to --end-lr, growing exponentially (default: 100)" in text


def test_lr_find_suggestions_are_named_for_what_they_are():
    from mobilenetv3.train.lr_find import suggest

    lrs = [1e-4 * 10 ** (i / 4) for i in range(13)]
    # steepest descent early, lowest loss at the end: the range is steepest .. lowest / 10
    early = suggest(lrs, [5.0, 4.9, 3.0, 1.0] + [1.0 - 0.05 * k for k in range(1, 10)])
    assert set(early) == {"steepest_lr", "min_loss_lr", "suggested_min_lr", "suggested_max_lr"}
    assert (early["steepest_lr"], early["min_loss_lr"]) == (lrs[2], lrs[12])
    assert (early["suggested_min_lr"], early["suggested_max_lr"]) == (lrs[2], lrs[12] / 10)
    # steepest descent just before the lowest loss: lowest / 10 is the lower end
    late = suggest(lrs, [5.0] * 9 + [4.9, 2.0, 1.0, 1.5])
    assert (late["steepest_lr"], late["min_loss_lr"]) == (lrs[10], lrs[11])
    assert (late["suggested_min_lr"], late["suggested_max_lr"]) == (lrs[11] / 10, lrs[10])
    assert late["suggested_min_lr"] < late["suggested_max_lr"]


def test_lr_find_json_and_file_use_the_same_names(tmp_path, mobilenetv3):
    output = tmp_path / "lr"
    status, stdout, stderr = mobilenetv3("lr-find", *[a for a in TINY if a not in ("--sched", "constant")],
                                         "--output", output, "--steps", 6, "--start-lr", "1e-4", "--end-lr", "1")
    assert status == 0, stderr
    printed = json.loads(stdout.strip().splitlines()[-1])
    assert list(printed) == ["steepest_lr", "min_loss_lr", "suggested_min_lr", "suggested_max_lr",
                             "optim_lr_equivalent", "global_batch", "plot"]
    assert printed["suggested_min_lr"] <= printed["suggested_max_lr"]
    assert printed["optim_lr_equivalent"] == {key: printed[key] * 256 / 4 for key in
                                              ("steepest_lr", "min_loss_lr", "suggested_min_lr", "suggested_max_lr")}
    saved = json.loads((output / "lr_find.json").read_text())
    assert {key: saved[key] for key in printed if key != "plot"} == {k: v for k, v in printed.items() if k != "plot"}
    assert "\r" not in stderr  # no bar without a terminal
    assert Path(printed["plot"]).is_file()
