"""`mobilenetv3 list` / `profile`, and the CLI's one-line error contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import mobilenetv3
from mobilenetv3.cli import main


def test_profile_json_has_the_documented_fields(capsys):
    assert main(["profile", "--model", "mobilenetv3_small_100", "--resolution", "224", "160", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["resolution"] for r in rows] == [224, 160]
    assert set(rows[0]) == {"model", "resolution", "params", "macs", "paper_macs", "paper_params"}
    assert rows[0]["params"] == 2_542_856 and abs(rows[0]["macs"] / 1e6 - rows[0]["paper_macs"]) < 1
    assert rows[1]["paper_macs"] == 30


def test_profile_table_lists_every_paper_network(capsys):
    assert main(["profile"]) == 0
    out = capsys.readouterr().out
    for width in ("125", "100", "075", "050", "035"):
        assert f"mobilenetv3_large_{width}" in out and f"mobilenetv3_small_{width}" in out
    assert "mobilenetv3_large_minimal_100" in out


def test_list_filters(capsys):
    assert main(["list", "*minimal*"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names and all("minimal" in n for n in names)


def test_unknown_model_is_one_line_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "mobilenetv3", "profile", "--model", "mobilenetv3_smal_100"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "unknown model 'mobilenetv3_smal_100'" in lines[0] and "mobilenetv3_small_100" in lines[0]


def test_version_names_the_package_and_torch(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"mobilenetv3 {mobilenetv3.__version__} (torch {torch.__version__.split('+')[0]}")
    assert "torchvision" in out


def _run_with_reader_gone(args, env=None):
    """Run the CLI with stdout a pipe whose reader closed before the first write (as `| head -1` does
    once it has its line): every write, or the final flush, gets EPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "mobilenetv3", *args], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, env=env)
    finally:
        os.close(write_end)
    return proc


@pytest.mark.parametrize("args", [["list"], ["profile", "--json", "--resolution", "224", "192"]])
def test_a_closed_pipe_ends_quietly(args):
    proc = _run_with_reader_gone(args)
    assert proc.stderr == ""  # no traceback, no "Exception ignored ... BrokenPipeError"
    assert proc.returncode == 141  # 128 + SIGPIPE, as a shell reports for `yes | head -1`


def test_help_into_a_closed_pipe_ends_quietly():
    proc = _run_with_reader_gone(["train", "--help"])
    assert proc.stderr == "" and proc.returncode in (0, 141)  # argparse itself swallows the failed write


def test_a_broken_pipe_that_is_not_stdout_is_not_hidden(monkeypatch, capsys):
    """An EPIPE from another pipe (a worker queue, a socket) is a real error: it must not end the command
    quietly as if the reader of stdout had left."""
    import mobilenetv3.cli.list_models as list_models

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe (a worker's queue)")

    monkeypatch.setattr(list_models, "run", broken)
    with pytest.raises(BrokenPipeError):
        main(["list"])  # stdout is pytest's capture here
    # and with stdout a pipe whose reader is still there
    code = ("import sys, mobilenetv3.cli as cli, mobilenetv3.cli.list_models as lm\n"
            "def broken(args): raise BrokenPipeError(32, 'Broken pipe (a worker queue)')\n"
            "lm.run = broken\nsys.exit(cli.main(['list']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1 and "BrokenPipeError: [Errno 32] Broken pipe (a worker queue)" in proc.stderr


@pytest.fixture(scope="module")
def tiny_weights_and_images(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("pipe")
    model = mobilenetv3.create_model("mobilenetv3_small_050", num_classes=3).eval()
    weights = root / "tiny.safetensors"
    mobilenetv3.save_model(model, weights)
    generator = np.random.default_rng(0)
    for index in range(40):
        pixels = generator.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"img{index:02d}.png")
    return weights, root


@pytest.mark.parametrize("extra", [["--engine", "torch"], ["--engine", "onnxruntime"], ["--engine", "torch", "--json"]])
def test_predict_into_a_closed_pipe_ends_quietly(tiny_weights_and_images, tmp_path, extra):
    weights, images = tiny_weights_and_images
    env = dict(os.environ, MOBILENETV3_CACHE=str(tmp_path / "cache"))
    proc = _run_with_reader_gone(["predict", "--checkpoint", str(weights), *extra, str(images)], env=env)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.returncode == 141
