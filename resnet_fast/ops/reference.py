"""Pure-PyTorch reference implementations: the specification every backend is tested against.

They receive arguments already validated and normalised by ``resnet_fast.ops`` (pairs for
stride/padding/dilation, matching devices, x's dtype for activations) and run anywhere torch runs.
Gradients are not taken through them: each op's backward is written out in :mod:`resnet_fast.ops.library`
(and, for ``batch_norm_act``, specified here by :func:`batch_norm_act_backward`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from resnet_fast.ops.layout import activation_format, conv_output_format, conv_output_size

_CHANNEL = (1, -1, 1, 1)


def bn_scale_shift(
    conv_bias: torch.Tensor | None,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(scale, shift)`` with ``bn(conv + conv_bias) == conv * scale + shift`` for an eval-mode
    BatchNorm: ``scale = gamma * rsqrt(var + eps)`` and ``shift = beta + (conv_bias - mean) * scale``, in
    ``dtype``. Missing affine parameters or conv bias count as 1, 0 and 0. The Triton epilogue computes the
    same two vectors from the same live tensors (:mod:`resnet_fast.kernels.epilogue`)."""
    scale = torch.rsqrt(running_var.to(dtype) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(dtype)
    centre = -running_mean.to(dtype)
    if conv_bias is not None:
        centre = centre + conv_bias.to(dtype)
    shift = centre * scale
    if bn_bias is not None:
        shift = shift + bn_bias.to(dtype)
    return scale, shift


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
    """``relu?(batch_norm(conv2d(x, weight) + bias) + residual)`` with an eval-mode BatchNorm (running
    statistics), exactly as torchvision's modules compute it; without ``running_var`` there is no BatchNorm.

    The output is in x's dtype and in :func:`~resnet_fast.ops.layout.conv_output_format`.
    """
    out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if running_var is not None:
        out = F.batch_norm(out, running_mean, running_var, bn_weight, bn_bias, False, 0.0, eps)
    if residual is not None:
        out = out + residual
    if relu:
        out = torch.relu(out)
    return out.contiguous(memory_format=conv_output_format(x, weight))


def add_relu(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``relu(x + y)``, with ``torch.empty_like(x)``'s strides."""
    out = torch.empty_like(x)
    torch.add(x, y, out=out)
    return out.relu_()


def batch_norm_act(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    eps: float,
    residual: torch.Tensor | None,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``relu?(batch_norm(x) + residual)``: torch's own batch norm (batch statistics, biased variance, when
    ``training``; the running statistics otherwise), then the residual add and ReLU in x's dtype, as
    torchvision's blocks compute them. The running statistics are not updated here: that is
    ``update_running_stats``'s job (:mod:`resnet_fast.ops.library`), from the returned statistics.

    Returns:
        ``(out, save_mean, save_invstd)``: out in x's dtype and :func:`~resnet_fast.ops.layout.activation_format`;
        the float32 ``[C]`` mean and ``rsqrt(var + eps)`` it normalised with (zeros for an empty batch),
        which :func:`batch_norm_act_backward` takes.
    """
    c, n = x.shape[1], x.numel() // max(x.shape[1], 1)
    if training and n == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    if not training:
        out = F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
        save_mean = running_mean.to(torch.float32, copy=True)
        save_invstd = torch.rsqrt(running_var.to(torch.float32) + eps)
    elif n == 0:
        out = torch.empty_like(x)
        save_mean, save_invstd = x.new_zeros(c, dtype=torch.float32), x.new_zeros(c, dtype=torch.float32)
    else:
        out, save_mean, save_invstd = torch.ops.aten.native_batch_norm(x, weight, bias, None, None, True, 0.0, eps)
    if residual is not None:
        out = out + residual
    if relu:
        out = torch.relu(out)
    return out.contiguous(memory_format=activation_format(x)), save_mean.float(), save_invstd.float()


def batch_norm_act_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor,
    weight: torch.Tensor | None,
    save_mean: torch.Tensor,
    save_invstd: torch.Tensor,
    training: bool,
    relu: bool,
    residual_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`batch_norm_act` given its output and saved statistics.

    With ``g`` the gradient after the ReLU mask (``threshold_backward`` on ``out``, as ``torch.relu``'s
    backward) and ``xhat = (x - mean) * invstd``: ``grad_bias = sum(g)``, ``grad_weight = sum(g * xhat)``,
    ``grad_x = weight * invstd * (g - (sum(g) + xhat * sum(g * xhat)) / n)`` when training (torch's own
    ``native_batch_norm_backward``) and ``weight * invstd * g`` otherwise; the residual's gradient is ``g``.

    Returns:
        ``(grad_x, grad_weight, grad_bias, grad_residual)``: grad_x in x's dtype and activation format;
        grad_weight and grad_bias float32 ``[C]``; grad_residual ``g``, or an empty tensor when
        ``residual_grad`` is False.
    """
    g = torch.ops.aten.threshold_backward(grad_out, out, 0) if relu else grad_out
    # A fresh tensor: op outputs may not alias inputs (without the ReLU, g is grad_out itself).
    grad_residual = g.clone() if residual_grad else x.new_empty((0,))
    xhat = (x.float() - save_mean.view(_CHANNEL)) * save_invstd.view(_CHANNEL)
    if training and x.numel() > 0:
        grad_x, _, _ = torch.ops.aten.native_batch_norm_backward(
            g, x, weight, None, None, save_mean, save_invstd, True, 0.0, [True, False, False]
        )
    else:
        scale = save_invstd if weight is None else save_invstd * weight.float()
        grad_x = (g.float() * scale.view(_CHANNEL)).to(x.dtype)
    grad_weight = (g.float() * xhat).sum(dim=(0, 2, 3))
    grad_bias = g.sum(dim=(0, 2, 3), dtype=torch.float32)
    return grad_x.contiguous(memory_format=activation_format(x)), grad_weight, grad_bias, grad_residual


# ---------------------------------------------------------------------------------------------------- stem
# The ImageNet stem's geometry, (kernel, stride, padding) of each stage: torchvision's conv1 and maxpool.
STEM_CONV = (7, 2, 3)
STEM_POOL = (3, 2, 1)


def stem_sizes(size: int) -> tuple[int, int]:
    """The stem's (convolution, pooled) output sizes along one axis of ``size`` input pixels."""
    conv = conv_output_size(size, STEM_CONV[0], STEM_CONV[1], STEM_CONV[2], 1)
    return conv, conv_output_size(conv, STEM_POOL[0], STEM_POOL[1], STEM_POOL[2], 1)


def stem(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    bn_weight: torch.Tensor | None,
    bn_bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """The ImageNet stem, ``max_pool2d(relu(bn(conv2d(x, weight) + bias)), 3, 2, 1)`` with the 7x7 stride-2
    padding-3 convolution (:data:`STEM_CONV`, :data:`STEM_POOL`), as torchvision computes it on x cast to
    the weight's dtype (the compute dtype). Without ``running_var`` there is no BatchNorm.

    Returns:
        ``[N, C_out, H_pool, W_pool]`` in the weight's dtype and
        :func:`~resnet_fast.ops.layout.conv_output_format` of x and the weight.
    """
    _, stride, padding = STEM_CONV
    out = conv_bn_act(x.to(weight.dtype), weight, bias, bn_weight, bn_bias, running_mean, running_var, eps,
                      (stride, stride), (padding, padding), (1, 1), 1, None, True)
    return F.max_pool2d(out, *STEM_POOL).contiguous(memory_format=conv_output_format(x, weight))
