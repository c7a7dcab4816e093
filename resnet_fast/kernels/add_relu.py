"""``relu(x + y)`` as one elementwise Triton kernel over the tensors' common dense memory order."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from resnet_fast.kernels.launch import DirectLaunch, cdiv
from resnet_fast.ops.layout import like_layout

# 16-byte vector loads need BLOCK / (32 * num_warps) >= 8 contiguous 16-bit elements per thread.
_BLOCK = 4096
_NUM_WARPS = 8


@triton.jit
def _add_relu_kernel(x_ptr, y_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    # int64 block start: activations of a large batch exceed 2^31 elements.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    x = tl.load(x_ptr + offs, mask=ok).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=ok).to(tl.float32)
    tl.store(out_ptr + offs, tl.maximum(x + y, 0.0).to(out_ptr.dtype.element_ty), mask=ok)


_add_relu = DirectLaunch(_add_relu_kernel)


def add_relu(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``relu(x + y)`` for same-shape, same-dtype tensors of any rank and layout.

    The output has x's strides when x is dense (``torch.empty_like``), else x's suggested memory format.
    Inputs already in that layout (the common case: two channels_last activations) are read in place;
    only an input with a different layout is copied into it first. The sum is formed in float32.
    """
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    x, y = like_layout(x, out), like_layout(y, out)
    with torch.cuda.device_of(x):  # Triton launches on the current CUDA device, not the tensors' one
        _add_relu[(cdiv(out.numel(), _BLOCK),)](x, y, out, out.numel(), BLOCK=_BLOCK, num_warps=_NUM_WARPS)
    return out
