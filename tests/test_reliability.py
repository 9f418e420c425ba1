"""Reliability and security (issue #5): crashes at any moment, torchrun restarts, hostile files, broken data,
numerical trouble, a full disk, and one-line errors for user mistakes.

Everything goes through the public CLI: `mobilenetv3.cli.main` in this process for the cheap cases,
real subprocesses where a process has to die (SIGKILL, torchrun).  Covered elsewhere, not repeated here:
the dataset-level handling of broken / odd-mode images (test_data.py), `load_model` refusing unsafe
pickles and naming the first bad key (test_weights_io.py), unknown `--set` keys (test_train_config.py),
one SIGKILL mid-epoch then an exact resume, a resume into another model, and the CLI errors for a missing
data dir, zero epochs, a mismatched --num-classes and a --resume without a checkpoint (test_train_run.py).
"""

from __future__ import annotations

import ast
import errno
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
import torch
from PIL import Image
from safetensors.torch import save_file

from mobilenetv3 import cli, create_model
from mobilenetv3.train.checkpoint import load as load_training_checkpoint
from mobilenetv3.train.metrics import read_rows
from mobilenetv3.weights.io import read_safetensors, save_model

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "src" / "mobilenetv3"

#: A tiny deterministic CPU run: 4 classes of synthetic 16 px images, 4 steps per epoch.
TINY_RUN = (
    "--data", "synthetic", "--model", "mobilenetv3_small_035", "--input-size", "16", "--device", "cpu",
    "--deterministic", "--workers", "0", "--batch-size", "4", "--checkpoint-every-steps", "1",
    "--set", "data.synthetic_train_samples=16", "--set", "data.synthetic_val_samples=8",
    "--set", "data.synthetic_classes=4", "--set", "schedule.warmup_epochs=0", "--set", "threads=1",
)
STEPS_PER_EPOCH = 4


@pytest.fixture
def mobilenetv3(capsys, monkeypatch):
    """Run `mobilenetv3 ARGS...` in this process -> (exit status, stdout, stderr); global torch state restored."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # set by --deterministic; restored by monkeypatch
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    threads, rng = torch.get_num_threads(), torch.get_rng_state()

    def run(*argv: str) -> tuple[int, str, str]:
        capsys.readouterr()
        status = cli.main([str(a) for a in argv])
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    yield run
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)


def error_line(status: int, stderr: str) -> str:
    """The CLI's error line, after checking the contract: exit 2, no traceback, the last line says it."""
    assert status == 2, stderr
    assert "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("mobilenetv3 ") and ": error: " in line, line
    return line


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """One tiny 1-epoch run (in a subprocess: it sets global torch state) shared by the tests that need one."""
    output = tmp_path_factory.mktemp("run")
    subprocess.run([sys.executable, "-m", "mobilenetv3", "train", *TINY_RUN, "--epochs", "1", "--output", output],
                   check=True, capture_output=True)
    return output


def python_command(*arguments) -> list[str]:
    return [sys.executable, *map(str, arguments)]


# --- crash at any moment; the soak's short version ------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_during_epochs_and_checkpoint_writes_then_resume_is_bit_identical(tmp_path):
    """benchmarks/soak.py, short: SIGKILL mid-step / mid-validation / inside a checkpoint write, --resume each time.

    After every kill last.pt must load (weights_only) and not be older than before; the final weights,
    EMA, optimizer, scheduler, best.pt, epoch_NNNN.pt, metrics rows and eval numbers must equal a clean run's.
    """
    result = subprocess.run(
        python_command(REPO / "benchmarks" / "soak.py", "--cycles", 3, "--epochs", 2, "--train-samples", 24,
                       "--seed", 3, "--workdir", tmp_path),
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "MOBILENETV3_RESULTS_DIR": str(tmp_path / "results")},  # keep the records clean
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["cycles"] == 3
    assert summary["stalled_write_kills"] >= 1 and summary["kills_during_write"] >= 1
    assert summary["kills_during_epoch"] >= 1
    assert summary["last_pt_readable_after_every_kill"] and summary["last_pt_never_went_back"]
    assert summary["equal"], summary["differences"]
    assert summary["final_step"] == 2 * 24 // 4
    assert summary["leftover_temp_files"] == 0


# --- worker death under torchrun ----------------------------------------------------------------------------

#: `mobilenetv3 <args>`, except that rank 1 of the first attempt SIGKILLs itself after step $KILL_RANK_1_AT_STEP.
KILLING_RANK = """
import os, signal, sys
from mobilenetv3 import cli
from mobilenetv3.train.run import Trainer

kill_at = int(os.environ["KILL_RANK_1_AT_STEP"])
save_mid_epoch = Trainer._save_mid_epoch

def save_then_die(self, state):
    save_mid_epoch(self, state)
    if self.env.rank == 1 and state.step == kill_at and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        os.kill(os.getpid(), signal.SIGKILL)

Trainer._save_mid_epoch = save_then_die
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_torchrun_restarts_a_killed_rank_and_training_resumes_by_itself(tmp_path):
    script = tmp_path / "killing_rank.py"
    script.write_text(KILLING_RANK)
    torchrun = python_command("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", 2)
    train = ["train", *TINY_RUN, "--epochs", "2"]
    env = {**os.environ, "KILL_RANK_1_AT_STEP": "3", "OMP_NUM_THREADS": "1"}
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)  # the default torchrun setup must work as it is

    restarted = subprocess.run([*torchrun, "--max-restarts", "1", script, *train, "--output", tmp_path / "restarted"],
                               env=env, capture_output=True, text=True, timeout=600)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "exitcode: -9" in restarted.stderr  # rank 1 really died of SIGKILL
    resumed = re.search(r"resumed from \S+/restarted/checkpoints/last\.pt "
                        r"\(saved at epoch \d/2, batch \d/2, step (\d)\)", restarted.stderr)
    assert resumed and resumed.group(1) in ("2", "3"), restarted.stderr[-3000:]  # from the last step written

    clean = subprocess.run([*torchrun, "-m", "mobilenetv3", *train, "--output", tmp_path / "clean"],
                           env=env, capture_output=True, text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr[-3000:]
    a = load_training_checkpoint(tmp_path / "clean" / "checkpoints" / "last.pt")
    b = load_training_checkpoint(tmp_path / "restarted" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 2 * STEPS_PER_EPOCH // 2  # global batch 8: 2 steps per epoch
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    timing = ("epoch_time_s", "train_images_per_s")
    rows = [[{k: v for k, v in row.items() if k not in timing} for row in read_rows(tmp_path / run / "metrics.jsonl")]
            for run in ("clean", "restarted")]
    assert rows[0] == rows[1] and [row["epoch"] for row in rows[1]] == [1, 2]


# --- untrusted checkpoints and weights -------------------------------------------------------------------------


def test_every_torch_load_in_the_package_is_weights_only():
    """Statically: each torch.load call passes weights_only=True (checkpoints from strangers run no code)."""
    calls = []
    for path in SOURCE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
                owner = node.func.value
                if isinstance(owner, ast.Name) and owner.id in ("torch", "pickle", "dill", "joblib"):
                    keywords = {k.arg: k.value for k in node.keywords}
                    safe = isinstance(keywords.get("weights_only"), ast.Constant) and keywords["weights_only"].value
                    calls.append((f"{path.relative_to(SOURCE)}:{node.lineno}", owner.id, bool(safe)))
    assert calls, "no torch.load found: the scan is broken"
    assert [call for call in calls if not call[2]] == []


@pytest.fixture
def evil_checkpoint(tmp_path) -> tuple[Path, Path]:
    """(a .pt whose unpickling would run `touch MARKER`, MARKER)."""
    marker = tmp_path / "code_ran"

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pt"
    torch.save({"model_name": "mobilenetv3_small_035", "model_kwargs": {}, "model": RunsCode()}, path)
    return path, marker


@pytest.fixture
def image_file(tmp_path) -> Path:
    path = tmp_path / "images" / "cat.png"
    path.parent.mkdir()
    Image.new("RGB", (20, 20), (200, 30, 30)).save(path)
    return path


def entry_points(weights: Path, image: Path, output: Path) -> dict[str, list]:
    """Every command that reads a weights file or checkpoint, reading `weights`."""
    return {
        "eval": ["eval", "--checkpoint", weights, "--data", "synthetic", "--device", "cpu", "--workers", 0],
        "predict": ["predict", "--checkpoint", weights, "--engine", "torch", image],
        "predict-onnxruntime": ["predict", "--checkpoint", weights, "--engine", "onnxruntime", image],
        "export": ["export", "--checkpoint", weights, "--format", "onnx", "--output", output / "model.onnx"],
        "resume": ["train", *TINY_RUN, "--epochs", 1, "--output", output / "run", "--resume", weights],
        "pretrained": ["train", *TINY_RUN, "--epochs", 1, "--output", output / "run", "--pretrained", weights],
        "average": ["average", weights, weights, "-o", output / "average.safetensors"],
        "convert": ["convert", "--to", "torchvision", weights, output / "tv.pth"],
    }


@pytest.mark.parametrize("command", ["eval", "predict", "predict-onnxruntime", "export", "resume", "pretrained",
                                     "average", "convert"])
def test_every_entry_point_refuses_a_pickle_that_runs_code(command, evil_checkpoint, image_file, tmp_path,
                                                           mobilenetv3, monkeypatch):
    monkeypatch.setenv("MOBILENETV3_CACHE", str(tmp_path / "cache"))
    evil, marker = evil_checkpoint
    status, _, stderr = mobilenetv3(*entry_points(evil, image_file, tmp_path)[command])
    line = error_line(status, stderr)
    assert f"refusing to load {evil}: it is not a plain-data checkpoint" in line
    assert "posix.system" in line or "os.system" in line  # names what it refused
    assert not marker.exists()
    assert not (tmp_path / "run" / "checkpoints").exists() and not list(tmp_path.glob("*.onnx"))


def _first_bad_key(model_name: str, tensors: dict[str, torch.Tensor]) -> str:
    """The first key, in the named model's own order, whose tensor is missing or has another shape."""
    for key, value in create_model(model_name).state_dict().items():
        if key not in tensors or tensors[key].shape != value.shape:
            return key
    raise AssertionError("every tensor fits")


@pytest.mark.parametrize("command", ["eval", "predict", "export", "pretrained"])
def test_weights_that_do_not_fit_their_architecture_are_refused_naming_the_first_bad_key(
        command, tmp_path, image_file, mobilenetv3):
    good = save_model(create_model("mobilenetv3_small_035", num_classes=4), tmp_path / "small_035.safetensors")
    tensors, metadata = read_safetensors(good)

    unknown = tmp_path / "unknown_arch.safetensors"
    save_file(tensors, str(unknown), metadata={**metadata, "model_name": "resnet50"})
    status, _, stderr = mobilenetv3(*entry_points(unknown, image_file, tmp_path)[command])
    assert "unknown model 'resnet50'" in error_line(status, stderr)

    misfit = tmp_path / "misfit.safetensors"  # small_035's tensors, labelled as small_100
    kwargs = json.loads(metadata["model_kwargs"])
    kwargs.pop("width_mult", None)
    save_file(tensors, str(misfit), metadata={**metadata, "model_name": "mobilenetv3_small_100",
                                              "model_kwargs": json.dumps(kwargs)})
    status, _, stderr = mobilenetv3(*entry_points(misfit, image_file, tmp_path)[command])
    key = _first_bad_key("mobilenetv3_small_100", tensors)
    assert re.search(rf"(shape mismatch for|missing key) '{re.escape(key)}'", error_line(status, stderr))


# --- broken data ----------------------------------------------------------------------------------------------


def test_training_folder_with_broken_and_odd_mode_images_skips_and_names_the_broken_ones(
        tmp_path, mobilenetv3, caplog):
    from test_data import BROKEN_FILES, GOOD_FILES, _save, _write_broken  # the data tests' image zoo

    root = tmp_path / "images"
    for name, make in GOOD_FILES.items():  # RGB, L, RGBA, P, CMYK, 16-bit PNG
        for label in ("cat", "dog"):
            _save(root / "train" / label / name, make())
            _save(root / "val" / label / name, make())
    _write_broken(root / "train" / "cat")  # truncated, empty, not an image
    caplog.set_level("WARNING", logger="mobilenetv3")
    # 15 files, batch 5: every file is read once per epoch (no partial last batch is dropped)
    status, stdout, stderr = mobilenetv3("train", *TINY_RUN, "--data", root, "--batch-size", 5, "--epochs", 1,
                                         "--output", tmp_path / "run")
    assert status == 0, stderr
    warned = [r.getMessage() for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert sorted(Path(m.split("image ", 1)[1].split(":")[0]).name for m in warned) == sorted(BROKEN_FILES)
    row = read_rows(tmp_path / "run" / "metrics.jsonl")[0]
    assert row["skipped_samples"] == len(BROKEN_FILES)
    assert row["val_samples"] == 2 * len(GOOD_FILES)
    checkpoint = load_training_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert checkpoint["step"] == 3 and all(torch.isfinite(v).all() for v in checkpoint["model"].values()
                                           if v.is_floating_point())


# --- numerical trouble ---------------------------------------------------------------------------------------


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, mobilenetv3):
    run = tmp_path / "run"
    status, _, stderr = mobilenetv3("train", *TINY_RUN, "--epochs", 2, "--opt", "sgd", "--lr", "1e12",
                                    "--set", "optim.lr_base_batch=none", "--set", "model.drop_rate=0",
                                    "--output", run)
    line = error_line(status, stderr)
    step = int(re.search(r"the training loss became (?:nan|inf|-inf) at step (\d+)", line).group(1))
    assert step >= 2
    last = load_training_checkpoint(run / "checkpoints" / "last.pt")
    assert last["step"] == step - 1  # the last step that finished: kept, not overwritten by the bad one
    assert not list((run / "checkpoints").glob(".*.tmp"))


def test_fp16_overflowing_steps_are_skipped_by_the_scaler_and_reported(tmp_path, mobilenetv3, monkeypatch, caplog):
    # A loss scale of 2**60 overflows fp16 gradients: each step is skipped and the scale halved, until it fits.
    init_scale = 2.0**60
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=init_scale))
    caplog.set_level("WARNING", logger="mobilenetv3")
    status, _, stderr = mobilenetv3("train", *TINY_RUN, "--epochs", 1, "--amp", "fp16", "--output", tmp_path / "run")
    assert status == 0, stderr
    row = read_rows(tmp_path / "run" / "metrics.jsonl")[0]
    scale = load_training_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["scaler"]["scale"]
    halvings = round(torch.log2(torch.tensor(init_scale / scale)).item())
    assert row["amp_skipped_steps"] == halvings == STEPS_PER_EPOCH
    assert any(f"skipped {halvings} of {STEPS_PER_EPOCH} steps" in r.getMessage() for r in caplog.records)


# --- disk full ------------------------------------------------------------------------------------------------


def test_disk_full_during_a_checkpoint_write_keeps_the_previous_one(tmp_path, mobilenetv3, monkeypatch):
    """ENOSPC in the middle of the 3rd checkpoint write (a patched torch.save): one line, last.pt of step 2 kept."""
    real_save, calls = torch.save, []

    def save_until_the_disk_fills(payload, target, *args, **kwargs):
        calls.append(target)
        if len(calls) == 3:
            Path(target).write_bytes(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(payload, target, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    run = tmp_path / "run"
    status, _, stderr = mobilenetv3("train", *TINY_RUN, "--epochs", 1, "--output", run)
    assert error_line(status, stderr).endswith(
        f"no space left on device while writing {run / 'checkpoints' / 'last.pt'}; the previous file is unchanged "
        "(free some space, then resume)")
    assert load_training_checkpoint(run / "checkpoints" / "last.pt")["step"] == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]  # no temp file left


def test_a_really_full_filesystem_keeps_the_previous_checkpoint(tmp_path):
    """A 1 MiB tmpfs (needs root): torch.save fails with a RuntimeError, not ENOSPC; still one clear UserError."""
    from mobilenetv3.errors import UserError
    from mobilenetv3.train import checkpoint as ckpt

    mount = tmp_path / "tiny_disk"
    mount.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", mount],
                                                       capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root); the patched-write test covers the logic")
    try:
        ckpt.save(mount / "last.pt", {"step": 1, "weights": torch.zeros(16)})
        with pytest.raises(UserError, match=r"no space left on device while writing .*last\.pt"):
            ckpt.save(mount / "last.pt", {"step": 2, "weights": torch.zeros(1 << 20)})  # 4 MiB
        assert torch.load(mount / "last.pt", weights_only=True)["step"] == 1
        assert [p.name for p in mount.iterdir()] == ["last.pt"]
    finally:
        subprocess.run(["umount", mount], check=False)


# --- user mistakes: one line, no traceback ----------------------------------------------------------------------


def _user_mistakes(tmp: Path, run: Path) -> dict[str, tuple[list, str]]:
    """name -> (arguments, a regex the error line must match)."""
    (tmp / "garbage.pt").write_bytes(b"this is not a checkpoint")
    (tmp / "unknown_key.yaml").write_text("optim:\n  lr: 0.1\n  momentun: 0.9\n")
    empty_class = tmp / "empty_class"
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            (empty_class / split / label).mkdir(parents=True)
        Image.new("RGB", (20, 20)).save(empty_class / split / "cat" / "a.png")
    two_classes = tmp / "two_classes"
    for label in ("cat", "dog"):
        (two_classes / "val" / label).mkdir(parents=True)
        Image.new("RGB", (20, 20)).save(two_classes / "val" / label / "a.png")
    no_classes = tmp / "no_classes"
    (no_classes / "train").mkdir(parents=True)
    (no_classes / "val").mkdir()
    train = ["train", *TINY_RUN, "--output", tmp / "new"]
    last = run / "checkpoints" / "last.pt"
    return {
        "unknown model": ([*train, "--model", "mobilenetv3_smal_100"],
                          r"unknown model 'mobilenetv3_smal_100'; did you mean .*mobilenetv3_small_100"),
        "missing checkpoint": (["eval", "--checkpoint", tmp / "nope.pt", "--data", "synthetic"],
                               r"checkpoint not found: \S*nope\.pt"),
        "garbage checkpoint": (["eval", "--checkpoint", tmp / "garbage.pt", "--data", "synthetic"],
                               r"garbage\.pt is not a readable PyTorch checkpoint"),
        "garbage resume": ([*train, "--resume", tmp / "garbage.pt"], r"garbage\.pt is not a readable PyTorch"),
        "negative epochs": ([*train, "--epochs", -3], r"epochs must be positive, got -3$"),
        "zero batch size": ([*train, "--batch-size", 0], r"batch_size must be positive, got 0$"),
        "negative eval batch": (["eval", "--checkpoint", last, "--data", "synthetic", "--batch-size", -1],
                                r"--batch-size must be positive, got -1"),
        "unknown key in a config file": ([*train, "--config", tmp / "unknown_key.yaml"],
                                         r"unknown config key 'optim.momentun'; did you mean optim.momentum\?"),
        "class folder with no images": ([*train, "--data", empty_class], r"class folder with no images: \S*dog"),
        "dataset with no classes": ([*train, "--data", no_classes], r"no class folders in \S*no_classes"),
        "eval on data with other classes": (["eval", "--checkpoint", last, "--data", two_classes, "--device", "cpu"],
                                            r"last\.pt predicts 4 classes but '\S*two_classes' has 2"),
        "resume with other classes": (["train", "--output", run, "--resume", "--set", "data.synthetic_classes=5"],
                                      r"cannot resume from \S*last\.pt: the model differs \(num_classes: "
                                      r"checkpoint 4 vs config 5\)"),
    }


MISTAKES = ["unknown model", "missing checkpoint", "garbage checkpoint", "garbage resume", "negative epochs",
            "zero batch size", "negative eval batch", "unknown key in a config file", "class folder with no images",
            "dataset with no classes", "eval on data with other classes", "resume with other classes"]


@pytest.mark.parametrize("mistake", MISTAKES)
def test_user_mistakes_are_one_line_errors(mistake, tmp_path, trained_run, mobilenetv3):
    cases = _user_mistakes(tmp_path, trained_run)
    assert sorted(cases) == sorted(MISTAKES)
    arguments, expected = cases[mistake]
    line = error_line(*mobilenetv3(*arguments)[::2])
    assert re.search(expected, line), line


def test_a_user_mistake_in_a_real_process_prints_exactly_one_line(tmp_path):
    result = subprocess.run(python_command("-m", "mobilenetv3", "train", "--data", tmp_path / "nowhere",
                                           "--output", tmp_path / "run"), capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"mobilenetv3 train: error: data folder not found: {tmp_path / 'nowhere'} (use 'fashion-mnist', 'synthetic' "
        "or a folder; expected ImageNet layout: DIR/train/<class>/<image>, DIR/val/<class>/<image>)"
    ]


def test_numbers_in_scientific_notation_are_numbers(tmp_path, mobilenetv3):
    """`--lr 1e-3` and `lr: 5e-5` in a YAML file (PyYAML alone reads both as strings) are not user mistakes."""
    (tmp_path / "recipe.yaml").write_text("optim:\n  weight_decay: 5e-5\n")
    status, stdout, stderr = mobilenetv3("train", "--config", tmp_path / "recipe.yaml", "--lr", "1e-3",
                                         "--set", "optim.eps=1E-8", "--epochs", "1e1", "--print-config")
    assert status == 0, stderr
    optim = yaml.safe_load(stdout)["optim"]
    assert (optim["lr"], optim["weight_decay"], optim["eps"]) == (1e-3, 5e-5, 1e-8)
    assert yaml.safe_load(stdout)["epochs"] == 10
    status, _, stderr = mobilenetv3("train", "--lr", "fast", "--print-config")
    assert error_line(status, stderr).endswith("optim.lr must be a number, got 'fast'")


def test_resume_after_a_torn_metrics_line_drops_it(tmp_path, trained_run, mobilenetv3):
    """A kill (or a full disk) in the middle of appending to metrics.jsonl leaves half a line: resume copes."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    with open(run / "metrics.jsonl", "a") as handle:
        handle.write('{"epoch": 2, "step": 7, "lr": 0.00')
    status, _, stderr = mobilenetv3("train", "--output", run, "--resume", "--epochs", "2")
    assert status == 0, stderr
    assert [row["epoch"] for row in read_rows(run / "metrics.jsonl")] == [1, 2]
