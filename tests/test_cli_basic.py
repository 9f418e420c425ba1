"""`mobilenetv3 list` / `profile`, and the CLI's one-line error contract."""

from __future__ import annotations

import json
import subprocess
import sys

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
