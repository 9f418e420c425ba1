"""Everyday rough edges of `eval` and folder data: images far smaller than the input size, flags without help,
and the "training logged" line's sample count and its note when the evaluation is not training's."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mobilenetv3 import Preprocessing
from mobilenetv3.cli import COMMANDS, main
from mobilenetv3.data import DataConfig, build_datasets
from mobilenetv3.train.metrics import read_rows
from test_train_run import make_image_folder  # noqa: E402  (tests/ is on sys.path)

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def make_folder(root: Path, size: int, train_per_class: int = 2, val_per_class: int = 2) -> Path:
    """train/ and val/ of two classes (bright, dark) of size x size images."""
    return make_image_folder(root, train_per_class, val_per_class, size=size)


def upscale_warnings(caplog) -> list[str]:
    messages = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    return [message for message in messages if "are resized to" in message]


# --- small images at the default 224 px ------------------------------------------------------------------------


def test_small_images_at_the_default_input_size_warn_naming_input_size(tmp_path, caplog):
    root = make_folder(tmp_path / "tiny", 32)
    caplog.set_level(logging.WARNING, logger="mobilenetv3.data")
    bundle = build_datasets(DataConfig(dataset=str(root)))  # what `train --data DIR` builds
    assert bundle.preprocessing.input_size == 224
    [message] = upscale_warnings(caplog)
    assert "about 32x32 px" in message and "resized to 224 px" in message and "224 by default" in message
    assert "--input-size 32" in message and "\n" not in message

    caplog.clear()
    build_datasets(DataConfig(dataset=str(root), input_size=32))  # at their own size: nothing to say
    build_datasets(DataConfig(dataset=str(root), input_size=64 - 2))  # upscaled less than 2x on a side
    assert upscale_warnings(caplog) == []


def test_images_close_to_the_input_size_do_not_warn(tmp_path, caplog):
    root = make_folder(tmp_path / "large", 200, train_per_class=1, val_per_class=1)
    caplog.set_level(logging.WARNING, logger="mobilenetv3.data")
    build_datasets(DataConfig(dataset=str(root)))
    build_datasets(DataConfig(dataset=str(root), input_size=224), need_train=False, preprocessing=Preprocessing())
    assert upscale_warnings(caplog) == []


def test_eval_at_the_weights_own_size_warns_against_changing_it(tmp_path, caplog):
    """For eval the input size is the weights' own: the warning says another size changes the results, and
    points at training with --input-size instead."""
    root = make_folder(tmp_path / "tiny", 32, train_per_class=0)
    caplog.set_level(logging.WARNING, logger="mobilenetv3.data")
    cfg = DataConfig(dataset=str(root), input_size=224, crop_pct=0.875)
    build_datasets(cfg, need_train=False, preprocessing=Preprocessing())
    [message] = upscale_warnings(caplog)
    assert "resized to 224 px, the weights' input size" in message and "trained with --input-size 32" in message


def test_the_size_comes_from_headers_and_unreadable_files_are_skipped_quietly(tmp_path, caplog):
    root = make_folder(tmp_path / "tiny", 32, train_per_class=0, val_per_class=3)
    for index in range(3):  # sampled too, skipped without the warning that reading them gives
        (root / "val" / "bright" / f"broken{index}.png").write_bytes(b"")
    caplog.set_level(logging.WARNING, logger="mobilenetv3.data")
    build_datasets(DataConfig(dataset=str(root), input_size=96), need_train=False)
    assert [message for message in (r.getMessage() for r in caplog.records) if "broken" in message] == []
    [message] = upscale_warnings(caplog)
    assert "about 32x32 px" in message and "--input-size 32" in message


# --- flags without help ----------------------------------------------------------------------------------------


def options_help(help_text: str) -> dict[str, str]:
    """{option invocation: its help text} from a --help output (help text as argparse wraps it, re-joined)."""
    options: dict[str, str] = {}
    current = None
    for line in help_text.split("\noptions:\n", 1)[1].splitlines():
        if re.match(r"  -", line):  # an option: its invocation, then maybe its help after 2+ spaces
            current, _, text = line.strip().partition("  ")
            options[current] = text.strip()
        elif current is not None and line.startswith("   ") and line.strip():  # help continued (or begun)
            options[current] = f"{options[current]} {line.strip()}".strip()
        elif not line.strip():
            current = None
    return options


def help_of_options(command: str, capsys) -> dict[str, str]:
    """options_help of `mobilenetv3 COMMAND --help`."""
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    return options_help(capsys.readouterr().out)


LISTED_IN_ISSUE_22 = {
    "eval": ("--input-size", "--crop-pct", "--workers", "--limit-batches", "--device"),
    "profile": ("--num-classes", "--in-chans"),
    "lr-find": ("--start-lr", "--end-lr", "--steps", "--batch-size"),
    "train": ("--input-size", "--epochs", "--lr", "--batch-size", "--limit-train-batches", "--device"),
}


@pytest.mark.parametrize("command, flags", [(name, LISTED_IN_ISSUE_22.get(name, ())) for name in COMMANDS])
def test_every_option_has_help_and_the_listed_ones_state_their_default(command, flags, capsys):
    options = help_of_options(command, capsys)
    assert len(options) > len(flags)
    bare = [invocation for invocation, text in options.items() if not text]
    assert bare == []
    for flag in flags:
        [text] = [text for invocation, text in options.items() if invocation.split()[0] == flag]
        assert "default" in text, (flag, text)


def test_the_help_parser_sees_a_bare_flag():
    """The check above is not vacuous: a flag without help reads as one, also beside a long invocation."""
    import argparse

    parser = argparse.ArgumentParser(prog="x")
    parser.add_argument("--bare", type=int)
    parser.add_argument("--described", type=int, help="has help (default 1)")
    parser.add_argument("--a-very-long-option-name", metavar="A_VERY_LONG_METAVAR", help="help on the next line")
    parser.add_argument("--last-and-bare", metavar="X")
    found = options_help(parser.format_help())
    assert found == {"-h, --help": "show this help message and exit", "--bare BARE": "",
                     "--described DESCRIBED": "has help (default 1)",
                     "--a-very-long-option-name A_VERY_LONG_METAVAR": "help on the next line",
                     "--last-and-bare X": ""}


# --- the "training logged" line of eval ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """(data folder of 32x32 images, its 1-epoch run at 32 px); val has 4 images, batches of 2."""
    root = tmp_path_factory.mktemp("eval_ux")
    data, output = make_folder(root / "data", 32), root / "run"
    command = [sys.executable, "-m", "mobilenetv3", "train", "--model", "mobilenetv3_small_035", "--data", str(data),
               "--input-size", "32", "--batch-size", "2", "--epochs", "1", "--workers", "0", "--set", "threads=1",
               "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "are resized to" not in result.stderr  # trained at the images' own size
    return data, output


def run_eval(run: Path, *args: str, capsys) -> list[str]:
    assert main(["eval", "--checkpoint", str(run / "checkpoints" / "last.pt"), *args]) == 0
    return capsys.readouterr().out.strip().splitlines()


def logged_line(lines: list[str]) -> str:
    [line] = [line for line in lines if line.startswith("training logged for this checkpoint")]
    return line


def test_logged_line_shows_the_sample_count_and_no_note_when_the_data_is_training_s(tiny_run, capsys):
    data, run = tiny_run
    assert read_rows(run / "metrics.jsonl")[-1]["val_samples"] == 4
    lines = run_eval(run, "--data", str(data), capsys=capsys)
    assert logged_line(lines).endswith("(4 samples)")
    assert "(4 samples)" in lines[0]  # this evaluation's own count, as before
    assert not any(line.startswith("note:") for line in lines)


def test_note_when_limit_batches_evaluates_fewer_samples(tiny_run, capsys):
    data, run = tiny_run
    lines = run_eval(run, "--data", str(data), "--limit-batches", "1", capsys=capsys)
    assert logged_line(lines).endswith("(4 samples)")
    [note] = [line for line in lines if line.startswith("note:")]
    assert note == (f"note: training validated on {data} (4 samples); this evaluation used {data} "
                    "(2 samples, --limit-batches 1), so the numbers are not comparable")


def test_note_when_the_data_is_another_folder(tiny_run, tmp_path, capsys):
    data, run = tiny_run
    other = tmp_path / "other"
    shutil.copytree(data, other)
    (other / "val" / "dark" / "0.jpg").unlink()
    [note] = [line for line in run_eval(run, "--data", str(other), capsys=capsys) if line.startswith("note:")]
    assert note == (f"note: training validated on {data} (4 samples); this evaluation used {other} (3 samples), "
                    "so the numbers are not comparable")


def test_note_when_the_input_size_differs_and_the_upscale_is_named(tiny_run, capsys, caplog):
    data, run = tiny_run
    caplog.set_level(logging.WARNING, logger="mobilenetv3.data")
    [note] = [line for line in run_eval(run, "--data", str(data), "--input-size", "64", capsys=capsys)
              if line.startswith("note:")]
    assert "training validated on" in note and "(4 samples, 32px)" in note and "(4 samples, 64px)" in note
    [message] = upscale_warnings(caplog)
    assert "about 32x32 px" in message and "(--input-size 64; the weights' own input size is 32 px)" in message


def test_note_when_the_same_folder_s_val_changed(tiny_run, capsys):
    data, run = tiny_run
    moved = data / "moved.png"
    shutil.move(data / "val" / "bright" / "1.png", moved)
    try:
        lines = run_eval(run, "--data", str(data), capsys=capsys)
    finally:
        shutil.move(moved, data / "val" / "bright" / "1.png")
    [note] = [line for line in lines if line.startswith("note:")]
    assert f"validated on {data} (4 samples); this evaluation used {data} (3 samples)" in note


def test_a_misspelt_device_is_one_line(tmp_path, capsys):
    assert main(["eval", "--checkpoint", str(tmp_path / "none.pt"), "--data", "synthetic", "--device", "gpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mobilenetv3 eval: error: --device gpu: ") and "\n" not in err
