"""benchmarks/results.py: records are appended as JSON lines and the README's results blocks are rendered from them."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("results", REPO / "benchmarks" / "results.py")
results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(results)

MOBILE_SPEED = {
    "rows": [{"model": "mobilenetv3_large_100", "engine": engine, "batch": 1, "median_ms": ms, "calls": 20,
              "vs_onnxruntime": 2.0 / ms}
             for engine, ms in [("onnxruntime-fp32", 2.0), ("executorch-fp32", 2.5), ("executorch-int8", 1.0)]],
    "bytes": {"mobilenetv3_large_100/onnxruntime-fp32": 22_000_000, "mobilenetv3_large_100/executorch-fp32": 22_100_000,
              "mobilenetv3_large_100/executorch-int8": 5_800_000},
    "input_size": 224, "threads": None, "clock": "wall", "repeats": 20, "min_time": 5.0,
}


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path / "results")
    return tmp_path


def test_record_appends_one_parseable_line(folder):
    path = results.record("mobile_speed", MOBILE_SPEED, argv=["benchmarks/mobile_speed.py", "--threads", "1"])
    results.record("mobile_speed", {"rows": []}, argv=["benchmarks/mobile_speed.py"])
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert path == folder / "results" / "mobile_speed.jsonl" and len(lines) == 2
    first = lines[0]
    assert set(first) == {"name", "date", "commit", "torch", "cpu", "cpu_flags", "cores", "command", "metrics"}
    assert first["name"] == "mobile_speed" and first["metrics"] == MOBILE_SPEED
    assert first["command"] == "python benchmarks/mobile_speed.py --threads 1"
    assert first["date"].endswith("+00:00") and set(first["cpu_flags"]) <= set(results.CPU_FLAGS)
    assert results.latest("mobile_speed") == lines[1]


def test_latest_skips_a_torn_last_line(folder):
    path = results.record("mobile_speed", MOBILE_SPEED, argv=["x.py"])
    with open(path, "a") as f:
        f.write('{"name": "mobile_speed", "metr')  # a run killed mid-write
    assert results.latest("mobile_speed")["metrics"] == MOBILE_SPEED
    assert results.latest("missing") is None


def test_render_fills_blocks_is_idempotent_and_check_finds_hand_edits(folder):
    readme = folder / "README.md"
    readme.write_text("# Title\n\n<!-- results:mobile_speed -->\nold numbers\n<!-- /results:mobile_speed -->\n\n"
                      "<!-- results:quantization -->\n<!-- /results:quantization -->\ntail\n")
    assert results.render_readme(readme, check=True) == ["mobile_speed", "quantization"]
    assert "old numbers" in readme.read_text()  # check writes nothing
    results.record("mobile_speed", MOBILE_SPEED, argv=["benchmarks/mobile_speed.py"])
    assert results.render_readme(readme) == ["mobile_speed", "quantization"]
    text = readme.read_text()
    assert "| mobilenetv3_large_100 | executorch-int8 | 1 | 1.00 | 2.00x |" in text
    assert "int8 .pte 5.8 MB (26% of fp32)" in text
    assert "No results yet: run `python benchmarks/quantization_accuracy.py`" in text
    assert "by `python benchmarks/mobile_speed.py`._\n\n<!-- /results:mobile_speed -->\n" in text
    assert text.startswith("# Title\n\n<!-- results:mobile_speed -->\n") and text.endswith("-->\ntail\n")
    assert results.render_readme(readme) == [] and readme.read_text() == text
    readme.write_text(text.replace("1.00 | 2.00x", "0.90 | 2.22x"))
    assert results.render_readme(readme, check=True) == ["mobile_speed"]


def test_quantization_renderer():
    rows = [{"model": "mobilenetv3_small_100", "weights": "fm.pt", "method": "float32", "top1": 90.13, "drop": None,
             "agreement": None, "pte_bytes": None, "command": "mobilenetv3 eval --checkpoint fm.pt"},
            {"model": "mobilenetv3_small_100", "weights": "fm.pt", "method": "ptq", "top1": 90.2, "drop": -0.07,
             "agreement": 99.02, "pte_bytes": 1_700_000, "command": "mobilenetv3 quantize --checkpoint fm.pt"}]
    record = {"date": "2026-12-06T10:00:00+00:00", "cpu": "AMD EPYC", "cpu_flags": [], "cores": 2, "torch": "2.14.1",
              "commit": "abc1234", "command": "python benchmarks/quantization_accuracy.py", "metrics": {"rows": rows}}
    text = results.RENDERERS["quantization"](record)
    assert "| mobilenetv3_small_100 | fm.pt | ptq | 90.20% | -0.07 | 99.02% | 1.7 MB | " \
           "`mobilenetv3 quantize --checkpoint fm.pt` |" in text
    assert "| float32 | 90.13% | — | — | — |" in text
    assert text.endswith("commit abc1234, by `python benchmarks/quantization_accuracy.py`._")


def test_unknown_or_unclosed_block_raises(folder):
    readme = folder / "README.md"
    readme.write_text("<!-- results:nonesuch -->\n<!-- /results:nonesuch -->\n")
    with pytest.raises(ValueError, match="nonesuch"):
        results.render_readme(readme)
    readme.write_text("<!-- results:mobile_speed -->\n")
    with pytest.raises(ValueError, match="mobile_speed"):
        results.render_readme(readme)


def test_the_readme_is_in_sync_with_the_recorded_results():
    """Fails after a benchmark run until `make results` has rewritten the README (and the record is committed)."""
    assert results.render_readme(REPO / "README.md", check=True) == []
