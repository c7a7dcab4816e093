"""The ``"cuda"`` backend: the hand-written CUDA kernels in ``csrc/``, registered as ``torch.ops.resnet_fast.*``.

Ops (schemas in ``csrc/ops.cpp``):

* ``add_relu(x, y)``: ``relu(x + y)``, 16-byte vectorised.
* ``bn_stats(x) -> (mean, var)``: per-channel batch statistics (float32, biased variance), Welford.
* ``bn_act_forward(x, weight, bias, running_mean!, running_var!, training, momentum, eps, residual, relu)
  -> (out, save_mean, save_invstd)``: ``relu?(batch_norm(x) + residual)``, running stats updated in place.
* ``bn_act_backward(grad_out, x, out, weight, save_mean, save_invstd, training, relu, residual_grad)
  -> (grad_x, grad_weight, grad_bias, grad_residual)``.

Loading (lazy, on first use of the backend): ``import resnet_fast._C`` (built by ``pip install -e .``);
else, on a machine with a GPU, nvcc and ninja, a JIT build of the same sources with
``torch.utils.cpp_extension.load`` (cached in torch's extensions directory; ``RESNET_FAST_NO_JIT=1``
disables it). Otherwise the backend is unavailable and says why.

This module also adds what the C++ side does not: fake (meta) implementations, so ``torch.compile``
traces the ops, and autograd (``register_autograd`` for ``add_relu``; an ``autograd.Function`` for
``batch_norm_act``, whose forward op mutates the running statistics).
"""

from __future__ import annotations

import threading

import torch
from torch.autograd.function import once_differentiable

from resnet_fast.backends import BackendUnavailable, Unsupported, cuda_build, register_backend
from resnet_fast.backends.cuda_build import CSRC, SOURCES  # noqa: F401  (the sources' names and the checkout's csrc/)

__all__ = ["OPS", "SOURCES", "batch_norm_act", "add_relu", "load_library", "pick_format"]

OPS = ("add_relu", "bn_stats", "bn_act_forward", "bn_act_backward")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_lock = threading.RLock()
_python_parts_registered = False
_how_loaded: str | None = None


# ------------------------------------------------------------------------------------------------
# Loading the library.
def _registered() -> bool:
    """Whether the resnet_fast ops already have CUDA kernels in this process."""
    try:
        return all(
            torch._C._dispatch_has_kernel_for_dispatch_key(f"resnet_fast::{name}", "CUDA") for name in OPS
        )
    except RuntimeError:  # operator not found
        return False


def _import_prebuilt() -> None:
    cuda_build.check_prebuilt()  # before the import: its ops could not be replaced by a JIT build after it
    import resnet_fast._C  # noqa: F401  (registers the ops on import)


def load_library() -> str:
    """Makes ``torch.ops.resnet_fast.*`` available with their fake and autograd registrations.

    Returns how the kernels were found; raises :class:`BackendUnavailable` with the reason otherwise.
    """
    global _how_loaded
    with _lock:
        if _how_loaded is None:
            if _registered():
                _how_loaded = "already loaded"
            else:
                try:
                    _import_prebuilt()
                    _how_loaded = "prebuilt resnet_fast._C"
                except (ImportError, BackendUnavailable) as e:  # also: another torch's build, other GPUs
                    _how_loaded = cuda_build.jit_build(e)
                if not _registered():
                    _how_loaded = None
                    raise BackendUnavailable("the resnet_fast library loaded but did not register its CUDA ops")
        _register_python_parts()
        return _how_loaded


# ------------------------------------------------------------------------------------------------
# Layout rule shared with csrc/common.cuh (pick_format / in_format), used by the fake implementations.
def pick_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format the kernels process (and return) ``x`` in. Mirrors ``pick_format`` in C++."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    if x.dim() == 4 and x.stride(1) < x.stride(3):
        return torch.channels_last
    return torch.contiguous_format


def _empty_in_format(x: torch.Tensor) -> torch.Tensor:
    """``at::empty_like(in_format(x, pick_format(x)))``."""
    fmt = pick_format(x)
    if x.is_contiguous(memory_format=fmt):
        return torch.empty_like(x)  # dense: same strides
    return torch.empty_like(x, memory_format=fmt)


def _fake_add_relu(x, y):
    dense = x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
    if dense and tuple(x.stride()) == tuple(y.stride()):
        return torch.empty_like(x)
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=pick_format(x))


def _fake_bn_stats(x):
    c = x.shape[1]
    return x.new_empty((c,), dtype=torch.float32), x.new_empty((c,), dtype=torch.float32)


def _fake_bn_act_forward(x, weight, bias, running_mean, running_var, training, momentum, eps, residual, relu):
    c = x.shape[1]
    return _empty_in_format(x), x.new_empty((c,), dtype=torch.float32), x.new_empty((c,), dtype=torch.float32)


def _fake_bn_act_backward(grad_out, x, out, weight, save_mean, save_invstd, training, relu, residual_grad):
    c = x.shape[1]
    grad_res = _empty_in_format(x) if residual_grad else x.new_empty((0,))
    f32 = torch.float32
    return _empty_in_format(x), x.new_empty((c,), dtype=f32), x.new_empty((c,), dtype=f32), grad_res


def _add_relu_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output)


def _add_relu_backward(ctx, grad):
    (out,) = ctx.saved_tensors
    g = torch.ops.aten.threshold_backward.default(grad, out, 0)  # what torch.relu's backward does
    return g, g


def _register_python_parts() -> None:
    global _python_parts_registered
    if _python_parts_registered:
        return
    for name, fake in (
        ("add_relu", _fake_add_relu),
        ("bn_stats", _fake_bn_stats),
        ("bn_act_forward", _fake_bn_act_forward),
        ("bn_act_backward", _fake_bn_act_backward),
    ):
        torch.library.register_fake(f"resnet_fast::{name}", fake)
    torch.library.register_autograd(
        "resnet_fast::add_relu", _add_relu_backward, setup_context=_add_relu_setup_context
    )
    _python_parts_registered = True


# ------------------------------------------------------------------------------------------------
# Backend implementations (the reference's positional signatures).
def _check_dtype(x: torch.Tensor, op: str) -> None:
    if x.dtype not in _DTYPES:
        raise Unsupported(f"{op}: the CUDA kernels take float32, float16 or bfloat16, got {x.dtype}")


def add_relu(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    _check_dtype(x, "add_relu")
    return torch.ops.resnet_fast.add_relu(x, y)


class _BatchNormAct(torch.autograd.Function):
    """Differentiable ``bn_act_forward``; running statistics are buffers (no gradient)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, residual, relu):
        out, save_mean, save_invstd = torch.ops.resnet_fast.bn_act_forward(
            x, weight, bias, running_mean, running_var, training, momentum, eps, residual, relu
        )
        ctx.save_for_backward(x, out, weight, save_mean, save_invstd)
        ctx.training = training
        ctx.relu = relu
        ctx.weight_dtype = weight.dtype if weight is not None else None
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, out, weight, save_mean, save_invstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_x, grad_w, grad_b, grad_res = torch.ops.resnet_fast.bn_act_backward(
            grad_out, x, out, weight, save_mean, save_invstd, ctx.training, ctx.relu, bool(need[8])
        )
        return (
            grad_x if need[0] else None,
            grad_w.to(ctx.weight_dtype) if need[1] else None,
            grad_b.to(ctx.bias_dtype) if need[2] else None,
            None,
            None,
            None,
            None,
            None,
            grad_res if need[8] else None,
            None,
        )


def batch_norm_act(x, weight, bias, running_mean, running_var, training, momentum, eps, residual, relu):
    """``relu?(F.batch_norm(x, ...) + residual)`` on the fused kernels; differentiable."""
    _check_dtype(x, "batch_norm_act")
    for t, name in ((weight, "weight"), (bias, "bias"), (running_mean, "running_mean"), (running_var, "running_var")):
        if t is not None and not t.is_floating_point():
            raise Unsupported(f"batch_norm_act: {name} must be floating point, got {t.dtype}")
    if x.numel() == 0:
        raise Unsupported("batch_norm_act: empty input")
    if training and x.shape[0] * x.shape[2] * x.shape[3] <= 1:
        # F.batch_norm raises its own error for this; let the reference say it.
        raise Unsupported("batch_norm_act: training needs more than one value per channel")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, residual)):
        return _BatchNormAct.apply(
            x, weight, bias, running_mean, running_var, training, momentum, eps, residual, relu
        )
    return torch.ops.resnet_fast.bn_act_forward(
        x, weight, bias, running_mean, running_var, training, momentum, eps, residual, relu
    )[0]


def _load():
    load_library()
    return {"add_relu": add_relu, "batch_norm_act": batch_norm_act}


def _is_cuda(device: torch.device) -> bool:
    return torch.device(device).type == "cuda"


register_backend(
    "cuda",
    _load,
    priority=10,
    supports_device=_is_cuda,
    differentiable={"add_relu", "batch_norm_act"},
    # Opt-in (``set_backend("cuda")``): "auto" never picks it, so it is never loaded or JIT-built
    # unasked. These kernels were written and checked without a GPU (CPU emulation of the kernel code);
    # make them automatic once the GPU tests in tests/test_cuda_ext.py have passed on real hardware.
    auto_select=lambda device: False,
)
