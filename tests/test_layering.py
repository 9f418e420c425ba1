"""Imports run one way: `mobilenetv3.models` stands without `weights`, `deploy` and `train`, and `predict` on
a cached ONNX export runs without torch.  Each check runs in a fresh interpreter, where nothing was imported
before."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mobilenetv3 import create_model, save_model
from mobilenetv3.preprocessing import Preprocessing


def _run(script: str, **env: str) -> dict:
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **env})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_models_import_without_weights_deploy_or_train():
    script = """
import json, sys
import torch
import mobilenetv3.models as models
loaded = sorted(m for m in sys.modules if m.startswith("mobilenetv3."))
built = {}
with torch.device("meta"):  # shapes only: every registered builder runs
    for name in models.list_models():
        entry = models.get_entry(name)
        model = entry.build(num_classes=10)
        # a detector's feature maps are its `backbone`'s (C4, C5 and the extra blocks), not features_only's
        features = model.backbone if entry.task == "detection" else entry.build(features_only=True)
        built[name] = [model.model_name, model.preprocessing, model.class_names,
                       name if entry.task == "detection" else features.model_name,
                       len(features.out_channels) if entry.task == "detection" else len(features.feature_info)]
print(json.dumps({"loaded": loaded, "built": built,
                  "after": sorted(m for m in sys.modules if m.startswith("mobilenetv3."))}))
"""
    out = _run(script)
    for package in ("mobilenetv3.weights", "mobilenetv3.deploy", "mobilenetv3.train", "mobilenetv3.factory",
                    "mobilenetv3.data", "mobilenetv3.cli"):
        assert not [m for m in out["after"] if m == package or m.startswith(package + ".")], (package, out["after"])
    from mobilenetv3.models import list_models

    assert sorted(out["built"]) == list_models() and len(out["built"]) >= 14
    for name, (model_name, preprocessing, class_names, features_name, levels) in out["built"].items():
        # declared attributes: the registered name, nothing recorded yet about weights
        assert (model_name, preprocessing, class_names, features_name) == (name, None, None, name)
        assert levels >= 4


def test_create_model_is_the_factory_and_builds_without_weights():
    import mobilenetv3
    import mobilenetv3.models
    from mobilenetv3.factory import create_model as factory_create_model

    assert mobilenetv3.create_model is factory_create_model
    assert not hasattr(mobilenetv3.models, "create_model")  # the registry knows nothing about weights
    model = create_model("mobilenetv3_small_035", num_classes=3)
    assert model.model_name == "mobilenetv3_small_035" and model.preprocessing is None and model.class_names is None


@pytest.fixture
def cached_export(tmp_path, monkeypatch):
    """A weights file whose ONNX export is already in the (private) cache, and images including a broken one."""
    pytest.importorskip("onnxruntime")
    from mobilenetv3.deploy.engines import cached_onnx_export

    monkeypatch.setenv("MOBILENETV3_CACHE", str(tmp_path / "cache"))
    model = create_model("mobilenetv3_small_035", num_classes=4).eval()
    weights = save_model(model, tmp_path / "tiny.safetensors", preprocessing=Preprocessing(input_size=32),
                         class_names=["a", "b", "c", "d"])
    cached_onnx_export(weights)
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(images / "one.png")
    Image.fromarray(rng.integers(0, 256, (40, 50), dtype=np.uint8)).save(images / "two.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return weights, images, tmp_path / "cache"


def test_predict_on_a_cached_onnx_export_never_imports_torch(cached_export):
    """torch (and torchvision) cannot even be imported in this process: a cache hit, an unreadable image among
    the inputs and the metadata's class names all run on ONNX Runtime, PIL and numpy alone."""
    weights, images, cache = cached_export
    script = f"""
import contextlib, importlib.abc, io, json, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision"):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
from mobilenetv3.cli import main
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    status = main(["predict", "--checkpoint", {str(weights)!r}, "--json", "--topk", "2", {str(images)!r}])
print(json.dumps({{"status": status, "out": out.getvalue(), "err": err.getvalue(),
                  "torch": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision"))}}))
"""
    out = _run(script, MOBILENETV3_CACHE=str(cache))
    assert out["torch"] == []
    assert out["status"] == 1, out["err"]  # one image was skipped
    assert "skipped 1 of 3 images" in out["err"] and "Traceback" not in out["err"]
    rows = [json.loads(line) for line in out["out"].splitlines()]
    assert [os.path.basename(row["path"]) for row in rows] == ["one.png", "two.png"]
    assert all(entry["label"] in "abcd" for row in rows for entry in row["topk"])
