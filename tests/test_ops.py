"""The functional ops: reference semantics, the torch.library ops (opcheck, autograd, autocast), fold_bn,
validation errors, and the backend registry."""
import copy
import subprocess
import sys
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F

import resnet_fast
from resnet_fast import backends, ops
from resnet_fast.ops import reference
from conftest import lowp_tolerance, rel_err


def test_fold_bn_matches_conv_then_batch_norm_in_float64():
    c_in, c_out = 5, 7
    x = torch.randn(2, c_in, 9, 11, dtype=torch.float64)
    w, b = torch.randn(c_out, c_in, 3, 3, dtype=torch.float64), torch.randn(c_out, dtype=torch.float64)
    gamma, beta = torch.rand(c_out, dtype=torch.float64) + 0.5, torch.randn(c_out, dtype=torch.float64)
    mean, var = torch.randn(c_out, dtype=torch.float64), torch.rand(c_out, dtype=torch.float64) + 0.1
    expected = F.batch_norm(F.conv2d(x, w, b, padding=1), mean, var, gamma, beta, False, 0.0, 1e-3)
    wf, bf = ops.fold_bn(w, b, gamma, beta, mean, var, 1e-3)
    assert rel_err(F.conv2d(x, wf, bf, padding=1), expected) < 1e-13
    # No conv bias and no affine: the fold must treat them as 0 / 1 / 0.
    wf, bf = ops.fold_bn(w, None, None, None, mean, var, 1e-5)
    expected = F.batch_norm(F.conv2d(x, w, padding=1), mean, var, None, None, False, 0.0, 1e-5)
    assert rel_err(F.conv2d(x, wf, bf, padding=1), expected) < 1e-13


def test_fold_bn_computes_in_float32_for_half_weights():
    w = torch.randn(16, 8, 3, 3)
    mean, var = torch.randn(16), torch.rand(16) * 1e-3 + 1e-4  # large scales: fp16 folding would lose bits
    gamma, beta = torch.rand(16) + 0.5, torch.randn(16)
    w64, b64 = ops.fold_bn(w.double(), None, gamma.double(), beta.double(), mean.double(), var.double(), 1e-5)
    wh, bh = ops.fold_bn(w.half(), None, gamma.half(), beta.half(), mean.half(), var.half(), 1e-5)
    assert wh.dtype == bh.dtype == torch.float16
    assert rel_err(wh, w64) < 2e-3 and rel_err(bh, b64) < 2e-3


def test_fold_bn_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="running_var must have shape"):
        ops.fold_bn(torch.randn(4, 3, 1, 1), None, None, None, torch.zeros(4), torch.ones(5), 1e-5)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("residual,relu", [(False, False), (True, False), (False, True), (True, True)])
def test_conv_bias_act_reference(memory_format, residual, relu):
    x = torch.randn(2, 6, 10, 9).to(memory_format=memory_format)
    w, b = torch.randn(8, 3, 3, 3), torch.randn(8)
    r = torch.randn(2, 8, 5, 5) if residual else None
    out = ops.conv_bias_act(x, w, b, stride=2, padding=1, dilation=1, groups=2, residual=r, relu=relu)
    expected = F.conv2d(x.double(), w.double(), b.double(), 2, 1, 1, 2)
    if residual:
        expected = expected + r.double()
    if relu:
        expected = expected.relu()
    assert rel_err(out, expected) < 1e-6
    assert out.is_contiguous(memory_format=memory_format)


def test_add_relu_and_batch_norm_act_reference():
    x, y = torch.randn(3, 4, 5, 6), torch.randn(3, 4, 5, 6)
    assert torch.equal(ops.add_relu(x, y), (x + y).clamp_min(0))
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    w, b = torch.rand(4) + 0.5, torch.randn(4)
    out = ops.batch_norm_act(x, w, b, rm, rv, training=True, momentum=0.3, eps=1e-5, residual=y, relu=True)
    expected = (F.batch_norm(x, rm2, rv2, w, b, True, 0.3, 1e-5) + y).relu()
    # The running variance is recovered from the saved inverse std: equal to torch's up to rounding.
    assert rel_err(out, expected) < 1e-6 and rel_err(rm, rm2) < 1e-6 and rel_err(rv, rv2) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_act_gradients_are_as_precise_as_torchs(training, dtype):
    """One BatchNorm (+ residual, ReLU), with batch or running statistics, every tensor in ``dtype`` (as in
    a model cast to half precision): the gradients of x, the residual and the affine parameters within 2x
    torch's own same-dtype error against float64. One layer with 2048 values per channel, so a precision
    defect in the backward (a cancelling variance, a low-precision sum) shows; the inputs sit off zero
    (mean 1, std 3), where such a cancellation costs digits.

    The residual keeps every pre-activation at least 0.25 from zero: in half precision, rounding would
    otherwise flip a few ReLU masks per draw, ours and torch's alike, each moving one gradient element
    by a whole ``g`` (seen: 7% of fp16 draws failed the rule on a single flip)."""
    x, r, g = torch.randn(8, 16, 16, 16) * 3 + 1, torch.randn(8, 16, 16, 16), torch.randn(8, 16, 16, 16)
    w, b = torch.rand(16) + 0.5, torch.randn(16)
    running_mean, running_var = torch.randn(16) + 1, torch.rand(16) * 9 + 5
    stats = (None, None) if training else (running_mean.double(), running_var.double())
    pre = F.batch_norm(x.double(), *stats, w.double(), b.double(), training) + r.double()
    r = torch.where(pre.abs() < 0.25, r + 0.5 * torch.sign(pre), r)

    def ours(x, r, w, b, rm, rv):
        return ops.batch_norm_act(x, w, b, rm.clone(), rv.clone(), training=training, residual=r, relu=True)

    def torchs(x, r, w, b, rm, rv):
        return (F.batch_norm(x, rm.clone(), rv.clone(), w, b, training) + r).relu()

    def gradients(fn, dtype):
        leaves = [t.to(dtype).requires_grad_() for t in (x, r, w, b)]
        stats = [t.to(dtype) for t in (running_mean, running_var)]
        return torch.autograd.grad(fn(*leaves, *stats), leaves, g.to(dtype))

    ref = gradients(torchs, torch.float64)
    for name, got, theirs, want in zip("x residual weight bias".split(), gradients(ours, dtype),
                                       gradients(torchs, dtype), ref):
        assert got.dtype == dtype, name
        assert rel_err(got, want) <= lowp_tolerance(dtype, theirs, want), name


@pytest.mark.parametrize("momentum", [0.2, None])
def test_batch_norm_act_keeps_batch_norm_bookkeeping(momentum):
    bn = torch.nn.BatchNorm2d(3, momentum=momentum)
    rm, rv, count = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    for _ in range(3):
        x = torch.randn(4, 3, 5, 5) * 2 + 1
        expected = bn(x).relu()
        out = ops.batch_norm_act(x, None, None, rm, rv, training=True, momentum=momentum, eps=bn.eps,
                                 num_batches_tracked=count)
        assert rel_err(out, expected) < 1e-6
    assert count.item() == bn.num_batches_tracked.item() == 3
    assert rel_err(rm, bn.running_mean) < 1e-6 and rel_err(rv, bn.running_var) < 1e-6
    with pytest.raises(ValueError, match="momentum=None .* needs num_batches_tracked"):
        ops.batch_norm_act(x, None, None, rm, rv, training=True, momentum=None)


def test_batch_norm_act_on_an_empty_batch_leaves_the_statistics_alone():
    rm, rv, count = torch.randn(3), torch.rand(3) + 0.5, torch.tensor(4)
    before = rm.clone(), rv.clone()
    out = ops.batch_norm_act(torch.randn(0, 3, 4, 4), None, None, rm, rv, training=True, num_batches_tracked=count)
    assert out.shape == (0, 3, 4, 4) and count.item() == 5  # counted, as nn.BatchNorm2d counts it
    assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])


def _bn_tensors(c, dtype=torch.float32):
    return torch.rand(c, dtype=dtype) + 0.5, torch.randn(c, dtype=dtype), torch.randn(c, dtype=dtype), \
        torch.rand(c, dtype=dtype) + 0.5


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_conv_bn_act_is_torchvisions_conv_then_eval_batch_norm(memory_format):
    x = torch.randn(2, 6, 10, 9, dtype=torch.float64).to(memory_format=memory_format)
    w, b = torch.randn(8, 6, 3, 3, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    gamma, beta, mean, var = _bn_tensors(8, torch.float64)
    r = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    out = ops.conv_bn_act(x, w, b, gamma, beta, mean, var, 1e-3, stride=2, padding=1, residual=r)
    conv = torch.nn.Conv2d(6, 8, 3, 2, 1).double()
    bn = torch.nn.BatchNorm2d(8, eps=1e-3).double().eval()
    with torch.no_grad():
        conv.weight.copy_(w), conv.bias.copy_(b), bn.weight.copy_(gamma), bn.bias.copy_(beta)
        bn.running_mean.copy_(mean), bn.running_var.copy_(var)
        expected = (bn(conv(x)) + r).relu()
    assert rel_err(out, expected) < 1e-13
    assert out.is_contiguous(memory_format=memory_format)


def test_conv_output_is_channels_last_when_the_weight_is():
    x, w = torch.randn(1, 4, 6, 6), torch.randn(8, 4, 3, 3).to(memory_format=torch.channels_last)
    assert ops.conv_bias_act(x, w, padding=1).is_contiguous(memory_format=torch.channels_last)


def test_conv_bn_act_gradients_reach_every_input():
    """gradcheck in float64 through x, the conv weight and bias, the BatchNorm's affine parameters and
    statistics, and the residual: the backward formula of the library op, not autograd of the reference."""
    d = torch.float64
    args = [torch.randn(2, 4, 7, 6, dtype=d), torch.randn(5, 4, 3, 3, dtype=d), torch.randn(5, dtype=d),
            *_bn_tensors(5, d), torch.randn(2, 5, 4, 3, dtype=d)]
    args = [a.requires_grad_() for a in args]

    def f(x, w, b, gamma, beta, mean, var, r):
        return ops.conv_bn_act(x, w, b, gamma, beta, mean, var, 1e-3, stride=2, padding=1, residual=r)

    assert torch.autograd.gradcheck(f, args)


def _second_order_cases():
    """(name, function, float64 inputs) for each op with a backward, as a gradient penalty meets them."""
    d = torch.float64
    x, r = torch.randn(2, 4, 6, 5, dtype=d), torch.randn(2, 4, 6, 5, dtype=d)
    gamma, beta, mean, var = _bn_tensors(4, d)
    return [
        ("conv_bn_act", lambda x, w, b, g, bt, m, v, r: ops.conv_bn_act(x, w, b, g, bt, m, v, padding=1, residual=r),
         [x, torch.randn(4, 4, 3, 3, dtype=d), torch.randn(4, dtype=d), gamma, beta, mean, var, r]),
        ("add_relu", ops.add_relu, [x, r]),
        ("batch_norm_act training", lambda x, g, b, r: ops.batch_norm_act(x, g, b, None, None, training=True,
                                                                           residual=r), [x, gamma, beta, r]),
        ("batch_norm_act eval", lambda x, g, b, r: ops.batch_norm_act(x, g, b, mean, var, training=False, residual=r),
         [x, gamma, beta, r]),
        ("stem", lambda x, w, b, g, bt: ops.stem(x, w, b, g, bt, mean, var),
         [torch.randn(1, 3, 9, 8, dtype=d), torch.randn(4, 3, 7, 7, dtype=d), torch.randn(4, dtype=d), gamma, beta]),
    ]


@pytest.mark.parametrize("case", range(len(_second_order_cases())), ids=[c[0] for c in _second_order_cases()])
def test_second_derivatives_of_every_op(case):
    """gradgradcheck in float64: the ops' gradients are themselves differentiable (create_graph=True, as
    a gradient penalty or double backprop takes them), and correctly so."""
    _, f, inputs = _second_order_cases()[case]
    assert torch.autograd.gradgradcheck(f, [t.clone().requires_grad_() for t in inputs])


def _eval_batch_norm(x, mean, var, gamma, beta, eps):
    """Eval-mode batch norm written out, so that autograd reaches the statistics (F.batch_norm's do not)."""
    out = (x - mean.view(-1, 1, 1)) * torch.rsqrt(var.view(-1, 1, 1) + eps)
    if gamma is not None:
        out = out * gamma.view(-1, 1, 1) + beta.view(-1, 1, 1)
    return out


def _torch_conv_bn_act(x, w, b, gamma, beta, mean, var, r, *, eps, relu=True, **geometry):
    out = F.conv2d(x, w, b, **geometry)
    if var is not None:
        out = _eval_batch_norm(out, mean, var, gamma, beta, eps)
    out = out if r is None else out + r
    return F.relu(out) if relu else out


def _float64_gradient_cases():
    """name -> (resnet_fast's op, torch's composition, float64 inputs to differentiate)."""
    d = torch.float64

    def t(*shape):
        return torch.randn(*shape, dtype=d)

    bn = _bn_tensors(6, d)
    geometry = dict(stride=2, padding=1, dilation=1, groups=2)

    def conv_bn(x, w, b, gamma, beta, mean, var, r):
        return ops.conv_bn_act(x, w, b, gamma, beta, mean, var, 1e-3, residual=r, **geometry)

    def conv_plain_bn(x, w, mean, var):
        return ops.conv_bn_act(x, w, None, None, None, mean, var, 1e-5, padding=(2, 1), dilation=2, relu=False)

    def train_bn(x, gamma, beta, r):
        return ops.batch_norm_act(x, gamma, beta, None, None, training=True, residual=r)

    def torch_train_bn(x, gamma, beta, r):
        return F.relu(F.batch_norm(x, None, None, gamma, beta, True, 0.1, 1e-5) + r)

    # Running statistics are buffers there, as in torch's batch norm: no gradient.
    def eval_bn(x, gamma, beta):
        return ops.batch_norm_act(x, gamma, beta, bn[2], bn[3], training=False, eps=1e-3)

    def torch_eval_bn(x, gamma, beta):
        return F.relu(F.batch_norm(x, bn[2], bn[3], gamma, beta, False, 0.0, 1e-3))

    def stem(x, w, b, gamma, beta, mean, var):
        return ops.stem(x, w, b, gamma, beta, mean, var, 1e-3)

    def torch_stem(x, w, b, gamma, beta, mean, var):
        return F.max_pool2d(_torch_conv_bn_act(x, w, b, gamma, beta, mean, var, None, eps=1e-3, stride=2,
                                               padding=3), 3, 2, 1)

    return {
        "conv_bn_act": (conv_bn, lambda *a: _torch_conv_bn_act(*a, eps=1e-3, **geometry),
                        [t(2, 4, 9, 8), t(6, 2, 3, 3), t(6), *bn, t(2, 6, 5, 4)]),
        "conv_bn_act, no affine or bias": (
            conv_plain_bn,
            lambda x, w, mean, var: _torch_conv_bn_act(x, w, None, None, None, mean, var, None, eps=1e-5,
                                                       relu=False, padding=(2, 1), dilation=2),
            [t(2, 4, 9, 8), t(6, 4, 3, 3), bn[2], bn[3]]),
        "conv_bias_act": (lambda x, w, b, r: ops.conv_bias_act(x, w, b, padding=1, residual=r),
                          lambda x, w, b, r: F.relu(F.conv2d(x, w, b, padding=1) + r),
                          [t(2, 4, 6, 5), t(6, 4, 3, 3), t(6), t(2, 6, 6, 5)]),
        "batch_norm_act, training": (train_bn, torch_train_bn, [t(3, 6, 5, 4), bn[0], bn[1], t(3, 6, 5, 4)]),
        "batch_norm_act, eval": (eval_bn, torch_eval_bn, [t(3, 6, 5, 4), bn[0], bn[1]]),
        "add_relu": (ops.add_relu, lambda x, y: F.relu(x + y), [t(2, 6, 5, 4), t(2, 6, 5, 4)]),
        "stem": (stem, torch_stem, [t(2, 3, 19, 22), t(6, 3, 7, 7), t(6), *bn]),
    }


@pytest.mark.parametrize("case", sorted(_float64_gradient_cases()))
def test_float64_gradients_equal_autograd_through_torchs_ops(case):
    """Each op's registered backward against autograd through torch's own ops, in float64 to 1e-12:
    a formula that differs, or sums kept in float32, fails here (gradcheck's tolerances pass float32 sums)."""
    ours, theirs, inputs = _float64_gradient_cases()[case]
    grads = []
    for f in (ours, theirs):
        args = [a.clone().requires_grad_() for a in inputs]
        out = f(*args)
        out.backward(torch.ones_like(out) + torch.arange(out.numel(), dtype=out.dtype).view_as(out) % 3)
        grads.append([a.grad for a in args])
    for i, (a, b) in enumerate(zip(*grads)):
        assert rel_err(a, b) <= 1e-12, f"input {i}"


def _library_op_samples():
    x, w, b = torch.randn(2, 4, 7, 6), torch.randn(5, 4, 3, 3), torch.randn(5)
    gamma, beta, mean, var = _bn_tensors(5)
    r = torch.randn(2, 5, 7, 6)
    xg = torch.randn(2, 5, 7, 6)
    out = torch.ops.resnet_fast.batch_norm_act(xg, gamma, beta, mean, var, 1e-5, True, r, True)
    return [
        ("conv_bn_act", (x, w, b, gamma, beta, mean, var, 1e-5, [1, 1], [1, 1], [1, 1], 1, r, True)),
        ("conv_bn_act", (x.to(memory_format=torch.channels_last), w, None, None, None, None, None, 0.0, [2, 1],
                         [0, 1], [1, 2], 1, None, False)),
        ("add_relu", (x, torch.randn_like(x))),
        ("batch_stats", (xg.to(memory_format=torch.channels_last),)),
        ("batch_norm_act", (xg, gamma, beta, mean, var, 1e-5, False, r, True)),
        ("batch_norm_act", (xg.to(memory_format=torch.channels_last), None, None, mean, var, 1e-5, True, None,
                            False)),
        ("batch_norm_act_backward", (torch.randn_like(out), xg, out, gamma, mean, var, 1e-5, True, True, True)),
        ("update_running_stats", (mean.clone(), var.clone(), torch.tensor(3), mean, var, None, 2 * 7 * 6)),
    ]


@pytest.mark.parametrize("name,args", _library_op_samples(), ids=lambda v: v if isinstance(v, str) else "")
def test_opcheck(name, args):
    """Schema, fake implementation (shapes and strides), autograd registration and AOT tracing."""
    op = getattr(torch.ops.resnet_fast, name).default
    differentiable = name in ("conv_bn_act", "add_relu", "batch_norm_act")
    args = tuple(a.clone().requires_grad_(differentiable and i in (0, 1, 2, 7, 12))
                 if isinstance(a, torch.Tensor) and a.is_floating_point() else a for i, a in enumerate(args))
    torch.library.opcheck(op, args)


def test_conv_ops_cast_under_autocast_and_read_batch_norm_in_float32():
    x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)
    gamma, beta, mean, var = _bn_tensors(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.conv_bn_act(x, w, None, gamma, beta, mean, var, padding=1)
        plain = ops.conv_bias_act(x, w, padding=1)
    assert out.dtype == plain.dtype == torch.bfloat16
    expected = F.batch_norm(F.conv2d(x.double(), w.double(), padding=1), mean.double(), var.double(),
                            gamma.double(), beta.double(), False, 0.0, 1e-5).relu()
    assert rel_err(out, expected) < 1e-2


def test_batch_norm_act_updates_running_stats_like_torch():
    x = torch.randn(4, 3, 5, 5) * 3 + 1
    rm, rv = torch.zeros(3), torch.ones(3)
    ops.batch_norm_act(x, None, None, rm, rv, training=True, momentum=0.25, eps=1e-5, relu=False)
    flat = x.transpose(0, 1).reshape(3, -1)
    assert torch.allclose(rm, 0.25 * flat.mean(1), atol=1e-6)
    assert torch.allclose(rv, 0.75 + 0.25 * flat.var(1, unbiased=True), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"x": torch.randn(3, 8, 8)}, ValueError, "x must be a 4-D"),
        ({"x": torch.randint(0, 5, (1, 3, 8, 8))}, TypeError, "x must be a floating-point"),
        ({"x": torch.randn(1, 4, 8, 8)}, ValueError, "x has 4 channels but weight expects 3"),
        ({"weight": torch.randn(4, 3, 3)}, ValueError, "weight must be a 4-D"),
        ({"weight": torch.randn(4, 3, 3, 3).double()}, TypeError, "weight has dtype torch.float64"),
        ({"bias": torch.randn(5)}, ValueError, r"bias must have shape \(4,\)"),
        ({"residual": torch.randn(1, 4, 7, 7)}, ValueError, r"residual must have shape \(1, 4, 8, 8\)"),
        ({"x": torch.randn(1, 3, 1, 1), "padding": 0}, ValueError, "too small for a 3x3 kernel"),
        ({"groups": 3}, ValueError, "groups must be >= 1 and divide C_out"),
        ({"stride": 0}, ValueError, "expected stride >= 1"),
        ({"stride": (1, 2, 3)}, ValueError, "stride must be an int or a pair"),
    ],
)
def test_conv_bias_act_rejects_bad_input(kwargs, error, match):
    args = {"x": torch.randn(1, 3, 8, 8), "weight": torch.randn(4, 3, 3, 3), "bias": torch.randn(4), "padding": 1}
    args.update(kwargs)
    x, weight, bias = args.pop("x"), args.pop("weight"), args.pop("bias")
    with pytest.raises(error, match=match):
        ops.conv_bias_act(x, weight, bias, **args)


def test_conv_bias_act_rejects_mismatched_devices():
    x = torch.randn(1, 3, 8, 8, device="meta")
    with pytest.raises(ValueError, match="weight is on cpu but x is on meta"):
        ops.conv_bias_act(x, torch.randn(4, 3, 3, 3))


def test_add_relu_and_batch_norm_act_reject_bad_input():
    with pytest.raises(ValueError, match="y must have shape"):
        ops.add_relu(torch.randn(2, 3), torch.randn(3, 2))
    with pytest.raises(TypeError, match="y has dtype"):
        ops.add_relu(torch.randn(2, 3), torch.randn(2, 3).half())
    with pytest.raises(TypeError, match="x must be a floating-point"):
        ops.add_relu(torch.ones(2, dtype=torch.int32), torch.ones(2, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"running_mean must have shape \(3,\)"):
        ops.batch_norm_act(torch.randn(2, 3, 4, 4), None, None, torch.zeros(4), torch.ones(4), training=True)
    with pytest.raises(ValueError, match="training=False needs running_mean"):
        ops.batch_norm_act(torch.randn(2, 3, 4, 4), None, None, None, None, training=False)


def test_ops_are_differentiable():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: ops.conv_bias_act(a[0], a[1], a[2], padding=1, residual=a[3]),
                                    (x, w, b, r))


# --- backend registry ----------------------------------------------------------------------------


@pytest.fixture
def fake_backend():
    """A registered test backend whose conv raises Unsupported for groups > 1 and fails for relu=False."""
    calls = []

    def conv(*args):
        groups, relu = args[11], args[13]
        if groups > 1:
            raise backends.Unsupported("grouped convolution runs on the reference backend")
        if not relu:
            raise RuntimeError("kernel failed to compile")
        calls.append("conv")
        return reference.conv_bn_act(*args)

    backends.register_backend("fake", lambda: {"conv_bn_act": conv}, priority=-1,
                              supports_device=lambda d: d.type == "cpu")
    backends.register_backend("broken", lambda: (_ for _ in ()).throw(ImportError("no such library")),
                              priority=-2, supports_device=lambda d: True)
    backends._warned.clear()
    yield calls
    backends.unregister_backend("fake")
    backends.unregister_backend("broken")


def test_a_backward_on_another_thread_dispatches_as_its_forward_did():
    """Autograd runs the backward of CUDA tensors on its own device thread, which sees none of the
    caller's contextvars (backend selection, strict mode, dispatch recorder): the ops' backward restores
    the forward's. A fresh thread stands in for the device thread here."""
    probe = {"batch_stats": reference.batch_stats, "batch_norm_act": reference.batch_norm_act,
             "batch_norm_act_backward": reference.batch_norm_act_backward}
    backends.register_backend("probe", lambda: probe, priority=-1, supports_device=lambda d: True,
                              auto_select=lambda d: False)
    try:
        x, w = torch.randn(2, 3, 4, 4, requires_grad=True), torch.rand(3, requires_grad=True) + 0.5
        with resnet_fast.backend("probe", strict=True), backends.record_dispatch() as calls:
            out = ops.batch_norm_act(x, w, torch.zeros(3), torch.zeros(3), torch.ones(3), training=True,
                                     momentum=0.1, eps=1e-5)
            grads = []
            worker = threading.Thread(target=lambda: grads.extend(torch.autograd.grad(out, [x, w],
                                                                                      torch.randn_like(out))))
            worker.start()
            worker.join()
        assert len(grads) == 2
        assert calls[("batch_norm_act_backward", "probe")] == 1, dict(calls)
    finally:
        backends.unregister_backend("probe")


def _conv(groups=1, relu=True):
    return ops.conv_bias_act(torch.randn(1, 4, 5, 5), torch.randn(4, 4 // groups, 3, 3), padding=1,
                             groups=groups, relu=relu)


def test_default_is_auto_and_reference_on_cpu():
    assert resnet_fast.get_backend() == "auto"
    assert "torch" in resnet_fast.available_backends()
    assert backends.resolve("conv_bn_act", torch.device("cpu"))[0] == "torch"


def test_set_backend_and_context_manager(fake_backend):
    with resnet_fast.backend("fake"):
        assert resnet_fast.get_backend() == "fake"
        _conv()
        with resnet_fast.backend("torch"):
            _conv()
        assert resnet_fast.get_backend() == "fake"
    assert resnet_fast.get_backend() == "auto" and fake_backend == ["conv"]
    resnet_fast.set_backend("fake")
    _conv()
    assert fake_backend == ["conv", "conv"]
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        resnet_fast.set_backend("nope")


def test_explicit_backend_that_cannot_serve_falls_back_and_warns_once(fake_backend):
    with resnet_fast.backend("broken"):
        with pytest.warns(RuntimeWarning, match="backend 'broken' is unavailable: ImportError: no such library"):
            out = _conv()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _conv()  # said once only
    assert out.shape == (1, 4, 5, 5)
    assert "broken" not in resnet_fast.available_backends()
    with resnet_fast.backend("broken", strict=True), pytest.raises(backends.BackendUnavailable):
        _conv()


def test_unsupported_arguments_fall_back_explicitly(fake_backend):
    with resnet_fast.backend("fake"), pytest.warns(RuntimeWarning, match="grouped convolution runs on the reference"):
        _conv(groups=2)
    with resnet_fast.backend("fake", strict=True), pytest.raises(backends.Unsupported):
        _conv(groups=2)
    assert fake_backend == []


def test_a_failing_kernel_falls_back_with_a_warning_unless_strict(fake_backend):
    with resnet_fast.backend("fake"), pytest.warns(RuntimeWarning, match="failed on 'conv_bn_act'.*compile"):
        out = _conv(relu=False)
    assert out.shape == (1, 4, 5, 5)
    with resnet_fast.backend("fake", strict=True), pytest.raises(RuntimeError, match="compile"):
        _conv(relu=False)


def test_autograd_calls_run_the_selected_kernel_forward(fake_backend):
    x = torch.randn(1, 4, 5, 5, requires_grad=True)
    w = torch.randn(4, 4, 3, 3, requires_grad=True)
    with resnet_fast.backend("fake"), warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.conv_bias_act(x, w, padding=1).sum().backward()
    assert fake_backend == ["conv"] and x.grad is not None and w.grad is not None


def test_record_dispatch_counts_the_backend_that_really_ran(fake_backend):
    with resnet_fast.backend("fake"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with backends.record_dispatch() as calls:
            _conv()  # runs on fake
            _conv(groups=2)  # Unsupported: the reference answers
            _conv(relu=False)  # the kernel fails: the reference answers
            ops.add_relu(torch.randn(3), torch.randn(3))  # fake has no add_relu
    assert calls == {("conv_bn_act", "fake"): 1, ("conv_bn_act", "torch"): 2, ("add_relu", "torch"): 1}
    _conv()
    assert sum(calls.values()) == 4  # nothing is counted outside the block


def test_bind_resolves_once_and_keeps_calls_semantics(fake_backend):
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3)
    args = (x, w, None, None, None, None, None, 1e-5, (1, 1), (1, 1), (1, 1), 1, None, True)
    with resnet_fast.backend("fake"):
        kernel = backends.bind("conv_bn_act", x.device)
    with backends.record_dispatch() as calls:
        out = kernel(*args)  # the selection is the one at bind time
        with pytest.warns(RuntimeWarning, match="failed on 'conv_bn_act'"):
            kernel(*args[:-1], False)  # the kernel fails: the reference answers, as in call
    assert fake_backend == ["conv"] and calls == {("conv_bn_act", "fake"): 1, ("conv_bn_act", "torch"): 1}
    assert torch.allclose(out, F.conv2d(x, w, padding=1).relu(), atol=1e-6)


@pytest.fixture
def counted_resolve(monkeypatch):
    """The number of backend resolutions (``backends.resolve`` calls) made, as a one-item list."""
    count = [0]
    resolve = backends.resolve

    def counted(op, device):
        count[0] += 1
        return resolve(op, device)

    monkeypatch.setattr(backends, "resolve", counted)
    return count


def test_a_model_forward_resolves_each_op_once(fake_backend, counted_resolve):
    """Issue 10: in plain inference a model's forward resolves each op's kernel at its first call, not at
    every convolution, and the calls keep the registry's semantics (kernel failures and ops the backend
    lacks answered by the reference, strict mode raising)."""
    model = resnet_fast.resnet18(num_classes=4).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), resnet_fast.backend("fake"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with backends.record_dispatch() as calls:
            model(x)
        assert counted_resolve == [2]  # conv_bn_act and stem
        # The fake kernel fails for relu=False (the three shortcut convolutions) and lacks stem.
        assert calls == {("conv_bn_act", "fake"): 16, ("conv_bn_act", "torch"): 3, ("stem", "torch"): 1}
        counted_resolve[0] = 0
        model.layer1(torch.randn(1, 64, 8, 8))  # a block called on its own resolves at every call
        assert counted_resolve == [4]
    with torch.no_grad(), resnet_fast.backend("fake", strict=True), pytest.raises(backends.BackendUnavailable):
        model(x)


def test_a_module_that_enables_autograd_inside_a_forward_gets_the_differentiable_op():
    """The kernels are resolved once per forward, but whether a call is plain inference is checked at
    every call: a submodule running under enable_grad inside a no_grad forward must record the op's own
    backward."""

    class WithGrad(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            with torch.enable_grad():
                out = self.inner(x)
            seen.append(out.grad_fn.name())
            return out

    seen = []
    model = resnet_fast.resnet18(num_classes=4).eval()
    model.layer4 = WithGrad(model.layer4)
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert len(seen) == 1 and "resnet_fast_conv_bn_act" in seen[0]  # the op's backward, not aten's


class _PassThrough(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _backward_nodes(out: torch.Tensor) -> set:
    """The names of every node of out's autograd graph."""
    names, stack, seen = set(), [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(node.name())
        stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("train", [True, False])
def test_eager_autograd_records_the_ops_backward_without_their_dispatch(train):
    """With autograd on, plain eager mode records each fused op as a ``torch.autograd.Function`` around its
    kernel (the op's dispatch costs several times a small BatchNorm's arithmetic) whose backward is the
    op's own: under a TorchFunctionMode, which makes every call dispatch the op, the graph holds the ops'
    nodes instead, and the output, every gradient and every running statistic are bitwise the same."""
    fused = ["resnet_fast_batch_norm_act"] if train else ["resnet_fast_conv_bn_act", "resnet_fast_stem"]
    model = resnet_fast.resnet18(num_classes=4).double().train(train)
    dispatched = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out = model(x)
    with _PassThrough():
        out_dispatched = dispatched(x)
    nodes, dispatched_nodes = _backward_nodes(out), _backward_nodes(out_dispatched)
    assert all(f"{name}Backward" in nodes for name in fused), nodes
    assert not any(node.startswith("GeneratedBackwardFor_resnet_fast") for node in nodes), nodes
    assert all(f"GeneratedBackwardFor_{name}_defaultBackward" in dispatched_nodes for name in fused), dispatched_nodes
    target = torch.randn_like(out)
    for result in (out, out_dispatched):
        ((result - target) ** 2).sum().backward()
    assert torch.equal(out, out_dispatched)
    for (name, a), (_, b) in zip(model.named_parameters(), dispatched.named_parameters()):
        assert torch.equal(a.grad, b.grad), name
    for (name, a), (_, b) in zip(model.named_buffers(), dispatched.named_buffers()):
        assert torch.equal(a, b), name


def test_unavailable_reason(fake_backend):
    assert backends.unavailable_reason("torch", torch.device("cpu")) is None
    assert backends.unavailable_reason("fake", torch.device("cpu")) is None
    assert "does not run on meta tensors" in backends.unavailable_reason("fake", torch.device("meta"))
    assert "no such library" in backends.unavailable_reason("broken", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown backend"):
        backends.unavailable_reason("nope", torch.device("cpu"))


_WITHOUT_TRITON = r"""
import sys, warnings
sys.modules["triton"] = None  # as if Triton were not installed: `import triton` raises ImportError
import torch, resnet_fast
assert "triton" in resnet_fast.backends.registered_backends()
assert "triton" not in resnet_fast.available_backends()
x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with resnet_fast.backend("triton"):
        out = [resnet_fast.ops.conv_bias_act(x, w, padding=1) for _ in range(3)]
said = [str(c.message) for c in caught if "triton" in str(c.message)]
assert len(said) == 1 and "triton is not installed" in said[0], said
assert torch.allclose(out[0], torch.nn.functional.conv2d(x, w, padding=1).relu(), atol=1e-6)
print("ok")
"""


def test_works_without_triton_and_says_so_once():
    done = subprocess.run([sys.executable, "-c", _WITHOUT_TRITON], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
