"""Model parity with torchvision: every factory, eval and train, dtypes, stems, sizes, serialisation, errors."""
import copy
import io
import pickle
import statistics

import pytest
import torch
import torchvision
from torch import nn

import resnet_fast
from resnet_fast.models.resnet import ARCHS
from resnet_fast.testing import randomize_batch_norm
from conftest import lowp_tolerance, rel_err
from helpers import float64_copy, model_pair


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_factory_matches_torchvision_in_eval(arch):
    tv, rf = model_pair(arch)
    tv.eval(), rf.eval()
    assert list(tv.state_dict()) == list(rf.state_dict())
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        expected, out = tv(x), rf(x)
    assert out.shape == (2, 1000)
    assert rel_err(out, expected) <= 1e-5


def test_factories_reject_conflicting_fixed_arguments():
    with pytest.raises(ValueError, match="resnext50_32x4d has groups=32, got groups=4"):
        resnet_fast.resnext50_32x4d(groups=4)


def _train_step_pair(tv, rf, x):
    """Runs one forward/backward in train mode on both models and a float64 copy of torchvision's."""
    tv64 = float64_copy(tv)
    for m in (tv, rf, tv64):
        m.train()
    outs = [m(x.to(dtype)) for m, dtype in ((tv, torch.float32), (rf, torch.float32), (tv64, torch.float64))]
    target = torch.randn_like(outs[2])
    for out in outs:
        ((out - target.to(out.dtype)) ** 2).mean().backward()
    return outs, tv64


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_train_step_in_float64_is_torchvisions(arch):
    """One training step in float64, where rounding cannot decide anything: the output, every gradient and
    every running statistic equal torchvision's float64 step to 1e-9. This pins every formula and index
    of the training path; the fp32 test below judges precision."""
    tv, rf = model_pair(arch, num_classes=10)
    tv, rf = tv.double().train(), rf.double().train()
    x = torch.randn(4, 3, 40, 40, dtype=torch.float64)
    outs = [m(x) for m in (tv, rf)]
    target = torch.randn_like(outs[0])
    for out in outs:
        ((out - target) ** 2).mean().backward()
    assert rel_err(outs[1], outs[0]) <= 1e-9
    for (name, a), (_, b) in zip(tv.named_parameters(), rf.named_parameters()):
        assert rel_err(b.grad, a.grad) <= 1e-9, name
    for (name, a), (_, b) in zip(tv.named_buffers(), rf.named_buffers()):
        assert rel_err(b.double(), a.double()) <= 1e-9, name


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_gradient_penalty_is_torchvisions(arch, mode):
    """Double backprop, as a gradient penalty (WGAN-GP, R1) takes it: the input gradient with
    create_graph=True, then the backward of its squared norm into every parameter; float64 against
    torchvision. In train mode this differentiates the BatchNorm backward itself (it raised: the op's
    backward had no backward)."""
    tv, rf = (getattr(m.double(), mode)() for m in model_pair(arch, num_classes=5))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    results = []
    for model in (tv, rf):
        xi = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(model(xi).square().sum(), xi, create_graph=True)
        g.square().sum().backward()
        results.append((g.detach(), {k: p.grad for k, p in model.named_parameters()}))
    (g_tv, grads_tv), (g_rf, grads_rf) = results
    assert rel_err(g_rf, g_tv) <= 1e-9
    assert grads_rf.keys() == grads_tv.keys()
    for name, expected in grads_tv.items():
        assert rel_err(grads_rf[name], expected) <= 1e-9, name


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_is_torchvisions(reentrant):
    """Every block under torch.utils.checkpoint (recomputed in the backward), float64: the gradients, and
    the running statistics updated by both the forward and its recomputation, as torchvision's."""
    tv, rf = (float64_copy(m).train() for m in model_pair("resnet50", num_classes=5))
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    for m in (tv, rf):
        h = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        for block in (*m.layer1, *m.layer2, *m.layer3, *m.layer4):
            h = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=reentrant)
        m.fc(torch.flatten(m.avgpool(h), 1)).square().sum().backward()
    for (name, a), (_, b) in zip(tv.named_parameters(), rf.named_parameters()):
        assert rel_err(b.grad, a.grad) <= 1e-9, name
    for (name, a), (_, b) in zip(tv.named_buffers(), rf.named_buffers()):
        assert rel_err(b.double(), a.double()) <= 1e-9, name


@pytest.mark.parametrize("arch,size", [("resnet18", 64), ("resnet50", 40)])
def test_train_mode_matches_torchvision(arch, size):
    """The precision of an fp32 training step against float64: in each of four draws the output and every
    running statistic within 2x torchvision's own fp32 error; the whole gradient, by its best draw,
    within 2x torchvision's mean error over the draws, with a floor of 2e-3.

    The gradient is judged over draws because one draw is a lottery. A ReLU input within rounding of zero
    falls on either side depending on the rounding order (seen: 1 element in 16k at layer4.1.bn1, +1.4e-7
    in our run, negative in torchvision's), and layer4 has 32 positions per channel, so one flipped mask
    moves that layer's weight gradient by about 1/32 and every gradient upstream with it. Single-draw
    gradient errors, ours and torchvision's alike (2026-12-04, 80 and 40 draws of each): resnet18 at 64
    px, 2.7e-6 without a flip, above 1e-5 in a quarter of the draws, up to 3.7e-2; resnet50 at 40 px,
    flips in every draw, 5e-3 to 4.4e-2. Judged by the mean of four draws (the rule until then), that
    failed in 7% (resnet18) and 1.3% (resnet50) of resamples of those draws, and it failed a CI run. The
    best draw fails in 0.014% and 0.034%: a precision defect shows in every draw, and the op-level tests
    judge each backward alone; the float64 test above pins every formula and index."""
    grad_errors = []
    for _ in range(4):
        tv, rf = model_pair(arch, num_classes=10)
        x = torch.randn(8, 3, size, size)
        (out_tv, out_rf, out64), tv64 = _train_step_pair(tv, rf, x)
        assert rel_err(out_rf, out64) <= lowp_tolerance(torch.float32, out_tv, out64)
        params = list(zip(tv.named_parameters(), rf.named_parameters(), tv64.named_parameters()))
        assert all(p_rf.grad is not None for _, (_, p_rf), _ in params)
        grads = [torch.cat([p.grad.flatten() for (_, p) in group]) for group in zip(*params)]
        grad_errors.append((rel_err(grads[1], grads[2]), rel_err(grads[0], grads[2])))
        buffers = zip(tv.named_buffers(), rf.named_buffers(), tv64.named_buffers())
        for (name, b_tv), (_, b_rf), (_, b64) in buffers:
            if name.endswith("num_batches_tracked"):
                assert b_rf.item() == b_tv.item() == 1, name
            else:
                assert rel_err(b_rf, b64) <= lowp_tolerance(torch.float32, b_tv, b64), name
    ours, theirs = zip(*grad_errors)
    assert min(ours) <= max(2 * statistics.fmean(theirs), 2e-3), \
        f"(ours, torchvision's) gradient errors per draw: {grad_errors}"


def test_momentum_none_and_untracked_batch_norm_behave_like_torch():
    """Batch statistics in both halves, so the input is 8x64x64: layer4 then normalises over 32 values per
    channel. At 4x32x32 it had 4, whose variance can be near zero and amplify rounding without bound
    (seen: torchvision's own fp32 error against float64 up to 4.7e-5, ours 2.4x that once in 60 draws)."""
    norm = lambda c: nn.BatchNorm2d(c, momentum=None)  # noqa: E731
    tv, rf = model_pair("resnet18", norm_layer=norm, num_classes=4)
    x = torch.randn(8, 3, 64, 64)
    for _ in range(2):
        tv(x), rf(x)
    for (name, a), (_, b) in zip(tv.named_buffers(), rf.named_buffers()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5), name
    norm = lambda c: nn.BatchNorm2d(c, track_running_stats=False)  # noqa: E731
    tv, rf = model_pair("resnet18", norm_layer=norm, num_classes=4)
    tv.eval(), rf.eval()  # no running stats: batch statistics even in eval mode
    with torch.no_grad():
        out_tv, out_rf, out64 = tv(x), rf(x), float64_copy(tv)(x.double())
    assert rel_err(out_rf, out64) <= lowp_tolerance(torch.float32, out_tv, out64)


def test_group_norm_layer_runs_unfused_and_matches():
    norm = lambda c: nn.GroupNorm(8, c)  # noqa: E731
    tv, rf = model_pair("resnet18", norm_layer=norm)
    x = torch.randn(2, 3, 32, 32)
    for mode in (True, False):
        tv.train(mode), rf.train(mode)
        with torch.no_grad():
            assert rel_err(rf(x), tv(x)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cpu(dtype):
    tv, rf = model_pair("resnet18")
    tv64 = float64_copy(tv).eval()
    tv.eval().to(dtype), rf.eval().to(dtype)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = tv64(x.double())
        assert rel_err(rf(x.to(dtype)), ref) <= lowp_tolerance(dtype, tv(x.to(dtype)), ref)


def _assert_mean_errors_within_twice_torchvisions(errors: list[list[float]], names: tuple[str, ...]) -> None:
    """errors: per draw, (ours, torchvision's) error against float64 for each quantity in names, in turn;
    each of our mean errors over the draws at most twice torchvision's."""
    means = [statistics.fmean(column) for column in zip(*errors)]
    for what, ours, theirs in zip(names, means[0::2], means[1::2]):
        assert ours <= 2 * theirs, f"{what}: (ours, torchvision's) errors per draw: {errors}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_model_trains_on_cpu(dtype):
    """A model cast to half precision (``model.to(dtype)``, no autocast) takes a training step as
    torchvision's does: its BatchNorm parameters are half while the batch statistics are float32 (the
    backward raised "expected scalar type"). Output, whole gradient and running statistics each within 2x
    torchvision's own same-dtype error against float64, by the mean over two draws: in half precision a
    ReLU mask flips in most draws, for both models (over ten draws each ratio stayed below 1.25)."""
    errors = []
    for _ in range(2):
        tv, rf = model_pair("resnet18", num_classes=10)
        tv64 = float64_copy(tv).train()
        tv, rf = tv.to(dtype).train(), rf.to(dtype).train()
        x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
        outs = [m(x.to(m.fc.weight.dtype)) for m in (rf, tv, tv64)]
        target = torch.randn_like(outs[2])
        for out in outs:
            ((out.double() - target) ** 2).mean().backward()
        grads = [torch.cat([p.grad.double().flatten() for p in m.parameters()]) for m in (rf, tv, tv64)]
        stats = [torch.cat([b.double().flatten() for name, b in m.named_buffers() if "running" in name])
                 for m in (rf, tv, tv64)]
        assert all(p.grad.dtype == dtype for p in rf.parameters())
        errors.append([rel_err(values[i], values[2]) for values in (outs, grads, stats) for i in (0, 1)])
    _assert_mean_errors_within_twice_torchvisions(errors, ("output", "gradient", "running statistics"))


@pytest.mark.parametrize("norm", ["BatchNorm2d", "FrozenBatchNorm2d"])
def test_autocast_training_step_on_cpu(norm):
    """A training step under ``torch.autocast`` (bfloat16), the usual way to train in low precision: with
    BatchNorm2d (convolutions by torch, the BatchNorm ops on their bfloat16 output) and with
    FrozenBatchNorm2d (fused, through the convolution op's autocast rule, with its backward). Output and
    whole gradient within 2x torchvision's own autocast error against float64, by the mean over two
    draws (over eight draws the largest single-draw ratio was 1.48)."""
    kwargs = {} if norm == "BatchNorm2d" else {"norm_layer": torchvision.ops.FrozenBatchNorm2d}
    errors = []
    for _ in range(2):
        tv, rf = model_pair("resnet18", num_classes=10, **kwargs)
        tv64 = float64_copy(tv).train()
        x = torch.randn(4, 3, 64, 64)
        outs = []
        for model in (rf.train(), tv.train()):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                outs.append(model(x))
        outs.append(tv64(x.double()))
        assert outs[0].dtype == outs[1].dtype == torch.bfloat16
        target = torch.randn_like(outs[2])
        for out in outs:
            ((out.double() - target) ** 2).mean().backward()
        grads = [torch.cat([p.grad.double().flatten() for p in m.parameters()]) for m in (rf, tv, tv64)]
        errors.append([rel_err(values[i], values[2]) for values in (outs, grads) for i in (0, 1)])
    _assert_mean_errors_within_twice_torchvisions(errors, ("output", "gradient"))


def test_autocast_inference_on_cpu():
    tv, rf = model_pair("resnet18")
    tv.eval(), rf.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = float64_copy(tv)(x.double())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_tv, out_rf = tv(x), rf(x)
    assert out_rf.dtype == torch.bfloat16
    assert rel_err(out_rf, ref) <= lowp_tolerance(torch.bfloat16, out_tv, ref)


@pytest.mark.parametrize("size", [(1, 1), (7, 9), (33, 17), (65, 64)])
def test_odd_image_sizes(size):
    tv, rf = model_pair("resnet18")
    tv.eval(), rf.eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert rel_err(rf(x), tv(x)) <= 1e-5


def test_nchw_and_channels_last_inputs_agree():
    _, rf = model_pair("resnet18")
    rf.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(rf(x), rf(x.contiguous(memory_format=torch.channels_last)), atol=1e-5)


def test_dilation_matches_torchvision():
    tv, rf = model_pair("resnet50", replace_stride_with_dilation=[False, True, True])
    tv.eval(), rf.eval()
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        expected = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
        for stage in (tv.layer1, tv.layer2, tv.layer3, tv.layer4):
            expected = stage(expected)
        assert rel_err(rf.forward_features(x), expected) <= 1e-5
        assert expected.shape[-1] == 6  # output stride 8


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("zero_init_residual", [False, True])
def test_same_seed_builds_torchvisions_initial_weights(arch, zero_init_residual):
    """Under one seed a factory draws torchvision's initial weights, bit for bit, and leaves the generator
    where torchvision's leaves it: a seeded training script (or torchvision's own test_models, whose
    expected outputs come from seeded untrained models) gets the same model and the same data after it."""
    models, states = [], []
    for build in (getattr(torchvision.models, arch), getattr(resnet_fast, arch)):
        torch.manual_seed(0)
        models.append(build(num_classes=50, zero_init_residual=zero_init_residual))
        states.append(torch.get_rng_state())
    expected, got = (m.state_dict() for m in models)
    assert list(got) == list(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert torch.equal(states[1], states[0])
    if zero_init_residual:
        last_norm = "bn3" if isinstance(models[1].layer1[0], resnet_fast.Bottleneck) else "bn2"
        assert all(getattr(b, last_norm).weight.abs().sum() == 0 for b in models[1].modules()
                   if isinstance(b, (resnet_fast.BasicBlock, resnet_fast.Bottleneck)))


def test_imagenet_and_cifar_stems():
    m = resnet_fast.resnet18()
    assert m.conv1.kernel_size == (7, 7) and m.conv1.stride == (2, 2) and isinstance(m.maxpool, nn.MaxPool2d)
    c = resnet_fast.resnet18(stem="cifar", num_classes=10)
    assert c.conv1.kernel_size == (3, 3) and c.conv1.stride == (1, 1) and isinstance(c.maxpool, nn.Identity)
    assert list(c.state_dict()) == list(m.state_dict())
    x = torch.randn(2, 3, 32, 32)
    c.eval()
    assert c.forward_features(x).shape == (2, 512, 4, 4)
    assert m.eval().forward_features(x).shape == (2, 512, 1, 1)
    # The cifar stem computes conv3x3 -> BN -> ReLU, checked against the modules run by hand.
    with torch.no_grad():
        stem = torch.relu(c.bn1(c.conv1(x)))
        expected = c.forward_head(c.layer4(c.layer3(c.layer2(c.layer1(stem)))))
        assert rel_err(c(x), expected) <= 1e-6


def test_small_cifar_net_and_grayscale_input():
    m = resnet_fast.ResNet(resnet_fast.BasicBlock, [2, 2, 2], widths=(64, 64, 64), stem="cifar", in_channels=1,
                           num_classes=10)
    assert m.stage_names == ["layer1", "layer2", "layer3"] and not hasattr(m, "layer4")
    assert m.fc.in_features == 64 and m.conv1.in_channels == 1
    randomize_batch_norm(m)
    x = torch.randn(3, 1, 32, 32)
    m.eval()
    with torch.no_grad():
        out = m(x)
        ref = float64_copy(m)
        with resnet_fast.backend("torch"):
            ref_out = ref(x.double())
    assert out.shape == (3, 10) and rel_err(out, ref_out) <= 1e-5
    g = resnet_fast.resnet50(in_channels=1, num_classes=7).eval()
    with torch.no_grad():
        assert g(torch.randn(2, 1, 56, 56)).shape == (2, 7)


def test_forward_features_head_and_reset_classifier():
    tv, rf = model_pair("resnet50")
    tv.eval(), rf.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = rf.forward_features(x)
        assert feats.shape == (2, 2048, 2, 2)
        pooled = rf.forward_head(feats, pre_logits=True)
        assert pooled.shape == (2, 2048) and rf.num_features == 2048
        assert rel_err(rf.forward_head(feats), tv(x)) <= 1e-5
    rf.reset_classifier(5)
    assert rf.fc.out_features == 5 and rf(x).shape == (2, 5)
    rf.reset_classifier(0)
    assert isinstance(rf.fc, nn.Identity) and rf(x).shape == (2, 2048)


def test_state_dict_round_trips_strictly_both_ways():
    tv = randomize_batch_norm(torchvision.models.resnet34())
    rf = resnet_fast.resnet34()
    rf.load_state_dict(tv.state_dict(), strict=True)
    back = torchvision.models.resnet34()
    back.load_state_dict(rf.state_dict(), strict=True)
    for (k, a), (k2, b) in zip(tv.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_pickle_deepcopy_and_torch_save():
    _, rf = model_pair("resnet18")
    rf.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = rf(x)
    buf = io.BytesIO()
    torch.save(rf, buf)
    size_with_model = buf.tell()
    assert size_with_model < 1.2 * sum(t.numel() * 4 for t in rf.state_dict().values()) + 1e6
    buf.seek(0)
    copies = [pickle.loads(pickle.dumps(rf)), copy.deepcopy(rf), torch.load(buf, weights_only=False)]
    for c in copies:
        assert isinstance(c, resnet_fast.ResNet)
        with torch.no_grad():
            assert torch.equal(c(x), expected)


def test_subclasses_torchvision_classes():
    m = resnet_fast.resnet50()
    assert isinstance(m, torchvision.models.ResNet)
    assert isinstance(m.layer1[0], torchvision.models.resnet.Bottleneck)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_children_in_torchvisions_order(arch):
    """Module order is API: ``nn.Sequential(*list(model.children())[:-1])``, the classic feature extractor,
    runs the children in that order, and named_modules() orders printing, hooks and conversions."""
    tv, rf = model_pair(arch, num_classes=10)
    assert [n for n, _ in rf.named_modules()] == [n for n, _ in tv.named_modules()]
    trunks = [nn.Sequential(*list(m.children())[:-1]).eval() for m in (tv, rf)]
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert rel_err(trunks[1](x), trunks[0](x)) <= 1e-5


@pytest.mark.parametrize(
    "make_input,error,match",
    [
        (lambda: torch.randn(3, 32, 32), ValueError, "x must be a 4-D"),
        (lambda: torch.randn(1, 1, 32, 32), ValueError, "x must have 3 channels .* got 1"),
        (lambda: torch.randn(1, 3, 0, 32), ValueError, "at least 1x1"),
        (lambda: torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8), TypeError, "floating-point"),
        (lambda: torch.randn(1, 3, 32, 32).half(), TypeError, "x has dtype torch.float16 but the model"),
        (lambda: torch.randn(1, 3, 32, 32, device="meta"), ValueError, "x is on meta but the model's"),
        (lambda: [1.0, 2.0], TypeError, "x must be a torch.Tensor"),
    ],
)
def test_model_rejects_bad_input(make_input, error, match):
    m = resnet_fast.resnet18().eval()
    with pytest.raises(error, match=match):
        m(make_input())


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"stem": "tiny"}, "stem must be one of"),
        ({"in_channels": 0}, "in_channels must be a positive int"),
        ({"widths": (64, 128)}, "one positive width per stage"),
        ({"replace_stride_with_dilation": [True]}, "3-element tuple"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        resnet_fast.ResNet(resnet_fast.BasicBlock, [1, 1, 1, 1], **kwargs)
    with pytest.raises(ValueError, match="BasicBlock only supports groups=1"):
        resnet_fast.ResNet(resnet_fast.BasicBlock, [1, 1], groups=2)


def test_torch_compile_fullgraph_eval_and_train():
    """torch.compile traces the plain modules (no graph break from the fold cache) and agrees with eager."""
    m = randomize_batch_norm(resnet_fast.ResNet(resnet_fast.BasicBlock, [1, 1], widths=(8, 16), stem="cifar",
                                                num_classes=5))
    x = torch.randn(4, 3, 16, 16)
    m.eval()
    with torch.no_grad():
        expected = m(x)
        assert rel_err(torch.compile(m, fullgraph=True)(x), expected) <= 1e-5
    m.train()
    eager = copy.deepcopy(m)
    eager(x).square().sum().backward()
    out = torch.compile(m, fullgraph=True)(x)
    with resnet_fast.backends.record_dispatch() as calls:
        out.square().sum().backward()
    # The compiled backward runs the BatchNorm backward op, and so the chosen backend's kernel (its
    # create_graph path, torch's own backward, must not be what the compiled graph recorded).
    assert calls[("batch_norm_act_backward", "torch")] == sum(isinstance(n, nn.BatchNorm2d) for n in m.modules())
    for (name, a), (_, b) in zip(eager.named_parameters(), m.named_parameters()):
        assert rel_err(b.grad, a.grad) <= 1e-4, name
    assert torch.allclose(eager.bn1.running_mean, m.bn1.running_mean, atol=1e-6)


def test_torch_export_matches_eager():
    m = randomize_batch_norm(resnet_fast.resnet18(num_classes=4)).eval()
    x = torch.randn(2, 3, 32, 32)
    program = torch.export.export(m, (x,))
    with torch.no_grad():
        assert rel_err(program.module()(x), m(x)) <= 1e-5


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("converted", [False, True])
def test_batch_of_zero(train, converted):
    """An empty batch gives an empty [0, num_classes] output, as torchvision does, in both modes."""
    tv, rf = model_pair("resnet18", num_classes=6)
    if converted:
        rf = resnet_fast.convert(randomize_batch_norm(torchvision.models.resnet18(num_classes=6)))
    rf.train(train)
    before = {n: b.clone() for n, b in rf.named_buffers() if "running" in n}
    out = rf(torch.randn(0, 3, 32, 32))
    assert out.shape == (0, 6)
    for name, b in rf.named_buffers():
        if "running" in name:
            assert torch.equal(b, before[name]), name  # an empty batch trains no statistic


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_meta_device_forward_gives_torchvisions_shapes(train, grad):
    """A model on the meta device (shape inference, deferred init before ``to_empty``) runs its forward
    like torchvision's, in both modes, with and without autograd: no kernel runs, only shapes."""
    tv, rf = (m.to("meta").train(train) for m in model_pair("resnet18", num_classes=6))
    x = torch.empty(2, 3, 40, 24, device="meta")
    with torch.set_grad_enabled(grad), resnet_fast.backend("torch", strict=True):
        out = rf(x)
        features = rf.forward_features(x)
    assert out.device.type == "meta" and out.shape == tv(x).shape == (2, 6)
    assert features.shape == (2, 512, 2, 1)

@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_builders_name_torchvisions_weights_enum(arch):
    """torchvision's get_model_weights(builder) reads the builder's ``weights`` annotation."""
    expected = torchvision.models.get_model_weights(getattr(torchvision.models, arch))
    assert torchvision.models.get_model_weights(ARCHS[arch]) is expected


def test_legacy_pretrained_keyword(monkeypatch):
    """torchvision's deprecated ``pretrained=`` (pytorch/examples' ImageNet script passes it): False builds
    a fresh model with torchvision's warning; True asks for IMAGENET1K_V1 like torchvision."""
    with pytest.warns(UserWarning, match="'pretrained' is deprecated"):
        model = resnet_fast.resnet50(pretrained=False)
    assert isinstance(model, resnet_fast.ResNet)
    asked = {}
    monkeypatch.setattr("resnet_fast.weights.load_pretrained",
                        lambda model, weights, **kwargs: asked.setdefault("weights", weights))
    with pytest.warns(UserWarning, match="'pretrained' is deprecated"):
        resnet_fast.resnet18(pretrained=True)
    assert asked["weights"] == torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    with pytest.raises(ValueError, match="not both"):
        resnet_fast.resnet18(pretrained=True, weights="DEFAULT")


def test_weights_load_under_torchvisions_test_mocks():
    """torchvision's detection tests build backbones with weights while mocking the download and
    ``nn.Module.load_state_dict`` (test_detection_model_trainable_backbone_layers): the loader must not
    depend on the real return value, as torchvision's own does not."""
    from unittest import mock

    with mock.patch("torchvision.models._api.load_state_dict_from_url"), \
            mock.patch("torch.nn.Module.load_state_dict"):
        assert isinstance(resnet_fast.resnet50(weights="DEFAULT"), resnet_fast.ResNet)
