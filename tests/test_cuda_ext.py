"""The C++/CUDA extension (csrc/) and the "cuda" backend.

Without a GPU (CI): the extension was built (when nvcc is there) and imports, every op is registered
with the declared schemas, fake implementations give the right shapes/dtypes/strides, the backend
explains why it cannot serve, and -- with a CPU mirror of the kernels' algorithm registered as the
ops' CPU implementation -- the Python side (autograd.Function, register_autograd, fakes,
torch.compile tracing of the mutating op) and the kernels' math (two-level Welford merge, backward
coefficients, running-stat update) are checked against the reference.

With a GPU: parity of every op against the reference (fp32/fp16/bf16, odd sizes, tails,
non-contiguous and misaligned inputs), backward against autograd of the reference, running statistics
after several steps, torch.compile(fullgraph=True), opcheck of the real kernels, and a resnet50 AMP
training step against torchvision.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.nn.functional as F

import resnet_fast
from resnet_fast import backends
from resnet_fast.backends import BackendUnavailable
from resnet_fast.backends import cuda_backend as cb
from resnet_fast.ops import reference

from conftest import lowp_tolerance, rel_err, requires_cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _nvcc_available() -> bool:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    return os.path.exists(os.path.join(home, "bin", "nvcc")) or shutil.which("nvcc") is not None


def _extension_expected() -> bool:
    """setup.py builds resnet_fast._C under exactly these conditions."""
    return (
        torch.version.cuda is not None
        and _nvcc_available()
        and os.environ.get("RESNET_FAST_NO_CUDA_EXT", "0") in ("", "0")
    )


def _library_or_skip() -> str:
    try:
        return cb.load_library()
    except BackendUnavailable as e:
        if _extension_expected() or torch.cuda.is_available():
            raise
        pytest.skip(f"resnet_fast CUDA library unavailable here: {e}")


# ================================================================================================
# Build, import, registration (CPU).
def test_extension_built_and_imports():
    if not _extension_expected():
        pytest.skip("no CUDA torch or no nvcc, or RESNET_FAST_NO_CUDA_EXT set: the package is pure Python")
    import resnet_fast._C  # noqa: F401  (fails if `pip install -e .` did not build it)

    assert cb.load_library() in ("prebuilt resnet_fast._C", "already loaded")


def test_every_op_registered_with_schema():
    _library_or_skip()
    for name in cb.OPS:
        op = getattr(torch.ops.resnet_fast, name).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"resnet_fast::{name}", "CUDA"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"resnet_fast::{name}", "Meta"), name
        assert op._schema.is_mutable == (name == "bn_act_forward"), name
    schema = torch.ops.resnet_fast.bn_act_forward.default._schema
    written = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    assert written == ["running_mean", "running_var"]


def test_backend_registered_and_never_auto_selected_off_gpu():
    assert "cuda" in backends.registered_backends()
    b = backends._REGISTRY["cuda"]
    assert b.priority == 10
    assert b.differentiable == frozenset({"add_relu", "batch_norm_act"})
    assert not b.supports_device(torch.device("cpu")) and b.supports_device(torch.device("cuda", 0))
    name, _ = backends.resolve("batch_norm_act", torch.device("cpu"), needs_grad=True)
    assert name == "torch"


def test_backend_on_cpu_tensors_explains_itself():
    x = torch.randn(2, 3, 4, 4)
    with resnet_fast.backend("cuda", strict=True):
        with pytest.raises(BackendUnavailable, match="cuda"):
            resnet_fast.ops.add_relu(x, x)
    with resnet_fast.backend("cuda"):  # not strict: the reference answers, with a warning
        with pytest.warns(RuntimeWarning, match="cuda"):
            out = resnet_fast.ops.add_relu(x, -x + 1)
    torch.testing.assert_close(out, torch.ones_like(x))


def test_unavailable_reason_without_library(monkeypatch):
    def no_prebuilt():
        raise ImportError("No module named 'resnet_fast._C'")

    monkeypatch.setattr(cb, "_import_prebuilt", no_prebuilt)
    monkeypatch.setattr(cb, "_registered", lambda: False)
    monkeypatch.setattr(cb, "_how_loaded", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BackendUnavailable, match=r"resnet_fast\._C is not importable.*no GPU is visible"):
        cb.load_library()
    monkeypatch.setenv("RESNET_FAST_NO_JIT", "1")
    with pytest.raises(BackendUnavailable, match="RESNET_FAST_NO_JIT"):
        cb.load_library()
    backend = backends.Backend("cuda-test", 1, cb._load, lambda d: True)
    assert not backend.is_available()
    with pytest.raises(BackendUnavailable, match="not importable"):
        backend.ops()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_ops_have_no_cpu_kernel():
    _library_or_skip()
    if torch._C._dispatch_has_kernel_for_dispatch_key("resnet_fast::add_relu", "CPU"):
        pytest.skip("a CPU implementation is registered in this process (the mirror fixture)")
    with pytest.raises(NotImplementedError):
        torch.ops.resnet_fast.add_relu(torch.ones(3), torch.ones(3))


# ================================================================================================
# Fake (meta) implementations (CPU).
def _layouts(shape):
    n, c, h, w = shape
    base = torch.empty(shape, device="meta")
    return {
        "nchw": base,
        "channels_last": base.to(memory_format=torch.channels_last),
        "nchw_sliced": torch.empty(n, c, h, w + 3, device="meta")[..., 1 : w + 1],
        "cl_sliced": torch.empty(n, c, h, w + 3, device="meta").to(memory_format=torch.channels_last)[..., :w],
        "permuted": torch.empty(n, h, c, w, device="meta").transpose(1, 2),
    }


def _canonical_strides(shape, fmt):
    return torch.empty(shape, device="meta", memory_format=fmt).stride()


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "nchw_sliced", "cl_sliced", "permuted"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_shapes_dtypes_strides(layout, dtype):
    _library_or_skip()
    shape = (2, 6, 5, 7)
    x = _layouts(shape)[layout].to(dtype)
    expected_fmt = torch.channels_last if layout in ("channels_last", "cl_sliced") else torch.contiguous_format
    assert cb.pick_format(x) == expected_fmt
    expected_strides = x.stride() if x.is_contiguous(memory_format=expected_fmt) else _canonical_strides(shape, expected_fmt)
    w = torch.empty(6, device="meta")
    rm, rv = torch.empty(6, device="meta"), torch.empty(6, device="meta")
    out, mean, invstd = torch.ops.resnet_fast.bn_act_forward(x, w, w, rm, rv, True, 0.1, 1e-5, x, True)
    assert out.shape == x.shape and out.dtype == dtype and out.stride() == expected_strides
    assert mean.shape == invstd.shape == (6,) and mean.dtype == invstd.dtype == torch.float32
    gx, gw, gb, gr = torch.ops.resnet_fast.bn_act_backward(x, x, out, w, mean, invstd, True, True, True)
    assert gx.shape == gr.shape == x.shape and gx.dtype == gr.dtype == dtype
    assert gx.stride() == gr.stride() == expected_strides
    assert gw.shape == gb.shape == (6,) and gw.dtype == gb.dtype == torch.float32
    _, _, _, gr0 = torch.ops.resnet_fast.bn_act_backward(x, x, out, None, mean, invstd, False, False, False)
    assert gr0.numel() == 0
    m, v = torch.ops.resnet_fast.bn_stats(x)
    assert m.shape == v.shape == (6,) and m.dtype == v.dtype == torch.float32
    y = torch.ops.resnet_fast.add_relu(x, x)
    assert y.shape == x.shape and y.dtype == dtype
    if layout in ("nchw", "channels_last"):
        assert y.stride() == x.stride()
    else:
        assert y.stride() == _canonical_strides(shape, expected_fmt)


def test_fake_tensor_mode_and_add_relu_any_rank():
    _library_or_skip()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.randn(3, 8, 4, 4).to(memory_format=torch.channels_last)
        rm, rv = torch.zeros(8), torch.ones(8)
        out, mean, _ = torch.ops.resnet_fast.bn_act_forward(x, None, None, rm, rv, True, 0.1, 1e-5, None, False)
        assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)
        for shape in [(7,), (3, 5), (2, 3, 4, 5, 6)]:
            a = torch.randn(shape, dtype=torch.bfloat16)
            r = torch.ops.resnet_fast.add_relu(a, a)
            assert r.shape == a.shape and r.dtype == a.dtype and r.is_contiguous()
        a = torch.randn(6, 5).t()
        assert torch.ops.resnet_fast.add_relu(a, a.contiguous()).is_contiguous()


# ================================================================================================
# CPU mirror of the kernels' algorithm, registered as the ops' CPU implementation for these tests.
# It follows the kernels step by step (fp32 arithmetic, P row-slices reduced to per-channel partials
# merged with Chan's formula, the same backward coefficients), so the Python wiring and the math are
# checked on CPU; only the CUDA code itself needs the GPU tests below.
_P = 3  # partials per channel in the mirror (the kernels pick P from the SM count)


def _rows(t):
    """[N, C, H, W] -> [M, C] float32 (row m = n*HW + s), the kernels' view of either layout."""
    return t.float().permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def _mirror_stats(x):
    rows = _rows(x)
    c = rows.shape[1]
    mean, m2, n = torch.zeros(c), torch.zeros(c), torch.zeros(c)
    for p in range(_P):
        part = rows[p::_P]  # grid-stride over rows, as in stats_nhwc_kernel
        if part.shape[0] == 0:
            continue
        n_b = torch.full((c,), float(part.shape[0]))
        mean_b = part.mean(0)
        m2_b = ((part - mean_b) ** 2).sum(0)
        # welford_merge
        nn = n + n_b
        d = mean_b - mean
        r = n_b / nn
        mean = mean + d * r
        m2 = m2 + m2_b + d * d * n * r
        n = nn
    return mean, m2, n


def _out_like(x):
    return cb._empty_in_format(x)


def _bc(v):
    return v.view(1, -1, 1, 1)


def _mirror_bn_act_forward(x, weight, bias, running_mean, running_var, training, momentum, eps, residual, relu):
    if training:
        mean, m2, n = _mirror_stats(x)
        var = m2 / n
        invstd = 1.0 / torch.sqrt(var + eps)
        if running_mean is not None:
            running_mean.copy_(momentum * mean + (1 - momentum) * running_mean.float())
            running_var.copy_(momentum * (m2 / (n - 1)) + (1 - momentum) * running_var.float())
    else:
        mean = running_mean.float().clone()
        invstd = 1.0 / torch.sqrt(running_var.float() + eps)
    v = (x.float() - _bc(mean)) * _bc(invstd)
    if weight is not None:
        v = v * _bc(weight.float())
    if bias is not None:
        v = v + _bc(bias.float())
    if residual is not None:
        v = v + residual.float()
    if relu:
        v = torch.where(v < 0, torch.zeros_like(v), v)
    out = _out_like(x)
    out.copy_(v)
    return out, mean, invstd


def _mirror_bn_act_backward(grad_out, x, out, weight, save_mean, save_invstd, training, relu, residual_grad):
    pass_ = ~(out.float() <= 0) if relu else torch.ones_like(out, dtype=torch.bool)
    g = torch.where(pass_, grad_out.float(), torch.zeros((), dtype=torch.float32))
    xmu = x.float() - _bc(save_mean)
    sum_dy = g.sum((0, 2, 3))
    sum_dyx = (g * xmu).sum((0, 2, 3))
    m = x.shape[0] * x.shape[2] * x.shape[3]
    a = sum_dy / m if training else torch.zeros_like(sum_dy)
    b = sum_dyx / m * save_invstd * save_invstd if training else torch.zeros_like(sum_dy)
    c = save_invstd * (weight.float() if weight is not None else 1.0)
    gx = _out_like(x)
    gx.copy_((g - _bc(a) - xmu * _bc(b)) * _bc(c))
    gr = x.new_empty((0,))
    if residual_grad:
        gr = _out_like(x)
        gr.copy_(torch.where(pass_, grad_out, torch.zeros((), dtype=grad_out.dtype)))
    return gx, sum_dyx * save_invstd, sum_dy, gr


def _mirror_bn_stats(x):
    mean, m2, n = _mirror_stats(x)
    return mean, m2 / n


def _mirror_add_relu(x, y):
    out = cb._fake_add_relu(x, y)  # same layout rule as the kernel
    v = x.float() + y.float()
    out.copy_(torch.where(v < 0, torch.zeros_like(v), v))
    return out


@pytest.fixture(scope="module")
def cpu_mirror():
    _library_or_skip()
    if torch._C._dispatch_has_kernel_for_dispatch_key("resnet_fast::add_relu", "CPU"):
        yield  # already registered (e.g. by another module)
        return
    lib = torch.library.Library("resnet_fast", "IMPL")
    lib.impl("add_relu", _mirror_add_relu, "CPU")
    lib.impl("bn_stats", _mirror_bn_stats, "CPU")
    lib.impl("bn_act_forward", _mirror_bn_act_forward, "CPU")
    lib.impl("bn_act_backward", _mirror_bn_act_backward, "CPU")
    try:
        yield
    finally:
        lib._destroy()


def _bn_case(shape, dtype, layout, device="cpu", affine=True, shift=0.0):
    n, c, h, w = shape
    x = (torch.randn(shape, device=device) * 2 + shift).to(dtype)
    res = torch.randn(shape, device=device).to(dtype)
    if layout == "channels_last":
        x, res = x.to(memory_format=torch.channels_last), res.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.randn(n, c, h, w + 2, device=device).to(dtype)[..., 1:-1]
    weight = torch.randn(c, device=device) if affine else None
    bias = torch.randn(c, device=device) if affine else None
    rm, rv = torch.randn(c, device=device), torch.rand(c, device=device) + 0.5
    return x, weight, bias, rm, rv, res


def _f64(t):
    return None if t is None else t.detach().double()


def test_mirror_add_relu_and_stats(cpu_mirror):
    x, y = torch.randn(3, 5, 7, 2), torch.randn(3, 5, 7, 2)
    torch.testing.assert_close(cb.add_relu(x, y), torch.relu(x + y), rtol=0, atol=0)
    x = torch.randn(4, 6, 5, 3) * 3 + 1000.0  # large mean: a naive E[x^2]-E[x]^2 would lose it
    mean, var = torch.ops.resnet_fast.bn_stats(x)
    var_ref, mean_ref = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    assert rel_err(mean, mean_ref) < 1e-6 and rel_err(var, var_ref) < 1e-4


def _check_bn_against_reference(fn, x, w, b, rm, rv, res, training, relu, tol, grad_tol):
    """Runs fn (the backend's batch_norm_act) and the float64 reference; compares outputs, running
    statistics and gradients of every input that requires one."""
    leaves = [t for t in (x, w, b, res) if t is not None]
    for t in leaves:
        t.requires_grad_()
    ref_leaves = [_f64(t).requires_grad_() for t in leaves]
    it = iter(ref_leaves)
    x64, w64, b64, res64 = (next(it) if t is not None else None for t in (x, w, b, res))
    rm64, rv64 = rm.double(), rv.double()
    out = fn(x, w, b, rm, rv, training, 0.1, 1e-5, res, relu)
    ref = reference.batch_norm_act(x64, w64, b64, rm64, rv64, training, 0.1, 1e-5, res64, relu)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert rel_err(out, ref) <= tol(out, ref)
    assert rel_err(rm, rm64) < 1e-5 and rel_err(rv, rv64) < 1e-4
    grad = torch.randn_like(out)
    out.backward(grad)
    grads_ref = torch.autograd.grad(ref, ref_leaves, grad.double())
    for mine, theirs in zip(leaves, grads_ref):
        assert mine.grad is not None and mine.grad.dtype == mine.dtype and mine.grad.shape == mine.shape
        assert rel_err(mine.grad, theirs) <= grad_tol(mine.grad, theirs)
    return out


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("relu", [True, False])
def test_mirror_bn_act_forward_backward(cpu_mirror, layout, training, residual, relu):
    x, w, b, rm, rv, res = _bn_case((4, 6, 5, 3), torch.float32, layout)
    res = res if residual else None
    out = _check_bn_against_reference(
        cb.batch_norm_act, x, w, b, rm, rv, res, training, relu, lambda o, r: 1e-5, lambda o, r: 1e-5
    )
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    elif layout == "nchw":
        assert out.is_contiguous()


def test_mirror_no_affine_no_running_stats(cpu_mirror):
    x = torch.randn(3, 4, 2, 2)
    out = cb.batch_norm_act(x, None, None, None, None, True, 0.1, 1e-5, None, False)
    torch.testing.assert_close(out, F.batch_norm(x, None, None, training=True), rtol=1e-5, atol=1e-5)


def test_mirror_backend_declines_what_it_does_not_handle(cpu_mirror):
    with pytest.raises(backends.Unsupported):
        cb.batch_norm_act(torch.randn(1, 4, 1, 1), None, None, None, None, True, 0.1, 1e-5, None, True)
    with pytest.raises(backends.Unsupported):
        cb.add_relu(torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64))


def test_mirror_running_stats_after_several_steps(cpu_mirror):
    bn = torch.nn.BatchNorm2d(5)
    rm, rv = bn.running_mean.clone(), bn.running_var.clone()
    for _ in range(4):
        x = torch.randn(3, 5, 4, 4) * 3 + 2
        bn(x)
        cb.batch_norm_act(x, bn.weight.detach(), bn.bias.detach(), rm, rv, True, 0.1, 1e-5, None, False)
    torch.testing.assert_close(rm, bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv, bn.running_var, rtol=1e-5, atol=1e-6)


def test_mirror_opcheck(cpu_mirror):
    """torch.library.opcheck: schema (declared mutation), fake vs real, autograd registration."""
    x = torch.randn(2, 4, 3, 3).to(memory_format=torch.channels_last)
    w, b, rm, rv = torch.randn(4), torch.randn(4), torch.zeros(4), torch.ones(4)
    torch.library.opcheck(torch.ops.resnet_fast.add_relu.default, (x, torch.randn_like(x)))
    torch.library.opcheck(torch.ops.resnet_fast.bn_stats.default, (x,))
    torch.library.opcheck(
        torch.ops.resnet_fast.bn_act_forward.default, (x, w, b, rm, rv, True, 0.1, 1e-5, torch.randn_like(x), True)
    )
    out, mean, invstd = torch.ops.resnet_fast.bn_act_forward(x, w, b, rm, rv, True, 0.1, 1e-5, None, True)
    torch.library.opcheck(
        torch.ops.resnet_fast.bn_act_backward.default,
        (torch.randn_like(x), x, out, w, mean, invstd, True, True, True),
    )


def test_mirror_add_relu_autograd(cpu_mirror):
    x, y = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    out = torch.ops.resnet_fast.add_relu(x, y)
    g = torch.randn_like(out)
    out.backward(g)
    x2, y2 = x.detach().requires_grad_(), y.detach().requires_grad_()
    torch.relu(x2 + y2).backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(y.grad, y2.grad)


@pytest.mark.parametrize("with_grad", [False, True])
def test_mirror_torch_compile_fullgraph(cpu_mirror, with_grad):
    """Dynamo traces the ops (fakes), the autograd.Function and the in-place running-stat update."""
    torch._dynamo.reset()

    def step(x, w, b, rm, rv, res):
        y = cb.batch_norm_act(x, w, b, rm, rv, True, 0.1, 1e-5, res, True)
        return cb.add_relu(y, res)

    x, w, b, rm, rv, res = _bn_case((2, 4, 3, 3), torch.float32, "channels_last")
    if with_grad:
        for t in (x, w, b):
            t.requires_grad_()
    rm2, rv2 = rm.clone(), rv.clone()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(x, w, b, rm, rv, res)
    ref = step(x, w, b, rm2, rv2, res)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)
    if with_grad:
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, (x, w, b), g)
        grads_ref = torch.autograd.grad(ref, (x, w, b), g)
        for a, e in zip(grads, grads_ref):
            torch.testing.assert_close(a, e)
