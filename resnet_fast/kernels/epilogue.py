"""The epilogue every fused convolution kernel shares: BatchNorm from the live tensors, residual, ReLU.

A kernel accumulates ``acc = conv(x, W)`` in float32 for a ``[BLOCK_M, BLOCK_N]`` tile (output pixels x
output channels), then calls :func:`channel_scale_shift` for its ``BLOCK_N`` channels and
:func:`apply_epilogue` on the tile before its single store. The per-channel vectors are those of
:func:`resnet_fast.ops.reference.bn_scale_shift`::

    scale = gamma * rsqrt(var + eps)          (1 without a BatchNorm)
    shift = beta + (bias - mean) * scale      (bias without a BatchNorm)

computed from the BatchNorm's and the conv's own tensors on every launch: a few loads per channel, no
folded copy of anything. Missing tensors are ``None`` pointers (Triton specialises them away).
"""

import triton
import triton.language as tl


@triton.jit
def channel_scale_shift(offs_n, n_ok, bias_ptr, bn_weight_ptr, bn_bias_ptr, mean_ptr, var_ptr, eps):
    """float32 ``(scale, shift)`` for the channels ``offs_n`` (masked by ``n_ok``); all pointers are
    ``[C_out]`` vectors of any floating dtype, contiguous."""
    if bias_ptr is not None:
        shift = tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    else:
        shift = tl.zeros(offs_n.shape, dtype=tl.float32)
    if var_ptr is not None:
        var = tl.load(var_ptr + offs_n, mask=n_ok, other=1.0).to(tl.float32)
        scale = 1.0 / tl.sqrt(var + eps)
        if bn_weight_ptr is not None:
            scale *= tl.load(bn_weight_ptr + offs_n, mask=n_ok, other=1.0).to(tl.float32)
        shift = (shift - tl.load(mean_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)) * scale
        if bn_bias_ptr is not None:
            shift += tl.load(bn_bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    else:
        scale = tl.full(offs_n.shape, 1.0, dtype=tl.float32)
    return scale, shift


@triton.jit
def apply_epilogue(acc, scale, shift, residual, RELU: tl.constexpr):
    """``relu?(acc * scale + shift + residual)`` in float32; ``residual`` is a loaded tile or None."""
    acc = acc * scale[None, :] + shift[None, :]
    if residual is not None:
        acc += residual.to(tl.float32)
    if RELU:
        acc = tl.maximum(acc, 0.0)
    return acc
