"""benchmarks/results.py: records are appended as JSON lines, and docs/results.md and the README's results blocks
are rendered from them."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
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


def test_docs_results_is_in_sync_with_the_recorded_results():
    """Fails after a benchmark run until `make results` has rewritten docs/results.md (and the record is committed)."""
    assert results.render_docs(REPO / "docs" / "results.md", check=True) is False


def _record_line(name: str, metrics: dict, command: str, date: str) -> str:
    return json.dumps({"name": name, "date": date, "commit": "abc1234", "torch": "2.14.1", "cpu": "AMD EPYC",
                       "cpu_flags": ["avx2"], "cores": 2, "command": command, "metrics": metrics})


def test_docs_show_every_section_and_the_latest_record_of_each_setting(folder):
    step = {"input": [1, 28, 28], "stem_stride": 1, "threads": 1, "steps": 15, "median_ms_fast": 700.0,
            "median_ms_plain": 1400.0, "cpu_capability": "AVX2", "routes_used": True}
    (folder / "results").mkdir()
    (folder / "results" / "train_step_speed.jsonl").write_text("\n".join([
        _record_line("train_step_speed", {**step, "model": "mobilenetv3_large_125", "batch_size": 128},
                     "python benchmarks/train_step_speed.py", "2026-12-01T00:00:00+00:00"),
        _record_line("train_step_speed", {**step, "model": "mobilenetv3_small_100", "batch_size": 256,
                                          "median_ms_fast": 500.0},
                     "python benchmarks/train_step_speed.py --model mobilenetv3_small_100 --batch-size 256",
                     "2026-12-02T00:00:00+00:00"),
        _record_line("train_step_speed", {**step, "model": "mobilenetv3_large_125", "batch_size": 128,
                                          "median_ms_fast": 650.0},
                     "python benchmarks/train_step_speed.py", "2026-12-03T00:00:00+00:00"),
    ]) + "\n")
    docs = folder / "docs" / "results.md"
    assert results.render_docs(docs) is True
    text = docs.read_text()
    for section in results.SECTIONS.values():
        assert f"\n## {section.title}\n" in text
    section = text.split("## CPU training step")[1].split("\n## ")[0]
    # one table per setting, the latest record of each, in the order the settings were first run
    assert "| fast | 650.0 | 1.00x |" in section and "| plain | 1400.0 | 2.15x |" in section
    assert "| fast | 700.0 |" not in section and "| fast | 500.0 | 1.00x |" in section
    assert section.index("mobilenetv3_large_125") < section.index("mobilenetv3_small_100")
    assert "No results yet: run `python benchmarks/eager_speed.py" in text
    assert "[history.md](history.md)" in text
    assert results.render_docs(docs) is False and docs.read_text() == text  # idempotent
    docs.write_text(text.replace("650.0", "600.0"))
    assert results.render_docs(docs, check=True) is True and "600.0" in docs.read_text()  # check writes nothing


def test_results_dir_comes_from_the_environment(tmp_path):
    """MOBILENETV3_RESULTS_DIR keeps a smoke run out of benchmarks/results/."""
    code = ("import sys; sys.path.insert(0, 'benchmarks'); import results; "
            "print(results.record('soak', {'equal': True}, argv=['benchmarks/soak.py']))")
    env = {**os.environ, "MOBILENETV3_RESULTS_DIR": str(tmp_path / "smoke")}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert Path(out.stdout.strip()) == tmp_path / "smoke" / "soak.jsonl"
    assert json.loads((tmp_path / "smoke" / "soak.jsonl").read_text())["metrics"] == {"equal": True}


def test_every_benchmark_script_records_into_a_rendered_section():
    scripts = sorted(p for p in (REPO / "benchmarks").glob("*.py") if p.name != "results.py")
    assert scripts
    for script in scripts:
        names = re.findall(r"\.record\(\s*f?\"([a-z_]+)", script.read_text(encoding="utf-8"))
        assert names, f"{script.name} does not call results.record"
        assert all(name in results.SECTIONS for name in names), (script.name, names)


def test_the_params_macs_section_is_what_profile_markdown_prints(capsys):
    from mobilenetv3.cli import main

    assert main(["profile", "--model", "mobilenetv3_small_100", "--resolution", "224", "160", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main(["profile", "--model", "mobilenetv3_small_100", "--resolution", "224", "160", "--markdown"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed.splitlines()[2] == "| mobilenetv3_small_100 | 224 | 2,542,856 | 2.5 | 56.5 | 57 |"
    assert results.SECTIONS["params_macs"].body({"rows": rows}) == printed


def test_timing_renderers_read_what_the_scripts_record():
    ours = {"network": "ours", "engine": "eager", "batch_size": 32, "mode": "inference", "median_ms": 150.0,
            "speedup": {"torchvision": 2.1, "timm": 2.0}}
    peers = [{**ours, "network": name, "median_ms": ms, "speedup": {}} for name, ms in (("torchvision", 315.0),
                                                                                      ("timm", 300.0))]
    eager = results.SECTIONS["eager_speed"].body({"rows": [ours, *peers], "verdicts": [], "model": "mobilenetv3_large_100",
                                                  "threads": 2, "clock": "wall"})
    assert "| 32 | eager | inference | 150.00 | 315.00 | 300.00 | 2.00x |" in eager
    layer = {"layer": "blocks.5.0.conv_dw", "input": [960, 2, 2], "output": [960, 2, 2], "kernel": [5, 5],
             "stride": [1, 1], "route": "taps", "median_ms_route": 1.0, "median_ms_plain": 5.0,
             "ratio_plain_over_route": 5.0}
    table = results.SECTIONS["small_conv_speed"].body({"rows": [layer]})
    assert "| blocks.5.0.conv_dw | 960x2x2 | 960x2x2 | 5x5 | 1x1 | taps | 1.00 | 5.00 | 5.00x |" in table


def test_segmentation_variants_render_as_one_table_in_docs_and_readme(folder):
    # one record per variant (separate runs of benchmarks/segmentation.py); docs and the README block show the
    # latest of each variant in one table, each record's provenance below it
    run = {"overrides": [], "recipe": "fashion-mnist-seg", "model": "lraspp_mobilenetv3_large_100",
           "params": 1745230, "epochs": 14, "wall_time_s": 1227.7, "train_time_s": 1197.1,
           "train_images_per_s": 116.8, "last_miou": 62.06, "last_pixel_acc": 92.7, "last_iou": [97.7] + [50.0] * 10,
           "best_miou": 62.06, "best_epoch": 14, "val_samples": 1000, "minutes_to_70": None}
    (folder / "results").mkdir()
    lines = [
        _record_line("segmentation", {**run, "variant": "large-lraspp", "last_miou": 55.0},
                     "python benchmarks/segmentation.py --variant large-lraspp", "2026-12-01T00:00:00+00:00"),
        _record_line("segmentation", {**run, "variant": "large-conv1x1", "overrides": ["model.head=conv1x1"],
                                      "last_miou": 57.66, "minutes_to_70": 12.5},
                     "python benchmarks/segmentation.py --variant 'large-conv1x1 model.head=conv1x1'",
                     "2026-12-02T00:00:00+00:00"),
        _record_line("segmentation", {**run, "variant": "large-lraspp"},
                     "python benchmarks/segmentation.py --variant large-lraspp", "2026-12-03T00:00:00+00:00"),
    ]
    (folder / "results" / "segmentation.jsonl").write_text("\n".join(lines) + "\n")
    readme = folder / "README.md"
    readme.write_text("x\n<!-- results:segmentation -->\n<!-- /results:segmentation -->\n")
    assert results.render_readme(readme) == ["segmentation"]
    block = readme.read_text()
    assert block.count("| variant | overrides |") == 1 and block.count("| variant | background | T-shirt/top |") == 1
    assert "| large-lraspp | — | lraspp_mobilenetv3_large_100 | 1,745,230 | 14 | 62.06% |" in block
    assert "| large-conv1x1 | `model.head=conv1x1` |" in block and "| 57.66% |" in block and "| 12.5 |" in block
    assert "55.00%" not in block and block.index("large-lraspp |") < block.index("large-conv1x1 |")
    assert block.count("- _Measured 2026-12-0") == 2 and "2026-12-01" not in block
    docs = folder / "docs" / "results.md"
    results.render_docs(docs)
    section = docs.read_text().split("## Segmentation on fashion-mnist-seg")[1].split("\n## ")[0]
    assert section.count("| variant | overrides |") == 1 and "| large-conv1x1 |" in section
