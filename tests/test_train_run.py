"""End-to-end training on tiny data: run folder, EMA, SWA, eval reproduction, averaging, resume after SIGKILL,
2-rank DDP (standalone and a 2-node rendezvous), lr-find, fine-tuning with another class count."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mobilenetv3 import create_model, load_model, save_model
from mobilenetv3.cli import main
from mobilenetv3.train.evaluation import FlipAveraged
from mobilenetv3.train.metrics import REQUIRED_KEYS, read_rows

MODEL = ["--model", "mobilenetv3_small_035", "--input-size", "32", "--workers", "0", "--set", "threads=1"]
SYNTHETIC = ["--data", "synthetic", "--set", "data.synthetic_train_samples=32", "--set", "data.synthetic_val_samples=21"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mobilenetv3", "train", *MODEL, *args]


def run_ok(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def state_dict(path: Path, key: str = "model") -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)[key]


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def kill_when(command: list[str], condition, timeout: float = 240) -> dict:
    """Run a training command and SIGKILL it as soon as its OUTPUT/checkpoints/last.pt satisfies `condition`;
    returns that checkpoint as the kill left it.

    Each new last.pt (an atomic replace: a new inode) stops the run with SIGSTOP before the checkpoint is read,
    so a fast run cannot move past the wanted state while it is being checked; it continues (SIGCONT) when the
    condition does not hold yet."""
    last = Path(command[command.index("--output") + 1]) / "checkpoints" / "last.pt"
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    seen = None
    try:
        while time.monotonic() < deadline:
            assert process.poll() is None, "the run ended before it could be killed mid-epoch"
            try:
                stat = last.stat()
            except FileNotFoundError:
                stat = None
            if stat is not None and (stat.st_ino, stat.st_mtime_ns) != seen:
                process.send_signal(signal.SIGSTOP)
                seen = (stat.st_ino, stat.st_mtime_ns)
                try:
                    if condition(torch.load(last, weights_only=True)):
                        break
                except (RuntimeError, EOFError, OSError):  # replaced between stat and SIGSTOP: read it again
                    seen = None
                process.send_signal(signal.SIGCONT)
            time.sleep(0.001)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    return torch.load(last, weights_only=True)


def make_image_folder(root: Path, train_per_class: int = 12, val_per_class: int = 3, size: int = 40) -> Path:
    """Two classes of size x size images (bright vs dark, so the task is learnable), PNG and JPEG mixed."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label, base in (("bright", 180), ("dark", 60)):
            folder = root / split / label
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                suffix = "png" if index % 2 else "jpg"
                Image.fromarray(pixels).save(folder / f"{index}.{suffix}")
    return root


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory) -> Path:
    """One 2-epoch run with EMA and per-epoch checkpoints, shared by the checks below."""
    output = tmp_path_factory.mktemp("run")
    run_ok(train_command(*SYNTHETIC, "--batch-size", "8", "--epochs", "2", "--ema", "--ema-decay", "0.5",
                         "--set", "checkpoint.keep_last_epochs=2", "--output", str(output)))
    return output


def test_run_folder_contents(ema_run):
    config = yaml.safe_load((ema_run / "config.yaml").read_text())
    assert config["model"]["name"] == "mobilenetv3_small_035" and config["epochs"] == 2
    provenance = config["provenance"]
    assert provenance["torch"] == str(torch.__version__) and provenance["world_size"] == 1
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True)
    if head.returncode == 0:
        assert provenance["git_commit"].startswith(head.stdout.strip())

    rows = read_rows(ema_run / "metrics.jsonl")
    assert [row["epoch"] for row in rows] == [1, 2] and [row["step"] for row in rows] == [4, 8]
    for row in rows:
        assert set(REQUIRED_KEYS) <= set(row)
        assert row["val_samples"] == 21 and row["world_size"] == 1 and row["skipped_samples"] == 0
        assert 0 <= row["val_top1"] <= row["val_top5"] <= 100
    with open(ema_run / "metrics.csv") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert [float(row["val_top1"]) for row in csv_rows] == [row["val_top1"] for row in rows]
    assert (ema_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((ema_run / "tensorboard").glob("events.out.tfevents.*"))

    names = sorted(path.name for path in (ema_run / "checkpoints").iterdir())
    assert names == ["best.pt", "epoch_0001.pt", "epoch_0002.pt", "last.pt"]  # no temp files left behind
    last = torch.load(ema_run / "checkpoints" / "last.pt", weights_only=True)
    for key in ("model", "ema", "optimizer", "scheduler", "scaler", "rng", "sampler", "config", "model_name",
                "model_kwargs", "preprocessing", "class_names", "epoch", "step", "metrics"):
        assert key in last, key
    assert (last["epoch"], last["step"], last["batch_in_epoch"]) == (2, 8, 0)
    assert set(last["rng"][0]) == {"python", "numpy", "torch", "cuda"}
    assert last["metrics"] == rows[-1]
    model = load_model(ema_run / "checkpoints" / "last.pt")
    assert model.num_classes == 10 and model.preprocessing.input_size == 32


def test_ema_differs_from_raw_and_is_reported(ema_run):
    last = torch.load(ema_run / "checkpoints" / "last.pt", weights_only=True)
    raw, ema = last["model"], last["ema"]
    assert raw.keys() == ema.keys()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw if raw[k].is_floating_point())
    assert last["ema_n_averaged"] == 8  # one update per optimizer step (AveragedModel copies on the first)
    row = last["metrics"]
    assert {"ema_val_loss", "ema_val_top1", "ema_val_top5"} <= set(row)
    assert row["ema_val_loss"] != row["val_loss"]


def test_eval_reproduces_the_logged_validation(ema_run, capsys):
    last = ema_run / "checkpoints" / "last.pt"
    row = read_rows(ema_run / "metrics.jsonl")[-1]
    for ema, prefix in ((False, ""), (True, "ema_")):
        assert main(["eval", "--checkpoint", str(last), "--data", "synthetic", "--json", *(["--ema"] if ema else [])]) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert set(result) == {"top1", "top5", "loss", "samples"}
        assert result["samples"] == row["val_samples"] == 21
        assert (result["top1"], result["top5"]) == (row[f"{prefix}val_top1"], row[f"{prefix}val_top5"])
        assert result["loss"] == pytest.approx(row[f"{prefix}val_loss"], rel=1e-6)


def test_eval_reproduces_a_bf16_channels_last_run(tmp_path, capsys):
    """eval takes the run's precision and layout: bf16 autocast in channels_last reproduces the logged numbers,
    and full precision (--amp none) gives others."""
    data, output = make_image_folder(tmp_path / "images"), tmp_path / "bf16"
    run_ok(train_command("--data", str(data), "--batch-size", "4", "--epochs", "2", "--amp", "bf16",
                         "--channels-last", "--lr", "0.01", "--set", "optim.lr_base_batch=4",  # logits far from 0
                         "--output", str(output)))
    row = read_rows(output / "metrics.jsonl")[-1]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the run had (threads=1): the same kernels split the same way
    try:
        results = {}
        for amp in ([], ["--amp", "none"]):
            assert main(["eval", "--checkpoint", str(output / "checkpoints" / "last.pt"), "--data", str(data),
                         "--json", *amp]) == 0
            results[len(amp)] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    finally:
        torch.set_num_threads(threads)
    own, full_precision = results[0], results[2]
    assert (own["top1"], own["top5"], own["samples"]) == (row["val_top1"], row["val_top5"], 6)
    assert own["loss"] == pytest.approx(row["val_loss"], rel=1e-6)
    assert abs(full_precision["loss"] - row["val_loss"]) > 1e-5


def test_flip_tta_scores_an_image_and_its_mirror_alike(tmp_path, capsys):
    """--tta flip averages the logits of the two left-right views, so a folder and its mirror image score
    exactly alike; single-view scores differ (the images are not symmetric), and by convexity the averaged
    loss is at most the mean of the two single-view losses."""
    rng = np.random.default_rng(1)
    for label in ("left", "right"):
        for index in range(3):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            for folder, image in (("as_is", pixels), ("mirrored", pixels[:, ::-1])):
                (tmp_path / folder / "val" / label).mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.ascontiguousarray(image)).save(tmp_path / folder / "val" / label / f"{index}.png")
    torch.manual_seed(0)
    model = create_model("mobilenetv3_small_035", num_classes=2)
    with torch.no_grad():  # fresh logits are all but equal: give every weight some noise so they vary
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter), alpha=0.1)
    weights = save_model(model, tmp_path / "w.safetensors")

    def score(folder: str, *tta: str) -> dict:
        assert main(["eval", "--checkpoint", str(weights), "--data", str(tmp_path / folder), "--input-size", "40",
                     "--crop-pct", "1.0", "--workers", "0", "--json", *tta]) == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    single, mirrored = score("as_is"), score("mirrored")
    assert abs(single["loss"] - mirrored["loss"]) > 1e-4
    averaged, averaged_mirrored = score("as_is", "--tta", "flip"), score("mirrored", "--tta", "flip")
    assert averaged["samples"] == 6 and averaged["tta"] == "flip" and "tta" not in single
    assert min(abs(averaged["loss"] - single["loss"]), abs(averaged["loss"] - mirrored["loss"])) > 1e-5
    assert averaged["loss"] == pytest.approx(averaged_mirrored["loss"], rel=1e-6)
    assert averaged["top1"] == averaged_mirrored["top1"]
    assert averaged["loss"] <= (single["loss"] + mirrored["loss"]) / 2 + 1e-6

    # and what is averaged is the logits, whatever the memory layout
    model.eval()
    images = torch.randn(3, 3, 40, 40)
    with torch.no_grad():
        expected = (model(images) + model(images.flip(-1))) / 2
        for layout in (torch.contiguous_format, torch.channels_last):
            torch.testing.assert_close(FlipAveraged(model)(images.contiguous(memory_format=layout)), expected)


def test_average_of_the_last_epochs(ema_run, tmp_path, capsys):
    output = tmp_path / "avg.safetensors"
    assert main(["average", "--run", str(ema_run), "--last", "2", "-o", str(output)]) == 0
    first, second = (state_dict(ema_run / "checkpoints" / f"epoch_000{i}.pt") for i in (1, 2))
    averaged = load_model(output).state_dict()
    for key, value in first.items():
        if value.is_floating_point():
            torch.testing.assert_close(averaged[key], (value.double() + second[key].double()).div(2).float())
        else:
            assert torch.equal(averaged[key], second[key])
    assert not torch.equal(averaged["classifier.weight"], second["classifier.weight"])


def test_best_follows_the_chosen_metric_and_average_takes_the_best_epochs(tmp_path, capsys):
    """best_metric=ema_val_loss: best.pt is the epoch of the lowest EMA loss; keep_best_epochs=2 keeps the two
    lowest-loss epoch files beside the last one, and `average --best 2` averages exactly those two."""
    output = tmp_path / "run"
    run_ok(train_command(*SYNTHETIC, "--batch-size", "8", "--epochs", "5", "--ema", "--ema-decay", "0.5",
                         "--lr", "0.05", "--set", "checkpoint.best_metric=ema_val_loss",
                         "--set", "checkpoint.keep_last_epochs=1", "--set", "checkpoint.keep_best_epochs=2",
                         "--output", str(output)))
    losses = {row["epoch"]: row["ema_val_loss"] for row in read_rows(output / "metrics.jsonl")}
    ranked = sorted(losses, key=losses.get)
    folder = output / "checkpoints"
    assert torch.load(folder / "best.pt", weights_only=True)["epoch"] == ranked[0]
    assert sorted(int(p.stem[6:]) for p in folder.glob("epoch_*.pt")) == sorted({5, *ranked[:2]})

    averaged_path = tmp_path / "best2.safetensors"
    assert main(["average", "--run", str(output), "--best", "2", "--metric", "ema_val_loss", "-o",
                 str(averaged_path)]) == 0
    first, second = (state_dict(folder / f"epoch_{epoch:04d}.pt") for epoch in sorted(ranked[:2]))
    averaged = load_model(averaged_path).state_dict()
    torch.testing.assert_close(averaged["classifier.weight"],
                               (first["classifier.weight"].double() + second["classifier.weight"]).div(2).float())


def test_the_built_in_default_learns_a_small_folder_in_a_few_epochs(tmp_path):
    """No recipe: AdamW, cosine, BN momentum 0.1.  200 images of two classes, batch 16, 8 epochs."""
    data, output = make_image_folder(tmp_path / "images", train_per_class=100, val_per_class=20), tmp_path / "run"
    run_ok(train_command("--data", str(data), "--batch-size", "16", "--epochs", "8", "--output", str(output)))
    rows = read_rows(output / "metrics.jsonl")
    assert rows[0]["val_top1"] <= 75 and rows[-1]["val_top1"] >= 95, [row["val_top1"] for row in rows]


def test_swa_averages_the_late_epochs_and_recomputes_batch_norm(tmp_path, capsys):
    data, output = make_image_folder(tmp_path / "images"), tmp_path / "swa"
    run_ok(train_command("--data", str(data), "--batch-size", "8", "--epochs", "3", "--set", "swa.enabled=true",
                         "--set", "swa.start_epoch=1", "--set", "swa.bn_batches=2", "--set", "swa.lr_ratio=0.5",
                         "--set", "checkpoint.keep_last_epochs=3",
                         "--output", str(output)))
    rows = read_rows(output / "metrics.jsonl")
    assert "swa_val_top1" not in rows[0]  # averaging starts after start_epoch
    assert [row.get("swa_averaged") for row in rows] == [None, 1, 2]

    # swa.safetensors = the uniform mean of the weights at the end of epochs 2 and 3, with its own BN statistics
    folder = output / "checkpoints"
    epoch2, epoch3 = (state_dict(folder / f"epoch_000{i}.pt") for i in (2, 3))
    averaged = load_model(folder / "swa.safetensors").state_dict()
    bn_statistics = [key for key in averaged if key.endswith(("running_mean", "running_var"))]
    assert bn_statistics
    for key, value in epoch3.items():
        if key in bn_statistics or not value.is_floating_point():
            continue
        torch.testing.assert_close(averaged[key], (epoch2[key] + value) / 2)
    assert all(not torch.equal(averaged[key], epoch3[key]) for key in bn_statistics)
    # update_bn resets the statistics and counts its batches: bn_batches=2 of the epoch's 3
    counts = {int(value) for key, value in averaged.items() if key.endswith("num_batches_tracked")}
    assert counts == {2}
    assert_same_tensors(averaged, torch.load(folder / "last.pt", weights_only=True)["swa"])

    # and evaluating the file reproduces what training logged for the average
    assert main(["eval", "--checkpoint", str(folder / "swa.safetensors"), "--data", str(data), "--json",
                 "--batch-size", "8", "--workers", "0"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["top1"], result["top5"]) == (rows[-1]["swa_val_top1"], rows[-1]["swa_val_top5"])
    assert result["loss"] == pytest.approx(rows[-1]["swa_val_loss"], rel=1e-5)


def test_epoch_checkpoints_are_ordered_by_number_past_9999(tmp_path):
    from mobilenetv3.train.checkpoint import epoch_checkpoints, prune_epoch_checkpoints

    for epoch in (2, 9999, 10000, 10001):
        (tmp_path / f"epoch_{epoch:04d}.pt").write_bytes(b"")
    (tmp_path / "epoch_notes.pt").write_bytes(b"")  # not an epoch file: never listed, never deleted
    assert [p.name for p in epoch_checkpoints(tmp_path)] == [
        "epoch_0002.pt", "epoch_9999.pt", "epoch_10000.pt", "epoch_10001.pt"]
    prune_epoch_checkpoints(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_10000.pt", "epoch_10001.pt", "epoch_notes.pt"]
    # the best (here lowest) scores are kept beside the last; a tie goes to the earlier epoch
    for epoch in (3, 4, 5):
        (tmp_path / f"epoch_{epoch:04d}.pt").write_bytes(b"")
    prune_epoch_checkpoints(tmp_path, 1, keep_best=2, larger_is_better=False,
                            scores={3: 0.5, 4: 0.2, 5: 0.5, 10000: 0.9, 10001: 0.7})
    assert sorted(p.name for p in tmp_path.glob("epoch_0*.pt")) == ["epoch_0003.pt", "epoch_0004.pt"]
    assert (tmp_path / "epoch_10001.pt").exists() and not (tmp_path / "epoch_10000.pt").exists()


def test_resume_after_sigkill_mid_epoch_is_bit_identical(tmp_path):
    data = make_image_folder(tmp_path / "images")
    common = ["--data", str(data), "--batch-size", "4", "--epochs", "3", "--deterministic", "--seed", "3",
              "--ema", "--ema-decay", "0.9", "--checkpoint-every-steps", "1",
              "--set", "regularization.mixup_alpha=0.4", "--set", "regularization.dropblock_prob=0.2",
              "--set", "model.drop_rate=0.3", "--set", "optim.name=sgd", "--set", "optim.lr=0.5",
              "--set", "swa.enabled=true", "--set", "swa.start_epoch=1", "--set", "swa.bn_batches=2"]
    reference = tmp_path / "reference"
    run_ok(train_command(*common, "--output", str(reference)))

    killed = tmp_path / "killed"
    # mid-epoch, with a running SWA average (it starts after epoch 2) to carry over
    payload = kill_when(train_command(*common, "--output", str(killed)),
                        lambda saved: saved["batch_in_epoch"] > 0 and saved["swa_n_averaged"] >= 1)
    last = killed / "checkpoints" / "last.pt"
    assert payload["batch_in_epoch"] > 0, "the kill must interrupt an epoch"

    # Resume from the run folder alone; with a DataLoader worker this time: per-sample seeds make the
    # augmentation independent of the worker setup.
    run_ok([sys.executable, "-m", "mobilenetv3", "train", "--output", str(killed), "--resume", "--workers", "1"])
    expected = torch.load(reference / "checkpoints" / "last.pt", weights_only=True)
    resumed = torch.load(last, weights_only=True)
    assert resumed["step"] == expected["step"] == 18
    assert resumed["swa_n_averaged"] == expected["swa_n_averaged"] == 2
    assert_same_tensors(resumed["model"], expected["model"])
    assert_same_tensors(resumed["ema"], expected["ema"])
    assert_same_tensors(resumed["swa"], expected["swa"])  # incl. the BatchNorm statistics recomputed since
    for group_a, group_b in zip(resumed["optimizer"]["state"].values(), expected["optimizer"]["state"].values()):
        assert_same_tensors(group_a, group_b)
    volatile = ("epoch_time_s", "train_images_per_s")
    strip = lambda rows: [{k: v for k, v in row.items() if k not in volatile} for row in rows]  # noqa: E731
    assert strip(read_rows(killed / "metrics.jsonl")) == strip(read_rows(reference / "metrics.jsonl"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ddp_two_ranks_standalone_and_two_node_rendezvous(tmp_path):
    # 2 epochs, SWA over the second: its BatchNorm statistics are pooled over the ranks
    common = [*MODEL, *SYNTHETIC, "--batch-size", "4", "--epochs", "2", "--seed", "1",
              "--set", "swa.enabled=true", "--set", "swa.start_epoch=1", "--set", "swa.bn_batches=2"]
    launcher = [sys.executable, "-m", "torch.distributed.run"]
    standalone = tmp_path / "standalone"
    run_ok([*launcher, "--standalone", "--nproc_per_node=2", "-m", "mobilenetv3", "train", *common,
            "--output", str(standalone)])

    two_nodes = tmp_path / "two_nodes"
    port = free_port()
    nodes = [
        subprocess.Popen([*launcher, "--nnodes=2", f"--node-rank={rank}", "--nproc_per_node=1",
                          "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=mnv3-test",
                          "-m", "mobilenetv3", "train", *common, "--output", str(two_nodes)],
                         env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)
    ]
    for node in nodes:
        _, stderr = node.communicate(timeout=300)
        assert node.returncode == 0, stderr[-3000:]

    for folder in (standalone, two_nodes):
        row, last_row = read_rows(folder / "metrics.jsonl")
        # 21 validation images over 2 ranks: 11 + 10, each counted once (no padding duplicates).
        assert (row["world_size"], row["val_samples"], row["global_batch"]) == (2, 21, 8)
        assert row["step"] == 4  # 32 samples / (2 ranks x 4)
        assert last_row["swa_averaged"] == 1 and "swa_val_top1" in last_row
    # Same seeds, same world size: the two launch modes train the very same model (and average).
    for key in ("model", "swa"):
        assert_same_tensors(state_dict(standalone / "checkpoints" / "last.pt", key),
                            state_dict(two_nodes / "checkpoints" / "last.pt", key))


def test_torchrun_with_one_process_trains_the_same_model_as_plain_python(tmp_path):
    common = [*MODEL, *SYNTHETIC, "--batch-size", "8", "--epochs", "1", "--seed", "3", "--deterministic"]
    plain, alone = tmp_path / "plain", tmp_path / "torchrun"
    run_ok([sys.executable, "-m", "mobilenetv3", "train", *common, "--output", str(plain)])
    result = run_ok([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                     "-m", "mobilenetv3", "train", *common, "--output", str(alone)])
    assert "distributed: 1 process(es), backend gloo" in result.stderr  # DDP really ran
    assert_same_tensors(state_dict(plain / "checkpoints" / "last.pt"), state_dict(alone / "checkpoints" / "last.pt"))


def test_torchrun_with_one_process_still_runs_ddp(monkeypatch):
    """`torchrun --nproc_per_node=1` joins a process group and wraps DDP (NCCL on one GPU); plain python does not."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from mobilenetv3.train import distributed

    for name in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_USE_AGENT_STORE", "RANK",
                 "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    plain = distributed.init("cpu")
    assert not plain.distributed and not dist.is_initialized()
    assert not isinstance(distributed.wrap_model(torch.nn.Linear(2, 2), plain, sync_bn=False), DistributedDataParallel)

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    try:
        env = distributed.init("cpu")
        assert env.distributed and env.world_size == 1 and dist.get_backend() == "gloo"
        assert isinstance(distributed.wrap_model(torch.nn.Linear(2, 2), env, sync_bn=False), DistributedDataParallel)
        assert distributed.all_reduce_sum([3.0, 4.0], env.device) == [3.0, 4.0]
    finally:
        distributed.shutdown()


def test_lr_find_writes_plot_and_suggestion(tmp_path, capsys):
    output = tmp_path / "lr"
    assert main(["lr-find", *MODEL, *SYNTHETIC, "--batch-size", "8", "--output", str(output),
                 "--steps", "12", "--start-lr", "1e-4", "--end-lr", "10"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (output / "lr_find.png").read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((output / "lr_find.json").read_text())
    assert 1e-4 <= result["suggested_min_lr"] <= result["suggested_max_lr"] <= 10
    assert result["steepest_lr"] in saved["lrs"] and result["min_loss_lr"] in saved["lrs"]
    assert sorted([result["steepest_lr"], result["min_loss_lr"] / 10]) == pytest.approx(
        [result["suggested_min_lr"], result["suggested_max_lr"]])


def test_pretrained_with_another_class_count(ema_run, tmp_path, monkeypatch):
    from mobilenetv3.train.config import ModelConfig
    from mobilenetv3.train.run import create_run_model
    from mobilenetv3.weights import io

    reads = []
    read_weights = io.read_weights
    monkeypatch.setattr(io, "read_weights", lambda path: reads.append(path) or read_weights(path))
    source = ema_run / "checkpoints" / "last.pt"
    model = create_run_model(ModelConfig(name="mobilenetv3_small_035", pretrained=str(source)), {"num_classes": 4})
    assert reads == [source]  # validated and loaded from one read of the file
    pretrained = state_dict(source)
    assert model.classifier.weight.shape == (4, 1024)
    for key, value in model.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(value, pretrained[key]), key

    output = tmp_path / "finetune"
    run_ok(train_command("--data", "synthetic", "--set", "data.synthetic_classes=4", "--set",
                         "data.synthetic_train_samples=16", "--set", "data.synthetic_val_samples=8",
                         "--batch-size", "8", "--epochs", "1", "--pretrained", str(source), "--output", str(output)))
    assert state_dict(output / "checkpoints" / "last.pt")["classifier.weight"].shape == (4, 1024)


def test_pretrained_file_keeps_its_layout(tmp_path):
    """A tf_-style file (padding="same", bn_eps=1e-5) is fine-tuned in its own layout, not the config's."""
    from mobilenetv3.errors import UserError
    from mobilenetv3.train.config import ModelConfig
    from mobilenetv3.train.run import create_run_model
    from mobilenetv3.weights.io import save_model

    source = create_model("mobilenetv3_small_035", num_classes=10, padding="same", bn_eps=1e-5, drop_rate=0.5)
    path = save_model(source, tmp_path / "tf.safetensors")
    model = create_run_model(ModelConfig(name="mobilenetv3_small_035", pretrained=str(path)),
                             {"num_classes": 4, "drop_rate": 0.1})
    assert (model.config["padding"], model.config["bn_eps"]) == ("same", 1e-5)
    assert (model.config["drop_rate"], model.config["bn_momentum"], model.num_classes) == (0.1, 0.01, 4)
    for key, value in source.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(value, model.state_dict()[key]), key
    for name in ("mobilenetv3_large_100", "mobilenetv3_small_100"):  # another arch, another width
        with pytest.raises(UserError, match=rf"holds a mobilenetv3_small_035 \(small\), but the config trains a {name} "):
            create_run_model(ModelConfig(name=name, pretrained=str(path)), {"num_classes": 4})


def test_user_errors_are_one_line(tmp_path, capsys):
    cases = [
        (["train", "--data", str(tmp_path / "missing"), "--output", str(tmp_path / "o")], "missing"),
        (["train", *SYNTHETIC, "--num-classes", "3", "--output", str(tmp_path / "o2")],
         "model.num_classes=3 but the dataset 'synthetic' has 10 classes"),
        (["train", "--epochs", "0"], "epochs must be positive, got 0"),
        (["train", "--output", str(tmp_path / "nothing"), "--resume"], "cannot resume"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mobilenetv3 train: error:") and message in lines[0], lines


def test_resume_refuses_another_model(ema_run, capsys):
    assert main(["train", "--output", str(ema_run), "--resume", "--model", "mobilenetv3_small_050"]) == 2
    error = capsys.readouterr().err.strip()
    assert "cannot resume from" in error and "the model differs" in error and "width_mult" in error


def test_a_checkpoint_from_before_the_dense_task_options_resumes(ema_run, tmp_path, capsys):
    # checkpoints written before `reduced_tail` / `dilate_strided_block` existed lack them in model_kwargs: they
    # built the network those options' defaults build, so they resume (and a real difference is still refused)
    from mobilenetv3.models.mobilenetv3 import ADDED_CONFIG_KEYS

    payload = torch.load(ema_run / "checkpoints" / "last.pt", weights_only=True)
    for key in ADDED_CONFIG_KEYS:
        assert payload["model_kwargs"].pop(key) == ADDED_CONFIG_KEYS[key]
    old = tmp_path / "old.pt"
    torch.save(payload, old)
    epochs = payload["config"]["epochs"]
    assert main(["train", "--resume", str(old), "--output", str(tmp_path / "run"), "--epochs", str(epochs + 1)]) == 0
    payload["model_kwargs"]["width_mult"] = 0.75
    torch.save(payload, old)
    assert main(["train", "--resume", str(old), "--output", str(tmp_path / "run2"), "--epochs", str(epochs + 1)]) == 2
    assert "the model differs (width_mult: checkpoint 0.75" in capsys.readouterr().err
