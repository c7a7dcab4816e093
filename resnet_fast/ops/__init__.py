"""Functional fused ops: validate, normalise, then call the ``torch.library`` op (``torch.ops.resnet_fast``)
through :func:`resnet_fast.ops.library.call`: in plain eager mode its kernel directly, under a ``torch.func``
transform its definition in torch operations (:mod:`resnet_fast.ops.transformable`).

Layouts: activations are ``[N, C, H, W]`` tensors, NCHW-contiguous or channels_last (NHWC in memory);
every op accepts both. Convolutions (the stem included) return channels_last when x or the weight is
channels_last (the rule of ``F.conv2d`` on cuDNN; :func:`~resnet_fast.ops.layout.conv_output_format`), the
other ops x's layout.
Weights are ``[C_out, C_in / groups, kH, kW]`` in any memory format; channels_last weights
(``[C_out, kH, kW, C_in]`` in memory, what ``model.to(memory_format=torch.channels_last)`` gives) are the
kernels' fast layout.

Each op is a ``torch.library`` operator (:mod:`resnet_fast.ops.library`) with a backward, a fake
implementation and, for the convolutions, an autocast rule: under ``torch.autocast`` x, the conv weight,
bias and residual are cast to the autocast dtype as ``F.conv2d``'s would be, and BatchNorm tensors are
read in float32 (:func:`stem` casts only the weight and bias: it casts x as it loads it). The op picks
its kernel at run time through :mod:`resnet_fast.backends`: ``"torch"``
(the reference, :mod:`resnet_fast.ops.reference`, every device), ``"triton"`` and ``"cuda"`` (CUDA
kernels) where installed.

Explicit fallbacks (``resnet_fast.backends.Unsupported``): the Triton convolution does not run grouped
convolutions (``groups > 1``, ResNeXt): those calls run on the reference (cuDNN on CUDA), silently in
``"auto"`` mode, with one warning when ``"triton"`` was selected, and raise in strict mode.
"""

from __future__ import annotations

from typing import Sequence

import torch

from resnet_fast.ops import library
from resnet_fast.ops.functional import norm_act
from resnet_fast.ops.layout import conv_output_size
from resnet_fast.ops.reference import STEM_CONV, bn_scale_shift

__all__ = ["add_relu", "autocast_dtype", "batch_norm_act", "conv_bias_act", "conv_bn_act", "fold_bn", "stem"]


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value}")
    return value


def _check_activation(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be a 4-D [N, C, H, W] tensor, got {t.dim()}-D with shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32, float16 or bfloat16), got {t.dtype}")


def _check_like(
    t: torch.Tensor | None, ref: torch.Tensor, name: str, shape: Sequence[int] | None = None, dtype: bool = True
) -> None:
    """``t`` must sit on ref's device (with ref's dtype when ``dtype``, and the given shape)."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but x is on {ref.device}; expected the same device")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x has {ref.dtype}; expected the same dtype")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype ``torch.autocast`` casts to on this device, or None when autocast is off."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def fold_bn(
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Folds an eval-mode BatchNorm into the convolution before it, for exporting folded weights.

    ``bn(conv(x, W) + b) == conv(x, W') + b'`` with ``s = gamma / sqrt(var + eps)``,
    ``W' = W * s[:, None, None, None]`` and ``b' = (b - mean) * s + beta``.
    Computed in float32 (float64 for float64 weights) and cast back to ``conv_weight.dtype``:
    folding in half precision loses accuracy. Differentiable. The models never fold: they apply the
    BatchNorm in the convolution's epilogue (:func:`conv_bn_act`), from the live tensors.

    Args:
        conv_weight: ``[C_out, C_in / groups, kH, kW]``.
        conv_bias, bn_weight, bn_bias: ``[C_out]`` or None (0, 1 and 0 respectively).
        running_mean, running_var: ``[C_out]``.
    Returns:
        ``(weight, bias)``: ``[C_out, C_in / groups, kH, kW]`` in conv_weight's memory format, and ``[C_out]``.
    """
    c_out = conv_weight.shape[0]
    for t, name in (
        (conv_bias, "conv_bias"),
        (bn_weight, "bn_weight"),
        (bn_bias, "bn_bias"),
        (running_mean, "running_mean"),
        (running_var, "running_var"),
    ):
        if t is not None and tuple(t.shape) != (c_out,):
            raise ValueError(f"{name} must have shape ({c_out},) to match conv_weight, got {tuple(t.shape)}")
    dtype = conv_weight.dtype
    compute = torch.promote_types(dtype, torch.float32)
    scale, shift = bn_scale_shift(conv_bias, bn_weight, bn_bias, running_mean, running_var, eps, compute)
    weight = conv_weight.to(compute) * scale.reshape(-1, 1, 1, 1)
    return weight.to(dtype), shift.to(dtype)


def _check_conv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: int | Sequence[int],
    padding: int | Sequence[int],
    dilation: int | Sequence[int],
    groups: int,
    residual: torch.Tensor | None,
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """Validates a convolution's arguments; returns (stride, padding, dilation) as pairs."""
    _check_activation(x, "x")
    stride, padding, dilation = _pair(stride, "stride"), _pair(padding, "padding"), _pair(dilation, "dilation")
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"expected stride >= 1, dilation >= 1, padding >= 0; got {stride}, {dilation}, {padding}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a 4-D [C_out, C_in / groups, kH, kW] tensor, got {shape}")
    c_out, c_in_per_group, kh, kw = weight.shape
    if groups < 1 or c_out % groups:
        raise ValueError(f"groups must be >= 1 and divide C_out = {c_out}, got groups={groups}")
    if x.shape[1] != c_in_per_group * groups:
        raise ValueError(
            f"x has {x.shape[1]} channels but weight expects {c_in_per_group * groups} "
            f"(weight.shape[1] = {c_in_per_group} x groups = {groups})"
        )
    # Under autocast the op casts these to the autocast dtype itself, as F.conv2d does.
    same_dtype = autocast_dtype(x.device) is None
    _check_like(weight, x, "weight", dtype=same_dtype)
    _check_like(bias, x, "bias", (c_out,), dtype=same_dtype)
    h_out = conv_output_size(x.shape[2], kh, stride[0], padding[0], dilation[0])
    w_out = conv_output_size(x.shape[3], kw, stride[1], padding[1], dilation[1])
    if h_out < 1 or w_out < 1:
        raise ValueError(
            f"x's spatial size {tuple(x.shape[2:])} is too small for a {kh}x{kw} kernel with "
            f"stride {stride}, padding {padding}, dilation {dilation} (output would be {h_out}x{w_out})"
        )
    _check_like(residual, x, "residual", (x.shape[0], c_out, h_out, w_out), dtype=same_dtype)
    return stride, padding, dilation


def conv_bias_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    residual: torch.Tensor | None = None,
    relu: bool = True,
) -> torch.Tensor:
    """``relu?(conv2d(x, weight) + bias + residual)`` in one pass over the output.

    Args:
        x: ``[N, C_in, H, W]``, NCHW or channels_last; float32, float16 or bfloat16.
        weight: ``[C_out, C_in / groups, kH, kW]``, same device and dtype as x.
        bias: ``[C_out]`` or None.
        stride, padding, dilation: int or (h, w) pair, as in ``torch.nn.functional.conv2d``.
        groups: convolution groups; ``C_in`` and ``C_out`` must be divisible by it.
        residual: ``[N, C_out, H_out, W_out]`` added before the ReLU, or None.
        relu: apply ReLU last.
    Returns:
        ``[N, C_out, H_out, W_out]`` in x's dtype; channels_last if x or the weight is.
    """
    stride, padding, dilation = _check_conv(x, weight, bias, stride, padding, dilation, groups, residual)
    return library.call(
        "conv_bn_act", x, weight, bias, None, None, None, None, 0.0, stride, padding, dilation, groups, residual,
        bool(relu),
    )


def conv_bn_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float = 1e-5,
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    residual: torch.Tensor | None = None,
    relu: bool = True,
) -> torch.Tensor:
    """``relu?(bn(conv2d(x, weight) + bias) + residual)`` with an eval-mode BatchNorm, in one pass.

    The BatchNorm is applied to the float32 accumulator as a per-channel ``scale = gamma * rsqrt(var + eps)``
    and ``shift = beta + (bias - mean) * scale`` computed from the tensors given, on every call: nothing is
    folded or cached, and the weight is never rescaled and rounded. ``nn.BatchNorm2d`` in eval mode and
    ``torchvision.ops.FrozenBatchNorm2d`` both compute this.

    Args:
        x, weight, bias, stride, padding, dilation, groups, residual, relu: as in :func:`conv_bias_act`.
        bn_weight, bn_bias: ``[C_out]`` affine parameters (any floating dtype, e.g. float32 under
            autocast) or None (1 and 0).
        running_mean, running_var: ``[C_out]`` statistics (any floating dtype).
        eps: the BatchNorm's epsilon.
    Returns:
        ``[N, C_out, H_out, W_out]`` in x's dtype; channels_last if x or the weight is.
    """
    stride, padding, dilation = _check_conv(x, weight, bias, stride, padding, dilation, groups, residual)
    c_out = weight.shape[0]
    for t, name in ((bn_weight, "bn_weight"), (bn_bias, "bn_bias")):
        _check_like(t, x, name, (c_out,), dtype=False)
    for t, name in ((running_mean, "running_mean"), (running_var, "running_var")):
        if t is None:
            raise ValueError(f"{name} must be a tensor of shape ({c_out},), got None")
        _check_like(t, x, name, (c_out,), dtype=False)
    return library.call(
        "conv_bn_act", x, weight, bias, bn_weight, bn_bias, running_mean, running_var, float(eps), stride, padding,
        dilation, groups, residual, bool(relu),
    )


def add_relu(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``relu(x + y)`` for two tensors of the same shape, dtype and device (any rank, any layout).

    Returns a tensor with ``torch.empty_like(x)``'s strides.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    _check_like(y, x, "y", x.shape)
    return library.call("add_relu", x, y)


def batch_norm_act(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    *,
    training: bool,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    relu: bool = True,
    num_batches_tracked: torch.Tensor | None = None,
) -> torch.Tensor:
    """``relu?(batch_norm(x) + residual)``, the train-mode tail of a ResNet block.

    Same semantics as ``torch.nn.functional.batch_norm`` (batch statistics when ``training``, running
    statistics updated in place with ``momentum`` and the unbiased variance), then the residual add and
    ReLU; with ``num_batches_tracked``, also ``nn.BatchNorm2d``'s bookkeeping (the counter is incremented
    when training, and ``momentum=None`` means a cumulative average over the batches seen).

    Args:
        x: ``[N, C, H, W]``, NCHW or channels_last.
        weight, bias: ``[C]`` affine parameters (float32 under mixed precision is fine) or None.
        running_mean, running_var: ``[C]`` buffers, updated in place when training; or None.
        residual: same shape, dtype and device as x, or None.
        num_batches_tracked: the BatchNorm's scalar counter, or None.
    Returns:
        ``[N, C, H, W]`` in x's dtype and memory format.
    """
    _check_activation(x, "x")
    c = x.shape[1]
    for t, name in ((weight, "weight"), (bias, "bias"), (running_mean, "running_mean"), (running_var, "running_var")):
        _check_like(t, x, name, (c,), dtype=False)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be tensors or both be None")
    if not training and running_mean is None:
        raise ValueError("training=False needs running_mean and running_var")
    if momentum is None and num_batches_tracked is None and training and running_mean is not None:
        raise ValueError("momentum=None (a cumulative average) needs num_batches_tracked")
    _check_like(residual, x, "residual", x.shape)
    return norm_act(x, weight, bias, running_mean, running_var, num_batches_tracked, bool(training),
                    None if momentum is None else float(momentum), float(eps), residual, bool(relu))


def stem(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    bn_weight: torch.Tensor | None = None,
    bn_bias: torch.Tensor | None = None,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """The ImageNet stem in one pass: ``max_pool2d(relu(bn(conv2d(x, weight) + bias)), 3, 2, 1)`` with
    torchvision's 7x7 stride-2 padding-3 ``conv1`` and its 3x3 stride-2 padding-1 ``maxpool``, and an
    eval-mode BatchNorm applied from the live tensors as in :func:`conv_bn_act`.

    x is read as given, in either layout and any floating dtype (typically the caller's float32 image
    batch for a float16/bfloat16 model), and cast to the weight's dtype as it is loaded; the convolution's
    own output is never written. Under ``torch.autocast`` the weight and bias are cast to the autocast
    dtype (x is still cast in the load).

    Args:
        x: ``[N, C_in, H, W]``, NCHW or channels_last, any floating dtype, H and W >= 1.
        weight: ``[C_out, C_in, 7, 7]``, floating; its dtype is the compute and output dtype.
        bias: ``[C_out]`` in the weight's dtype, or None.
        bn_weight, bn_bias: ``[C_out]`` affine parameters (any floating dtype) or None (1 and 0).
        running_mean, running_var: ``[C_out]`` statistics (any floating dtype), or both None for no BatchNorm.
        eps: the BatchNorm's epsilon.
    Returns:
        ``[N, C_out, H_pool, W_pool]`` in the weight's dtype, channels_last if x or the weight is
        (``H_pool = (H_conv - 1) // 2 + 1`` with ``H_conv = (H - 1) // 2 + 1``).
    """
    _check_activation(x, "x")
    expected = (x.shape[1], STEM_CONV[0], STEM_CONV[0])
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or tuple(weight.shape[1:]) != expected:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must be a [C_out, {', '.join(map(str, expected))}] tensor (x has {x.shape[1]} "
                         f"channels), got {shape}")
    if x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"x must hold images of at least 1x1, got shape {tuple(x.shape)}")
    c_out = weight.shape[0]
    _check_like(weight, x, "weight", dtype=False)
    _check_like(bias, x, "bias", (c_out,), dtype=False)
    if bias is not None and bias.dtype != weight.dtype and autocast_dtype(x.device) is None:
        raise TypeError(f"bias has dtype {bias.dtype} but weight has {weight.dtype}; expected the same dtype")
    for t, name in ((bn_weight, "bn_weight"), (bn_bias, "bn_bias"), (running_mean, "running_mean"),
                    (running_var, "running_var")):
        _check_like(t, x, name, (c_out,), dtype=False)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be tensors or both be None")
    if running_var is None and (bn_weight is not None or bn_bias is not None):
        raise ValueError("bn_weight and bn_bias need running_mean and running_var (a BatchNorm to apply)")
    return library.call("stem", x, weight, bias, bn_weight, bn_bias, running_mean, running_var, float(eps))
