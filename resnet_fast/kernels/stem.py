"""The ImageNet stem as one kernel: the caller's image batch -> conv1 7x7/2 + BatchNorm + ReLU + 3x3/2 max-pool.

:func:`fused_stem` computes :func:`resnet_fast.ops.reference.stem` in a single pass: it reads x as the
caller gives it (NCHW or channels_last, float32 or the model's dtype, cast to the weight's dtype as it is
loaded), runs the convolution as an implicit GEMM on the tensor cores with the shared epilogue
(:mod:`resnet_fast.kernels.epilogue`: BatchNorm scale and shift from the live tensors, ReLU), max-pools in
registers and writes only the pooled activation. The 112x112 convolution output of a 224x224 image never
goes to memory, and neither does a converted copy of the input.

K layout: 2x2 space-to-depth. The 7x7 stride-2 kernel, padded in the load to 8x8 with a zero first row and
column (input offset -4 instead of the padding of 3), is a 4x4 stride-1 kernel over 2x2 pixel cells: each
input channel contributes exactly 64 taps, one K block of 64, so K = 64 * C_in is a multiple of the
tensor-core K step for every channel count (1 for grayscale, 3, 4, ...), with no ragged K tail to mask.
Padding C 3 -> 4 instead gives K = 4 * 49 = 196, more than 192 and a multiple of no K block (a masked
tail, or 224 / 256 after rounding up), and C -> 8 doubles it; so space-to-depth. Either way the padding
lives in the load masks: no padded copy of the weight is stored.

Tiling and the fused pool: a program owns BLOCK_M pooled pixels that share a pooled row (``M`` runs over
(image, pooled column)), a strip of ROWS pooled rows and BLOCK_N output channels, and walks down its strip.
Pooled row p is the max over conv rows 2p-1, 2p and 2p+1, and conv row 2p+1 is also the first row of
pooled row p+1's window, so it is carried in registers to the next step: each conv row is computed once,
plus one halo row (2 * first_row - 1) per strip. Along a row, the window's three columns 2q-1, 2q, 2q+1
of pooled column q are three GEMMs on the same M rows (Triton cannot shift a register tile along M to
reuse the neighbour's column), so columns cost 1.5x: in all about 1.5x the minimal conv work (times
192/147 for the padded taps) and no extra memory traffic.
Window positions outside the convolution's output count as 0: after the ReLU every value is >= 0 and
every window holds at least its centre, so the max is unchanged.

Offsets: a tile's first image is addressed in int64 (a batch may exceed 2^31 elements), everything from
there in int32 (int64 address tiles do not fit in registers next to the accumulators); where the few
images one tile spans would overflow that, :class:`~resnet_fast.backends.Unsupported` sends the call to
the reference backend.

:func:`stem` is the ``"triton"`` backend's ``stem``: :func:`fused_stem` once selected, until a GPU run has
measured it (BENCHMARKS.md), otherwise the gather kernel's convolution followed by torch's max-pool.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from resnet_fast.backends import Unsupported
from resnet_fast.kernels import conv
from resnet_fast.kernels.conv_common import (
    accumulate, channel_vector, configured, dot_flags, float32_unsupported_reason,
)
from resnet_fast.kernels.epilogue import apply_epilogue, channel_scale_shift
from resnet_fast.kernels.launch import cdiv, next_power_of_2
from resnet_fast.ops import layout
from resnet_fast.ops.reference import STEM_CONV, STEM_POOL, stem_sizes

__all__ = ["DEFAULT", "STEM_KERNELS", "conv_then_pool", "fused_stem", "stem"]

# BLOCK_M pooled pixels x BLOCK_N channels per program, ROWS pooled rows walked down per program (fewer
# rows: more programs for small batches; more: fewer halo rows). 64-row tiles over 8 warps with 2 stages
# compile for sm_90 without register spills in every dtype and layout, with triton 3.6 and 3.8
# (tests/test_stem.py); 128-row tiles spill at 8 warps and hit the 128-register cap at 16, and a third
# stage spills float32 weights.
_GPU_CONFIGS = [triton.Config({"BLOCK_M": 64, "ROWS": rows}, num_warps=8, num_stages=2) for rows in (8, 16, 4, 2)]
_FIXED_GPU_CONFIG = _GPU_CONFIGS[0]
# Under the interpreter each program costs milliseconds: wide tiles and long strips.
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 64, "ROWS": 16}, num_warps=4)
_MAX_BLOCK_M = max(c.kwargs["BLOCK_M"] for c in (*_GPU_CONFIGS, _INTERPRETER_CONFIG))
_MAX_BLOCK_N = 64  # ResNet stems have 64 channels; wider stems take more channel blocks


@triton.jit
def _conv_row_window_max(
    x_tile, x_pix, m_ok, w_ptr, w_tap, w_ok, r, s, tap_ok, scale, shift, conv_row, pooled_col,
    C_in, H, W, H_conv, W_conv, sx_c, sx_h, sx_w, sw_c,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``relu(bn(conv))`` at conv row ``conv_row`` (a scalar), maxed over the pool window's three columns of
    each pooled column ``pooled_col`` (``[BLOCK_M]``): ``[BLOCK_M, BLOCK_N]`` float32. Window positions
    outside the convolution's output count as 0.

    ``x_tile + x_pix`` is each M row's image; ``w_ptr + w_tap`` (mask ``w_ok``) the ``[64 taps, BLOCK_N]``
    weight tile of channel 0; ``r``, ``s`` and ``tap_ok`` the taps' row, column and realness (``[64]``)."""
    ih = 2 * conv_row - 4 + r  # stride 2; -4 = -(padding 3) - (the padding row)
    row_ok = tap_ok & (ih >= 0) & (ih < H)
    row_inside = (conv_row >= 0) & (conv_row < H_conv)
    best = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # A runtime loop, not static_range: unrolled, the compiler hoists all three columns' gather addresses
    # out of the row loop and spills them.
    for j in range(3):
        conv_col = 2 * pooled_col - 1 + j
        iw = 2 * conv_col[:, None] - 4 + s[None, :]  # [BLOCK_M, 64 taps]
        x_tap = x_pix[:, None] + (ih * sx_h)[None, :] + iw * sx_w
        x_ok = m_ok[:, None] & row_ok[None, :] & (iw >= 0) & (iw < W)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for c in range(C_in):  # one K block of 64 taps per input channel
            b = tl.load(w_ptr + (w_tap + c * sw_c), mask=w_ok, other=0.0)
            a = tl.load(x_tile + (x_tap + c * sx_c), mask=x_ok, other=0.0).to(b.dtype)  # cast to the compute dtype
            acc = accumulate(a, b, acc, UPCAST)
        act = apply_epilogue(acc, scale, shift, None, True)
        inside = row_inside & (conv_col >= 0) & (conv_col < W_conv)
        best = tl.maximum(best, tl.where(inside[:, None], act, 0.0))
    return best


@triton.jit
def _stem_kernel(
    x_ptr, w_ptr, bias_ptr, bn_weight_ptr, bn_bias_ptr, mean_ptr, var_ptr, y_ptr,
    eps,
    M, C_in, H, W, C_out, H_conv, W_conv, H_pool, W_pool,
    sx_n, sx_c, sx_h, sx_w,
    sw_o, sw_c, sw_h, sw_w,
    sy_n, sy_c, sy_h, sy_w,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
):
    # Programs: (block of (image, pooled column) pairs, strip of ROWS pooled rows, block of channels).
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    first_row = tl.program_id(1) * ROWS
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < C_out
    pooled_col = offs_m % W_pool
    # Offsets are int32 from the tile's first image, whose own offset is int64 (the launcher checks that
    # the tile's images fit): int64 address tiles would not fit in registers.
    first_img = (tl.program_id(0) * BLOCK_M) // W_pool
    img = offs_m // W_pool - first_img
    x_tile = x_ptr + first_img.to(tl.int64) * sx_n
    y_tile = y_ptr + first_img.to(tl.int64) * sy_n
    x_pix = img * sx_n
    y_pix = img * sy_n + pooled_col * sy_w
    # K: the 64 taps of the kernel padded to 8x8 (one input channel at a time); row 0 and column 0 are the
    # padding, zero in the load.
    r = tl.arange(0, 64) // 8
    s = tl.arange(0, 64) % 8
    tap_ok = (r > 0) & (s > 0)
    w_tap = (offs_n * sw_o)[None, :] + ((r - 1) * sw_h + (s - 1) * sw_w)[:, None]  # [64 taps, BLOCK_N]
    w_ok = tap_ok[:, None] & n_ok[None, :]
    scale, shift = channel_scale_shift(offs_n, n_ok, bias_ptr, bn_weight_ptr, bn_bias_ptr, mean_ptr, var_ptr, eps)

    # Pooled row p is the max over conv rows 2p-1, 2p and 2p+1. Walking down the conv rows from the halo
    # row 2*first_row - 1, an odd row 2p+1 closes pooled row p and opens row p+1's window.
    window = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for conv_row in range(2 * first_row - 1, 2 * min(first_row + ROWS, H_pool)):
        row = _conv_row_window_max(
            x_tile, x_pix, m_ok, w_ptr, w_tap, w_ok, r, s, tap_ok, scale, shift, conv_row, pooled_col,
            C_in, H, W, H_conv, W_conv, sx_c, sx_h, sx_w, sw_c, UPCAST, BLOCK_M, BLOCK_N,
        )
        window = tl.maximum(window, row)
        if conv_row % 2 != 0:
            closed = conv_row > 2 * first_row  # the halo row closes no row of this strip
            y_off = (y_pix + (conv_row // 2) * sy_h)[:, None] + (offs_n * sy_c)[None, :]
            y_ok = (m_ok & closed)[:, None] & n_ok[None, :]
            tl.store(y_tile + y_off, window.to(y_ptr.dtype.element_ty), mask=y_ok)
            window = row


_launch = configured(
    _stem_kernel,
    family="stem",
    configs=_GPU_CONFIGS,
    key=["M", "C_in", "C_out", "H", "W"],
    prune=lambda configs, nargs, **kwargs: configs,
    fixed=_FIXED_GPU_CONFIG,
    interpreter=_INTERPRETER_CONFIG,
)


def _tile_span(t: torch.Tensor, images: int) -> int:
    """Elements of ``t`` from the start of one image to the end of the ``images``-th image after it."""
    return 1 + images * t.stride(0) + sum((size - 1) * stride for size, stride in zip(t.shape[1:], t.stride()[1:]))


def fused_stem(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """:func:`resnet_fast.ops.reference.stem` in one kernel launch; arguments already validated.

    Args:
        x: ``[N, C_in, H, W]``, any floating dtype and strides (NCHW and channels_last both read directly).
        weight: ``[C_out, C_in, 7, 7]``, any strides; its dtype is the compute and output dtype.
        bias, bn_weight, bn_bias, running_mean, running_var: ``[C_out]`` or None (no BatchNorm without
            ``running_var``); any floating dtype, read as float32.
    Returns:
        ``[N, C_out, H_pool, W_pool]`` in the weight's dtype and
        :func:`~resnet_fast.ops.layout.conv_output_format` (channels_last for the models' CUDA weights).
    """
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    (h_conv, h_pool), (w_conv, w_pool) = stem_sizes(h), stem_sizes(w)
    m = n * w_pool
    images = max(0, min(n - 1, (_MAX_BLOCK_M - 1) // w_pool + 1))  # how far past its first image a tile reaches
    pooled_image = c_out * h_pool * w_pool  # the output is dense, in either layout
    if max(_tile_span(x, images), (images + 1) * pooled_image, m + _MAX_BLOCK_M) >= 2**31:
        raise Unsupported(f"the stem kernel's 32-bit offsets within a tile cannot address x {tuple(x.shape)} with "
                          f"strides {x.stride()} (or its output)")
    y = layout.empty_conv_output(x, weight, h_pool, w_pool, dtype=weight.dtype)
    if y.numel() == 0:
        return y
    channel = [channel_vector(t) for t in (bias, bn_weight, bn_bias, running_mean, running_var)]
    block_n = max(16, min(_MAX_BLOCK_N, next_power_of_2(c_out)))

    def grid(meta: dict) -> tuple[int, int, int]:
        return cdiv(m, meta["BLOCK_M"]), cdiv(h_pool, meta["ROWS"]), cdiv(c_out, block_n)

    with torch.cuda.device_of(x):  # Triton launches on the current CUDA device, not the tensors' one
        _launch(
            grid,
            x, weight, *channel, y,
            eps,
            m, c_in, h, w, c_out, h_conv, w_conv, h_pool, w_pool,
            *x.stride(), *weight.stride(), *y.stride(),
            BLOCK_N=block_n, **dot_flags(weight.dtype),
        )
    return y


def conv_then_pool(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps) -> torch.Tensor:
    """The stem as before :func:`fused_stem` (same arguments and result): x cast in a pass of its own, the
    Triton convolution (:func:`resnet_fast.kernels.conv.conv_bn_act`), then torch's max-pool."""
    _, stride, padding = STEM_CONV
    act = conv.conv_bn_act(x.to(weight.dtype), weight, bias, bn_weight, bn_bias, running_mean, running_var, eps,
                           (stride, stride), (padding, padding), (1, 1), 1, None, True)
    return F.max_pool2d(act, *STEM_POOL).contiguous(memory_format=layout.conv_output_format(x, weight))


# The "triton" backend's stem. The default changes to "fused" once a GPU run has measured it faster
# (BENCHMARKS.md names that run); RESNET_FAST_STEM_KERNEL=<name> forces one, as RESNET_FAST_CONV_KERNEL
# does for the convolutions (resnet_fast.kernels.conv).
STEM_KERNELS: dict[str, Callable[..., torch.Tensor]] = {"fused": fused_stem, "conv_then_pool": conv_then_pool}
DEFAULT = "conv_then_pool"


def stem(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps):
    """The ``"triton"`` backend's ``stem``: the selected (or forced) implementation."""
    name = os.environ.get("RESNET_FAST_STEM_KERNEL") or DEFAULT
    if name not in STEM_KERNELS:
        raise Unsupported(f"RESNET_FAST_STEM_KERNEL={name!r} is not one of {sorted(STEM_KERNELS)}")
    reason = float32_unsupported_reason(weight)  # the weight's dtype is the compute dtype
    if reason is not None:
        raise Unsupported(reason)
    return STEM_KERNELS[name](x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps)
