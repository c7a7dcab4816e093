"""Which Triton convolution kernel serves a ``conv_bn_act`` call: one table, chosen per layer class.

Every kernel family (one file each, sharing :mod:`resnet_fast.kernels.epilogue`) takes the arguments of
:func:`resnet_fast.ops.reference.conv_bn_act` and raises :class:`~resnet_fast.backends.Unsupported` for
calls it cannot serve:

* ``gather`` (:mod:`~resnet_fast.kernels.conv_gather`): masked pointer loads; any layout, channel count
  and GPU. The general path, and the one every call falls back to.
* ``gemm_tma`` (:mod:`~resnet_fast.kernels.conv_gemm_tma`): 1x1 stride-1 convolutions as a persistent
  GEMM over NHWC rows through tensor descriptors (TMA, sm_90+).
* ``patch_tma`` (:mod:`~resnet_fast.kernels.conv_patch_tma`): any kernel size, stride and dilation over
  spatial patches through tensor descriptors (TMA, sm_90+).

:data:`TABLE` names, per layer class, the default family and the TMA family. A TMA family becomes a
class's default only once a GPU run has measured it faster than the one it replaces, recorded in
BENCHMARKS.md ("Convolution kernel per layer class"); on the H200 run of 2026-12-04 gather was faster
on every class but one shape, so every default is ``gather``. ``RESNET_FAST_CONV_KERNEL=<family>``
forces a family, and ``RESNET_FAST_CONV_KERNEL=tma`` the table's TMA family of each call's class; a call the forced family cannot take (a 3-channel stem, NCHW
input, an Ampere GPU, ...) runs on ``gather`` rather than leaving the Triton backend.
:func:`record_kernels` counts which family served each call.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import os
from typing import Callable

import torch

from resnet_fast.backends import Unsupported, counting
from resnet_fast.kernels import conv_gather, conv_gemm_tma, conv_patch_tma
from resnet_fast.kernels.conv_common import float32_unsupported_reason

__all__ = ["KERNELS", "TABLE", "conv_bn_act", "kernel_for", "layer_class", "record_kernels", "select"]

KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    "gather": conv_gather.conv_bn_act,
    "gemm_tma": conv_gemm_tma.conv_bn_act,
    "patch_tma": conv_patch_tma.conv_bn_act,
}

# Why a family cannot serve a call (None if it can), asked before choosing it. The gather kernel takes
# every call the backend can serve at all.
_UNSUPPORTED_REASON: dict[str, Callable[..., str | None]] = {
    "gemm_tma": conv_gemm_tma.unsupported_reason,
    "patch_tma": conv_patch_tma.unsupported_reason,
}

# Layer class -> (default family, TMA family). Defaults: measured on an H200 (BENCHMARKS.md).
TABLE: dict[str, tuple[str, str]] = {
    "1x1": ("gather", "gemm_tma"),
    "1x1 strided": ("gather", "patch_tma"),
    "kxk": ("gather", "patch_tma"),
}

FORCE_VARIABLE = "RESNET_FAST_CONV_KERNEL"


def layer_class(weight: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int]) -> str:
    """``"1x1"`` (an unpadded 1x1, stride 1: a plain GEMM), ``"1x1 strided"`` (the downsample shortcut)
    or ``"kxk"`` (everything else)."""
    if tuple(weight.shape[2:]) == (1, 1) and tuple(padding) == (0, 0):
        return "1x1" if tuple(stride) == (1, 1) else "1x1 strided"
    return "kxk"


def select(x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int],
           dilation: tuple[int, int], groups: int) -> str:
    """The family asked for: the forced one (``RESNET_FAST_CONV_KERNEL``) or the class's default."""
    default, tma = TABLE[layer_class(weight, stride, padding)]
    forced = os.environ.get(FORCE_VARIABLE)
    if not forced:
        return default
    if forced == "tma":
        return tma
    if forced not in KERNELS:
        raise Unsupported(f"{FORCE_VARIABLE}={forced!r} is not 'tma' or one of {sorted(KERNELS)}")
    return forced


def kernel_for(x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int],
               dilation: tuple[int, int], groups: int, residual: torch.Tensor | None) -> str:
    """The family that serves the call: :func:`select`'s, or ``gather`` where that one cannot."""
    name = select(x, weight, stride, padding, dilation, groups)
    check = _UNSUPPORTED_REASON.get(name)
    if check is not None and check(x, weight, stride, padding, dilation, groups, residual) is not None:
        return "gather"
    return name


_recording: contextvars.ContextVar[collections.Counter | None] = contextvars.ContextVar(
    "resnet_fast_conv_kernels", default=None
)


def record_kernels() -> contextlib.AbstractContextManager[collections.Counter]:
    """Counts the calls served inside the block by kernel family: ``{"gather": 2, "patch_tma": 5}``."""
    return counting(_recording)


def conv_bn_act(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, stride, padding, dilation,
                groups, residual, relu):
    """The ``"triton"`` backend's ``conv_bn_act``: the family :func:`kernel_for` names (float32 with TF32
    on is left to torch: :func:`~resnet_fast.kernels.conv_common.float32_unsupported_reason`)."""
    reason = float32_unsupported_reason(x)
    if reason is not None:
        raise Unsupported(reason)
    name = kernel_for(x, weight, stride, padding, dilation, groups, residual)
    out = KERNELS[name](x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, stride, padding,
                        dilation, groups, residual, relu)
    counts = _recording.get()
    if counts is not None:
        counts[name] += 1
    return out
