"""keep_freed_memory: freed blocks stay in the process, so allocating them again costs no page faults."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# A fresh process (mallopt settings cannot be undone) allocates, touches and frees a 64 MiB tensor over and over:
# above glibc's largest dynamic mmap threshold (32 MiB on 64-bit), so by default every round is a fresh mmap
# whose 16,384 pages fault in again.  Kept, the heap grows over the first few rounds (the aligned request is a
# little larger than the block freed just before) and then serves every round from memory already mapped.
# It prints whether the settings applied and the minor page faults of the 8 rounds after 8 warm-up rounds.
ROUNDS = r"""
import json, resource, sys
import torch
from mobilenetv3.allocator import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def one_round():
    block = torch.ones(16 << 20)  # 64 MiB of float32, every page written
    del block
for _ in range(8):
    one_round()
before = faults()
for _ in range(8):
    one_round()
print(json.dumps({"applied": applied, "faults": faults() - before}))
"""


def rounds(mode: str) -> dict:
    result = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():
    default, kept = rounds("default"), rounds("keep")
    assert kept["applied"] is True
    pages = (64 << 20) // 4096
    assert default["faults"] >= 8 * pages * 0.9  # each round faults its 64 MiB in again
    assert kept["faults"] < pages // 4  # the freed memory is reused: at most stray faults


@pytest.mark.parametrize("keep", [True, False])
def test_cpu_training_keeps_freed_memory_unless_switched_off(monkeypatch, keep):
    import importlib

    import torch

    from mobilenetv3.train import load_config
    from mobilenetv3.train.distributed import DistEnv

    run_module = importlib.import_module("mobilenetv3.train.run")  # the module (the package exports run())

    calls = []
    monkeypatch.setattr(run_module, "keep_freed_memory", lambda: calls.append(True) or True)
    config = load_config(None, overrides=[("keep_freed_memory", keep)])
    run_module.setup_runtime(config, DistEnv(device=torch.device("cpu")))
    assert calls == ([True] if keep else [])
