"""Every ```python block of the README runs as written (in a fresh folder), and says what its comments say.

A block whose first line is `# needs a download` is only compiled (this machine has no network; the
download path itself is tested in test_pretrained.py); `# needs Fashion-MNIST` blocks run when the data is
installed (`make data`; CI installs it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def _fashion_mnist_installed() -> bool:
    from mobilenetv3.data import fashion_mnist

    try:
        fashion_mnist.locate(download=False)
    except ValueError:
        return False
    return True


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    code = BLOCKS[index]
    compiled = compile(code, f"README.md python block {index + 1}", "exec")
    first = code.splitlines()[0]
    if first.startswith("# needs a download"):
        return  # compiled only: see the module docstring
    if first.startswith("# needs Fashion-MNIST") and not _fashion_mnist_installed():
        pytest.skip("Fashion-MNIST is not installed (make data)")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    exec(compiled, namespace)
    _check_comments(namespace)


def _check_comments(ns: dict) -> None:
    """The shapes and counts the blocks' comments state."""
    if "feats" in ns:  # the Python API block: Large with 10 classes, 1 input channel
        assert ns["feats"].shape == (2, 960, 7, 7)
        assert ns["logits"].shape == (2, 10)
        assert ns["pooled"].shape == (2, 1280)
        assert ns["model"].num_classes == 5  # the weights file kept reset_classifier(5)
        assert [m.shape[-1] for m in ns["maps"]] == [224 // 4, 224 // 8, 224 // 16, 224 // 16]
    if "bundle" in ns:  # the data block
        assert ns["bundle"].describe() == "60000 train, 10000 val samples, 10 classes, 1x28x28 input"
        assert ns["images"].shape == (256, 1, 28, 28) and ns["images"].dtype == torch.float32
        assert ns["targets"].shape == (256,)
