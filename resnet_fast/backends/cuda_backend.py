"""The ``"cuda"`` backend: the hand-written CUDA kernels in ``csrc/``, registered as ``torch.ops.resnet_fast_cuda.*``.

Kernel entry points (schemas in ``csrc/ops.cpp``), called by this backend's implementations of the
library ops (:mod:`resnet_fast.ops.library`, which own the fake implementations and the backward):

* ``add_relu(x, y)``: ``relu(x + y)``, 16-byte vectorised, in ``empty_like(x)``'s layout.
* ``bn_stats(x) -> (mean, var)``: per-channel batch statistics (float32, biased variance), Welford.
* ``bn_act(x, weight, bias, mean, var, eps, residual, relu) -> out``:
  ``relu?((x - mean) * rsqrt(var + eps) * weight + bias + residual)`` with the statistics given (the
  batch's from ``bn_stats`` when training, the running ones in eval; the library updates those).
* ``bn_act_backward(grad_out, x, out, weight, save_mean, save_invstd, training, relu, residual_grad)
  -> (grad_x, grad_weight, grad_bias, grad_residual)``.

Loading (lazy, on first use of the backend): ``import resnet_fast._C`` (built by ``pip install``),
after checking, without importing it, that it carries code for the visible GPUs
(:mod:`resnet_fast.backends.cuda_build`); else, on a machine with a GPU, nvcc and ninja, a JIT build
of the sources the package ships (``resnet_fast/csrc``, or the checkout's ``csrc/``) with
``torch.utils.cpp_extension.load`` (cached in torch's extensions directory; ``RESNET_FAST_NO_JIT=1``
disables it). Otherwise the backend is unavailable and says why, once.
"""

from __future__ import annotations

import threading

import torch

from resnet_fast.backends import BackendUnavailable, Unsupported, cuda_build, register_backend
from resnet_fast.backends.cuda_build import CSRC, SOURCES  # noqa: F401  (the sources' names and the checkout's csrc/)

__all__ = ["OPS", "SOURCES", "add_relu", "batch_norm_act", "batch_norm_act_backward", "batch_stats", "load_library"]

OPS = ("add_relu", "bn_stats", "bn_act", "bn_act_backward")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_lock = threading.RLock()
_how_loaded: str | None = None


# ------------------------------------------------------------------------------------------------
# Loading the library.
def _registered() -> bool:
    """Whether the resnet_fast_cuda ops already have CUDA kernels in this process."""
    try:
        return all(
            torch._C._dispatch_has_kernel_for_dispatch_key(f"resnet_fast_cuda::{name}", "CUDA") for name in OPS
        )
    except RuntimeError:  # operator not found
        return False


def _import_prebuilt() -> None:
    cuda_build.check_prebuilt()  # before the import: its ops could not be replaced by a JIT build after it
    import resnet_fast._C  # noqa: F401  (registers the ops on import)


def load_library() -> str:
    """Makes ``torch.ops.resnet_fast_cuda.*`` available.

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
        return _how_loaded


# ------------------------------------------------------------------------------------------------
# Implementations of the library ops (the reference's positional signatures).
def _check_dtype(x: torch.Tensor, op: str) -> None:
    if x.dtype not in _DTYPES:
        raise Unsupported(f"{op}: the CUDA kernels take float32, float16 or bfloat16, got {x.dtype}")


def add_relu(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The kernel op returns ``empty_like(x)``'s layout, the library op's, for any input layout (it
    brings x and y to those strides itself)."""
    _check_dtype(x, "add_relu")
    return torch.ops.resnet_fast_cuda.add_relu(x, y)


def batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and biased variance (float32), by the ``bn_stats`` kernels."""
    _check_dtype(x, "batch_stats")
    if x.shape[0] * x.shape[2] * x.shape[3] <= 1:
        # Empty batches and one value per channel: the reference's answer (and error message).
        raise Unsupported("batch_stats: needs more than one value per channel")
    return torch.ops.resnet_fast_cuda.bn_stats(x)


def batch_norm_act(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None,
    relu: bool,
) -> torch.Tensor:
    """``relu?(batch_norm(x; mean, var) + residual)`` by the ``bn_act`` kernel; training or eval is only
    which statistics the library passes, so the kernel does not need to know."""
    _check_dtype(x, "batch_norm_act")
    if x.numel() == 0:
        raise Unsupported("batch_norm_act: empty input")
    return torch.ops.resnet_fast_cuda.bn_act(x, weight, bias, mean, var, eps, residual, relu)


def batch_norm_act_backward(grad_out, x, out, weight, mean, var, eps, training, relu, residual_grad):
    _check_dtype(x, "batch_norm_act_backward")
    if x.numel() == 0:
        raise Unsupported("batch_norm_act_backward: empty input")
    return torch.ops.resnet_fast_cuda.bn_act_backward(
        grad_out, x, out, weight, mean, torch.rsqrt(var.float() + eps), training, relu, residual_grad
    )


def _load():
    load_library()
    return {
        "add_relu": add_relu,
        "batch_stats": batch_stats,
        "batch_norm_act": batch_norm_act,
        "batch_norm_act_backward": batch_norm_act_backward,
    }


def _is_cuda(device: torch.device) -> bool:
    return torch.device(device).type == "cuda"


register_backend(
    "cuda",
    _load,
    priority=10,
    supports_device=_is_cuda,
    # Opt-in (``set_backend("cuda")``): "auto" never picks it, so it is never loaded or JIT-built
    # unasked. These kernels were written and checked without a GPU (CPU emulation of the kernel code);
    # make them automatic once the GPU tests in tests/test_cuda_ext.py have passed on real hardware.
    auto_select=lambda device: False,
)
