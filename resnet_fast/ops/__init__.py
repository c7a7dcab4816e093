"""Functional fused ops: validate, normalise, then dispatch to the selected backend.

Layouts: activations are ``[N, C, H, W]`` tensors, NCHW-contiguous or channels_last (NHWC in memory);
every op accepts both and returns its result in the input's memory format. Weights are
``[C_out, C_in / groups, kH, kW]`` in any memory format.

Backends (``resnet_fast.backends``): ``"torch"`` (the reference, :mod:`resnet_fast.ops.reference`,
every device, with autograd); ``"triton"`` and ``"cuda"`` (CUDA kernels) where installed. An op called
with tensors that need a gradient runs on a backend with a backward for it (the reference otherwise).

Explicit fallbacks (``resnet_fast.backends.Unsupported``): the Triton ``conv_bias_act`` does not run
grouped convolutions (``groups > 1``, ResNeXt): those calls run on the reference (cuDNN on CUDA),
silently in ``"auto"`` mode, with one warning when ``"triton"`` was selected, and raise in strict mode.

Under ``torch.autocast``, ``conv_bias_act`` casts its floating inputs to the autocast dtype first, as
``torch.nn.functional.conv2d`` would.
"""

from __future__ import annotations

from typing import Sequence

import torch

from resnet_fast import backends

__all__ = ["add_relu", "autocast_dtype", "batch_norm_act", "conv_bias_act", "fold_bn"]


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


def _check_like(t: torch.Tensor | None, ref: torch.Tensor, name: str, shape: Sequence[int] | None = None) -> None:
    """``t`` must sit on ref's device with ref's dtype (and the given shape)."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but x is on {ref.device}; expected the same device")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x has {ref.dtype}; expected the same dtype")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype ``torch.autocast`` casts to on this device, or None when autocast is off."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def fold_bn(
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Folds an eval-mode BatchNorm into the convolution before it.

    ``bn(conv(x, W) + b) == conv(x, W') + b'`` with ``s = gamma / sqrt(var + eps)``,
    ``W' = W * s[:, None, None, None]`` and ``b' = (b - mean) * s + beta``.
    Computed in float32 (float64 for float64 weights) and cast back to ``conv_weight.dtype``:
    folding in half precision loses accuracy. Differentiable.

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
    scale = torch.rsqrt(running_var.to(compute) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(compute)
    shift = -running_mean.to(compute)
    if conv_bias is not None:
        shift = shift + conv_bias.to(compute)
    bias = shift * scale
    if bn_bias is not None:
        bias = bias + bn_bias.to(compute)
    weight = conv_weight.to(compute) * scale.reshape(-1, 1, 1, 1)
    return weight.to(dtype), bias.to(dtype)


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
        bias: ``[C_out]`` or None (typically the folded BatchNorm, see :func:`fold_bn`).
        stride, padding, dilation: int or (h, w) pair, as in ``torch.nn.functional.conv2d``.
        groups: convolution groups; ``C_in`` and ``C_out`` must be divisible by it.
        residual: ``[N, C_out, H_out, W_out]`` added before the ReLU, or None.
        relu: apply ReLU last.
    Returns:
        ``[N, C_out, H_out, W_out]`` in x's dtype and memory format.
    """
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
    for t, name in ((weight, "weight"), (bias, "bias"), (residual, "residual")):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; expected the same device")
    dtype = autocast_dtype(x.device)
    if dtype is not None:
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
        residual = residual.to(dtype) if residual is not None else None
    _check_like(weight, x, "weight")
    _check_like(bias, x, "bias", (c_out,))
    h_out = conv_output_size(x.shape[2], kh, stride[0], padding[0], dilation[0])
    w_out = conv_output_size(x.shape[3], kw, stride[1], padding[1], dilation[1])
    if h_out < 1 or w_out < 1:
        raise ValueError(
            f"x's spatial size {tuple(x.shape[2:])} is too small for a {kh}x{kw} kernel with "
            f"stride {stride}, padding {padding}, dilation {dilation} (output would be {h_out}x{w_out})"
        )
    _check_like(residual, x, "residual", (x.shape[0], c_out, h_out, w_out))
    return backends.call(
        "conv_bias_act",
        x, weight, bias, stride, padding, dilation, groups, residual, bool(relu),
        device=x.device,
        needs_grad=_needs_grad(x, weight, bias, residual),
    )


def add_relu(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``relu(x + y)`` for two tensors of the same shape, dtype and device (any rank, any layout).

    Returns a tensor in x's memory format.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    _check_like(y, x, "y", x.shape)
    return backends.call("add_relu", x, y, device=x.device, needs_grad=_needs_grad(x, y))


def batch_norm_act(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    relu: bool = True,
) -> torch.Tensor:
    """``relu?(batch_norm(x) + residual)``, the train-mode tail of a ResNet block.

    Same semantics as ``torch.nn.functional.batch_norm`` (batch statistics when ``training``, running
    statistics updated in place with ``momentum`` and the unbiased variance), then the residual add and
    ReLU.

    Args:
        x: ``[N, C, H, W]``, NCHW or channels_last.
        weight, bias: ``[C]`` affine parameters (float32 under mixed precision is fine) or None.
        running_mean, running_var: ``[C]`` buffers, updated in place when training; or None.
        residual: same shape, dtype and device as x, or None.
    Returns:
        ``[N, C, H, W]`` in x's dtype and memory format.
    """
    _check_activation(x, "x")
    c = x.shape[1]
    for t, name in ((weight, "weight"), (bias, "bias"), (running_mean, "running_mean"), (running_var, "running_var")):
        if t is not None:
            if t.device != x.device:
                raise ValueError(f"{name} is on {t.device} but x is on {x.device}; expected the same device")
            if tuple(t.shape) != (c,):
                raise ValueError(f"{name} must have shape ({c},) for x with {c} channels, got {tuple(t.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be tensors or both be None")
    if not training and running_mean is None:
        raise ValueError("training=False needs running_mean and running_var")
    _check_like(residual, x, "residual", x.shape)
    return backends.call(
        "batch_norm_act",
        x, weight, bias, running_mean, running_var, bool(training), float(momentum), float(eps), residual, bool(relu),
        device=x.device,
        needs_grad=_needs_grad(x, weight, bias, residual),
    )
