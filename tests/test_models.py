"""The networks are the paper's: exact counts, the timm model contract, TorchScript/export parity."""

from __future__ import annotations

import pytest
import torch

import mobilenetv3
from mobilenetv3 import UnknownModelError, UserError, create_model, list_models
from mobilenetv3.models.spec import LARGE, SMALL, make_divisible
from mobilenetv3.profile import PAPER, profile_model

WIDTHS = {"035": 0.35, "050": 0.5, "075": 0.75, "100": 1.0, "125": 1.25}

# Exact parameter counts published by the peers for the same networks (torchvision / timm model cards).
PEER_PARAMS = {
    "mobilenetv3_large_100": 5_483_032,
    "mobilenetv3_small_100": 2_542_856,
    "mobilenetv3_large_075": 3_993_528,
    "mobilenetv3_small_075": 2_041_872,
    "mobilenetv3_large_minimal_100": 3_924_288,
    "mobilenetv3_small_minimal_100": 2_044_736,
}

PAPER_ROWS = [
    (f"mobilenetv3_{arch}_{suffix}", 224) for arch in ("large", "small") for suffix in WIDTHS
] + [("mobilenetv3_large_100", r) for r in (256, 192, 160, 128, 96)] + [
    ("mobilenetv3_small_100", r) for r in (256, 160, 128, 96)
] + [("mobilenetv3_large_minimal_100", 224), ("mobilenetv3_small_minimal_100", 224)]


def test_tables_match_the_paper():
    # Table 1 / Table 2 rows: 15 bnecks for Large, 11 for Small, with the paper's strides and widths.
    assert len(LARGE.blocks) == 15 and len(SMALL.blocks) == 11
    assert [b.stride for b in LARGE.blocks].count(2) == 4
    assert [b.out_channels for b in SMALL.blocks][-1] == 96
    assert sum(b.squeeze_excite for b in LARGE.blocks) == 8
    assert make_divisible(5.6) == 8 and make_divisible(18) == 24 and make_divisible(30) == 32


@pytest.mark.parametrize("name,resolution", PAPER_ROWS)
def test_counts_within_paper_tolerance(name, resolution):
    profile = profile_model(name, resolution)
    assert profile.paper_macs is not None or profile.paper_params is not None
    if profile.paper_macs is not None:
        assert abs(profile.macs / 1e6 - profile.paper_macs) <= 1.0, profile
    if profile.paper_params is not None:
        assert abs(profile.params / 1e6 - profile.paper_params) <= 0.1, profile
    if name in PEER_PARAMS:
        assert profile.params == PEER_PARAMS[name]


def test_small_125_params_left_out_of_paper_table():
    # The paper prints 3.6M, which its own 1024-wide head cannot give; we keep only its MACs.
    assert PAPER[("small", 1.25, 224)] == (91, None)
    assert abs(profile_model("mobilenetv3_small_125").params - 3.6e6) > 0.1e6


def test_registry_names_and_generic_builder():
    names = list_models()
    for arch in ("large", "small"):
        for suffix in WIDTHS:
            assert f"mobilenetv3_{arch}_{suffix}" in names
        assert f"mobilenetv3_{arch}_minimal_100" in names
    generic = create_model("mobilenetv3_large", width_mult=0.75)
    fixed = create_model("mobilenetv3_large_075")
    assert [p.shape for p in generic.parameters()] == [p.shape for p in fixed.parameters()]


def test_minimal_variants_have_no_se_no_hardswish_and_3x3_only():
    model = create_model("mobilenetv3_large_minimal_100")
    kinds = {type(m).__name__ for m in model.modules()}
    assert "SqueezeExcite" not in kinds and "Hardswish" not in kinds
    depthwise = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.kernel_size == (3, 3) for m in depthwise)


def test_head_is_unscaled_and_has_no_bn():
    for name in ("mobilenetv3_large_035", "mobilenetv3_large_125"):
        model = create_model(name)
        assert model.conv_head.out_channels == 1280 and model.conv_head.bias is not None
    assert create_model("mobilenetv3_small_050").conv_head.out_channels == 1024


def test_unknown_model_lists_close_matches():
    with pytest.raises(UnknownModelError, match="mobilenetv3_large_100"):
        create_model("mobilenetv3_larg_100")


@pytest.mark.parametrize("name", ["mobilenetv3_large_100", "mobilenetv3_small_075", "mobilenetv3_small_minimal_100"])
def test_contract_odd_resolution_channels_classes_and_grads(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_chans=1, drop_path_rate=0.1)
    x = torch.randn(1, 1, 193, 257)
    out = model(x)
    assert out.shape == (1, 7)
    out.sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, no_grad
    feats = model.forward_features(x)
    assert feats.shape[1] == model.num_features and feats.shape[-2:] == (7, 9)
    pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape == (1, model.head_hidden_size)
    model.reset_classifier(3)
    assert model(x).shape == (1, 3)
    model.reset_classifier(0)
    assert model(x).shape == (1, model.head_hidden_size)


def test_zero_init_last_starts_every_residual_block_as_the_identity():
    torch.manual_seed(0)
    model = create_model("mobilenetv3_large_100", num_classes=5, zero_init_last=True)
    plain = create_model("mobilenetv3_large_100", num_classes=5)
    residual = [block for block in model.blocks if block.has_skip]
    assert len(residual) == 10  # Table 1's rows whose input and output match (stride 1, same width)
    x = torch.randn(2, 3, 64, 64)
    features = model.stem(x)
    for block, reference in zip(model.blocks, plain.blocks):
        out = block(features)
        if block.has_skip:
            assert torch.equal(out, features)  # projection scaled by zero: only the shortcut is left
        else:
            assert torch.equal(block.project.bn.weight, reference.project.bn.weight)  # ones
        features = out
    model(x).sum().backward()
    assert all(block.project.bn.weight.grad.abs().sum() > 0 for block in residual)  # the zero scale learns
    assert model.state_dict().keys() == plain.state_dict().keys()


@pytest.mark.parametrize("output_stride", [32, 16, 8])
def test_features_only_shapes_match_feature_info(output_stride):
    torch.manual_seed(0)
    model = create_model("mobilenetv3_large_100", features_only=True, output_stride=output_stride).eval()
    x = torch.randn(1, 3, 96, 128)
    outs = model(x)
    assert len(outs) == len(model.feature_info) == 5
    for out, info in zip(outs, model.feature_info):
        assert out.shape[1] == info["num_chs"]
        assert out.shape[-2:] == (96 // info["reduction"], 128 // info["reduction"])
    assert [i["reduction"] for i in model.feature_info] == [min(r, output_stride) for r in (2, 4, 8, 16, 32)]
    assert [i["num_chs"] for i in model.feature_info] == [16, 24, 40, 112, 960]


def test_features_only_subset_drops_unused_layers_and_loads_classifier_weights():
    classifier = create_model("mobilenetv3_small_100").eval()
    backbone = create_model("mobilenetv3_small_100", features_only=True, out_indices=(1, 2)).eval()
    assert [i["reduction"] for i in backbone.feature_info] == [4, 8]
    missing, unexpected = backbone.load_state_dict(classifier.state_dict(), strict=False)
    assert not missing
    x = torch.randn(1, 3, 64, 64)
    out = backbone(x)
    backbone(x)[1].sum().backward()
    assert all(p.grad is not None for p in backbone.parameters())
    with torch.no_grad():
        expected = classifier.blocks[:3](classifier.stem(x))
    assert torch.equal(out[1], expected)
    with pytest.raises(UserError, match="out_indices"):
        create_model("mobilenetv3_small_100", features_only=True, out_indices=(7,))


def test_feature_info_matches_timm():
    timm = pytest.importorskip("timm")
    for ours, theirs in (("mobilenetv3_large_100", "mobilenetv3_large_100"), ("mobilenetv3_small_100", "mobilenetv3_small_100")):
        ref = timm.create_model(theirs, features_only=True, pretrained=False)
        mine = create_model(ours)
        assert mine.feature_info.channels() == ref.feature_info.channels()
        assert mine.feature_info.reduction() == ref.feature_info.reduction()


@pytest.mark.parametrize("kwargs", [{}, {"padding": "same"}])
def test_torchscript_and_export_parity(kwargs):
    torch.manual_seed(0)
    model = create_model("mobilenetv3_small_050", num_classes=5, **kwargs).eval()
    x = torch.randn(2, 3, 97, 131)
    with torch.no_grad():
        expected = model(x)
        scripted = torch.jit.script(model)
        assert torch.allclose(scripted(x), expected, atol=1e-5)
        exported = torch.export.export(model, (x,))
        assert torch.allclose(exported.module()(x), expected, atol=1e-5)


def test_torchscript_features_only():
    model = create_model("mobilenetv3_small_050", features_only=True).eval()
    x = torch.randn(1, 3, 64, 64)
    scripted = torch.jit.script(model)
    for a, b in zip(scripted(x), model(x)):
        assert torch.allclose(a, b, atol=1e-5)


def test_bad_kwargs_are_user_errors():
    for kwargs in ({"output_stride": 4}, {"stem_stride": 3}, {"drop_rate": 1.5}, {"norm_layer": "layernorm"}):
        with pytest.raises(UserError):
            create_model("mobilenetv3_small_100", **kwargs)
    assert isinstance(mobilenetv3.UserError("x"), ValueError)


def test_same_padding_is_asymmetric_like_tensorflow():
    from mobilenetv3.models.layers import SamePadConv2d

    conv = SamePadConv2d(1, 1, 3, stride=2, bias=False)
    torch.nn.init.ones_(conv.weight)
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    # TF 'SAME' for a 4x4 input, k=3, s=2 pads 0 before and 1 after: the first window is rows/cols 0..2.
    assert conv(x)[0, 0, 0, 0].item() == x[0, 0, :3, :3].sum().item()


def test_reset_classifier_keeps_dtype_and_accepts_timm_signature():
    model = create_model("mobilenetv3_small_035").to(torch.bfloat16).eval()
    model.reset_classifier(4, "avg")
    assert model.classifier.weight.dtype == torch.bfloat16
    assert model(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)).shape == (1, 4)
    with pytest.raises(UserError, match="global_pool"):
        model.reset_classifier(4, "max")


def test_pretrained_file_of_another_width_is_refused(tmp_path):
    path = mobilenetv3.save_model(create_model("mobilenetv3_small_075"), tmp_path / "w.safetensors")
    with pytest.raises(UserError, match="width_mult=0.75"):
        create_model("mobilenetv3_small_100", pretrained=str(path))
    with pytest.raises(UserError, match="not a mobilenetv3_large_075"):
        create_model("mobilenetv3_large_075", pretrained=str(path))
    assert create_model("mobilenetv3_small", pretrained=str(path)).config["width_mult"] == 0.75


def test_inference_batchnorm_runs_in_place_and_bit_identical(monkeypatch):
    """Eval + no_grad on CPU: BN writes into the conv output on large maps, with nn.BatchNorm2d's numbers."""
    from mobilenetv3 import cpu_routes

    torch.manual_seed(0)
    model = create_model("mobilenetv3_small_050", num_classes=7)
    with torch.no_grad():  # non-trivial running statistics
        model(torch.randn(4, 3, 64, 64))
    model.eval()
    x = torch.randn(8, 3, 160, 160)  # the stem's 8 x 8 x 80 x 80 output is above the threshold
    calls = []  # wrote into its input
    original = cpu_routes.batch_norm

    def spy(norm, t, conv, conv_input):
        result = original(norm, t, conv, conv_input)
        calls.append(result is t)
        return result

    monkeypatch.setattr(cpu_routes, "batch_norm", spy)
    with torch.inference_mode():
        fast = model(x)
    assert any(calls) and not all(calls)  # the big early maps in place, the small late ones not
    calls.clear()
    with cpu_routes.routes(inplace_batchnorm=False), torch.inference_mode():  # every BN called as a module
        reference = model(x)
    assert calls and not any(calls)
    assert torch.equal(fast, reference)
    # With autograd on, nothing is overwritten in place, and gradients flow.
    calls.clear()
    x.requires_grad_(True)
    with cpu_routes.routes(inplace_batchnorm_min_elements=1):
        model(x).sum().backward()
    assert calls and not any(calls) and x.grad is not None
    monkeypatch.undo()
    seen = []  # a hooked BN is called as a module, so its hooks run
    handle = model.stem.bn.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    with torch.inference_mode():
        assert torch.equal(model(x), reference) and len(seen) == 1
    handle.remove()
    x = x.detach()
    with torch.enable_grad():  # the plain eager path: NCHW, out of place
        plain = model(x)
    with torch.inference_mode():  # TorchScript compiles the plain path (the routes are jit.unused)
        assert torch.equal(torch.jit.script(model)(x), plain)


def _record_conv_routes(model):
    """Forward pre-hooks on every routable conv that record (route, depthwise, kernel larger than the map, input
    pixels, has bias) per call; hooks do not change which route a conv takes."""
    from mobilenetv3 import cpu_routes

    calls = []

    def record(conv, args):
        t = args[0]
        overhangs = t.shape[-2] < conv.kernel_size[0] or t.shape[-1] < conv.kernel_size[1]
        calls.append((cpu_routes.conv_route(conv, t), conv.groups > 1, overhangs, t.shape[-2] * t.shape[-1],
                      conv.bias is not None))

    handles = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, cpu_routes.RoutedConv2d)]
    return calls, handles


def test_cpu_training_pads_overhanging_depthwise_kernels_explicitly():
    """Depthwise kernels larger than their map (28x28 input, stem stride 1: 5x5 kernels on 4x4 and 2x2 maps) train
    on a channels_last CPU batch as explicit padding + unpadded conv (tap by tap on the tiniest), 1x1 convs on
    small maps as a GEMM, with the plain convs' outputs and gradients."""
    from mobilenetv3 import cpu_routes

    torch.manual_seed(0)
    model = create_model("mobilenetv3_small_050", num_classes=5, in_chans=1, stem_stride=1)
    model.to(memory_format=torch.channels_last)
    x = cpu_routes.to_channels_last(torch.randn(4, 1, 28, 28))
    calls, _ = _record_conv_routes(model)

    def train_step():
        model.zero_grad()
        torch.manual_seed(1)  # the same dropout mask each time
        out = model(x)
        out.square().sum().backward()
        return out, {name: p.grad.clone() for name, p in model.named_parameters()}

    with cpu_routes.routes(on_avx512=True):  # the routes are for CPUs without AVX-512: use them on any CPU here
        fast, fast_grads = train_step()
    routes = [route for route, *_ in calls]
    assert "padded_depthwise" in routes and "depthwise_taps" in routes
    matmuls = [(pixels, bias) for route, _, _, pixels, bias in calls if route == "pointwise_gemm"]
    assert (1, True) in matmuls and any(pixels > 1 for pixels, _ in matmuls)  # squeeze-excite, small maps
    assert all((route in ("padded_depthwise", "depthwise_taps")) == (depthwise and overhangs)
               for route, depthwise, overhangs, _, _ in calls)
    calls.clear()
    with cpu_routes.routes(enabled=False):  # every conv by nn.Conv2d's forward
        plain, plain_grads = train_step()
    assert calls and not any(route for route, *_ in calls)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5 * plain.abs().max().item())
    # Relative to the largest gradient: some (the BN biases before a block's next BN) are rounding noise, ~1e-9.
    scale = max(grad.abs().max().item() for grad in plain_grads.values())
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6 * scale, msg=name)
    # Depthwise routes only with autograd on and on a channels_last batch (a 1x1 map is NHWC in either layout).
    with cpu_routes.routes(on_avx512=True):
        for memory_format, grad in ((torch.contiguous_format, True), (torch.channels_last, False)):
            model.to(memory_format=memory_format)
            calls.clear()
            with torch.set_grad_enabled(grad):
                model(x.clone(memory_format=memory_format))  # clone: x.contiguous() keeps one-channel NHWC strides
            assert calls and not any(route for route, depthwise, *_ in calls if depthwise)
        # A hooked conv still takes its route, and its hooks, forward and backward, run.
        model.to(memory_format=torch.channels_last)
        last = model.blocks[-1].depthwise.conv
        seen = []
        last.register_forward_hook(lambda module, args, output: seen.append(output.shape))
        last.register_full_backward_hook(lambda module, grad_input, grad_output: seen.append("backward"))
        calls.clear()
        model(x).sum().backward()
    assert seen == [seen[0], "backward"] and sum(route is not None and depthwise for route, depthwise, *_ in calls) \
        == sum(depthwise and overhangs for _, depthwise, overhangs, _, _ in calls)


def test_padded_depthwise_conv_equals_the_conv_and_stays_off_where_unmeasured():
    """Non-square kernel, stride, bias: output and all gradients equal the plain conv's, tap by tap and padded;
    off for anything else."""
    from mobilenetv3 import cpu_routes

    torch.manual_seed(0)
    conv = cpu_routes.RoutedConv2d(6, 6, (5, 3), stride=(2, 1), padding=(2, 1), groups=6, bias=True)
    x = torch.randn(2, 6, 4, 2).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad_out = torch.randn(2, 6, 2, 2)

    def run():
        x.grad = conv.weight.grad = conv.bias.grad = None
        out = conv(x)
        out.backward(grad_out)
        return out.detach(), x.grad, conv.weight.grad, conv.bias.grad

    with cpu_routes.routes(enabled=False):
        plain = run()
    for taps, route in ((True, "depthwise_taps"), (False, "padded_depthwise")):
        with cpu_routes.routes(on_avx512=True, depthwise_taps=taps):
            assert cpu_routes.conv_route(conv, x) == route
            for mine, reference in zip(run(), plain):
                torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-6)
    with cpu_routes.routes(on_avx512=True):
        assert cpu_routes.conv_route(conv, x.detach().double()) is None  # float32 only
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert cpu_routes.conv_route(conv, x) is None
        grouped = cpu_routes.RoutedConv2d(6, 6, 5, padding=2, groups=3)  # grouped but not depthwise
        assert cpu_routes.conv_route(grouped, x) is None
        with cpu_routes.routes(padded_depthwise=False, depthwise_taps=False):
            assert cpu_routes.conv_route(conv, x) is None
        handle = conv.register_full_backward_hook(lambda module, grad_input, grad_output: None)
        assert cpu_routes.conv_route(conv, x) == "depthwise_taps"  # its backward hook runs all the same
        handle.remove()
    # not measured on AVX-512 CPUs: the plain conv there unless asked
    avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    assert (cpu_routes.conv_route(conv, x) is None) == avx512
    assert not any(isinstance(m, cpu_routes.RoutedConv2d) and m.dilation != (1, 1)
                   for m in create_model("mobilenetv3_small_050", output_stride=8).modules())


def test_depthwise_by_taps_is_the_conv_with_its_gradients_and_second_gradients():
    """The tap-by-tap depthwise conv of tiny maps (5x5 on 2x2, and strided with a non-square kernel) against
    F.conv2d in float64, then autograd's numerical check of its gradients and of their gradients."""
    from mobilenetv3.cpu_routes import depthwise_by_taps

    torch.manual_seed(0)
    for size, kernel, stride, padding in (((2, 2), (5, 5), (1, 1), (2, 2)), ((4, 3), (5, 3), (2, 1), (2, 1))):
        x = torch.randn(3, 4, *size, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
        weight = torch.randn(4, 1, *kernel, dtype=torch.float64)
        torch.testing.assert_close(
            depthwise_by_taps(x, weight, stride, padding),
            torch.nn.functional.conv2d(x, weight, None, stride, padding, 1, 4),
        )
        x.requires_grad_()
        weight.requires_grad_()
        assert torch.autograd.gradcheck(lambda a, b: depthwise_by_taps(a, b, stride, padding), (x, weight))
        assert torch.autograd.gradgradcheck(lambda a, b: depthwise_by_taps(a, b, stride, padding), (x, weight))


def test_pointwise_conv_as_matmul_equals_the_conv_and_stays_off_where_unmeasured():
    """A 1x1 conv with bias on small NHWC maps (1x1 as in squeeze-excite and the head, and 4x4) as a GEMM: the
    conv's output, layout and gradients; the plain conv for anything else."""
    from mobilenetv3 import cpu_routes

    torch.manual_seed(0)
    conv = cpu_routes.RoutedConv2d(8, 5, 1, bias=True)
    for size in (1, 4):
        x = torch.randn(3, 8, size, size).contiguous(memory_format=torch.channels_last).requires_grad_()
        grad_out = torch.randn(3, 5, size, size)
        results = []
        for settings in (dict(on_avx512=True), dict(enabled=False)):
            with cpu_routes.routes(**settings):
                assert (cpu_routes.conv_route(conv, x) == "pointwise_gemm") == ("on_avx512" in settings)
                x.grad = conv.weight.grad = conv.bias.grad = None
                out = conv(x)
                out.backward(grad_out)
            results.append((out.detach(), x.grad, conv.weight.grad, conv.bias.grad))
        for mine, reference in zip(*results):
            torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-6)
        assert results[0][0].is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(3, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    with cpu_routes.routes(on_avx512=True):
        assert cpu_routes.conv_route(conv, x) == "pointwise_gemm"
        with torch.no_grad():
            assert cpu_routes.conv_route(conv, x) is None  # training only: inference was not measured
        conv.eval()
        assert cpu_routes.conv_route(conv, x) is None  # nor an eval-mode model under autograd
        conv.train()
        assert cpu_routes.conv_route(conv, x.contiguous()) is None  # NCHW: the view would not exist
        assert cpu_routes.conv_route(conv, x.double()) is None
        big = torch.randn(1, 8, 5, 4).contiguous(memory_format=torch.channels_last)  # 20 pixels: oneDNN is as fast
        assert cpu_routes.conv_route(conv, big) is None
        with cpu_routes.routes(pointwise_gemm_max_pixels=20):
            assert cpu_routes.conv_route(conv, big) == "pointwise_gemm"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert cpu_routes.conv_route(conv, x) is None
        for other in (cpu_routes.RoutedConv2d(8, 5, 1, stride=2), cpu_routes.RoutedConv2d(8, 4, 1, groups=2),
                      cpu_routes.RoutedConv2d(8, 5, 3)):
            assert cpu_routes.conv_route(other, x) is None
        with cpu_routes.routes(pointwise_gemm=False):
            assert cpu_routes.conv_route(conv, x) is None
        seen = []
        handle = conv.register_forward_hook(lambda module, args, output: seen.append(output.shape))
        conv(x)
        assert seen == [(3, 5, 4, 4)]  # a module call: its hook runs, whichever kernel computed it
        handle.remove()
    avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    assert (cpu_routes.conv_route(conv, x) is None) == avx512


def test_cpu_routes_switch_and_environment_variable():
    """One switch: set_routes / routes() turn every route or one off and back; MOBILENETV3_CPU_ROUTES sets the
    start (0, 1 or a list of routes); a bad value or name is a one-line UserError."""
    import os
    import subprocess
    import sys

    from mobilenetv3 import cpu_routes

    assert cpu_routes.settings() == cpu_routes.RouteSettings()
    with cpu_routes.routes(enabled=False) as off:
        assert not any(getattr(off, name) for name in cpu_routes.ROUTES)
        with cpu_routes.routes(channels_last=True):
            assert cpu_routes.settings().channels_last and not cpu_routes.settings().pointwise_gemm
        model = create_model("mobilenetv3_small_050").eval()
        seen = []
        model.stem.conv.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
        with torch.inference_mode():
            model(torch.randn(1, 3, 64, 64))
        assert seen == [True]  # no channels_last route: NCHW all the way
    assert cpu_routes.settings() == cpu_routes.RouteSettings()
    previous = cpu_routes.set_routes(pointwise_gemm=False)
    assert not cpu_routes.settings().pointwise_gemm and cpu_routes.settings().channels_last
    cpu_routes.restore(previous)
    with pytest.raises(UserError, match="unknown CPU route setting"):
        cpu_routes.set_routes(no_such_route=False)
    for value, expected in (("0", cpu_routes.RouteSettings(**{name: False for name in cpu_routes.ROUTES})),
                            ("1", cpu_routes.RouteSettings()), ("", cpu_routes.RouteSettings()),
                            ("channels_last, inplace_batchnorm", cpu_routes.RouteSettings(
                                padded_depthwise=False, depthwise_taps=False, pointwise_gemm=False))):
        assert cpu_routes.from_environment(value) == expected
    with pytest.raises(UserError, match="unknown route channels_lats"):
        cpu_routes.from_environment("channels_lats")
    # read on import: a process started with the variable set runs without routes
    code = "from mobilenetv3 import cpu_routes; print(cpu_routes.settings().channels_last)"
    env = {**os.environ, "MOBILENETV3_CPU_ROUTES": "0"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
    # a bad value through the command line: exit status 2 and one line, before or while a command runs
    env["MOBILENETV3_CPU_ROUTES"] = "channels_lats"
    for command in (["list"], ["train", "--help"]):
        result = subprocess.run([sys.executable, "-m", "mobilenetv3", *command], env=env, capture_output=True,
                                text=True)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "MOBILENETV3_CPU_ROUTES='channels_lats': unknown route channels_lats" in result.stderr


@pytest.mark.parametrize("grad", [True, False])
def test_torch_fx_symbolic_trace(grad):
    """torch.fx (torchvision's create_feature_extractor, FX quantization) traces the plain, out-of-place graph."""
    from torchvision.models.feature_extraction import create_feature_extractor

    torch.manual_seed(0)
    model = create_model("mobilenetv3_small_050", num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.set_grad_enabled(grad):
        traced = torch.fx.symbolic_trace(model)
        extractor = create_feature_extractor(model, {"blocks.3": "mid", "classifier": "logits"})
    assert not any(node.target == "mul_" for node in traced.graph.nodes)
    with torch.enable_grad():  # the traced graph is the plain eager path: NCHW, out of place
        expected, mid = model(x), model.blocks[:4](model.stem(x))
    with torch.no_grad():
        assert torch.equal(traced(x), expected)
        assert torch.equal(extractor(x)["logits"], expected)
        assert torch.equal(extractor(x)["mid"], mid)


def test_cpu_inference_runs_channels_last_inside_and_returns_the_callers_layout():
    torch.manual_seed(0)
    model = create_model("mobilenetv3_small_050", num_classes=5)
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64))  # BN statistics, so the outputs are not near zero
        torch.nn.init.normal_(model.classifier.weight)
    model.eval()
    seen = []
    model.stem.conv.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    x = torch.randn(2, 3, 72, 56)
    with torch.enable_grad():
        plain, plain_features = model(x), model.forward_features(x)
    assert seen == [True, True]
    with torch.inference_mode():
        fast, features = model(x), model.forward_features(x)
        nhwc_features = model.forward_features(x.contiguous(memory_format=torch.channels_last))
    assert seen[2:] == [False, False, False]  # NHWC inside
    with torch.no_grad():  # the usual inference idiom takes the same path
        assert torch.equal(model(x), fast) and seen[5:] == [False]
    with torch.autograd.forward_ad.dual_level():  # forward-mode AD: the plain NCHW ops
        dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        with torch.no_grad():
            model(dual)
    assert seen[6:] == [True]
    assert features.is_contiguous() and nhwc_features.is_contiguous(memory_format=torch.channels_last)
    scale = plain.abs().max().item()
    assert scale > 1e-3
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-5 * scale)  # the same arithmetic, other summation order
    torch.testing.assert_close(features, plain_features, rtol=0, atol=1e-5 * plain_features.abs().max().item())
    backbone = create_model("mobilenetv3_small_050", features_only=True)
    backbone.load_state_dict(model.state_dict(), strict=False)
    with torch.inference_mode():
        maps = backbone.eval()(x)
    assert all(m.is_contiguous() for m in maps)


@pytest.mark.parametrize("inference", [torch.no_grad, torch.inference_mode])
def test_inference_fast_paths_leave_other_peoples_tensors_alone(inference):
    """A conv output handed to a hook, a conv that returns its input, and the caller's batch are never overwritten."""
    from torch.func import functional_call, stack_module_state

    from mobilenetv3.models.layers import ConvNormAct
    from mobilenetv3.models.spec import Activation

    torch.manual_seed(0)
    model = create_model("mobilenetv3_small_050", num_classes=5)
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64))
    model.eval()
    x = torch.randn(8, 3, 160, 160)
    original = x.clone()
    kept = []
    model.stem.conv.register_forward_hook(lambda module, args, output: kept.append((args[0].clone(), output)))
    with inference():
        model(x)
        assert torch.equal(kept[0][1], torch.nn.functional.conv2d(
            kept[0][0], model.stem.conv.weight, None, 2, 1))  # the hook's tensor was not normalised in place
    assert torch.equal(x, original)
    layer = ConvNormAct(16, 16, 1, norm_layer=torch.nn.BatchNorm2d, activation=Activation.HARD_SWISH).eval()
    layer.conv = torch.nn.Identity()  # e.g. after pruning: the "conv output" is the caller's tensor
    y = torch.randn(8, 16, 64, 64)
    before = y.clone()
    with inference():
        out = layer(y)
    assert torch.equal(y, before) and not torch.equal(out, before)
    # A hook that keeps a depthwise output (feature extraction) keeps it: the in-place SE product goes elsewhere.
    block = next(b for b in model.blocks if b.has_se)
    held = []
    handle = block.depthwise.register_forward_hook(lambda module, args, output: held.append((output, output.clone())))
    with inference():
        model(x)
    handle.remove()
    assert torch.equal(held[0][0], held[0][1])
    # One input channel (Fashion-MNIST): NCHW and NHWC strides differ only in stride(1); still converted.
    grey = create_model("mobilenetv3_small_050", in_chans=1).eval()
    strides = []
    grey.stem.conv.register_forward_pre_hook(lambda module, args: strides.append(args[0].stride(1)))
    with inference():
        grey(torch.randn(2, 1, 64, 64))
    assert strides == [1]
    # vmap over an ensemble (torch.func) runs the plain ops: out= kernels have no batching rule.
    models = [create_model("mobilenetv3_small_050", num_classes=5).eval() for _ in range(2)]
    params, buffers = stack_module_state(models)
    batch = torch.randn(2, 3, 96, 96)

    def run(p, b):
        return functional_call(models[0], (p, b), (batch,))

    with torch.no_grad():
        ensemble = torch.vmap(run)(params, buffers)
        for index, member in enumerate(models):
            torch.testing.assert_close(ensemble[index], member(batch), rtol=1e-4, atol=1e-5)
