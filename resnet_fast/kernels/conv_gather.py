"""Fused convolution by gathering: ``relu?(bn(conv2d(x, W) + bias) + residual)`` as one implicit-GEMM kernel.

The convolution is a GEMM ``[M, K] x [K, C_out]`` with ``M = N * H_out * W_out`` output pixels and
``K = kH * kW * C_in`` taps; the A operand is never materialised (each tile is gathered from x with
masked loads, which also gives the zero padding). Accumulation is in float32 and the shared epilogue
(:mod:`resnet_fast.kernels.epilogue`: BatchNorm scale and shift from the live tensors, residual, ReLU)
runs on the accumulator before the cast and the single store.

Layouts: every tensor is addressed through its strides, so NCHW, channels_last and strided views all
work; channels_last activations and weights (``[C_out, kH, kW, C_in]`` in memory, the layout resnet_fast
models keep on CUDA) make the channel loads contiguous and are the fast path. Nothing is copied per call.
This is the general path: any channel count, alignment, layout and GPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from resnet_fast.backends import Unsupported
from resnet_fast.kernels import conv_common
from resnet_fast.kernels.conv_common import (
    SHARED_MEMORY, accumulate, accumulators_fit, channel_vector, configured, dot_flags, grouped_tile,
)
from resnet_fast.kernels.epilogue import apply_epilogue, channel_scale_shift
from resnet_fast.kernels.launch import DirectLaunch, cdiv, next_power_of_2
from resnet_fast.ops import layout
from resnet_fast.ops.layout import conv_output_size

# Tile shapes for the GPU autotuner, from wide (large layers) to narrow (few output channels or pixels).
_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
    for bm, bn, bk, s, w in [
        (128, 256, 64, 3, 8),
        (256, 128, 64, 3, 8),
        (128, 128, 64, 4, 8),
        (128, 128, 32, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 64, 5, 4),
        (64, 64, 32, 4, 8),  # the widest that exact float32 (FMA) runs without spilling
        (128, 32, 64, 4, 4),
        (64, 32, 32, 5, 4),
        # Small M (batch 1: layer4 has 49 output pixels, layer3 196), usually with split-K.
        (32, 64, 64, 4, 4),
        (16, 128, 64, 4, 4),
    ]
]
# Under the interpreter each program costs milliseconds: large tiles, one fixed config.
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16, "GROUP_M": 8}, num_warps=4)
# RESNET_FAST_AUTOTUNE=0: one config that fits in every dtype without spilling, instead of
# compiling and timing each candidate on the first call per shape (quick first calls, e.g. for tests).
_FIXED_GPU_CONFIG = triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8}, num_stages=3, num_warps=4)
_SMALL_M = 4096  # output pixels under which tiles shorter than 64 rows, and split-K, are considered


def _prune_configs(configs: list[triton.Config], nargs: dict, **kwargs) -> list[triton.Config]:
    """The configs worth timing for this problem: pipeline buffers ((BLOCK_M + BLOCK_N) * BLOCK_K
    elements per stage) that fit in shared memory for x's dtype, an accumulator that fits in registers
    (:func:`~resnet_fast.kernels.conv_common.accumulators_fit`), column tiles no wider than C_out needs,
    row tiles no taller than M needs, and the small-M tiles only where M is small. Saves compiling and
    timing configs that cannot win."""
    nargs = {**nargs, **kwargs}
    itemsize = nargs["x_ptr"].element_size()
    widest = max(32, next_power_of_2(nargs["C_out"]))
    tallest = max(16, next_power_of_2(nargs["M"]))
    kept = [
        c
        for c in configs
        if (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"] * itemsize * c.num_stages <= SHARED_MEMORY
        and accumulators_fit(c, itemsize)
        and c.kwargs["BLOCK_N"] <= widest
        and c.kwargs["BLOCK_M"] <= tallest
        and (c.kwargs["BLOCK_M"] >= 64 or nargs["M"] <= _SMALL_M)
    ]
    return kept or configs[-1:]


@triton.jit
def _epilogue_store(
    acc, offs_m, offs_n, M, C_out, H_out, W_out,
    bias_ptr, bn_weight_ptr, bn_bias_ptr, mean_ptr, var_ptr, eps, r_ptr, y_ptr,
    sr_n, sr_c, sr_h, sr_w, sy_n, sy_c, sy_h, sy_w, RELU: tl.constexpr,
):
    """The shared epilogue on a float32 [BLOCK_M, BLOCK_N] tile of output pixels x channels, then the
    cast and the store, both addressed through the strides (int64: a batch may exceed 2^31 elements)."""
    m_ok = offs_m < M
    n_ok = offs_n < C_out
    out_ok = m_ok[:, None] & n_ok[None, :]
    ow = (offs_m % W_out).to(tl.int64)
    oh = ((offs_m // W_out) % H_out).to(tl.int64)
    img = (offs_m // (W_out * H_out)).to(tl.int64)
    n64 = offs_n.to(tl.int64)
    residual = None
    if r_ptr is not None:
        r_off = (img * sr_n + oh * sr_h + ow * sr_w)[:, None] + n64[None, :] * sr_c
        residual = tl.load(r_ptr + r_off, mask=out_ok, other=0.0)
    scale, shift = channel_scale_shift(offs_n, n_ok, bias_ptr, bn_weight_ptr, bn_bias_ptr, mean_ptr, var_ptr, eps)
    acc = apply_epilogue(acc, scale, shift, residual, RELU)
    y_off = (img * sy_n + oh * sy_h + ow * sy_w)[:, None] + n64[None, :] * sy_c
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _conv_gather_kernel(
    x_ptr, w_ptr, bias_ptr, bn_weight_ptr, bn_bias_ptr, mean_ptr, var_ptr, r_ptr, y_ptr, ws_ptr,
    eps,
    M, C_in, H, W, C_out, H_out, W_out,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    sx_n, sx_c, sx_h, sx_w,
    sw_o, sw_c, sw_h, sw_w,
    sr_n, sr_c, sr_h, sr_w,
    sy_n, sy_c, sy_h, sy_w,
    KH: tl.constexpr, KW: tl.constexpr,
    RELU: tl.constexpr, UPCAST: tl.constexpr, FLAT_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(C_out, BLOCK_N), GROUP_M)
    # Split-K: program pid_k takes every SPLIT_K-th block of the reduction (interleaved, so each split
    # sees every tap), and writes its float32 partial sum for _split_k_reduce_kernel.
    pid_k = tl.program_id(1)

    # Output pixel m = (n, oh, ow). Activation offsets are int64: a batch (even one NCHW image) may
    # exceed 2^31 elements; weight offsets stay int32.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < C_out
    ow = offs_m % W_out
    oh = (offs_m // W_out) % H_out
    img = (offs_m // (W_out * H_out)).to(tl.int64)
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_img = x_ptr + img * sx_n
    w_col = w_ptr + offs_n * sw_o

    # The transposed product, channels x pixels (weight tile @ pixel tile): in the MMA layout a thread then
    # holds few output channels, so the epilogue's per-channel vectors cost few registers (pixels x
    # channels spills); tl.trans relabels the accumulator for the epilogue at no cost.
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    # What a pixel's loads depend on besides the tap is loop-invariant: the address of its tap (0, 0), and
    # which taps fall inside the image (bit r of row_taps, bit s of col_taps; none for a pixel past M).
    # A tap then adds one offset to each pixel's address and tests two bits, where recomputing rows,
    # columns, bounds and 64-bit products made most of the main loop's instructions (BENCHMARKS.md, "The
    # gather kernel's main loop"). KH and KW are at most 31 (the launcher checks).
    x_pix0 = x_img + ih0.to(tl.int64) * sx_h + iw0.to(tl.int64) * sx_w
    row_taps = tl.zeros_like(offs_m)
    for tap_r in tl.static_range(KH):
        ih = ih0 + tap_r * dil_h
        row_taps |= ((ih >= 0) & (ih < H) & m_ok).to(tl.int32) << tap_r
    col_taps = tl.zeros_like(offs_m)
    for tap_s in tl.static_range(KW):
        iw = iw0 + tap_s * dil_w
        col_taps |= ((iw >= 0) & (iw < W)).to(tl.int32) << tap_s
    if FLAT_K:
        # C_in under BLOCK_K (the 3-channel stem): K flattened over (r, s, c), so that a K block holds
        # several taps instead of padding each tap's channels to BLOCK_K.
        for k0 in range(pid_k * BLOCK_K, KH * KW * C_in, BLOCK_K * SPLIT_K):
            k = k0 + offs_k
            k_ok = k < KH * KW * C_in
            c = k % C_in
            tap = tl.where(k_ok, k // C_in, 0)  # past K: tap 0, masked (and no shift past 31 bits)
            r = tap // KW
            s = tap - r * KW
            inside = ((row_taps[None, :] >> r[:, None]) & (col_taps[None, :] >> s[:, None]) & 1) != 0
            x_offset = (r * dil_h).to(tl.int64) * sx_h + (s * dil_w).to(tl.int64) * sx_w + c.to(tl.int64) * sx_c
            x_tile = tl.load(x_pix0[None, :] + x_offset[:, None], mask=inside & k_ok[:, None], other=0.0)
            w_tap = r * sw_h + s * sw_w + c * sw_c
            w_tile = tl.load(w_col[:, None] + w_tap[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc = accumulate(w_tile, x_tile, acc, UPCAST)
    else:
        # Each K block is one tap (r, s) and one channel block: one uniform offset per pixel. One flat
        # loop over (tap, channel block) rather than nested loops: the pipeliner overlaps loads only
        # within the innermost loop, and a 64-channel layer has a single channel block per tap.
        c_blocks = tl.cdiv(C_in, BLOCK_K)
        for kb in range(pid_k, KH * KW * c_blocks, SPLIT_K):
            if KH * KW == 1:
                r = 0
                s = 0
                cb = kb
            else:
                tap = kb // c_blocks
                cb = kb - tap * c_blocks
                r = tap // KW
                s = tap - r * KW
            c = cb * BLOCK_K + offs_k
            c_ok = c < C_in
            pix_ok = ((row_taps >> r) & (col_taps >> s) & 1) != 0
            tap_offset = (r * dil_h).to(tl.int64) * sx_h + (s * dil_w).to(tl.int64) * sx_w
            x_tile = tl.load((x_pix0 + tap_offset)[None, :] + c[:, None].to(tl.int64) * sx_c,
                             mask=c_ok[:, None] & pix_ok[None, :], other=0.0)
            w_tap = w_col + r * sw_h + s * sw_w
            w_tile = tl.load(w_tap[:, None] + c[None, :] * sw_c, mask=n_ok[:, None] & c_ok[None, :], other=0.0)
            acc = accumulate(w_tile, x_tile, acc, UPCAST)

    acc = tl.trans(acc)
    if SPLIT_K == 1:
        _epilogue_store(
            acc, offs_m, offs_n, M, C_out, H_out, W_out, bias_ptr, bn_weight_ptr, bn_bias_ptr, mean_ptr, var_ptr,
            eps, r_ptr, y_ptr, sr_n, sr_c, sr_h, sr_w, sy_n, sy_c, sy_h, sy_w, RELU,
        )
    else:
        ws_off = (pid_k * M + offs_m).to(tl.int64)[:, None] * C_out + offs_n[None, :]
        tl.store(ws_ptr + ws_off, acc, mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _split_k_reduce_kernel(
    ws_ptr, bias_ptr, bn_weight_ptr, bn_bias_ptr, mean_ptr, var_ptr, r_ptr, y_ptr,
    eps, M, C_out, H_out, W_out,
    sr_n, sr_c, sr_h, sr_w,
    sy_n, sy_c, sy_h, sy_w,
    RELU: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Sums the SPLIT_K float32 partials ``ws[SPLIT_K, M, C_out]`` in a fixed order (deterministic), then
    the same epilogue and store as the unsplit kernel."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (offs_m < M)[:, None] & (offs_n < C_out)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(SPLIT_K):
        acc += tl.load(ws_ptr + (k * M + offs_m).to(tl.int64)[:, None] * C_out + offs_n[None, :], mask=ok, other=0.0)
    _epilogue_store(
        acc, offs_m, offs_n, M, C_out, H_out, W_out, bias_ptr, bn_weight_ptr, bn_bias_ptr, mean_ptr, var_ptr,
        eps, r_ptr, y_ptr, sr_n, sr_c, sr_h, sr_w, sy_n, sy_c, sy_h, sy_w, RELU,
    )


_launch = configured(
    _conv_gather_kernel,
    family="gather",
    configs=_GPU_CONFIGS,
    key=["M", "C_in", "C_out", "KH", "KW", "stride_h", "stride_w", "dil_h", "dil_w", "SPLIT_K"],
    prune=_prune_configs,
    fixed=_FIXED_GPU_CONFIG,
    interpreter=_INTERPRETER_CONFIG,
    # Few input channels (the 3-channel stem): flatten (r, s, c) into K so that a K block holds several
    # taps instead of padding every tap's 3 channels to BLOCK_K.
    heuristics={"FLAT_K": lambda meta: meta["C_in"] < meta["BLOCK_K"]},
)


# Split-K: a layer whose output tiles cannot fill the GPU (batch 1: layer4 has 49 output pixels) splits
# its reduction across programs, as long as each split keeps enough K blocks to pipeline.
_MIN_K_BLOCKS_PER_SPLIT = 4
_MAX_SPLIT_K = 16
_REDUCE_BLOCK = {"BLOCK_M": 32, "BLOCK_N": 64}
_split_k_reduce = DirectLaunch(_split_k_reduce_kernel)


def split_k(m: int, c_out: int, k_blocks: int, multiprocessors: int) -> int:
    """How many ways to split the reduction of a conv with ``m`` output pixels, ``c_out`` channels and
    ``k_blocks`` 64-wide K blocks: the power of two that brings the tile count (counted with 64x128
    tiles) up to the multiprocessor count, keeping at least 4 K blocks per split."""
    if m > _SMALL_M:
        return 1
    tiles = cdiv(m, 64) * cdiv(c_out, 128)
    split = 1
    while (
        split < _MAX_SPLIT_K
        and tiles * split * 2 <= multiprocessors
        and k_blocks // (split * 2) >= _MIN_K_BLOCKS_PER_SPLIT
    ):
        split *= 2
    return split


def _split_k_for(x: torch.Tensor, m: int, c_out: int, k_blocks: int) -> int:
    """``RESNET_FAST_SPLIT_K`` when set (tests, tuning), else :func:`split_k` on x's GPU (1 elsewhere)."""
    forced = os.environ.get("RESNET_FAST_SPLIT_K")
    if forced:
        return max(1, int(forced))
    return split_k(m, c_out, k_blocks, conv_common.multiprocessors(x.device))


def _workspace(split: int, m: int, c_out: int, device: torch.device) -> torch.Tensor:
    """The float32 partial sums of a split-K launch, ``[split, M, C_out]`` (one function: tests poison it)."""
    return torch.empty((split, m, c_out), dtype=torch.float32, device=device)


def conv_bn_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    eps: float,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    residual: torch.Tensor | None,
    relu: bool,
) -> torch.Tensor:
    """``relu?(bn(conv2d(x, weight, bias, stride, padding, dilation)) + residual)`` in one kernel launch.

    Arguments are those of :func:`resnet_fast.ops.reference.conv_bn_act`, already validated.

    Args:
        x: ``[N, C_in, H, W]`` float32/float16/bfloat16, any strides (channels_last is the fast path).
        weight: ``[C_out, C_in, kH, kW]``, x's dtype, any strides; channels_last (``[C_out, kH, kW, C_in]``
            in memory) is the fast path.
        bias, bn_weight, bn_bias, running_mean, running_var: ``[C_out]`` or None (no BatchNorm without
            ``running_var``); any floating dtype, read as float32.
        stride, padding, dilation: (h, w) pairs.
        groups: must be 1: grouped convolutions (ResNeXt) raise :class:`Unsupported`, which sends the
            call to the reference backend (or raises in strict mode), as do more than 2^31 output pixels.
        residual: ``[N, C_out, H_out, W_out]`` with any strides, or None.
        relu: apply ReLU after the residual add.
    Returns:
        ``[N, C_out, H_out, W_out]`` in x's dtype and :func:`~resnet_fast.ops.layout.conv_output_format`.
    """
    if groups != 1:
        raise Unsupported(f"grouped convolution (groups={groups}) runs on the reference backend")
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    h_out = conv_output_size(h, kh, stride[0], padding[0], dilation[0])
    w_out = conv_output_size(w, kw, stride[1], padding[1], dilation[1])
    m = n * h_out * w_out
    if m + 256 >= 2**31:  # pixel indices (and the last tile's) are int32; element offsets are int64
        raise Unsupported(f"{m} output pixels exceed the kernel's 32-bit pixel index")
    if kh > 31 or kw > 31:  # a pixel's in-image taps are int32 bit masks
        raise Unsupported(f"a {kh}x{kw} kernel exceeds the gather kernel's 31 taps per axis")
    y = layout.empty_conv_output(x, weight, h_out, w_out)
    if m == 0 or c_out == 0:
        return y
    r_strides = residual.stride() if residual is not None else (0, 0, 0, 0)
    channel = [channel_vector(t) for t in (bias, bn_weight, bn_bias, running_mean, running_var)]
    split = _split_k_for(x, m, c_out, kh * kw * cdiv(c_in, 64))
    workspace = _workspace(split, m, c_out, x.device) if split > 1 else None

    def grid(meta: dict) -> tuple[int, int]:
        return cdiv(m, meta["BLOCK_M"]) * cdiv(c_out, meta["BLOCK_N"]), split

    # Triton launches on the current CUDA device, not the tensors' one.
    with torch.cuda.device_of(x):
        _launch(
            grid,
            x, weight, *channel, residual, y, workspace,
            eps,
            m, c_in, h, w, c_out, h_out, w_out,
            *stride, *padding, *dilation,
            *x.stride(), *weight.stride(), *r_strides, *y.stride(),
            KH=kh, KW=kw, RELU=relu, SPLIT_K=split, **dot_flags(x.dtype),
        )
        if split > 1:
            reduce_grid = (cdiv(m, _REDUCE_BLOCK["BLOCK_M"]), cdiv(c_out, _REDUCE_BLOCK["BLOCK_N"]))
            _split_k_reduce[reduce_grid](
                workspace, *channel, residual, y, eps, m, c_out, h_out, w_out, *r_strides, *y.stride(),
                RELU=relu, SPLIT_K=split, **_REDUCE_BLOCK,
            )
    return y
