"""Self-describing weights files: save/load round trips and clear errors on bad files."""

from __future__ import annotations

import json

import pytest
import torch

from mobilenetv3 import Preprocessing, UserError, create_model, load_model, save_model
from mobilenetv3.weights.io import load_checkpoint, model_description, read_safetensors, read_weights


def _randomize_bn(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)


def test_save_load_round_trip_with_metadata(tmp_path):
    torch.manual_seed(0)
    model = create_model("mobilenetv3_small_075", num_classes=3, in_chans=1, stem_stride=1, drop_rate=0.1).eval()
    _randomize_bn(model)
    prep = Preprocessing(input_size=28, crop_pct=1.0, mean=(0.286,), std=(0.353,), in_chans=1)
    path = save_model(model, tmp_path / "w.safetensors", preprocessing=prep, class_names=["a", "b", "c"])
    _, metadata = read_safetensors(path)
    assert metadata["model_name"] == "mobilenetv3_small_075"
    kwargs = json.loads(metadata["model_kwargs"])
    assert kwargs["in_chans"] == 1 and kwargs["stem_stride"] == 1 and kwargs["num_classes"] == 3
    assert json.loads(metadata["preprocessing"])["input_size"] == 28
    loaded = load_model(path)
    assert loaded.preprocessing == prep and loaded.class_names == ["a", "b", "c"]
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_features_only_model_round_trips(tmp_path):
    model = create_model("mobilenetv3_large_100", features_only=True, out_indices=(2, 3), output_stride=16).eval()
    loaded = load_model(save_model(model, tmp_path / "f.safetensors"))
    assert loaded.feature_info == model.feature_info
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(loaded(x), model(x)))


def test_wrong_shape_names_first_mismatching_key(tmp_path):
    model = create_model("mobilenetv3_small_100", num_classes=10)
    path = save_model(model, tmp_path / "w.safetensors")
    tensors, metadata = read_safetensors(path)
    metadata["model_kwargs"] = json.dumps({**json.loads(metadata["model_kwargs"]), "num_classes": 7})
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=metadata)
    with pytest.raises(UserError, match=r"shape mismatch for 'classifier.weight'.*\(10, 1024\).*\(7, 1024\)"):
        load_model(bad)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    model = create_model("mobilenetv3_small_100")
    state = model.state_dict()
    from mobilenetv3.weights.io import load_state_dict_checked

    with pytest.raises(UserError, match="unexpected key 'extra.weight'"):
        load_state_dict_checked(model, {**state, "extra.weight": torch.zeros(1)})
    state.pop("stem.conv.weight")
    with pytest.raises(UserError, match="missing key 'stem.conv.weight'"):
        load_state_dict_checked(model, state)


def test_unknown_architecture_in_metadata_is_refused(tmp_path):
    path = save_model(create_model("mobilenetv3_small_100"), tmp_path / "w.safetensors")
    tensors, metadata = read_safetensors(path)
    metadata["model_name"] = "resnet50"
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "x.safetensors"), metadata=metadata)
    with pytest.raises(UserError, match="unknown model 'resnet50'"):
        load_model(tmp_path / "x.safetensors")


def test_garbage_and_missing_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_model(tmp_path / "nope.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00not a safetensors file")
    with pytest.raises(UserError, match="not a readable safetensors"):
        load_model(tmp_path / "garbage.safetensors")
    (tmp_path / "garbage.pt").write_bytes(b"definitely not a zip")
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        load_model(tmp_path / "garbage.pt")


def test_pickle_that_runs_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(UserError, match="refusing to load"):
        load_checkpoint(path)
    with pytest.raises(UserError, match="refusing to load"):
        load_model(path)
    assert not marker.exists()


def test_training_checkpoint_layout_is_read(tmp_path):
    model = create_model("mobilenetv3_small_050", num_classes=4).eval()
    ema = {k: v.clone() + (0.5 if v.is_floating_point() else 0) for k, v in model.state_dict().items()}
    name, kwargs = model_description(model)
    path = tmp_path / "last.pt"
    torch.save({"model_name": name, "model_kwargs": kwargs, "model": model.state_dict(), "ema": ema, "epoch": 3}, path)
    raw = read_weights(path)
    assert raw.extra["epoch"] == 3
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(load_model(path)(x), model(x))
        assert not torch.equal(load_model(path, ema=True)(x), model(x))
    torch.save({"model": model.state_dict()}, tmp_path / "bare.pt")
    with pytest.raises(UserError, match="mobilenetv3 convert"):
        load_model(tmp_path / "bare.pt")


def test_custom_norm_callables(tmp_path):
    from functools import partial

    batchnorm = create_model("mobilenetv3_small_035", norm_layer=partial(torch.nn.BatchNorm2d, eps=1e-3))
    assert load_model(save_model(batchnorm, tmp_path / "bn.safetensors")).config["norm_layer"] == "batchnorm"
    groupnorm = create_model("mobilenetv3_small_035", norm_layer=lambda c: torch.nn.GroupNorm(1, c))
    with pytest.raises(UserError, match="cannot describe norm_layer"):
        save_model(groupnorm, tmp_path / "gn.safetensors")
