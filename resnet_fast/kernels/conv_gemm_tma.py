"""Fused 1x1 convolution as a persistent GEMM with tensor descriptors (TMA): ``relu?(bn(x @ W^T + bias)
+ residual)`` over NHWC rows (Hopper and newer, or the interpreter).

A 1x1, stride-1, unpadded convolution of channels_last x is the GEMM ``[N*H*W, C_in] x [C_in, C_out]``
over x's memory as it is: 2-D descriptors address the activation rows ``[M, C_in]``, the weight
``[C_out, C_in]``, and the residual and the output ``[M, C_out]``. The tensor memory accelerator loads
the tiles into swizzled shared memory that wgmma reads directly, fills the ragged edges (M, C_in) with
zeros and clips the output store; the kernel computes no addresses and no masks.

Persistent: one program per multiprocessor walks the tiles in grouped order (GROUP_M row tiles per weight
column tile, while that stays in L2), and the flattened loop lets the pipeliner fetch the next tile's
first blocks during this tile's epilogue. The epilogue is the shared one
(:mod:`resnet_fast.kernels.epilogue`: BatchNorm scale and shift from the live tensors, bias, residual,
ReLU) on the float32 accumulator, then one cast and a descriptor store.
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

__all__ = ["conv_bn_act", "unsupported_reason"]

_INTERPRETER_PROGRAMS = 3  # few programs, several tiles each: the persistent loop runs under test


def _set_block_shapes(nargs: dict) -> None:
    """Descriptor boxes for the config's tile (autotune pre_hook)."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    nargs["x_desc"].block_shape = [bm, bk]
    nargs["w_desc"].block_shape = [bn, bk]
    conv_common.set_output_boxes(nargs, [bm, bn])


_GPU_CONFIGS = [
    conv_common.tile_config(*c, _set_block_shapes)
    for c in [(128, 128, 5, 8), (128, 128, 4, 8), (128, 128, 4, 4), (128, 64, 4, 4), (64, 128, 4, 4), (64, 64, 5, 4)]
]  # fmt: skip
# RESNET_FAST_AUTOTUNE=0: one config that fits every dtype without spilling.
_FIXED_GPU_CONFIG = conv_common.tile_config(128, 64, 3, 4, _set_block_shapes)
_INTERPRETER_CONFIG = conv_common.tile_config(64, 32, 1, 4, _set_block_shapes)


def _prune_configs(configs: list[triton.Config], nargs: dict, **kwargs) -> list[triton.Config]:
    """Configs that fit (:func:`~resnet_fast.kernels.conv_common.fits`) with the output tile and a
    residual's apart from the pipeline buffers, as the flattened persistent loop keeps them (counted
    whether or not this call has a residual: the tuned config is cached per shape, and ResNet-50 runs a
    64 -> 256 1x1 at 56x56 both with one and without), with channel tiles no wider than C_out needs."""
    nargs = {**nargs, **kwargs}
    itemsize = nargs["y_desc"].base.element_size()
    widest = max(64, launch.next_power_of_2(nargs["C_out"]))
    kept = [c for c in configs if conv_common.fits(c, nargs["BLOCK_K"], itemsize, 2) and c.kwargs["BLOCK_N"] <= widest]
    return kept or configs[-1:]


@triton.jit
def _conv1x1_gemm_kernel(
    x_desc, w_desc, r_desc, y_desc,
    bias_ptr, bn_weight_ptr, bn_bias_ptr, mean_ptr, var_ptr,
    eps,
    M, C_in, C_out, num_programs,
    RELU: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(C_out, BLOCK_N)
    k_blocks = tl.cdiv(C_in, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_m * num_n, num_programs, flatten=True):
        pid_m, pid_n = grouped_tile(tile, num_m, num_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        # The transposed product (channels x pixels), as in conv_patch_tma: a thread of the wgmma
        # accumulator then holds a few channels, so the epilogue's per-channel vectors cost a few
        # registers instead of BLOCK_N / 2 (which spilled at 128 x 128).
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for kb in range(k_blocks):
            w = w_desc.load([off_n, kb * BLOCK_K])
            x = x_desc.load([off_m, kb * BLOCK_K])
            acc = accumulate(w, x.T, acc, UPCAST)

        offs_n = off_n + tl.arange(0, BLOCK_N)
        scale, shift = channel_scale_shift(offs_n, offs_n < C_out, bias_ptr, bn_weight_ptr, bn_bias_ptr, mean_ptr,
                                           var_ptr, eps)
        residual = None
        if r_desc is not None:
            residual = r_desc.load([off_m, off_n])
        out = apply_epilogue(tl.trans(acc), scale, shift, residual, RELU)
        y_desc.store([off_m, off_n], out.to(y_desc.dtype))


_launch = conv_common.configured(
    _conv1x1_gemm_kernel,
    family="gemm_tma",
    configs=_GPU_CONFIGS,
    # Descriptors carry no dtype the autotuner would key on: BLOCK_K (a 128-byte row) tells fp32 apart.
    key=["M", "C_in", "C_out", "BLOCK_K"],
    prune=_prune_configs,
    fixed=_FIXED_GPU_CONFIG,
    interpreter=_INTERPRETER_CONFIG,
    direct=False,  # tensor-descriptor arguments: Triton's own launch
)


def _rows(t: torch.Tensor) -> torch.Tensor | None:
    """A channels_last tensor's ``[N*H*W, C]`` matrix (pixels in order), if a descriptor can address it."""
    v = nhwc(t)
    try:
        return None if v is None else v.view(-1, v.shape[3])
    except RuntimeError:  # images or rows are not packed one after another
        return None


def _block_k(c_in: int, itemsize: int) -> int:
    """Channels per K block: a 128-byte row, no wider than C_in needs (tl.dot's minimum is 16)."""
    return min(conv_common.ROW_BYTES // itemsize, max(16, launch.next_power_of_2(c_in)))


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
    if weight.shape[2:] != (1, 1) or tuple(stride) != (1, 1) or tuple(padding) != (0, 0):
        return "not a 1x1, stride-1, unpadded convolution"
    reason = conv_common.descriptor_unsupported_reason(x, weight, groups, residual)
    if reason is not None:
        return reason
    if _rows(x) is None:
        return "x's pixels are not one [N*H*W, C_in] matrix"
    if x.numel() // x.shape[1] + 256 >= 2**31:  # descriptor coordinates are int32
        return "more than 2^31 pixels"
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
    """``relu?(bn(conv2d(x, weight, bias)) + residual)`` for a 1x1, stride-1, unpadded convolution, in one
    kernel launch.

    Arguments are those of :func:`resnet_fast.ops.reference.conv_bn_act`, already validated.

    Args:
        x: ``[N, C_in, H, W]`` float32/float16/bfloat16, dense channels_last (``[N*H*W, C_in]`` rows in
            memory) with ``C_in * itemsize`` a multiple of 16 bytes.
        weight: ``[C_out, C_in, 1, 1]`` in x's dtype, ``C_out * itemsize`` a multiple of 16 bytes.
        bias, bn_weight, bn_bias, running_mean, running_var: ``[C_out]`` or None (no BatchNorm without
            ``running_var``); any floating dtype, read as float32.
        stride, padding, dilation: (1, 1), (0, 0) and anything (dilation does nothing to a 1x1 kernel).
        groups: must be 1.
        residual: ``[N, C_out, H, W]`` dense channels_last, or None.
        relu: apply ReLU after the residual add.
    Returns:
        ``[N, C_out, H, W]`` in x's dtype, channels_last.
    Raises:
        Unsupported: before any launch, for calls outside the above (:func:`unsupported_reason`).
    """
    reason = unsupported_reason(x, weight, stride, padding, dilation, groups, residual)
    if reason is not None:
        raise Unsupported(f"1x1 GEMM TMA convolution: {reason}")
    n, c_in, h, w = x.shape
    c_out = weight.shape[0]
    y = layout.empty_conv_output(x, weight, h, w)
    if y.numel() == 0:
        return y
    m = n * h * w
    # Descriptors start with placeholder boxes: _set_block_shapes gives them the launch's.
    x_desc = TensorDescriptor.from_tensor(_rows(x), [1, 1])
    w_desc = TensorDescriptor.from_tensor(weight_matrix(weight), [1, 1])
    y_desc = TensorDescriptor.from_tensor(_rows(y), [1, 1])
    r_desc = None if residual is None else TensorDescriptor.from_tensor(_rows(residual), [1, 1])
    programs = _INTERPRETER_PROGRAMS if conv_common.INTERPRET else conv_common.multiprocessors(x.device)

    def grid(meta: dict) -> tuple[int]:
        return (min(programs, launch.cdiv(m, meta["BLOCK_M"]) * launch.cdiv(c_out, meta["BLOCK_N"])),)

    # Triton launches on the current CUDA device, not the tensors' one.
    with torch.cuda.device_of(x):
        _launch(
            grid,
            x_desc, w_desc, r_desc, y_desc,
            *map(conv_common.channel_vector, (bias, bn_weight, bn_bias, running_mean, running_var)),
            eps,
            m, c_in, c_out, programs,
            RELU=relu, **conv_common.dot_flags(x.dtype),
            BLOCK_K=_block_k(c_in, x.element_size()),
        )
    return y
