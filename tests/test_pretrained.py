"""Pretrained weights by name, through torch.hub's cache with hash checks, served from local files
(file:// URLs) because this machine has no network: the same code path as the published URLs."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch

from mobilenetv3 import UserError, create_model, save_model
from mobilenetv3.weights.convert import PEER_VARIANTS
from mobilenetv3.weights.pretrained import pretrained_kwargs, resolve_source
from mobilenetv3.weights.published import PUBLISHED, PUBLISHED_WEIGHTS

from test_convert import max_difference, peer_model, randomize  # noqa: E402  (tests/ is on sys.path)

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def hub_dir(tmp_path):
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path / "hub" / "checkpoints"
    torch.hub.set_dir(previous)
    torch.set_num_threads(previous_threads)


def publish(monkeypatch, tmp_path, key, state_dict, *, hash_override: str | None = None) -> Path:
    """Save `state_dict` as the peer would publish it ("<name>-<sha256 prefix>.pth") and point its row of the
    published weights table at it (URL and hash)."""
    staging = tmp_path / "staging.pth"
    torch.save(state_dict, staging)
    digest = hash_override or hashlib.sha256(staging.read_bytes()).hexdigest()[:8]
    published = tmp_path / "published" / f"{key[1]}-{digest}.pth"
    published.parent.mkdir(exist_ok=True)
    staging.rename(published)
    monkeypatch.setitem(PUBLISHED, key, dataclasses.replace(PUBLISHED[key], url=published.as_uri(), sha256=digest))
    return published


def test_published_table_names_known_variants_and_carries_hashes():
    assert len(PUBLISHED) == len(PUBLISHED_WEIGHTS)  # one row per (peer, network, tag)
    for (peer, name, tag), weights in PUBLISHED.items():
        assert (weights.peer, weights.name, weights.tag) == (peer, name, tag)
        assert tag in PEER_VARIANTS[(peer, name)].tags, (peer, name, tag)
        assert weights.preprocessing.in_chans == 3
        assert weights.num_classes >= 1000 or len(weights.class_names) == weights.num_classes  # e.g. VOC's 21
        if weights.url is None:  # a tag the peer defines without a file
            assert weights.sha256 is None and not weights.metrics
            continue
        assert weights.url.startswith("https://")
        if "huggingface.co" in weights.url:
            assert weights.sha256 is None
        else:  # the hash the row carries is the one in the published file name
            assert weights.sha256 and len(weights.sha256) >= 8, weights.url
            assert f"-{weights.sha256}." in weights.url.rsplit("/", 1)[1], weights.url
            assert weights.file_name == weights.url.rsplit("/", 1)[1]
        if weights.num_classes == 1000:  # the publisher's ImageNet-1k accuracy, at this row's preprocessing
            assert 50 < weights.metrics["imagenet1k_top1"] < weights.metrics["imagenet1k_top5"] < 100, weights.label
    # the first row of a network is its default: torchvision's DEFAULT is IMAGENET1K_V2
    assert PEER_VARIANTS[("torchvision", "mobilenet_v3_large")].default_tag == "IMAGENET1K_V2"


def test_published_table_agrees_with_the_peers_own_metadata():
    torchvision = pytest.importorskip("torchvision")
    for weights_enum in (torchvision.models.MobileNet_V3_Large_Weights, torchvision.models.MobileNet_V3_Small_Weights):
        for entry in weights_enum:
            row = PUBLISHED[("torchvision", weights_enum.__name__.replace("_Weights", "").lower(), entry.name)]
            assert row.url == entry.url and row.num_classes == len(entry.meta["categories"])
            assert row.metrics == {"imagenet1k_top1": entry.meta["_metrics"]["ImageNet-1K"]["acc@1"],
                                   "imagenet1k_top5": entry.meta["_metrics"]["ImageNet-1K"]["acc@5"]}
            assert row.preprocessing.resize_size == entry.transforms().resize_size[0]
    timm = pytest.importorskip("timm")
    for row in PUBLISHED_WEIGHTS:
        if row.peer != "timm" or row.url is None:
            continue
        config = timm.models.get_pretrained_cfg(f"{row.name}.{row.tag}")
        assert config.url == ("" if "huggingface.co" in row.url else row.url), row.label
        assert row.num_classes == config.num_classes, row.label
        assert (row.preprocessing.crop_pct, row.preprocessing.interpolation) == (config.crop_pct, config.interpolation)
        assert (row.preprocessing.mean, row.preprocessing.std) == (tuple(config.mean), tuple(config.std)), row.label
        assert row.preprocessing.input_size == config.input_size[-1], row.label


def test_pretrained_torchvision_downloads_once_into_hub_cache(monkeypatch, tmp_path, hub_dir):
    reference = randomize(peer_model("torchvision", "mobilenet_v3_small")).float()
    published = publish(monkeypatch, tmp_path, ("torchvision", "mobilenet_v3_small", "IMAGENET1K_V1"),
                        reference.state_dict())
    model = create_model("mobilenetv3_small_100", pretrained="torchvision").eval()
    assert (hub_dir / published.name).is_file()
    assert max_difference(reference.double(), model.double()) <= 1e-4
    assert (model.preprocessing.resize_size, model.preprocessing.input_size) == (256, 224)
    published.unlink()  # the second load is served from the cache
    again = create_model("mobilenetv3_small_100", pretrained=True).eval()
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.float().state_dict().values()))


def test_pretrained_tf_port_builds_the_tf_layout(monkeypatch, tmp_path):
    reference = randomize(peer_model("timm", "tf_mobilenetv3_small_100")).float()
    publish(monkeypatch, tmp_path, ("timm", "tf_mobilenetv3_small_100", "in1k"), reference.state_dict())
    model = create_model("mobilenetv3_small_100", pretrained="tf").eval()
    assert model.config["padding"] == "same" and model.config["bn_eps"] == 1e-3
    assert model.preprocessing.mean == (0.5, 0.5, 0.5)
    assert max_difference(reference.double(), model.double()) <= 1e-4


def test_new_head_and_input_channels_keep_the_backbone(monkeypatch, tmp_path):
    reference = randomize(peer_model("timm", "mobilenetv3_small_050")).float()
    publish(monkeypatch, tmp_path, ("timm", "mobilenetv3_small_050", "lamb_in1k"), reference.state_dict())
    model = create_model("mobilenetv3_small_050", pretrained="timm", num_classes=10).eval()
    assert model.classifier.out_features == 10
    inputs = torch.randn(2, 3, 37, 29)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(inputs), reference.forward_features(inputs), atol=1e-5)
    backbone = create_model("mobilenetv3_small_050", pretrained="timm", features_only=True, output_stride=16)
    assert torch.equal(backbone.stem.conv.weight, reference.conv_stem.weight)
    assert backbone.feature_info[-1]["reduction"] == 16
    gray = create_model("mobilenetv3_small_050", pretrained="timm", in_chans=1)
    assert torch.allclose(gray.stem.conv.weight, reference.conv_stem.weight.sum(dim=1, keepdim=True))
    assert gray.preprocessing.in_chans == 1


def test_hash_mismatch_and_corrupt_cache_are_errors(monkeypatch, tmp_path, hub_dir):
    key = ("torchvision", "mobilenet_v3_small", "IMAGENET1K_V1")
    state_dict = peer_model("torchvision", "mobilenet_v3_small").state_dict()
    publish(monkeypatch, tmp_path, key, state_dict, hash_override="00000000")
    with pytest.raises(UserError, match="failed its hash check"):
        create_model("mobilenetv3_small_100", pretrained="torchvision")
    assert not any(hub_dir.glob("*.pth"))  # nothing half-trusted is left in the cache
    published = publish(monkeypatch, tmp_path, key, state_dict)
    create_model("mobilenetv3_small_100", pretrained="torchvision")
    (hub_dir / published.name).write_bytes(b"truncated")
    with pytest.raises(UserError, match="does not match its SHA-256 prefix"):
        create_model("mobilenetv3_small_100", pretrained="torchvision")


def test_pretrained_from_our_weights_file(tmp_path):
    source = randomize(create_model("mobilenetv3_small_075", num_classes=4, in_chans=1)).float()
    path = save_model(source, tmp_path / "mine.safetensors")
    model = create_model("mobilenetv3_small_075", pretrained=str(path)).eval()
    assert model.config["num_classes"] == 4 and model.config["in_chans"] == 1
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
    with pytest.raises(UserError, match="pretrained weights file not found"):
        create_model("mobilenetv3_small_075", pretrained=str(tmp_path / "missing.safetensors"))


def test_weights_selection():
    assert resolve_source("mobilenetv3_large_100", True).label == "torchvision mobilenet_v3_large.IMAGENET1K_V2"
    assert resolve_source("mobilenetv3_large_100", "timm").label == "timm mobilenetv3_large_100.ra_in1k"
    assert resolve_source("mobilenetv3_large_100", "mobilenetv3_rw").label == "timm mobilenetv3_rw.rmsp_in1k"
    assert resolve_source("mobilenetv3_large", "mobilenetv3_large_150d").variant.model_kwargs["width_mult"] == 1.5
    assert resolve_source("mobilenetv3_small_050", True).label == "timm mobilenetv3_small_050.lamb_in1k"
    assert pretrained_kwargs("mobilenetv3_large_100", "timm.miil_in21k")["num_classes"] == 11221
    assert pretrained_kwargs("mobilenetv3_large_100", "mobilenetv3_rw")["head_bias"] is False
    with pytest.raises(UserError, match="no 'keras' weights for mobilenetv3_small_100; choose from .*torchvision"):
        resolve_source("mobilenetv3_small_100", "keras")
    with pytest.raises(UserError, match="no published weights for mobilenetv3_large_035"):
        create_model("mobilenetv3_large_035", pretrained=True)
    with pytest.raises(UserError, match="no 'timm' weights for mobilenetv3_large_075; choose from tf, "):
        resolve_source("mobilenetv3_large_075", "timm")  # timm defines it, but untrained
    with pytest.raises(UserError, match="no weights tag 'v9'"):
        resolve_source("mobilenetv3_large_100", "timm.v9")


def test_hubconf_entry_points(monkeypatch, tmp_path):
    model = torch.hub.load(str(REPO_ROOT), "mobilenetv3_small_075", source="local", num_classes=5)
    assert model.classifier.out_features == 5
    reference = randomize(peer_model("torchvision", "mobilenet_v3_small")).float()
    publish(monkeypatch, tmp_path, ("torchvision", "mobilenet_v3_small", "IMAGENET1K_V1"), reference.state_dict())
    model = torch.hub.load(str(REPO_ROOT), "mobilenetv3_small_100", source="local", pretrained="torchvision")
    assert max_difference(reference.double(), model.double()) <= 1e-4
