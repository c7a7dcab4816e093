"""Shapes and memory formats of the fused ops' outputs: one rule each, shared by every backend and by
the fake (meta) implementations, so a traced graph and a real run always agree on strides.
"""

from __future__ import annotations

import torch

__all__ = [
    "activation_format",
    "conv_output_format",
    "conv_output_size",
    "empty_conv_output",
    "is_channels_last",
    "like_layout",
]


def is_channels_last(t: torch.Tensor) -> bool:
    """Whether a 4-D tensor is laid out NHWC: channel stride no larger than the column stride and below
    the row stride. Decided by the strides alone; agrees with torch's ``suggest_memory_format`` on
    dense tensors, and tensors whose size-1 dimensions make both layouts the same memory (a 1x1 conv
    weight, ``[N, 1, H, W]``) keep whatever strides ``.contiguous`` left them.
    """
    if t.dim() != 4:
        return False
    _, c, h, w = t.stride()
    return c <= w and c < h


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def conv_output_format(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """channels_last when the input or the weight is, as cuDNN and oneDNN decide for ``F.conv2d``: a model
    whose conv weights are channels_last keeps its activations NHWC from the first conv on."""
    return torch.channels_last if is_channels_last(x) or is_channels_last(weight) else torch.contiguous_format


def empty_conv_output(
    x: torch.Tensor, weight: torch.Tensor, h_out: int, w_out: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The uninitialised ``[N, C_out, H_out, W_out]`` output of a convolution of x by weight, in ``dtype``
    (default x's; the stem computes in the weight's) and :func:`conv_output_format` (every kernel and the
    fake implementation allocate through here)."""
    return torch.empty((x.shape[0], weight.shape[0], h_out, w_out), dtype=dtype or x.dtype, device=x.device,
                       memory_format=conv_output_format(x, weight))


def activation_format(x: torch.Tensor) -> torch.memory_format:
    """The format elementwise BatchNorm ops process and return ``x`` in: channels_last for NHWC input
    (dense or not), NCHW otherwise. The CUDA kernels' ``pick_format`` (csrc/ops.cpp) is the same rule."""
    if x.is_contiguous():
        return torch.contiguous_format
    if x.dim() == 4 and (x.is_contiguous(memory_format=torch.channels_last) or x.stride(1) < x.stride(3)):
        return torch.channels_last
    return torch.contiguous_format


def like_layout(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` itself if it already has ``like``'s strides, else a copy with them (``like`` is dense)."""
    return t if t.stride() == like.stride() else torch.empty_like(like).copy_(t)
