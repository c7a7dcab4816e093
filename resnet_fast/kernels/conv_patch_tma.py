"""Fused convolution over spatial patches with tensor descriptors (TMA): any kernel size, stride, padding
and dilation on channels_last activations with C_in a multiple of 16 (Hopper and newer, or the
interpreter).

The output is tiled as patches of ``PATCH_N x PATCH_H x PATCH_W`` pixels (several images for small
maps) by ``BLOCK_N`` output channels: a GEMM tile of ``BLOCK_M = PATCH_N * PATCH_H * PATCH_W`` pixels.
For each tap (r, t) and channel block, the pixels' operand is one box of x loaded at shifted
coordinates: the tensor memory accelerator computes the addresses and fills what lies outside the image
(padding, negative coordinates included) with zeros, so the main loop has no masks and no address
arithmetic per pixel. The host picks the patch's spatial shape per call (:func:`patch_shape`: the least
padding waste), the autotuner the number of pixels (so of images) per tile.

Stride: input row ``s*oh + r*d - p`` is row ``oh + q`` of the phase ``x[:, ph::s]`` where
``r*d - p = s*q + ph`` and ``0 <= ph < s`` (DESIGN-TMA.md). One descriptor covers every phase: x's NHWC
memory seen as ``[N, H/s_h, s_h, W/s_w, s_w*C]``, so the row phase is a coordinate of its own and the
column phase selects a block of ``C`` channels in the last dimension; every tap is a unit-stride box.
That view is exact when s_h divides H and s_w divides W (true of every ResNet downsample); other maps
go to the gather kernel. The strided 1x1 downsample is the single-tap case: a GEMM over ``x[:, ::2, ::2]``.

The weight is read from its channels_last memory as the matrix ``[C_out, kH*kW*C_in]`` (a K block never
crosses a tap: BLOCK_K divides C_in), the residual and the output as ``[N, H_out, W_out, C_out]`` boxes
of the tile's patch. The shared epilogue (BatchNorm scale and shift from the live tensors, bias,
residual, ReLU) runs on the float32 accumulator before the cast and the descriptor store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from resnet_fast.backends import Unsupported
from resnet_fast.kernels import conv_common, launch
from resnet_fast.kernels.conv_common import accumulate, grouped_tile, nhwc, weight_matrix
from resnet_fast.kernels.epilogue import apply_epilogue, channel_scale_shift
from resnet_fast.ops import layout
from resnet_fast.ops.layout import conv_output_size

__all__ = ["conv_bn_act", "patch_shape", "unsupported_reason"]

_MAX_PATCH = 64  # pixels of one image per tile: the smallest BLOCK_M, so every config takes whole patches


def _set_block_shapes(nargs: dict) -> None:
    """Descriptor boxes for the launch's patch and the config's tile (autotune pre_hook)."""
    ph, pw, bn, bk = (nargs[k] for k in ("PATCH_H", "PATCH_W", "BLOCK_N", "BLOCK_K"))
    pn = nargs["BLOCK_M"] // (ph * pw)
    nargs["x_desc"].block_shape = [pn, ph, 1, pw, bk]
    nargs["w_desc"].block_shape = [bn, bk]
    conv_common.set_output_boxes(nargs, [pn, ph, pw, bn])


# (pixels, output channels, stages, warps). The output channels are wgmma's M side (64 rows per
# warpgroup), the pixels its N side (up to 256).
_GPU_CONFIGS = [
    conv_common.tile_config(*c, _set_block_shapes)
    for c in [
        (256, 128, 3, 8), (128, 256, 3, 8), (128, 128, 4, 8), (128, 128, 4, 4), (256, 64, 4, 4), (128, 64, 4, 4),
        (64, 128, 4, 4), (64, 64, 5, 4),
    ]
]  # fmt: skip
# RESNET_FAST_AUTOTUNE=0: one config that fits every dtype without spilling.
_FIXED_GPU_CONFIG = conv_common.tile_config(128, 64, 3, 4, _set_block_shapes)
_INTERPRETER_CONFIG = conv_common.tile_config(64, 32, 1, 4, _set_block_shapes)


def _prune_configs(configs: list[triton.Config], nargs: dict, **kwargs) -> list[triton.Config]:
    """Configs that fit (:func:`~resnet_fast.kernels.conv_common.fits`; the epilogue reuses the pipeline's
    shared memory), with channel tiles no wider than C_out needs and no more images per tile than the
    batch has (or than the smallest tile holds)."""
    nargs = {**nargs, **kwargs}
    itemsize = nargs["y_desc"].base.element_size()
    patch = nargs["PATCH_H"] * nargs["PATCH_W"]
    widest = max(64, launch.next_power_of_2(nargs["C_out"]))
    images = max(nargs["N"], _MAX_PATCH // patch)
    kept = [
        c for c in configs
        if conv_common.fits(c, nargs["BLOCK_K"], itemsize, 0) and c.kwargs["BLOCK_N"] <= widest
        and c.kwargs["BLOCK_M"] // patch <= images
    ]
    return kept or configs[-1:]


@triton.jit
def _conv_patch_kernel(
    x_desc, w_desc, r_desc, y_desc,
    bias_ptr, bn_weight_ptr, bn_bias_ptr, mean_ptr, var_ptr,
    eps,
    N, H_out, W_out, C_in, C_out,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr,
    RELU: tl.constexpr, UPCAST: tl.constexpr,
    PATCH_H: tl.constexpr, PATCH_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # A tile: BLOCK_M pixels, PATCH_H x PATCH_W of each of PATCH_N images, by BLOCK_N output channels.
    PATCH_N: tl.constexpr = BLOCK_M // (PATCH_H * PATCH_W)
    tiles_h = tl.cdiv(H_out, PATCH_H)
    tiles_w = tl.cdiv(W_out, PATCH_W)
    num_m = tl.cdiv(N, PATCH_N) * tiles_h * tiles_w
    pid_m, pid_n = grouped_tile(tl.program_id(0), num_m, tl.cdiv(C_out, BLOCK_N), GROUP_M)
    n0 = pid_m // (tiles_h * tiles_w) * PATCH_N
    oh0 = pid_m // tiles_w % tiles_h * PATCH_H
    ow0 = pid_m % tiles_w * PATCH_W
    co0 = pid_n * BLOCK_N

    # The transposed product (channels x pixels): the weight tile is wgmma's A operand and the pixel box,
    # reshaped in shared memory, its B operand, so both stay in shared memory (an A operand reshaped
    # from a box would go through registers).
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    # One flat loop over (tap, channel block): the pipeliner overlaps loads only within the innermost
    # loop, and a 64-channel layer has a single channel block per tap.
    c_blocks = C_in // BLOCK_K
    for kb in range(0, KH * KW * c_blocks):
        tap = kb // c_blocks
        r = tap // KW
        t = tap % KW
        c0 = kb % c_blocks * BLOCK_K
        # The tap's offset r*d - p = s*q + ph, floored: shifted by s*p to divide a non-negative number.
        row = r * dil_h - pad_h + stride_h * pad_h
        col = t * dil_w - pad_w + stride_w * pad_w
        x = x_desc.load([n0, oh0 + row // stride_h - pad_h, row % stride_h, ow0 + col // stride_w - pad_w,
                         col % stride_w * C_in + c0])
        w = w_desc.load([co0, tap * C_in + c0])
        acc = accumulate(w, x.reshape(BLOCK_M, BLOCK_K).T, acc, UPCAST)

    offs_n = co0 + tl.arange(0, BLOCK_N)
    scale, shift = channel_scale_shift(offs_n, offs_n < C_out, bias_ptr, bn_weight_ptr, bn_bias_ptr, mean_ptr,
                                       var_ptr, eps)
    residual = None
    if r_desc is not None:
        residual = r_desc.load([n0, oh0, ow0, co0]).reshape(BLOCK_M, BLOCK_N)
    out = apply_epilogue(tl.trans(acc), scale, shift, residual, RELU)
    y_desc.store([n0, oh0, ow0, co0], out.to(y_desc.dtype).reshape(PATCH_N, PATCH_H, PATCH_W, BLOCK_N))


_launch = conv_common.configured(
    _conv_patch_kernel,
    family="patch_tma",
    configs=_GPU_CONFIGS,
    # Descriptors carry no dtype the autotuner would key on: BLOCK_K (a 128-byte row) tells fp32 apart.
    key=["N", "H_out", "W_out", "C_in", "C_out", "KH", "KW", "stride_h", "stride_w", "PATCH_H", "PATCH_W",
         "BLOCK_K"],
    prune=_prune_configs,
    fixed=_FIXED_GPU_CONFIG,
    interpreter=_INTERPRETER_CONFIG,
    direct=False,  # tensor-descriptor arguments: Triton's own launch
)


def patch_shape(n: int, h_out: int, w_out: int) -> tuple[int, int]:
    """``(PATCH_H, PATCH_W)``: the powers of two (at most 64 pixels) whose patches cover the ``[n, h_out,
    w_out]`` output with the fewest wasted pixels when a 64-pixel tile holds ``64 // (PATCH_H * PATCH_W)``
    images; ties go to the larger patch (fewer images per tile), then to the wider one (longer contiguous
    runs). ResNet-50 at batch 256 wastes none: 8x8 at 56x56, 4x4 at 28x28, 2x2 at 14x14, 1x1 at 7x7."""

    def padded(d: int, p: int) -> int:
        return -(-d // p) * p

    candidates = []
    for lh in range(_MAX_PATCH.bit_length()):
        for lw in range(_MAX_PATCH.bit_length() - lh):
            ph, pw = 1 << lh, 1 << lw
            work = padded(n, _MAX_PATCH // (ph * pw)) * padded(h_out, ph) * padded(w_out, pw)
            candidates.append((work, -ph * pw, -pw, (ph, pw)))
    return min(candidates)[-1]


def _block_k(c_in: int, itemsize: int) -> int | None:
    """Channels per K block: a 128-byte row of them, dividing C_in so that a weight box never reaches the
    next tap (and the phase view's column phases, packed along channels, stay apart); tl.dot needs 16."""
    block_k = min(conv_common.ROW_BYTES // itemsize, c_in & -c_in)
    return block_k if block_k >= 16 else None


def unsupported_reason(
    x: torch.Tensor,
    weight: torch.Tensor,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    residual: torch.Tensor | None,
) -> str | None:
    """Why this kernel cannot serve the call (None if it can); checked before anything is launched."""
    reason = conv_common.descriptor_unsupported_reason(x, weight, groups, residual)
    if reason is not None:
        return reason
    h, w = x.shape[2:]
    if h % stride[0] or w % stride[1]:
        return f"a {h}x{w} map is not a whole number of stride-{stride[0]}x{stride[1]} phases"
    if stride[1] > 1 and x.stride(3) != x.shape[1]:
        return "a column stride needs x's pixels packed (column stride C_in)"
    if _block_k(x.shape[1], x.element_size()) is None:
        return f"{x.shape[1]} input channels do not split into blocks of 16"
    return None


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
        x: ``[N, C_in, H, W]`` float32/float16/bfloat16, channels_last (``[N, H, W, C_in]`` in memory, 16-byte
            aligned; any row and image strides, pixels packed under a column stride) with C_in a multiple
            of 16 and H, W divisible by the stride.
        weight: ``[C_out, C_in, kH, kW]`` in x's dtype, dense channels_last (``[C_out, kH, kW, C_in]``).
        bias, bn_weight, bn_bias, running_mean, running_var: ``[C_out]`` or None (no BatchNorm without
            ``running_var``); any floating dtype, read as float32.
        stride, padding, dilation: (h, w) pairs.
        groups: must be 1.
        residual: ``[N, C_out, H_out, W_out]`` dense channels_last, or None.
        relu: apply ReLU after the residual add.
    Returns:
        ``[N, C_out, H_out, W_out]`` in x's dtype, channels_last (``C_out * itemsize`` must be a multiple
        of 16 bytes).
    Raises:
        Unsupported: before any launch, for calls outside the above (:func:`unsupported_reason`).
    """
    reason = unsupported_reason(x, weight, stride, padding, dilation, groups, residual)
    if reason is not None:
        raise Unsupported(f"patch TMA convolution: {reason}")
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    h_out = conv_output_size(h, kh, stride[0], padding[0], dilation[0])
    w_out = conv_output_size(w, kw, stride[1], padding[1], dilation[1])
    y = layout.empty_conv_output(x, weight, h_out, w_out)
    if y.numel() == 0:
        return y
    sh, sw = stride
    # Descriptors start with placeholder boxes: _set_block_shapes gives them the launch's.
    x_phases = TensorDescriptor(nhwc(x), [n, h // sh, sh, w // sw, sw * c_in],
                                [x.stride(0), sh * x.stride(2), x.stride(2), sw * x.stride(3), 1], [1] * 5)
    w_desc = TensorDescriptor.from_tensor(weight_matrix(weight), [1, 1])
    y_desc = TensorDescriptor.from_tensor(nhwc(y), [1] * 4)
    r_desc = None if residual is None else TensorDescriptor.from_tensor(nhwc(residual), [1] * 4)
    ph, pw = patch_shape(n, h_out, w_out)

    def grid(meta: dict) -> tuple[int]:
        images = meta["BLOCK_M"] // (ph * pw)
        tiles = launch.cdiv(n, images) * launch.cdiv(h_out, ph) * launch.cdiv(w_out, pw)
        return (tiles * launch.cdiv(c_out, meta["BLOCK_N"]),)

    # Triton launches on the current CUDA device, not the tensors' one.
    with torch.cuda.device_of(x):
        _launch(
            grid,
            x_phases, w_desc, r_desc, y_desc,
            *map(conv_common.channel_vector, (bias, bn_weight, bn_bias, running_mean, running_var)),
            eps,
            n, h_out, w_out, c_in, c_out,
            *stride, *padding, *dilation,
            KH=kh, KW=kw, RELU=relu, **conv_common.dot_flags(x.dtype),
            PATCH_H=ph, PATCH_W=pw, BLOCK_K=_block_k(c_in, x.element_size()),
        )
    return y
