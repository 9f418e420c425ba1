"""`make data` (scripts/get_fashion_mnist.sh), which `make demo` and CI run first: the order in which it gets
Fashion-MNIST on a fresh machine, with `python`, `id` and `apt-get` replaced by stubs that record calls."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "get_fashion_mnist.sh"

# The stub python: `locate(download=False)` succeeds once the marker file exists (apt "installed" it),
# `locate(download=True)` succeeds when $DOWNLOAD_OK is 1, and cache_dir() prints a path.
PYTHON_STUB = """#!/usr/bin/env bash
echo "python $2" >> "$LOG"
case "$2" in
  *download=False*) [ -e "$MARKER" ] ;;
  *download=True*) [ "$DOWNLOAD_OK" = 1 ] ;;
  *cache_dir*) echo /home/user/.cache/mobilenetv3/fashion-mnist ;;
  *) exit 99 ;;
esac
"""
APT_STUB = """#!/usr/bin/env bash
echo "apt-get $*" >> "$LOG"
if [ "$1" = install ] && [ "$APT_OK" = 1 ]; then : > "$MARKER"; fi
[ "$1" = update ] || [ "$APT_OK" = 1 ]
"""
ID_STUB = """#!/usr/bin/env bash
echo "$FAKE_UID"
"""


def _stub(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def run_script(tmp_path: Path, *, have_data=False, uid=0, with_apt=True, apt_ok=True, download_ok=False):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir / "python", PYTHON_STUB)
    _stub(bin_dir / "id", ID_STUB)
    if with_apt:
        _stub(bin_dir / "apt-get", APT_STUB)
    marker, log = tmp_path / "installed", tmp_path / "log"
    if have_data:
        marker.touch()
    log.touch()
    # PATH holds the stubs and bash alone, so a real apt-get on this machine is never found or run.
    os.symlink("/bin/bash", bin_dir / "bash")
    env = {"PATH": str(bin_dir), "LOG": str(log), "MARKER": str(marker), "FAKE_UID": str(uid),
           "APT_OK": str(int(apt_ok)), "DOWNLOAD_OK": str(int(download_ok))}
    proc = subprocess.run(["/bin/bash", str(SCRIPT), str(bin_dir / "python")], env=env, capture_output=True, text=True)
    calls = [line.split(" ", 1)[0] + (" download" if "download=True" in line else "")
             + (" install" if line.startswith("apt-get install") else "") for line in log.read_text().splitlines()]
    return proc, calls


def test_data_already_there_does_nothing(tmp_path):
    proc, calls = run_script(tmp_path, have_data=True)
    assert proc.returncode == 0 and calls == ["python"]


def test_root_with_apt_installs_the_debian_package_and_does_not_download(tmp_path):
    proc, calls = run_script(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "apt-get install" in calls and "python download" not in calls
    assert calls[-1] == "python"  # checked that the package brought the files


def test_apt_failure_falls_back_to_the_download(tmp_path):
    proc, calls = run_script(tmp_path, apt_ok=False, download_ok=True)
    assert proc.returncode == 0, proc.stderr
    assert calls.index("apt-get install") < calls.index("python download")


@pytest.mark.parametrize("uid, with_apt", [(1000, True), (0, False)])
def test_without_root_or_apt_it_downloads_and_else_says_what_to_run(tmp_path, uid, with_apt):
    proc, calls = run_script(tmp_path, uid=uid, with_apt=with_apt, download_ok=False)
    assert not any(call.startswith("apt-get") for call in calls)
    assert "python download" in calls
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "sudo apt-get install dataset-fashion-mnist" in lines[0]
    assert "/home/user/.cache/mobilenetv3/fashion-mnist" in lines[0]
