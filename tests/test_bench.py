"""`bench`: what it measures and reports (no timing assertions: speed belongs to benchmarks/)."""

from __future__ import annotations

import json

import pytest
import torch

from mobilenetv3 import create_model
from mobilenetv3.cli import main
from mobilenetv3.profile import count_macs
from mobilenetv3.deploy.bench import BenchRow, _add_speedups, benchmark, format_table, peer_model
from mobilenetv3.timing import calibrate_batchnorm, percentile, time_interleaved


def test_calibrated_batchnorm_holds_the_batch_statistics():
    torch.manual_seed(0)
    model = create_model("mobilenetv3_small_035", num_classes=5)
    images = torch.randn(6, 3, 32, 32)
    calibrate_batchnorm(model, images)
    assert not model.training and model.stem.bn.momentum == 0.01  # momentum restored
    with torch.no_grad():
        stem = model.stem.conv(images)
    torch.testing.assert_close(model.stem.bn.running_mean, stem.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.stem.bn.running_var, stem.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["mobilenetv3_large_100", "mobilenetv3_small_100", "mobilenetv3_small_075"])
@pytest.mark.parametrize("peer", ["torchvision", "timm"])
def test_peers_are_the_same_network(name, peer):
    """The comparison is fair only if the peer has the same tensors: equal parameter counts."""
    if peer == "torchvision" and name.endswith("075"):
        pytest.skip("torchvision's x0.75 rounds expansions differently (its own layout, not the paper's)")
    ours = sum(p.numel() for p in create_model(name).parameters())
    theirs = sum(p.numel() for p in peer_model(peer, name).parameters())
    assert ours == theirs


def test_interleaved_timing_runs_round_robin():
    calls: list[str] = []
    times = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                             device=torch.device("cpu"), warmup=2, min_repeats=3, min_seconds=0.0)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert [len(t) for t in times.values()] == [3, 3] and all(s >= 0 for t in times.values() for s in t)


def row(network: str, engine: str, median: float, batch: int = 1) -> BenchRow:
    return BenchRow(network, engine, batch, "inference", median, median, batch / median * 1e3, 0.1, 0.1, 10)


def test_speedups_use_the_same_engine_else_the_peers_eager_row():
    rows = [row("ours", "eager", 10.0), row("timm", "eager", 15.0), row("ours", "compile", 5.0),
            row("timm", "compile", 6.0), row("ours", "onnxruntime", 3.0), row("ours", "eager", 40.0, batch=8)]
    _add_speedups(rows)
    assert rows[0].speedup == {"timm": 1.5}
    assert rows[2].speedup == {"timm": pytest.approx(6.0 / 5.0)}
    assert rows[4].speedup == {"timm": 5.0}  # no timm ONNX Runtime row: against timm eager
    assert rows[5].speedup == {}  # no peer at batch 8
    assert "vs timm" in format_table(rows).splitlines()[0]


def test_benchmark_rows_for_engines_peers_and_training():
    rows = benchmark("mobilenetv3_small_035", batch_sizes=(2,), engines=("eager", "channels-last", "onnxruntime"),
                     compare=("torchvision",), train=True, resolution=32, warmup=1, min_repeats=2, min_seconds=0.0)
    keys = [(r.network, r.engine, r.mode, r.batch_size) for r in rows]
    assert keys == [("ours", "eager", "inference", 2), ("torchvision", "eager", "inference", 2),
                    ("ours", "channels-last", "inference", 2), ("torchvision", "channels-last", "inference", 2),
                    ("ours", "onnxruntime", "inference", 2), ("ours", "eager", "train", 2),
                    ("torchvision", "eager", "train", 2)]
    for r in rows:
        assert r.calls >= 2 and r.p90_ms >= r.median_ms > 0
        assert r.images_per_s == pytest.approx(r.batch_size / r.median_ms * 1e3)
        assert 0 < r.peak_fraction
        assert set(r.speedup) == ({"torchvision"} if r.network == "ours" else set())
    ours_eager = next(r for r in rows if r.network == "ours" and r.engine == "eager")
    tv_eager = next(r for r in rows if r.network == "torchvision" and r.engine == "eager")
    assert ours_eager.speedup["torchvision"] == pytest.approx(tv_eager.median_ms / ours_eager.median_ms)
    assert ours_eager.gflop_per_image == pytest.approx(2 * count_macs(create_model("mobilenetv3_small_035").eval(), 32) / 1e9)


def test_cli_json_rows_and_no_training_at_batch_1(capsys):
    assert main(["bench", "--model", "mobilenetv3_small_035", "--batch-size", "1", "--engines", "eager", "--train",
                 "--resolution", "32", "--warmup", "0", "--repeats", "2", "--min-time", "0", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # BatchNorm cannot train on one image: batch 1 has inference rows only.
    assert [(r["network"], r["engine"], r["batch_size"], r["mode"]) for r in rows] == [("ours", "eager", 1, "inference")]
    assert {"median_ms", "p90_ms", "images_per_s", "peak_fraction", "speedup"} <= set(rows[0])


@pytest.mark.parametrize("argv, message", [
    (["--engines", "amp-bf16", "--device", "cpu"], "needs a CUDA GPU"),
    (["--engines", "tensorrt"], "unknown engine 'tensorrt'"),
    (["--compare", "keras"], "unknown peer 'keras'"),
    (["--batch-size", "0"], "batch sizes must be positive"),
])
def test_user_errors_are_one_line(argv, message, capsys):
    assert main(["bench", "--model", "mobilenetv3_small_035", "--resolution", "32", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_percentile_is_the_nearest_rank_value():
    assert percentile([3.0, 1.0, 2.0, 4.0], 0.9) == 4.0  # one of the values, never an interpolation
    assert percentile([3.0, 1.0, 2.0, 4.0], 0.5) == 2.0
    assert percentile([5.0], 0.9) == 5.0
