"""Training config: recipes load and validate, overrides are typed, unknown keys and bad values are clear errors."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import yaml

from mobilenetv3.errors import UserError
from mobilenetv3.train.config import TrainConfig, all_keys, list_recipes, load_config, set_key, to_dict
from mobilenetv3.train.run import create_run_model, model_kwargs_for

RECIPES = ("imagenet-paper", "imagenet-torchvision", "imagenet-timm", "imagenet-seed", "fashion-mnist",
           "fashion-mnist-large")


def test_every_issue_recipe_is_shipped_and_validates():
    assert set(RECIPES) <= set(list_recipes())
    for name in RECIPES:
        config = load_config(name)
        assert config.description, name


def test_recipes_hold_their_sources_settings():
    paper = load_config("imagenet-paper")
    assert (paper.optim.name, paper.optim.lr, paper.optim.lr_base_batch, paper.optim.eps) == ("rmsproptf", 0.1, 4096, 0.001)
    assert (paper.schedule.name, paper.schedule.step_epochs, paper.schedule.gamma) == ("exponential", 3.0, 0.99)
    assert paper.optim.weight_decay == 1e-5 and paper.optim.no_decay_norm_and_bias
    assert (paper.model.drop_rate, paper.regularization.label_smoothing, paper.ema.decay) == (0.2, 0.1, 0.9999)
    assert paper.ema.enabled and paper.schedule.warmup_epochs > 0 and paper.reference_top1 == 75.2
    assert (paper.model.bn_eps, paper.model.bn_momentum) == (0.001, 0.01)  # TF: decay 0.99

    tv = load_config("imagenet-torchvision")
    assert (tv.optim.name, tv.optim.lr, tv.optim.lr_base_batch, tv.optim.weight_decay) == ("rmsprop", 0.064, 1024, 1e-5)
    assert (tv.schedule.name, tv.schedule.step_epochs, tv.schedule.gamma, tv.epochs) == ("step", 2.0, 0.973, 600)
    assert (tv.data.auto_augment, tv.data.random_erasing) == ("autoaugment", 0.2)
    assert tv.model.bn_momentum == 0.01 and not tv.optim.no_decay_norm_and_bias

    timm = load_config("imagenet-timm")
    assert (timm.optim.name, timm.optim.eps, timm.optim.lr, timm.optim.lr_base_batch) == ("rmsproptf", 0.001, 0.064, 1024)
    assert (timm.schedule.step_epochs, timm.schedule.gamma, timm.batch_size, timm.epochs) == (2.4, 0.973, 512, 600)
    assert (timm.data.auto_augment, timm.data.randaugment_magnitude, timm.data.random_erasing) == ("randaugment", 9, 0.2)
    assert timm.model.drop_path_rate == 0.2 and timm.ema.enabled and timm.ema.decay == 0.9999
    assert timm.model.bn_momentum == 0.1  # timm trains with PyTorch's BatchNorm defaults

    seed = load_config("imagenet-seed")
    assert (seed.optim.name, seed.optim.nesterov, seed.schedule.name, seed.schedule.cyclic_mode) == (
        "sgd", True, "cyclic", "triangular2")
    assert (seed.regularization.mixup_alpha, seed.regularization.label_smoothing) == (0.2, 0.1)
    assert seed.regularization.dropblock_prob > 0

    fm = load_config("fashion-mnist")
    assert fm.data.dataset == "fashion-mnist" and fm.reference_top1 == 95.0
    large = load_config("fashion-mnist-large")  # the same schedule, SGD, a bigger network, more regularisation
    assert (large.model.name, large.data.dataset, large.batch_size, large.threads) == (
        "mobilenetv3_large_125", "fashion-mnist", 128, 1)
    assert large.schedule == fm.schedule
    assert (large.optim.name, large.optim.lr, large.optim.lr_base_batch, large.optim.weight_decay) == (
        "sgd", 0.1, 256, 5e-4) and large.optim.nesterov
    assert large.data.random_erasing > 0 and large.model.drop_rate > 0


def test_overrides_are_typed_for_every_key():
    config = TrainConfig()
    flat = to_dict(config)
    for key in all_keys():
        value = flat
        for part in key.split("."):
            value = value[part]
        if value is None:
            text = "null"
        elif isinstance(value, str):
            text = value
        else:
            text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        set_key(config, key, text)  # every key accepts its own value written as on the command line
    assert to_dict(config) == flat

    config = load_config(overrides=[("optim.lr", "0.5"), ("epochs", "3"), ("ema.enabled", "true"),
                                    ("schedule.milestones", "10,20"), ("model.num_classes", "none"),
                                    ("optim.betas", "[0.8, 0.99]"), ("data.input_size", "64")])
    assert config.optim.lr == 0.5 and config.epochs == 3 and config.ema.enabled is True
    assert config.schedule.milestones == [10.0, 20.0] and config.model.num_classes is None
    assert config.optim.betas == (0.8, 0.99) and config.data.input_size == 64


@pytest.mark.parametrize(("key", "message"), [
    ("optim.lrr", "unknown config key 'optim.lrr'; did you mean optim.lr?"),
    ("lr", "unknown config key 'lr'; did you mean optim.lr?"),
    ("schedule.warmup", "unknown config key 'schedule.warmup'; did you mean schedule.warmup_epochs"),
    ("regularisation.label_smoothing", "unknown config key 'regularisation'"),
])
def test_unknown_keys_name_the_key_and_close_matches(key, message):
    with pytest.raises(UserError) as error:
        load_config(overrides=[(key, "1")])
    assert message in str(error.value)


def test_unknown_key_in_a_yaml_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("optim:\n  name: sgd\n  momentun: 0.9\n")
    with pytest.raises(UserError, match=r"unknown config key 'optim.momentun'; did you mean optim.momentum\?"):
        load_config(config_file=path)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("epochs", "0", "epochs must be positive, got 0"),
    ("batch_size", "-8", "batch_size must be positive, got -8"),
    ("epochs", "2.5", "epochs must be an integer, got 2.5"),
    ("optim.lr", "fast", "optim.lr must be a number, got 'fast'"),
    ("optim.name", "lamb", "optim.name must be one of sgd, rmsproptf, rmsprop, adamw, got 'lamb'"),
    ("amp", "fp8", "amp must be one of none, bf16, fp16"),
    ("regularization.label_smoothing", "1.5", "regularization.label_smoothing must be in [0.0, 1.0]"),
    ("regularization.dropblock_size", "4", "dropblock_size must be odd"),
    ("checkpoint.best_metric", "ema_val_top1", "needs ema.enabled=true"),
    ("checkpoint.best_metric", "swa_val_top1", "checkpoint.best_metric must be one of val_top1, ema_val_top1"),
    ("swa.start_epoch", "-1", "swa.start_epoch must be >= 0, got -1"),
    ("model.name", "mobilenetv3_large_1000", "unknown model 'mobilenetv3_large_1000'"),
    ("ema.enabled", "maybe", "ema.enabled must be true or false"),
    ("model.output_stride", "4", "model.output_stride must be 8, 16 or 32, got 4"),
])
def test_bad_values_are_user_errors(key, value, message):
    with pytest.raises(UserError) as error:
        load_config(overrides=[(key, value)])
    assert message in str(error.value)


def test_swa_start_defaults_to_the_last_quarter_and_must_leave_epochs_to_average():
    config = load_config(overrides=[("swa.enabled", "true"), ("epochs", "20")])
    assert config.swa.first_epoch_after(config.epochs) == 15
    with pytest.raises(UserError, match=r"swa.start_epoch \(20\) must be at least 1 and below epochs \(20\)"):
        load_config(overrides=[("swa.enabled", "true"), ("epochs", "20"), ("swa.start_epoch", "20")])
    with pytest.raises(UserError, match=r"swa.start_epoch \(1\) must be at least 1 and below epochs \(1\)"):
        load_config(overrides=[("swa.enabled", "true"), ("epochs", "1")])  # one epoch leaves none to average


def test_cli_flags_map_onto_config_keys():
    from mobilenetv3.cli import build_parser
    from mobilenetv3.cli.train import resolve_config

    args = build_parser().parse_args([
        "train", "--recipe", "fashion-mnist", "--lr", "0.01", "--epochs", "3", "--batch-size", "32", "--amp", "bf16",
        "--ema", "--ema-decay", "0.99", "--no-channels-last", "--limit-train-batches", "5", "--data-dir", "/x",
        "--set", "schedule.name=cosine", "--set", "optim.weight_decay=0",
    ])
    config = resolve_config(args)
    assert (config.optim.lr, config.epochs, config.batch_size, config.amp) == (0.01, 3, 32, "bf16")
    assert (config.ema.enabled, config.ema.decay, config.channels_last) == (True, 0.99, False)
    assert (config.limit_train_batches, config.data.data_dir, config.schedule.name) == (5, "/x", "cosine")
    assert config.optim.weight_decay == 0.0
    assert config.model.name == load_config("fashion-mnist").model.name  # from the recipe, untouched


def test_cli_reports_a_bad_key_in_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "mobilenetv3", "train", "--set", "optim.lrr=0.1"], capture_output=True, text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "mobilenetv3 train: error: unknown config key 'optim.lrr'; did you mean optim.lr?"
    ]


def test_print_config_round_trips(tmp_path):
    from mobilenetv3.train.config import dump_yaml

    config = load_config("imagenet-timm", overrides=[("epochs", "7")])
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(config, {"git_commit": "abc"}))
    assert to_dict(load_config(config_file=path)) == to_dict(config)


def test_output_stride_reaches_the_model_and_its_saved_kwargs():
    """model.output_stride=8 keeps 28x28 Fashion-MNIST at 4x4 in the last stage (dilation instead of the last
    stride) where the stem-stride-1 default ends at 2x2; the model's config, which checkpoints store, has it."""
    bundle = SimpleNamespace(num_classes=10, in_chans=1, model_defaults={"in_chans": 1, "stem_stride": 1})
    images = torch.zeros(1, 1, 28, 28)
    for overrides, stride, size in (([], 32, 2), ([("model.output_stride", "8")], 8, 4)):
        config = load_config(recipe="fashion-mnist", overrides=overrides)
        model = create_run_model(config.model, model_kwargs_for(config, bundle)).eval()
        assert model.config["output_stride"] == stride
        with torch.no_grad():
            assert model.forward_features(images).shape[-2:] == (size, size)


def test_zero_init_last_reaches_the_model():
    bundle = SimpleNamespace(num_classes=10, in_chans=1, model_defaults={"in_chans": 1, "stem_stride": 1})
    for value, zeroed in (("false", False), ("true", True)):
        config = load_config(recipe="fashion-mnist", overrides=[("model.zero_init_last", value)])
        model = create_run_model(config.model, model_kwargs_for(config, bundle))
        scales = [block.project.bn.weight for block in model.blocks if block.has_skip]
        assert model.config["zero_init_last"] is zeroed
        assert all(bool((scale == 0).all()) is zeroed for scale in scales)


@pytest.mark.parametrize(("key", "value", "message"), [
    ("optim.weight_decay", "-1", "optim.weight_decay must be >= 0, got -1.0"),
    ("schedule.pct_start", "1.5", "schedule.pct_start must be in [0.0, 1.0], got 1.5"),
    ("schedule.warmup_epochs", "-1", "schedule.warmup_epochs must be >= 0, got -1.0"),
    ("schedule.milestones", "30,10", "schedule.milestones must be increasing, got [30.0, 10.0]"),
    ("schedule.milestones", "[30, 60", "schedule.milestones must be a list, got '[30, 60'"),  # not a traceback
    ("optim.lr", ".nan", "optim.lr must be positive, got nan"),  # NaN is outside every bound
    ("epochs", ".inf", "epochs must be an integer, got inf"),
    ("swa.bn_batches", "-2", "swa.bn_batches must be >= 0, got -2"),
    ("output", None, "output must be a string, got None"),
])
def test_limits_beside_the_fields_name_key_value_and_limit(key, value, message):
    with pytest.raises(UserError) as error:
        load_config(overrides=[(key, value)])
    assert str(error.value) == message


def test_key_info_is_what_the_command_line_flags_are_made_from():
    from mobilenetv3.train.config import key_info

    name, stride, limit = key_info("optim.name"), key_info("model.output_stride"), key_info("limit_train_batches")
    assert (name.choices, name.default) == (("sgd", "rmsproptf", "rmsprop", "adamw"), "adamw")
    assert (stride.kind, stride.choices, stride.default) == (int, (8, 16, 32), None)
    assert (limit.kind, limit.choices) == (int, ())
    assert key_info("ema.enabled").kind is bool and key_info("data.workers").default == 2
    with pytest.raises(UserError, match=r"unknown config key 'optim.lrr'; did you mean optim.lr\?"):
        key_info("optim.lrr")
