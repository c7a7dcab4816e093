"""Kernel benchmarks at ResNet-50's real shapes: batch 256, 224x224 images, bf16, channels_last.

* ``test_conv``: every distinct (conv shape, epilogue) of ResNet-50 -- ``resnet_fast.ops.conv_bn_act``
  (the eval-mode BatchNorm applied in the epilogue from its live tensors) on the "triton" (and "cuda",
  where it implements the op) backend, strict, so the kernel really runs -- against cuDNN's conv alone
  (``F.conv2d``), cuDNN's own fused conv + bias (+ residual) + ReLU over BN-folded weights
  (``torch.cudnn_convolution_relu`` / ``torch.cudnn_convolution_add_relu``; the downsample, which has no
  ReLU, ``F.conv2d`` with the folded bias), and what eager torchvision runs in eval mode: cuDNN conv,
  then separate BatchNorm, residual add and ReLU kernels. ``rf-triton`` is the Triton backend's default
  kernel per layer class; ``rf-triton-gather`` and ``rf-triton-tma`` force a family
  (``RESNET_FAST_CONV_KERNEL``: gather, or the TMA family of the layer's class) and skip the shapes it
  does not serve (the 3-channel stem under TMA). Epilogues: ``relu`` (conv1/conv2 of a block, the stem),
  ``none`` (the downsample shortcut: BN only), ``add_relu`` (conv3 + BN + residual + ReLU).
* ``test_add_relu``: ``ops.add_relu`` against ``torch.relu(x + y)`` at the four block-output shapes,
  forward and backward.
* ``test_batch_norm_act``: the training BatchNorm ops (batch statistics, running-stat update,
  optional residual, ReLU; bf16 activations, float32 parameters as under autocast) against
  ``F.batch_norm(training=True)`` + add + ReLU, forward and backward, at every BN site of ResNet-50.

Throughput in extra_info: ``tflops`` (convs) and ``gb_per_s`` = *ideal* bytes (each tensor the op must
read or write, counted once) over the median time -- an effective bandwidth, never more than what the
kernel really moved. Backward timings replay ``torch.autograd.grad(..., retain_graph=True)`` over
forward graphs built outside the timed region. Each rf result is checked against float64
(relative error at most 2x eager bf16's own).
"""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from benchmarks import bench_utils as bu

pytestmark = pytest.mark.gpu

BATCH = 256
DEVICE = "cuda"
DTYPE = torch.bfloat16
CL = torch.channels_last
PARITY_ROWS = 8

HEADLINE_CONVS = {
    "7x7s2-3to64-224px-relu", "3x3s1-64to64-56px-relu", "1x1s1-256to64-56px-relu", "1x1s1-64to256-56px-add_relu",
    "3x3s1-256to256-14px-relu",
}


def _cl(shape, dtype=DTYPE):
    return torch.randn(*shape, device=DEVICE, dtype=dtype).contiguous(memory_format=CL)


def _rf_ctx(backend: str):
    """resnet_fast strict backend context, or a skip with the reason it cannot run here."""
    import resnet_fast

    reason = bu.backend_usable(backend, torch.device(DEVICE))
    if reason is not None:
        pytest.skip(f"resnet_fast backend {backend!r} unavailable here: {reason}")
    return resnet_fast.backend(backend, strict=True)


def _run_or_skip(fn):
    """Runs fn once; a backend that does not implement or support this call is a skip, not a failure."""
    from resnet_fast.backends import BackendUnavailable

    try:
        return fn()
    except BackendUnavailable as e:  # includes Unsupported
        pytest.skip(f"not served by this backend (strict mode): {e}")


def _tag(benchmark, **kw):
    benchmark.extra_info.update(kind="kernel", dtype="bf16", batch=BATCH, **kw)


# ----------------------------------------------------------------------------------------------- conv


def _conv_params():
    params = []
    for s in bu.resnet50_conv_shapes():
        key = s.layer()
        mark = pytest.mark.headline if key in HEADLINE_CONVS else pytest.mark.sweep
        for impl in ("rf-triton", "rf-triton-gather", "rf-triton-tma", "rf-cuda", "cudnn-conv", "cudnn-fused",
                     "cudnn-conv+bn+act"):
            params.append(pytest.param(s, impl, id=f"{s.id()}-{impl}", marks=[mark]))
    return params


def _force_family(family: str, s: bu.ConvShape, x, w, residual, monkeypatch) -> None:
    """Forces a Triton conv kernel family for this benchmark; a skip where it would not serve the shape
    (the dispatcher would run gather instead, which is not what the row claims to measure)."""
    from resnet_fast.kernels import conv

    monkeypatch.setenv(conv.FORCE_VARIABLE, family)
    served = conv.kernel_for(x, w, (s.stride,) * 2, (s.pad,) * 2, (1, 1), 1, residual)
    if family != "gather" and served == "gather":
        pytest.skip(f"the {family} family does not serve this shape (it would run on gather)")


@pytest.mark.parametrize("shape,impl", _conv_params())
def test_conv(shape: bu.ConvShape, impl: str, measure, benchmark, monkeypatch):
    s = shape
    ho = s.h_out
    benchmark.group = f"conv {s.id()}"
    _tag(benchmark, op="conv", shape=s.id(), impl=impl, c_in=s.c_in, c_out=s.c_out, k=s.k, stride=s.stride,
         h=s.h, epilogue=s.epilogue)
    residual = s.epilogue == "add_relu"
    relu = s.epilogue != "none"
    x_bytes = BATCH * s.c_in * s.h * s.h * 2
    out_bytes = BATCH * s.c_out * ho * ho * 2
    w = _cl((s.c_out, s.c_in, s.k, s.k)) * (2.0 / (s.c_in * s.k * s.k)) ** 0.5
    # An eval-mode BatchNorm's live tensors, float32 as under autocast: the fused kernel applies them in
    # its epilogue; eager torchvision runs them as a separate batch_norm pass.
    gamma = 1 + 0.1 * torch.randn(s.c_out, device=DEVICE)
    beta = 0.1 * torch.randn(s.c_out, device=DEVICE)
    mean = 0.1 * torch.randn(s.c_out, device=DEVICE)
    var = 1 + 0.1 * torch.rand(s.c_out, device=DEVICE)
    per_set = x_bytes + (out_bytes if residual else 0)
    sets = [(_cl((BATCH, s.c_in, s.h, s.h)), _cl((BATCH, s.c_out, ho, ho)) if residual else None)
            for _ in range(bu.n_buffers(per_set))]
    rot = bu.Rotation(sets)
    flops = s.flops(BATCH)
    fused_bytes = x_bytes + w.numel() * 2 + out_bytes * (2 if residual else 1) + s.c_out * 16

    if impl.startswith("rf-"):
        from resnet_fast import ops

        backend, _, family = impl[3:].partition("-")
        if family:
            _force_family(family, s, sets[0][0], w, sets[0][1], monkeypatch)
        with _rf_ctx(backend):
            def step():
                x, r = rot.next()
                return ops.conv_bn_act(x, w, None, gamma, beta, mean, var, stride=s.stride, padding=s.pad,
                                       residual=r, relu=relu)

            _run_or_skip(lambda: measure(step, device=DEVICE, work=bu.Work(flops=flops, bytes=fused_bytes)))
            rot.i = 0
            out = step().detach()
        # parity on the first images of the first input set
        x, r = sets[0]
        xk, rk = x[:PARITY_ROWS], (r[:PARITY_ROWS] if r is not None else None)

        def ref(xx, ww, rr, cast):
            o = F.conv2d(xx, ww, None, s.stride, s.pad)
            o = F.batch_norm(o, *(cast(t) for t in (mean, var, gamma, beta)), False, 0.0, 1e-5)
            o = o + rr if rr is not None else o
            return torch.relu(o) if relu else o

        ref64 = ref(xk.double(), w.double(), rk.double() if rk is not None else None, torch.Tensor.double)
        same = ref(xk, w, rk, lambda t: t)
        bu.check_parity(benchmark.extra_info, "out", out[:PARITY_ROWS], same, ref64, DTYPE)
    elif impl == "cudnn-conv":
        def step():
            return F.conv2d(rot.next()[0], w, None, s.stride, s.pad)

        measure(step, device=DEVICE, work=bu.Work(flops=flops, bytes=x_bytes + w.numel() * 2 + out_bytes))
    elif impl == "cudnn-fused":
        # cuDNN's fused conv + bias (+ residual) + ReLU takes a bias, not a BatchNorm: fold it (untimed).
        scale = gamma * torch.rsqrt(var + 1e-5)
        w_folded = (w * scale.view(-1, 1, 1, 1).to(DTYPE)).contiguous(memory_format=CL)
        b_folded = (beta - mean * scale).to(DTYPE)
        geometry = ((s.stride,) * 2, (s.pad,) * 2, (1, 1), 1)

        def step():
            x, r = rot.next()
            if r is not None:
                return torch.cudnn_convolution_add_relu(x, w_folded, r, 1.0, b_folded, *geometry)
            if relu:
                return torch.cudnn_convolution_relu(x, w_folded, b_folded, *geometry)
            return F.conv2d(x, w_folded, b_folded, s.stride, s.pad)

        measure(step, device=DEVICE, work=bu.Work(flops=flops, bytes=fused_bytes))
    else:  # what eager torchvision runs in eval mode
        def step():
            x, r = rot.next()
            o = F.batch_norm(F.conv2d(x, w, None, s.stride, s.pad), mean, var, gamma, beta, False, 0.0, 1e-5)
            if r is not None:
                o = o + r
            return torch.relu(o) if relu else o

        measure(step, device=DEVICE, work=bu.Work(flops=flops, bytes=fused_bytes))


# ----------------------------------------------------------------------------------------------- add_relu

ADD_RELU_SHAPES = [(BATCH, 256, 56, 56), (BATCH, 512, 28, 28), (BATCH, 1024, 14, 14), (BATCH, 2048, 7, 7)]


def _shape_id(shape) -> str:
    return f"{shape[1]}ch{shape[2]}px"


@dataclass
class _Graphs:
    """Forward results (with autograd graphs) built outside the timed region, for timing backward."""

    outs: list
    inputs: list
    grads: list


def _backward_step(g: _Graphs):
    rot = bu.Rotation(list(range(len(g.outs))))

    def step():
        i = rot.next()
        return torch.autograd.grad(g.outs[i], g.inputs[i], g.grads[i], retain_graph=True)

    return step


def _time_op(op, sets: list, grad_inputs, direction: str, measure, work: bu.Work) -> _Graphs | None:
    """Times ``op`` over the rotating input ``sets``: the forward under no_grad, or the backward of one
    forward per set built outside the timed region (returned, for the parity check of its gradients)."""
    if direction == "fwd":
        rot = bu.Rotation(sets)

        def step():
            with torch.no_grad():
                return op(*rot.next())

        _run_or_skip(lambda: measure(step, device=DEVICE, work=work))
        return None
    outs = [_run_or_skip(lambda: op(*args)) for args in sets]
    g = _Graphs(outs, [grad_inputs(args) for args in sets], [torch.randn_like(o) for o in outs])
    measure(_backward_step(g), device=DEVICE, work=work)
    return g


def _add_relu_params():
    params = []
    for shape in ADD_RELU_SHAPES:
        mark = pytest.mark.headline if shape[1] == 256 else pytest.mark.sweep
        for direction in ("fwd", "bwd"):
            for impl in ("rf-cuda", "rf-triton", "eager"):
                params.append(pytest.param(shape, direction, impl, id=f"{_shape_id(shape)}-{direction}-{impl}",
                                           marks=[mark]))
    return params


@pytest.mark.parametrize("shape,direction,impl", _add_relu_params())
def test_add_relu(shape, direction, impl, measure, benchmark):
    numel = 1
    for d in shape:
        numel *= d
    benchmark.group = f"add_relu {_shape_id(shape)} {direction}"
    _tag(benchmark, op="add_relu", shape=_shape_id(shape), direction=direction, impl=impl)
    n_sets = bu.n_buffers(numel * 2 * (2 if direction == "fwd" else 5))
    need_grad = direction == "bwd"
    sets = [(_cl(shape).requires_grad_(need_grad), _cl(shape).requires_grad_(need_grad)) for _ in range(n_sets)]

    if impl == "eager":
        def op(x, y):
            return torch.relu(x + y)
        ctx = None
    else:
        from resnet_fast import ops

        op = ops.add_relu
        ctx = _rf_ctx(impl[3:])

    def run():
        # forward: read x and y, write out; backward: read grad and out, write grad
        return _time_op(op, sets, tuple, direction, measure, bu.Work(bytes=3 * numel * 2))

    if ctx is None:
        run()
        return
    with ctx:
        res = run()
    # parity, fresh small slices of the first set, float64 reference
    x, y = sets[0]
    xk, yk = x[:PARITY_ROWS].detach(), y[:PARITY_ROWS].detach()
    if direction == "fwd":
        with _rf_ctx(impl[3:]), torch.no_grad():
            out = op(xk, yk)
        bu.check_parity(benchmark.extra_info, "out", out, torch.relu(xk + yk), torch.relu(xk.double() + yk.double()),
                        DTYPE)
    else:
        gx = res.grads[0]
        got = torch.autograd.grad(res.outs[0], res.inputs[0], gx, retain_graph=True)[0]
        x64, y64 = x.detach().double(), y.detach().double()
        ref = gx.double() * ((x64 + y64) > 0)
        same = gx * ((x.detach() + y.detach()) > 0)
        bu.check_parity(benchmark.extra_info, "grad", got, same, ref, DTYPE)


# ----------------------------------------------------------------------------------------------- batch_norm_act


def _bn_sites():
    """Distinct (channels, size, residual?) of ResNet-50's BatchNorm sites that end in a ReLU."""
    seen = []
    for s in bu.resnet50_conv_shapes():
        if s.epilogue == "none":
            continue
        key = (s.c_out, s.h_out, s.epilogue == "add_relu")
        if key not in seen:
            seen.append(key)
    return seen


def _bn_params():
    params = []
    for c, h, res in _bn_sites():
        sid = f"{c}ch{h}px-{'bn_add_relu' if res else 'bn_relu'}"
        mark = pytest.mark.headline if (c, h) in ((256, 56), (64, 56)) else pytest.mark.sweep
        for direction in ("fwd", "bwd"):
            for impl in ("rf-cuda", "rf-triton", "eager"):
                params.append(pytest.param((c, h, res), direction, impl, id=f"{sid}-{direction}-{impl}", marks=[mark]))
    return params


@pytest.mark.parametrize("site,direction,impl", _bn_params())
def test_batch_norm_act(site, direction, impl, measure, benchmark):
    c, h, residual = site
    shape = (BATCH, c, h, h)
    numel = BATCH * c * h * h
    sid = f"{c}ch{h}px-{'bn_add_relu' if residual else 'bn_relu'}"
    benchmark.group = f"batch_norm_act {sid} {direction}"
    _tag(benchmark, op="batch_norm_act", shape=sid, direction=direction, impl=impl, training=True)
    need_grad = direction == "bwd"
    n_sets = bu.n_buffers(numel * 2 * ((2 if residual else 1) + (4 if need_grad else 1)))
    weight = (1 + 0.1 * torch.randn(c, device=DEVICE)).requires_grad_(need_grad)
    bias = (0.1 * torch.randn(c, device=DEVICE)).requires_grad_(need_grad)
    rmean, rvar = torch.zeros(c, device=DEVICE), torch.ones(c, device=DEVICE)
    sets = [(_cl(shape).requires_grad_(need_grad),
             _cl(shape).requires_grad_(need_grad) if residual else None) for _ in range(n_sets)]

    if impl == "eager":
        def op(x, r):
            o = F.batch_norm(x, rmean, rvar, weight, bias, True, 0.1, 1e-5)
            return torch.relu(o + r if r is not None else o)
        ctx = None
    else:
        from resnet_fast import ops

        def op(x, r):
            return ops.batch_norm_act(x, weight, bias, rmean, rvar, training=True, momentum=0.1, eps=1e-5,
                                      residual=r, relu=True)
        ctx = _rf_ctx(impl[3:])

    io = numel * 2
    if direction == "fwd":
        work = bu.Work(bytes=io * (3 if residual else 2))  # read x (+ residual), write out
    else:  # read grad, x and out; write grad_x (+ grad_residual)
        work = bu.Work(bytes=io * (5 if residual else 4))

    def run():
        def grad_inputs(args):
            x, r = args
            return tuple(t for t in (x, weight, bias, r) if t is not None)

        return _time_op(op, sets, grad_inputs, direction, measure, work)

    if ctx is None:
        run()
        return
    with ctx:
        res = run()

    # parity on the first set against float64 (BN statistics span the whole batch: full tensors)
    x, r = sets[0]

    def ref_fn(xx, rr, w, b):
        o = F.batch_norm(xx, None, None, w, b, True, 0.1, 1e-5)
        return torch.relu(o + rr if rr is not None else o)

    if direction == "fwd":
        with _rf_ctx(impl[3:]), torch.no_grad():
            out = op(x.detach(), r.detach() if r is not None else None)
        with torch.no_grad():
            ref = ref_fn(x.double(), r.double() if r is not None else None, weight.double(), bias.double())
            same = ref_fn(x, r, weight, bias)
        bu.check_parity(benchmark.extra_info, "out", out, same, ref, DTYPE)
    else:
        gout = res.grads[0]
        got = torch.autograd.grad(res.outs[0], res.inputs[0][0], gout, retain_graph=True)[0]

        def grad_x(xx, rr, w, b, gg):
            xx = xx.detach().requires_grad_(True)
            o = ref_fn(xx, rr.detach() if rr is not None else None, w.detach(), b.detach())
            return torch.autograd.grad(o, xx, gg)[0]

        ref = grad_x(x.double(), r.double() if r is not None else None, weight.double(), bias.double(), gout.double())
        same = grad_x(x, r, weight, bias, gout)
        bu.check_parity(benchmark.extra_info, "grad_x", got, same, ref, DTYPE)


# ----------------------------------------------------------------------------------------------- stem

STEM_SHAPE = "7x7s2-3to64-224px+maxpool3x3s2"
# What each stem row times, at batch 256 from 224x224 images.
STEM_IMPLS = {
    "rf-triton-fused": "ops.stem, fused kernel (RESNET_FAST_STEM_KERNEL=fused), on the caller's float32 NCHW batch",
    "rf-triton": "ops.stem, the triton backend's default (x cast, gather conv, torch max-pool), same batch",
    "eager": "eager torchvision from the same batch: cast to bf16 channels_last, cuDNN conv, BN, ReLU, max-pool",
    "cudnn-conv-bf16": "cuDNN's 7x7/2 conv alone, bf16 channels_last input",
    "cudnn-conv-fp16": "cuDNN's 7x7/2 conv alone, fp16 channels_last input (its special first-layer kernel)",
    "eager-maxpool": "F.max_pool2d(3, 2, 1) alone on the bf16 64x112x112 conv output",
}


@pytest.mark.headline
@pytest.mark.parametrize("impl", list(STEM_IMPLS))
def test_stem(impl: str, measure, benchmark, monkeypatch):
    """The ImageNet stem (conv1 + bn1 + relu + maxpool) against its parts as cuDNN and eager PyTorch run
    them. GB/s counts the ideal bytes of each row's own inputs and outputs; TFLOP/s the conv's useful math
    (7x7x3 taps, not the kernel's padded 8x8)."""
    from resnet_fast.ops import reference

    benchmark.group = f"stem {STEM_SHAPE}"
    _tag(benchmark, op="stem", shape=STEM_SHAPE, impl=impl, what=STEM_IMPLS[impl])
    dtype = torch.float16 if impl == "cudnn-conv-fp16" else DTYPE
    benchmark.extra_info["dtype"] = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    image, conv_out, pooled = (BATCH, 3, 224, 224), (BATCH, 64, 112, 112), (BATCH, 64, 56, 56)
    numel = {name: BATCH * c * h * w for name, (_, c, h, w) in
             (("image", image), ("conv", conv_out), ("pooled", pooled))}
    flops = 2.0 * numel["conv"] * 3 * 49
    w = _cl((64, 3, 7, 7), dtype) * (2.0 / 147) ** 0.5
    gamma, beta = 1 + 0.1 * torch.randn(64, device=DEVICE), 0.1 * torch.randn(64, device=DEVICE)
    mean, var = 0.1 * torch.randn(64, device=DEVICE), 1 + 0.1 * torch.rand(64, device=DEVICE)
    norm = (gamma, beta, mean, var)

    if impl == "eager-maxpool":
        rot = bu.Rotation([(_cl(conv_out),) for _ in range(bu.n_buffers(numel["conv"] * 2))])
        measure(lambda: F.max_pool2d(rot.next()[0], 3, 2, 1), device=DEVICE,
                work=bu.Work(bytes=(numel["conv"] + numel["pooled"]) * 2))
        return
    if impl.startswith("cudnn-conv"):
        rot = bu.Rotation([(_cl(image, dtype),) for _ in range(bu.n_buffers(numel["image"] * 2))])
        measure(lambda: F.conv2d(rot.next()[0], w, None, 2, 3), device=DEVICE,
                work=bu.Work(flops=flops, bytes=(numel["image"] + numel["conv"]) * 2))
        return
    # The caller's batch: float32 NCHW, as a data loader hands it over.
    batches = [torch.randn(*image, device=DEVICE) for _ in range(bu.n_buffers(numel["image"] * 4))]
    rot = bu.Rotation(batches)
    work = bu.Work(flops=flops, bytes=numel["image"] * 4 + numel["pooled"] * 2)
    if impl == "eager":
        def step():
            x = rot.next().to(DTYPE, memory_format=CL)
            return F.max_pool2d(torch.relu(F.batch_norm(F.conv2d(x, w, None, 2, 3), mean, var, gamma, beta, False,
                                                        0.0, 1e-5)), 3, 2, 1)

        measure(step, device=DEVICE, work=work)
        return
    from resnet_fast import ops

    monkeypatch.setenv("RESNET_FAST_STEM_KERNEL", "fused" if impl == "rf-triton-fused" else "conv_then_pool")
    with _rf_ctx("triton"):
        _run_or_skip(lambda: measure(lambda: ops.stem(rot.next(), w, None, *norm), device=DEVICE, work=work))
        out = ops.stem(batches[0][:PARITY_ROWS], w, None, *norm)
    x = batches[0][:PARITY_ROWS]
    ref64 = reference.stem(x.to(DTYPE).double(), w.double(), None, *(t.double() for t in norm), 1e-5)
    bu.check_parity(benchmark.extra_info, "out", out, reference.stem(x, w, None, *norm, 1e-5), ref64, DTYPE)
