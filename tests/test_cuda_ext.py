"""The C++/CUDA extension (csrc/) and the "cuda" backend.

Without a GPU (CI):
* the extension was built (when nvcc is there) and imports, every kernel op is registered as
  ``torch.ops.resnet_fast_cuda.*`` with the declared schemas, the backend explains why it cannot serve;
* the real kernel code runs on the CPU: csrc/emulation compiles add_relu.cu and batch_norm_act.cu with
  g++ against a small CUDA emulation (fibers for threads, real __syncthreads semantics), checked
  against float64 torch for every dtype, layout, tail and vector/scalar path;
* with a CPU mirror of the kernels' algorithm registered as the kernel ops' CPU implementation (and the
  backend allowed onto CPU tensors), the library ops run through the "cuda" backend in strict mode:
  forward, backward, running statistics, opcheck (fake strides against the backend's real ones) and
  torch.compile are checked against torch.

With a GPU: the same through the real kernels (fp32/fp16/bf16, odd sizes, tails, non-contiguous and
misaligned inputs), running statistics after several steps, torch.compile(fullgraph=True), opcheck, and
a resnet50 AMP training step against torchvision.
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
from resnet_fast.ops.layout import activation_format
from resnet_fast.testing import PRECISION_FLOOR

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


# The contract of csrc/ops.cpp's TORCH_LIBRARY block with cuda_backend's calls (positional) and the CPU
# mirror below: argument names, types and order, and that no op writes to its inputs.
SCHEMAS = {
    "add_relu": "resnet_fast_cuda::add_relu(Tensor x, Tensor y) -> Tensor",
    "bn_stats": "resnet_fast_cuda::bn_stats(Tensor x) -> (Tensor mean, Tensor var)",
    "bn_act": "resnet_fast_cuda::bn_act(Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor var, float eps, "
              "Tensor? residual, bool relu) -> Tensor",
    "bn_act_backward": "resnet_fast_cuda::bn_act_backward(Tensor grad_out, Tensor x, Tensor out, Tensor? weight, "
                       "Tensor save_mean, Tensor save_invstd, bool training, bool relu, bool residual_grad) -> "
                       "(Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor grad_residual)",
}


def test_every_op_registered_with_schema():
    _library_or_skip()
    assert sorted(cb.OPS) == sorted(SCHEMAS)
    for name in cb.OPS:
        schema = getattr(torch.ops.resnet_fast_cuda, name).default._schema
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"resnet_fast_cuda::{name}", "CUDA"), name
        assert str(schema) == SCHEMAS[name]
        assert not schema.is_mutable, name


def test_library_registers_nothing_else():
    """Removed ops stay removed: the namespace holds exactly the backend's OPS."""
    _library_or_skip()
    registered = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names()
                  if n.startswith("resnet_fast_cuda::")}
    assert registered == set(cb.OPS)


def test_backend_registered_and_opt_in():
    assert "cuda" in backends.registered_backends()
    b = backends._REGISTRY["cuda"]
    assert not b.auto_select(torch.device("cuda", 0)) and not b.auto_select(torch.device("cpu"))
    assert b.priority == 10
    assert not b.supports_device(torch.device("cpu")) and b.supports_device(torch.device("cuda", 0))
    assert backends.resolve("batch_norm_act", torch.device("cpu"))[0] == "torch"


def test_backend_on_cpu_tensors_explains_itself(monkeypatch):
    monkeypatch.setattr(backends, "_warned", set())  # the fallback warning is said once per process
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
    if torch._C._dispatch_has_kernel_for_dispatch_key("resnet_fast_cuda::add_relu", "CPU"):
        pytest.skip("a CPU implementation is registered in this process (the mirror fixture)")
    with pytest.raises(NotImplementedError):
        torch.ops.resnet_fast_cuda.add_relu(torch.ones(3), torch.ones(3))


class _Labelled(torch.Tensor):
    """A CUDA tensor's metadata (shape, dtype, device) without data: the kernel ops receive it as is (its
    ``__torch_dispatch__`` steps aside), so their argument checks run on a machine without a GPU too, and
    any data access or device call made before a check fails instead of passing unnoticed."""

    @staticmethod
    def __new__(cls, *size, dtype=torch.float32):
        return torch.Tensor._make_wrapper_subclass(cls, size, dtype=dtype, device="cuda:0")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        with torch._C._DisableTorchDispatch():
            return func(*args, **(kwargs or {}))


_CHANNEL_ARGS = ("weight", "bias", "mean", "var")


@pytest.mark.parametrize("argument", _CHANNEL_ARGS)
def test_bn_act_refuses_bad_arguments_before_touching_the_gpu(argument):
    """The compiled bn_act validates every argument before its CUDAGuard and before any tensor work:
    on the GPU (torch 2.11) a refused per-channel argument crashed the process instead of raising."""
    _library_or_skip()
    x = _Labelled(2, 4, 3, 3)
    for bad, message in [(_Labelled(5), r"must have shape \[4\], got \[5\]"), (_Labelled(2, 2), r"must have shape \[4\]"),
                         (torch.ones(4), "must be on x's device cuda:0, got cpu")]:
        args = {name: _Labelled(4) for name in _CHANNEL_ARGS} | {argument: bad}
        with pytest.raises(RuntimeError, match=f"bn_act: {argument} {message}"):
            torch.ops.resnet_fast_cuda.bn_act(x, args["weight"], args["bias"], args["mean"], args["var"], 1e-5, None,
                                              True)
    for residual, message in [(_Labelled(2, 4, 3, 2), "have x's shape"), (_Labelled(2, 4, 3, 3, dtype=torch.half),
                              "have x's dtype"), (torch.ones(2, 4, 3, 3), "be on x's device")]:
        with pytest.raises(RuntimeError, match=f"bn_act: residual must {message}"):
            torch.ops.resnet_fast_cuda.bn_act(x, None, None, _Labelled(4), _Labelled(4), 1e-5, residual, False)


def test_bn_backward_and_stats_refuse_bad_arguments_before_touching_the_gpu():
    _library_or_skip()
    x, c = _Labelled(2, 4, 3, 3), _Labelled(4)
    for args, message in [((x, x, x, None, torch.zeros(4), c), "save_mean must be on x's device"),
                          ((x, x, x, None, c, _Labelled(5)), r"save_invstd must have shape \[4\]"),
                          ((x, x, _Labelled(2, 4, 3, 2), None, c, c), "out must have x's shape"),
                          ((torch.ones(2, 4, 3, 3), x, x, None, c, c), "grad_out must be on x's device"),
                          ((x, x, x, _Labelled(3), c, c), r"weight must have shape \[4\]")]:
        with pytest.raises(RuntimeError, match=f"bn_act_backward: {message}"):
            torch.ops.resnet_fast_cuda.bn_act_backward(*args, True, True, True)
    with pytest.raises(RuntimeError, match="bn_stats: x has no elements per channel"):
        torch.ops.resnet_fast_cuda.bn_stats(_Labelled(0, 4, 3, 3))


# ================================================================================================
# Ground truth: torch's own batch norm in float64, differentiable, updating running statistics.
def torch_bn_act(x, w, b, rm, rv, training, momentum, eps, res, relu):
    out = F.batch_norm(x, rm, rv, w, b, training, momentum, eps)
    if res is not None:
        out = out + res
    return torch.relu(out) if relu else out


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


def _run_bn(backend_name, cast, x, w, b, rm, rv, res, g, training, relu):
    """The op on cast copies of the inputs: the public op on ``backend_name`` (strict), or float64 torch
    for ``None``. Returns (out, grads of the (x, w, b, res) present, running_mean, running_var)."""
    leaves = [None if t is None else cast(t).detach().requires_grad_() for t in (x, w, b, res)]
    rm_, rv_ = cast(rm).clone(), cast(rv).clone()
    if backend_name is None:
        out = torch_bn_act(leaves[0], leaves[1], leaves[2], rm_, rv_, training, 0.1, 1e-5, leaves[3], relu)
    else:
        with resnet_fast.backend(backend_name, strict=True), backends.record_dispatch() as calls:
            out = resnet_fast.ops.batch_norm_act(leaves[0], leaves[1], leaves[2], rm_, rv_, training=training,
                                                 momentum=0.1, eps=1e-5, residual=leaves[3], relu=relu)
            grads = torch.autograd.grad(out, [t for t in leaves if t is not None], cast(g))
        expected = {("batch_norm_act", backend_name): 1, ("batch_norm_act_backward", backend_name): 1}
        if training:
            expected[("batch_stats", backend_name)] = 1
        assert calls == expected
        return out, grads, rm_, rv_
    return out, torch.autograd.grad(out, [t for t in leaves if t is not None], cast(g)), rm_, rv_


# ================================================================================================
# CPU mirror of the kernels' algorithm, registered as the kernel ops' CPU implementation for these tests.
# It follows the kernels step by step (fp32 arithmetic, P row-slices reduced to per-channel partials
# merged with Chan's formula, the same backward coefficients), so the backend's wiring, the library
# ops around it and the math are checked on CPU; only the CUDA code itself needs the GPU tests below.
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
    """``at::empty_like(in_format(x, pick_format(x)))`` of ops.cpp."""
    return torch.empty(x.shape, dtype=x.dtype, memory_format=activation_format(x))


def _bc(v):
    return v.view(1, -1, 1, 1)


def _mirror_bn_act(x, weight, bias, mean, var, eps, residual, relu):
    invstd = 1.0 / torch.sqrt(var.float() + eps)
    v = (x.float() - _bc(mean.float())) * _bc(invstd)
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
    return out


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
    # The kernel op's layout rule (ops.cpp): empty_like(x), whatever the inputs' strides.
    v = x.float() + y.float()
    return torch.empty_like(x).copy_(torch.where(v < 0, torch.zeros_like(v), v))


@pytest.fixture(scope="module")
def cpu_mirror():
    _library_or_skip()
    lib = None
    if not torch._C._dispatch_has_kernel_for_dispatch_key("resnet_fast_cuda::add_relu", "CPU"):
        lib = torch.library.Library("resnet_fast_cuda", "IMPL")
        lib.impl("add_relu", _mirror_add_relu, "CPU")
        lib.impl("bn_stats", _mirror_bn_stats, "CPU")
        lib.impl("bn_act", _mirror_bn_act, "CPU")
        lib.impl("bn_act_backward", _mirror_bn_act_backward, "CPU")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backends._REGISTRY["cuda"], "supports_device", lambda device: True)
        yield
    if lib is not None:
        lib._destroy()


def test_mirror_add_relu_and_stats(cpu_mirror):
    x, y = torch.randn(3, 5, 7, 2), torch.randn(3, 5, 7, 2).to(memory_format=torch.channels_last)
    with resnet_fast.backend("cuda", strict=True):
        out = resnet_fast.ops.add_relu(x, y)
    torch.testing.assert_close(out, torch.relu(x + y), rtol=0, atol=0)
    assert out.stride() == x.stride()
    x = torch.randn(4, 6, 5, 3) * 3 + 1000.0  # large mean: a naive E[x^2]-E[x]^2 would lose it
    mean, var = torch.ops.resnet_fast_cuda.bn_stats(x)
    var_ref, mean_ref = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    assert rel_err(mean, mean_ref) < 1e-6 and rel_err(var, var_ref) < 1e-4


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("relu", [True, False])
def test_mirror_batch_norm_act_forward_backward(cpu_mirror, layout, training, residual, relu):
    """The library op on the cuda backend (mirror): output, running statistics and every gradient."""
    x, w, b, rm, rv, res = _bn_case((4, 6, 5, 3), torch.float32, layout)
    res = res if residual else None
    g = torch.randn(x.shape)
    mine = _run_bn("cuda", lambda t: t, x, w, b, rm, rv, res, g, training, relu)
    ref = _run_bn(None, torch.Tensor.double, x, w, b, rm, rv, res, g, training, relu)
    assert mine[0].dtype == x.dtype and rel_err(mine[0], ref[0]) <= 1e-5
    assert mine[0].is_contiguous(memory_format=activation_format(x))
    for a, r in zip(mine[1], ref[1]):
        assert rel_err(a, r) <= 1e-5
    assert rel_err(mine[2], ref[2]) < 1e-6 and rel_err(mine[3], ref[3]) < 1e-5


def test_mirror_no_affine_no_running_stats(cpu_mirror):
    x = torch.randn(3, 4, 2, 2)
    with resnet_fast.backend("cuda", strict=True):
        out = resnet_fast.ops.batch_norm_act(x, None, None, None, None, training=True, relu=False)
    torch.testing.assert_close(out, F.batch_norm(x, None, None, training=True), rtol=1e-5, atol=1e-5)


def test_mirror_backend_declines_what_it_does_not_handle(cpu_mirror):
    with pytest.raises(backends.Unsupported):
        cb.batch_stats(torch.randn(1, 4, 1, 1))
    with pytest.raises(backends.Unsupported):
        cb.batch_stats(torch.randn(0, 4, 2, 2))
    with pytest.raises(backends.Unsupported):
        cb.batch_norm_act(torch.randn(0, 4, 2, 2), None, None, torch.zeros(4), torch.ones(4), 1e-5, None, True)
    with pytest.raises(backends.Unsupported):
        cb.add_relu(torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_mirror_running_stats_after_several_steps(cpu_mirror, momentum):
    bn = torch.nn.BatchNorm2d(5, momentum=momentum)
    rm, rv, count = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    for _ in range(4):
        x = torch.randn(3, 5, 4, 4) * 3 + 2
        bn(x)
        with resnet_fast.backend("cuda", strict=True):
            resnet_fast.ops.batch_norm_act(x, bn.weight.detach(), bn.bias.detach(), rm, rv, training=True,
                                           momentum=momentum, relu=False, num_batches_tracked=count)
    torch.testing.assert_close(rm, bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv, bn.running_var, rtol=1e-5, atol=1e-6)
    assert count.item() == 4


def test_mirror_opcheck(cpu_mirror):
    """The library ops served by the cuda backend: the fakes describe its real outputs (strides too)."""
    x = torch.randn(2, 4, 3, 3).to(memory_format=torch.channels_last)
    w, b = torch.randn(4), torch.randn(4)
    with resnet_fast.backend("cuda", strict=True):
        torch.library.opcheck(torch.ops.resnet_fast.add_relu.default, (x, torch.randn_like(x)))
        torch.library.opcheck(torch.ops.resnet_fast.batch_stats.default, (x,))
        mean, var = torch.ops.resnet_fast.batch_stats(x)
        for training in (True, False):
            torch.library.opcheck(torch.ops.resnet_fast.batch_norm_act.default,
                                  (x.clone().requires_grad_(), w, b, mean, var, 1e-5, training, torch.randn_like(x),
                                   True))
        out = torch.ops.resnet_fast.batch_norm_act(x, w, b, mean, var, 1e-5, True, None, True)
        torch.library.opcheck(torch.ops.resnet_fast.batch_norm_act_backward.default,
                              (torch.randn_like(x), x, out, w, mean, var, 1e-5, True, True, True))


@pytest.mark.parametrize("with_grad", [False, True])
def test_mirror_torch_compile_fullgraph(cpu_mirror, with_grad):
    """Dynamo traces the library ops (fakes, backward, the running-stat update) served by the backend."""
    torch._dynamo.reset()

    def step(x, w, b, rm, rv, res):
        y = resnet_fast.ops.batch_norm_act(x, w, b, rm, rv, training=True, residual=res)
        return resnet_fast.ops.add_relu(y, res)

    x, w, b, rm, rv, res = _bn_case((2, 4, 3, 3), torch.float32, "channels_last")
    if with_grad:
        for t in (x, w, b):
            t.requires_grad_()
    rm2, rv2 = rm.clone(), rv.clone()
    with resnet_fast.backend("cuda", strict=True):
        out = torch.compile(step, fullgraph=True, backend="aot_eager")(x, w, b, rm, rv, res)
    ref = torch.relu(torch_bn_act(x, w, b, rm2, rv2, True, 0.1, 1e-5, res, True) + res)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)
    if with_grad:
        g = torch.randn_like(out)
        with resnet_fast.backend("cuda", strict=True):
            grads = torch.autograd.grad(out, (x, w, b), g)
        for a, e in zip(grads, torch.autograd.grad(ref, (x, w, b), g)):
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


# ================================================================================================
# GPU: the real kernels.
@pytest.fixture
def cuda_lib():
    cb.load_library()  # on a GPU machine an unavailable library is a failure, not a skip


ADD_RELU_SHAPES = [(1,), (7,), (1023,), (4099,), (3, 5, 7), (2, 3, 5, 7), (8, 64, 14, 14), (2, 24, 7, 9)]


def _add_relu_on_cuda(x, y):
    with resnet_fast.backend("cuda", strict=True):
        return resnet_fast.ops.add_relu(x, y)


@requires_cuda
@pytest.mark.parametrize("shape", ADD_RELU_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_add_relu_parity(cuda_lib, shape, dtype):
    x = torch.randn(shape, device="cuda", dtype=dtype)
    y = torch.randn(shape, device="cuda", dtype=dtype)
    out = _add_relu_on_cuda(x, y)
    torch.testing.assert_close(out, torch.relu(x + y), rtol=0, atol=0)  # fp32 add, one rounding: exact
    assert out.stride() == x.stride()


def _add_relu_inputs(layout, dtype):
    shape = (3, 10, 7, 5)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=dtype)  # noqa: E731
    if layout == "channels_last":
        return mk(shape).to(memory_format=torch.channels_last), mk(shape).to(memory_format=torch.channels_last)
    if layout == "misaligned":  # 16-byte vector path impossible: scalar loop over everything
        n = 3 * 10 * 7 * 5
        return mk(n + 1)[1:].view(shape), mk(n + 3)[3:].view(shape)
    if layout == "sliced":
        return mk(3, 10, 7, 8)[..., 2:7], mk(3, 10, 7, 8)[..., :5]
    if layout == "mixed":
        return mk(shape).to(memory_format=torch.channels_last), mk(shape)
    if layout == "expanded":
        return mk(shape), mk(1, 10, 1, 1).expand(shape)
    if layout == "transposed":
        return mk(40, 33).t(), mk(40, 33).t()
    raise AssertionError(layout)


@requires_cuda
@pytest.mark.parametrize("layout", ["channels_last", "misaligned", "sliced", "mixed", "expanded", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_add_relu_layouts(cuda_lib, layout, dtype):
    x, y = _add_relu_inputs(layout, dtype)
    out = _add_relu_on_cuda(x, y)
    torch.testing.assert_close(out, torch.relu(x + y), rtol=0, atol=0)
    assert out.stride() == torch.empty_like(x).stride()  # what the fake says
    if layout in ("channels_last", "mixed"):
        assert out.is_contiguous(memory_format=torch.channels_last)


@requires_cuda
def test_gpu_add_relu_backward(cuda_lib):
    x = torch.randn(4, 16, 5, 5, device="cuda", requires_grad=True)
    y = torch.randn(4, 16, 5, 5, device="cuda", requires_grad=True)
    g = torch.randn(4, 16, 5, 5, device="cuda")
    gx, gy = torch.autograd.grad(_add_relu_on_cuda(x, y), (x, y), g)
    rx, ry = torch.autograd.grad(torch.relu(x + y), (x, y), g)
    torch.testing.assert_close(gx, rx, rtol=0, atol=0)
    torch.testing.assert_close(gy, ry, rtol=0, atol=0)


@requires_cuda
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(2, 3, 7, 7), (3, 67, 5, 7), (64, 8, 56, 56), (4, 512, 1, 1)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_bn_stats(cuda_lib, layout, shape, dtype):
    x = (torch.randn(shape, device="cuda") + 100.0).to(dtype)  # large mean: stability
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    mean, var = torch.ops.resnet_fast_cuda.bn_stats(x)
    var_ref, mean_ref = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    assert mean.dtype == var.dtype == torch.float32
    assert rel_err(mean, mean_ref) < 1e-6
    assert rel_err(var, var_ref) < 1e-4


@requires_cuda
@pytest.mark.parametrize("argument", ["weight", "bias", "mean", "var"])
def test_gpu_bn_act_checks_channel_arguments(cuda_lib, argument):
    """A per-channel argument of the wrong shape or device is refused with its name."""
    x = torch.randn(2, 4, 3, 3, device="cuda")
    args = {"weight": torch.ones(4, device="cuda"), "bias": torch.zeros(4, device="cuda"),
            "mean": torch.zeros(4, device="cuda"), "var": torch.ones(4, device="cuda")}

    def call():
        return torch.ops.resnet_fast_cuda.bn_act(x, args["weight"], args["bias"], args["mean"], args["var"], 1e-5,
                                                 None, True)

    torch.testing.assert_close(call(), torch.relu(x / (1 + 1e-5) ** 0.5))
    args[argument] = torch.ones(5, device="cuda")
    with pytest.raises(RuntimeError, match=rf"bn_act: {argument} must have shape \[4\]"):
        call()
    args[argument] = torch.ones(4)
    with pytest.raises(RuntimeError, match=rf"bn_act: {argument} must be on x's device"):
        call()


@requires_cuda
def test_gpu_bn_act_checks_residual(cuda_lib):
    x = torch.randn(2, 4, 3, 3, device="cuda")
    mean, var = torch.zeros(4, device="cuda"), torch.ones(4, device="cuda")
    for residual, message in [(torch.randn(2, 4, 3, 2, device="cuda"), "have x's shape"), (x.half(), "have x's dtype"),
                              (x.cpu(), "be on x's device")]:
        with pytest.raises(RuntimeError, match=f"bn_act: residual must {message}"):
            torch.ops.resnet_fast_cuda.bn_act(x, None, None, mean, var, 1e-5, residual, False)


BN_SHAPES = [(4, 64, 8, 8), (3, 67, 5, 7), (2, 3, 7, 7), (16, 32, 1, 1), (5, 256, 14, 14), (2, 8, 3, 3)]


@requires_cuda
@pytest.mark.parametrize("res_relu", [(True, True), (False, True), (False, False)], ids=["res_relu", "relu", "plain"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", BN_SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_bn_act_parity(cuda_lib, dtype, layout, shape, training, res_relu):
    """Forward, gradients (x, weight, bias, residual) and running stats vs float64 torch, within 2x the
    reference backend's own same-dtype error."""
    residual, relu = res_relu
    x, w, b, rm, rv, res = _bn_case(shape, dtype, layout, device="cuda", shift=3.0)  # fp32 weight (AMP-style)
    res = res if residual else None
    g = torch.randn(shape, device="cuda").to(dtype)
    keep = lambda t: t  # noqa: E731
    mine = _run_bn("cuda", keep, x, w, b, rm, rv, res, g, training, relu)
    same = _run_bn("torch", keep, x, w, b, rm, rv, res, g, training, relu)
    ref = _run_bn(None, torch.Tensor.double, x, w, b, rm, rv, res, g, training, relu)
    out = mine[0]
    assert out.dtype == dtype and out.shape == x.shape
    assert out.stride() == same[0].stride()  # one layout rule for every backend
    assert rel_err(out, ref[0]) <= lowp_tolerance(dtype, same[0], ref[0])
    for name, a, s, r in zip(["x", "weight", "bias", "residual"], mine[1], same[1], ref[1]):
        assert a.dtype == s.dtype and a.shape == s.shape, name
        assert rel_err(a, r) <= lowp_tolerance(a.dtype if a.dtype != torch.float32 else dtype, s, r), name
    for a, s, r in zip(mine[2:], same[2:], ref[2:]):  # running statistics (float32)
        assert rel_err(a, r) <= lowp_tolerance(torch.float32, s, r)


@requires_cuda
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_running_stats_after_several_steps(cuda_lib, layout, dtype):
    bn = torch.nn.BatchNorm2d(24).cuda()
    rm, rv, count = bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone()
    for step in range(5):
        x = (torch.randn(6, 24, 9, 7, device="cuda") * (step + 1) + step).to(dtype)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
        with torch.no_grad(), resnet_fast.backend("cuda", strict=True):
            bn(x)
            resnet_fast.ops.batch_norm_act(x, bn.weight, bn.bias, rm, rv, training=True, num_batches_tracked=count)
    torch.testing.assert_close(rm, bn.running_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rv, bn.running_var, rtol=1e-5, atol=1e-5)


@requires_cuda
def test_gpu_public_op_runs_the_kernel(cuda_lib):
    x = torch.randn(4, 32, 6, 6, device="cuda", dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.ones(32, device="cuda", requires_grad=True)
    b = torch.zeros(32, device="cuda", requires_grad=True)
    rm, rv = torch.zeros(32, device="cuda"), torch.ones(32, device="cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with resnet_fast.backend("cuda", strict=True):
            out = resnet_fast.ops.batch_norm_act(x, w, b, rm, rv, training=True, residual=x, relu=True)
            out.float().sum().backward()
            resnet_fast.ops.add_relu(x.detach(), x.detach())
    names = {e.key for e in prof.key_averages()}
    kernels = {"resnet_fast_cuda::bn_stats", "resnet_fast_cuda::bn_act", "resnet_fast_cuda::bn_act_backward",
               "resnet_fast_cuda::add_relu"}
    assert kernels <= names
    assert x.grad is not None and w.grad is not None and b.grad is not None


@requires_cuda
def test_gpu_opcheck(cuda_lib):
    """The library ops on the real kernels: fakes (strides too), autograd registration, AOT tracing."""
    for dtype in DTYPES:
        x = torch.randn(3, 16, 5, 5, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
        w, b = torch.randn(16, device="cuda"), torch.randn(16, device="cuda")
        with resnet_fast.backend("cuda", strict=True):
            torch.library.opcheck(torch.ops.resnet_fast.add_relu.default, (x, torch.randn_like(x)))
            torch.library.opcheck(torch.ops.resnet_fast.batch_stats.default, (x,))
            mean, var = torch.ops.resnet_fast.batch_stats(x)
            torch.library.opcheck(torch.ops.resnet_fast.batch_norm_act.default,
                                  (x.clone().requires_grad_(), w, b, mean, var, 1e-5, True, torch.randn_like(x), True))
            out = torch.ops.resnet_fast.batch_norm_act(x, w, b, mean, var, 1e-5, True, None, True)
            torch.library.opcheck(torch.ops.resnet_fast.batch_norm_act_backward.default,
                                  (torch.randn_like(x), x, out, w, mean, var, 1e-5, True, True, True))


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_torch_compile_fullgraph(cuda_lib, dtype):
    torch._dynamo.reset()

    def step(x, w, b, rm, rv, res):
        y = resnet_fast.ops.batch_norm_act(x, w, b, rm, rv, training=True, residual=res)
        return resnet_fast.ops.add_relu(y, res)

    x, w, b, rm, rv, res = _bn_case((8, 64, 14, 14), dtype, "channels_last", device="cuda")
    for t in (x, w, b):
        t.requires_grad_()
    rm2, rv2 = rm.clone(), rv.clone()
    with resnet_fast.backend("cuda", strict=True):
        out = torch.compile(step, fullgraph=True)(x, w, b, rm, rv, res)
        ref = step(x, w, b, rm2, rv2, res)
        g = torch.randn_like(out)
        grads = torch.autograd.grad(out, (x, w, b), g)
        grads_ref = torch.autograd.grad(ref, (x, w, b), g)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)
    for a, e in zip(grads, grads_ref):
        torch.testing.assert_close(a, e)


@requires_cuda
def test_gpu_resnet50_train_step_amp_bf16_channels_last(cuda_lib, monkeypatch):
    """One AMP bf16 channels_last training step on the cuda backend vs torchvision: loss, gradients and
    running statistics within 2x torchvision's own bf16 error against its fp32 step (TF32 off)."""
    import copy

    tv_models = pytest.importorskip("torchvision.models")
    if not hasattr(resnet_fast, "resnet50"):
        pytest.skip("resnet_fast.resnet50 is not there yet")

    calls = {"n": 0}
    cuda_ops = backends._REGISTRY["cuda"].ops()
    fused = cuda_ops["batch_norm_act"]

    def counting(*args, **kwargs):
        calls["n"] += 1
        return fused(*args, **kwargs)

    monkeypatch.setitem(cuda_ops, "batch_norm_act", counting)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)

    torch.manual_seed(0)
    base = tv_models.resnet50()
    x = torch.randn(8, 3, 64, 64, device="cuda").to(memory_format=torch.channels_last)
    target = torch.randint(0, 1000, (8,), device="cuda")

    def run(model, amp):
        model = model.cuda().to(memory_format=torch.channels_last).train()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), target)
        loss.backward()
        grads = torch.cat([p.grad.detach().double().flatten() for p in model.parameters()])
        stats = torch.cat([m.detach().double().flatten() for n, m in model.named_buffers() if "running" in n])
        return loss.detach().double(), grads, stats

    ref = run(copy.deepcopy(base), amp=False)
    same = run(copy.deepcopy(base), amp=True)
    ours_model = resnet_fast.resnet50()
    ours_model.load_state_dict(base.state_dict())
    with resnet_fast.backend("cuda"):
        ours = run(ours_model, amp=True)
    assert calls["n"] >= 53  # every BatchNorm of resnet50 went through the fused kernel
    loss_err = abs((ours[0] - ref[0]).item())
    assert loss_err <= max(2 * abs((same[0] - ref[0]).item()), 2.0**-8 * abs(ref[0].item()))
    assert rel_err(ours[1], ref[1]) <= lowp_tolerance(torch.bfloat16, same[1], ref[1])
    assert rel_err(ours[2], ref[2]) <= lowp_tolerance(torch.float32, same[2], ref[2])


# ================================================================================================
# The real kernel code executed on the CPU: csrc/emulation compiles add_relu.cu and batch_norm_act.cu
# with g++ against a small CUDA emulation (blocks one after another, a block's threads as std::threads,
# __syncthreads a barrier). The host steps of ops.cpp (layout choice, vectorisation decision, launch
# order) are mirrored below; P (partials per channel) and the grid size are varied on purpose.
import ctypes  # noqa: E402
import subprocess  # noqa: E402

_DT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_VEC = {torch.float32: 4, torch.float16: 8, torch.bfloat16: 8}


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler for the CPU emulation of the kernels")
    src = cb.CSRC / "emulation" / "emulate.cpp"
    out = tmp_path_factory.mktemp("emu") / "libresnet_fast_emu.so"
    include = os.path.join(os.path.dirname(torch.__file__), "include")
    cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-I", str(cb.CSRC), "-I", include, str(src),
           "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-4000:]
    lib = ctypes.CDLL(str(out))
    P, I64, I, F, U = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_uint
    lib.emu_add_relu.argtypes = [I, P, P, P, I64, I, U]
    lib.emu_bn_stats_partials.argtypes = [I, P, I64, I64, I64, I, I64, P, P, P]
    lib.emu_bn_stats_finalize.argtypes = [P, P, P, I64, I64, P, P]
    lib.emu_bn_apply.argtypes = [I, P, P, P, I64, I64, I64, I, I, P, P, P, P, I, U]
    lib.emu_bn_bwd_reduce.argtypes = [I, P, P, P, P, I64, I64, I64, I, I64, I, P, P]
    lib.emu_bn_bwd_finalize.argtypes = [P, P, I64, I64, I64, I, P, P, P, P, P, P, P]
    lib.emu_bn_bwd_elemt.argtypes = [I, P, P, P, P, P, I64, I64, I64, I, I, P, P, P, P, I, U]
    return lib


def _ptr(t):
    return None if t is None else t.data_ptr()


def _aligned(*ts):
    return all(t is None or t.data_ptr() % 16 == 0 for t in ts)


def _emu_add_relu(lib, x, y, blocks):
    """add_relu_cuda (ops.cpp) on the emulated kernel: the output is empty_like(x), and x and y are
    brought to its strides (like_strides)."""
    out = torch.empty_like(x)
    xc, yc = (t if t.stride() == out.stride() else torch.empty_like(out).copy_(t) for t in (x, y))
    vec = _aligned(xc, yc, out)
    lib.emu_add_relu(_DT[x.dtype], _ptr(xc), _ptr(yc), _ptr(out), x.numel(), int(vec), blocks)
    return out, vec


def _emu_geometry(x):
    fmt = activation_format(x)
    n, c, h, w = x.shape
    return fmt, fmt == torch.channels_last, n, c, h * w


def _emu_bn_stats(lib, x, P):
    """bn_stats_cuda (ops.cpp) on the emulated kernels with P partials per channel; returns (mean, var,
    the [P, C] partial counts)."""
    fmt, nhwc, n, c, hw = _emu_geometry(x)
    xc = x.contiguous(memory_format=fmt)
    mean, var, ws = torch.empty(c), torch.empty(c), torch.empty(3, P, c)
    lib.emu_bn_stats_partials(_DT[x.dtype], _ptr(xc), n, c, hw, int(nhwc), P, _ptr(ws[0]), _ptr(ws[1]), _ptr(ws[2]))
    lib.emu_bn_stats_finalize(_ptr(ws[0]), _ptr(ws[1]), _ptr(ws[2]), P, c, _ptr(mean), _ptr(var))
    return mean, var, ws[2]


def _emu_bn_act(lib, x, w, b, mean, var, eps, res, relu, blocks):
    """bn_act_cuda (ops.cpp) on the emulated kernel; returns (out, invstd, vectorized)."""
    fmt, nhwc, n, c, hw = _emu_geometry(x)
    xc = x.contiguous(memory_format=fmt)
    rc = None if res is None else res.contiguous(memory_format=fmt)
    wf = None if w is None else w.float().contiguous()
    bf = None if b is None else b.float().contiguous()
    mean_f = mean.float().contiguous()
    invstd = var.float().add(eps).sqrt().reciprocal()
    out = torch.empty_like(xc)
    vec = _aligned(xc, rc, out) and (c if nhwc else hw) % _VEC[x.dtype] == 0
    lib.emu_bn_apply(_DT[x.dtype], _ptr(xc), _ptr(rc), _ptr(out), n, c, hw, int(nhwc), int(vec), _ptr(mean_f),
                     _ptr(invstd), _ptr(wf), _ptr(bf), int(relu), blocks)
    return out, invstd, vec


def _emu_bn_forward(lib, x, w, b, rm, rv, training, eps, res, relu, P, blocks):
    """The cuda backend's forward on the emulated kernels: bn_act with x's batch statistics (bn_stats)
    when training, else with rm/rv. Returns (out, mean, invstd, vectorized), what the backward takes."""
    mean, var = _emu_bn_stats(lib, x, P)[:2] if training else (rm.float(), rv.float())
    out, invstd, vec = _emu_bn_act(lib, x, w, b, mean, var, eps, res, relu, blocks)
    return out, mean, invstd, vec


def _emu_bn_backward(lib, dy, x, out, w, mean, invstd, training, relu, residual_grad, P, blocks):
    """bn_act_backward_cuda (ops.cpp) on the emulated kernels."""
    fmt, nhwc, n, c, hw = _emu_geometry(x)
    xc, dyc, outc = (t.contiguous(memory_format=fmt) for t in (x, dy, out))
    wf = None if w is None else w.float().contiguous()
    ws, coef = torch.empty(2, P, c), torch.empty(3, c)
    gw, gb = torch.zeros(c), torch.zeros(c)
    dt = _DT[x.dtype]
    lib.emu_bn_bwd_reduce(dt, _ptr(dyc), _ptr(xc), _ptr(outc), _ptr(mean), n, c, hw, int(nhwc), P, int(relu),
                          _ptr(ws[0]), _ptr(ws[1]))
    lib.emu_bn_bwd_finalize(_ptr(ws[0]), _ptr(ws[1]), P, c, n * hw, int(training), _ptr(invstd), _ptr(wf), _ptr(gw),
                            _ptr(gb), _ptr(coef[0]), _ptr(coef[1]), _ptr(coef[2]))
    gx = torch.empty_like(xc)
    gr = torch.empty_like(xc) if residual_grad else None
    vec = _aligned(dyc, xc, outc, gx, gr) and (c if nhwc else hw) % _VEC[x.dtype] == 0
    lib.emu_bn_bwd_elemt(dt, _ptr(dyc), _ptr(xc), _ptr(outc), _ptr(gx), _ptr(gr), n, c, hw, int(nhwc), int(vec),
                         _ptr(mean), _ptr(coef[0]), _ptr(coef[1]), _ptr(coef[2]), int(relu), blocks)
    return gx, gw, gb, gr


def _emu_add_relu_inputs(case, dtype):
    mk = lambda *s: torch.randn(*s).to(dtype)  # noqa: E731
    if case.startswith("numel"):
        n = int(case[5:])
        return mk(n), mk(n)
    if case == "channels_last":
        return mk(2, 16, 3, 5).to(memory_format=torch.channels_last), mk(2, 16, 3, 5).to(memory_format=torch.channels_last)
    if case == "misaligned":
        return mk(211)[1:].view(2, 5, 21), mk(213)[3:].view(2, 5, 21)
    if case == "sliced":
        return mk(3, 4, 5, 9)[..., 2:7], mk(3, 4, 5, 9)[..., :5]
    if case == "mixed":
        return mk(2, 6, 3, 5).to(memory_format=torch.channels_last), mk(2, 6, 3, 5)
    if case == "expanded":
        return mk(2, 6, 3, 5), mk(1, 6, 1, 1).expand(2, 6, 3, 5)
    if case == "transposed":  # dense but neither contiguous nor channels_last: empty_like keeps its strides
        return mk(40, 33).t(), mk(40, 33).t()
    raise AssertionError(case)


@pytest.mark.parametrize("blocks", [1, 3])
@pytest.mark.parametrize("case", ["numel1", "numel7", "numel33", "numel1031", "channels_last", "misaligned", "sliced",
                                  "mixed", "expanded", "transposed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_add_relu_kernel(emu, dtype, case, blocks):
    x, y = _emu_add_relu_inputs(case, dtype)
    out, vec = _emu_add_relu(emu, x, y, blocks)
    assert vec == (case != "misaligned")
    torch.testing.assert_close(out, torch.relu(x + y), rtol=0, atol=0)
    assert out.stride() == torch.empty_like(x).stride()  # what the op's fake says
    if case != "sliced":  # a dense x keeps its strides
        assert out.stride() == x.stride()


@pytest.mark.parametrize("P", [1, 3])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_bn_stats_kernel(emu, dtype, layout, P):
    x = (torch.randn(3, 40, 5, 7) * 0.5 + 300.0).to(dtype)  # large mean: Welford must keep the variance
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    mean, var, counts = _emu_bn_stats(emu, x, P)
    var_ref, mean_ref = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    assert rel_err(mean, mean_ref) < 1e-6
    assert rel_err(var, var_ref) < 1e-4
    assert torch.equal(counts.sum(0), torch.full((x.shape[1],), float(x.numel() // x.shape[1])))  # each value once


_EMU_BN_SHAPES = [(2, 8, 3, 5), (3, 5, 2, 3), (2, 6, 4, 4), (4, 3, 1, 1), (2, 40, 3, 3)]


@pytest.mark.parametrize("res_relu", [(True, True), (False, True), (False, False)], ids=["res_relu", "relu", "plain"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", _EMU_BN_SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_bn_act_kernels(emu, dtype, layout, shape, training, res_relu):
    """Forward (bn_stats then bn_act when training, bn_act on the running statistics in eval) and every
    gradient of the emulated kernels vs the float64 reference."""
    residual, relu = res_relu
    x, w, b, rm, rv, res = _bn_case(shape, dtype, layout, shift=2.0)
    res = res if residual else None
    P, blocks = (2, 3) if shape[1] % 2 else (3, 1)
    out, mean, invstd, vec = _emu_bn_forward(emu, x, w, b, rm, rv, training, 1e-5, res, relu, P, blocks)

    leaves64 = [_f64(t).requires_grad_() for t in (x, w, b)] + ([_f64(res).requires_grad_()] if residual else [])
    ref = torch_bn_act(leaves64[0], leaves64[1], leaves64[2], rm.double(), rv.double(), training, 0.1, 1e-5,
                       leaves64[3] if residual else None, relu)
    out_tol = PRECISION_FLOOR[dtype]
    # Judged against the pre-ReLU output's norm: where ReLU leaves few values (of 12 in (4, 3, 1, 1)), the
    # output's own norm is far below the scale the kernel rounds at (seen in CI: 1.07e-5 against 1e-5 in
    # float32, a single output of 0.015 left).
    with torch.no_grad():
        pre = torch_bn_act(*leaves64[:3], rm.double(), rv.double(), training, 0.1, 1e-5,
                           leaves64[3] if residual else None, False)
    assert rel_err(out, ref) * ref.norm().item() <= out_tol * pre.norm().item()
    if layout == "channels_last" and shape[1] > 1 and shape[2] * shape[3] > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)

    dy = torch.randn(shape).to(dtype)
    gx, gw, gb, gr = _emu_bn_backward(emu, dy, x, out, w, mean, invstd, training, relu, residual, P, blocks)
    grads = torch.autograd.grad(ref, leaves64, dy.double())
    assert rel_err(gx, grads[0]) <= max(out_tol, 1e-5)
    assert rel_err(gw, grads[1]) <= 1e-5 * (1 if dtype == torch.float32 else 10)
    assert rel_err(gb, grads[2]) <= 1e-5
    if residual:
        assert rel_err(gr, grads[3]) <= 1e-12


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_kernels_take_the_vector_path(emu, dtype):
    """The 16-byte pack path (checked separately from the scalar one above) gives the same results."""
    x, w, b, rm, rv, res = _bn_case((2, 16, 4, 4), dtype, "channels_last", shift=1.0)
    out_v, mean, invstd, vec = _emu_bn_forward(emu, x, w, b, rm, rv, True, 1e-5, res, True, 3, 2)
    assert vec
    ref = torch_bn_act(_f64(x), _f64(w), _f64(b), rm.double(), rv.double(), True, 0.1, 1e-5, _f64(res), True)
    assert rel_err(out_v, ref) <= {torch.float32: 1e-5, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    x_nchw, res_nchw = x.contiguous(), res.contiguous()
    out_nchw, _, _, vec_nchw = _emu_bn_forward(emu, x_nchw, w, b, rm, rv, True, 1e-5, res_nchw, True, 3, 2)
    assert vec_nchw == (16 % _VEC[dtype] == 0)
    torch.testing.assert_close(out_nchw, out_v.contiguous())  # same values up to the reduction order


@pytest.mark.parametrize("P", [1, 2])
@pytest.mark.parametrize("shape", [(4, 3, 16, 17), (20, 3, 7, 9)], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_emulated_long_reductions(emu, layout, shape, P):
    """Enough values per thread for the unrolled reduction loops and the NCHW cursor's wrap-around
    (step < HW and step > HW)."""
    x, w, b, rm, rv, res = _bn_case(shape, torch.float32, layout, shift=5.0)
    out, mean, invstd, _ = _emu_bn_forward(emu, x, w, b, rm, rv, True, 1e-5, res, True, P, 2)
    leaves64 = [_f64(t).requires_grad_() for t in (x, w, b, res)]
    ref = torch_bn_act(leaves64[0], leaves64[1], leaves64[2], None, None, True, 0.1, 1e-5, leaves64[3], True)
    assert rel_err(out, ref) <= 1e-5
    dy = torch.randn(shape)
    gx, gw, gb, gr = _emu_bn_backward(emu, dy, x, out, w, mean, invstd, True, True, True, P, 2)
    grads = torch.autograd.grad(ref, leaves64, dy.double())
    for mine, theirs in zip((gx, gw, gb, gr), grads):
        assert rel_err(mine, theirs) <= 1e-5


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_bn_without_affine(emu, dtype, layout, training):
    """weight = bias = None: the kernels' nullptr paths (identity scale, no shift)."""
    x, _, _, rm, rv, res = _bn_case((3, 8, 4, 5), dtype, layout, affine=False, shift=1.0)
    out, mean, invstd, _ = _emu_bn_forward(emu, x, None, None, rm, rv, training, 1e-5, res, True, 2, 2)
    x64, res64 = _f64(x).requires_grad_(), _f64(res).requires_grad_()
    ref = torch_bn_act(x64, None, None, rm.double(), rv.double(), training, 0.1, 1e-5, res64, True)
    tol = {torch.float32: 1e-5, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    assert rel_err(out, ref) <= tol
    dy = torch.randn(x.shape).to(dtype)
    gx, _, _, gr = _emu_bn_backward(emu, dy, x, out, None, mean, invstd, training, True, True, 2, 2)
    gx64, gr64 = torch.autograd.grad(ref, (x64, res64), dy.double())
    assert rel_err(gx, gx64) <= max(tol, 1e-5)
    assert rel_err(gr, gr64) <= 1e-12
