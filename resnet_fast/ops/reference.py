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
    if running_var is not None:  # F.batch_norm's op without its Python checks (this runs for every conv)
        out = torch.batch_norm(out, bn_weight, bn_bias, running_mean, running_var, False, 0.0, eps, True)
    # In place, as torchvision's blocks do: out is this function's own fresh tensor, and the reference runs
    # without autograd (the library op owns the backward).
    if residual is not None:
        out += residual
    if relu:
        out.relu_()
    return out.contiguous(memory_format=conv_output_format(x, weight))


def add_relu(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``relu(x + y)``, with ``torch.empty_like(x)``'s strides."""
    out = torch.empty_like(x)
    torch.add(x, y, out=out)
    return out.relu_()


def statistics_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of per-channel statistics and their gradients for activations x: float32, float64 for
    float64 x."""
    return torch.promote_types(x.dtype, torch.float32)


def values_per_channel(x: torch.Tensor) -> int:
    """The number of values per channel of a training BatchNorm's input ``[N, C, H, W]``.

    Raises ValueError for one, as ``F.batch_norm`` does in training.
    """
    n = x.numel() // max(x.shape[1], 1)
    if n == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
    return n


def batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel batch mean and biased variance of x, float32 ``[C]`` (float64 for float64 x), as
    ``F.batch_norm`` computes them in training; zeros and ones for an empty batch (which updates nothing).

    Raises ValueError for one value per channel (:func:`values_per_channel`).
    """
    compute = statistics_dtype(x)
    if values_per_channel(x) == 0:
        return x.new_zeros(x.shape[1], dtype=compute), x.new_ones(x.shape[1], dtype=compute)
    # torch's own training BatchNorm statistics (on CPU two passes over x, in its layout): 3-16x faster on
    # CPU than var_mean over (0, 2, 3), and the same values torchvision's model normalises with.
    return torch.batch_norm_update_stats(x if x.dtype == compute else x.to(compute), None, None, 0.0)


def update_running_stats(
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    num_batches_tracked: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    momentum: float | None,
    count: int,
) -> None:
    """``nn.BatchNorm2d``'s bookkeeping after a training step over ``count`` values per channel with batch
    ``mean`` and biased ``var``, in place: the counter is incremented; ``momentum=None`` means a cumulative
    average over the batches seen; the running variance takes the unbiased variance; an empty batch changes
    no statistic."""
    factor = 0.0 if momentum is None else momentum
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            factor = 1.0 / float(num_batches_tracked)
    if count == 0:
        return
    # In place in the buffers' dtype, the sums in the statistics' (float32 for a half model's buffers).
    running_mean.mul_(1.0 - factor).add_(mean, alpha=factor)
    running_var.mul_(1.0 - factor).add_(var, alpha=factor * count / max(count - 1, 1))


def batch_norm_act(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None,
    relu: bool,
) -> torch.Tensor:
    """``relu?(batch_norm(x; mean, var) + residual)``: ``(x - mean) * rsqrt(var + eps) * weight + bias`` by
    torch's own ``batch_norm``, then the residual add and ReLU in x's dtype, as torchvision's blocks compute
    them. ``mean``/``var`` are the batch statistics (training) or the running statistics (eval).

    Returns x's dtype, in :func:`~resnet_fast.ops.layout.activation_format`.
    """
    # torch's batch norm takes low-precision x with float32 parameters, but parameters and statistics of
    # one dtype: a half model's affine parameters meet float32 batch statistics here.
    weight, bias = (t if t is None or t.dtype == mean.dtype else t.to(mean.dtype) for t in (weight, bias))
    out = F.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
    if residual is not None:
        out += residual  # out is fresh and no autograd runs here: in place, as torchvision does
    if relu:
        out.relu_()
    return out.contiguous(memory_format=activation_format(x))


def batch_norm_act_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    out: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    eps: float,
    training: bool,
    relu: bool,
    residual_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`batch_norm_act` given its output.

    With ``g`` the gradient after the ReLU mask (``threshold_backward`` on ``out``, as ``torch.relu``'s
    backward), ``invstd = rsqrt(var + eps)`` and ``xhat = (x - mean) * invstd``: ``grad_bias = sum(g)``,
    ``grad_weight = sum(g * xhat)``, ``grad_x = weight * invstd * (g - (sum(g) + xhat * sum(g * xhat)) / n)``
    when training (the statistics are x's own) and ``weight * invstd * g`` otherwise, all three by torch's
    ``native_batch_norm_backward``, as for torchvision's BatchNorm; the residual's gradient is ``g``.

    Returns:
        ``(grad_x, grad_weight, grad_bias, grad_residual)``: grad_x in x's dtype and activation format;
        grad_weight and grad_bias ``[C]`` in float32 (float64 for float64 x); grad_residual ``g``, or an
        empty tensor when ``residual_grad`` is False.
    """
    # g in x's layout: gradients arrive in any strides (avgpool's backward hands an expanded, stride-0 one),
    # and torch's CPU batch-norm backward is unreliable on mixed or ambiguous layouts (seen on 2.14.1:
    # errors of order 1e-3 in bias gradients). x's own layout is the well-trodden path.
    fmt = activation_format(x)
    g = torch.ops.aten.threshold_backward(grad_out, out, 0) if relu else grad_out
    g = g.contiguous(memory_format=fmt)
    # A fresh tensor: op outputs may not alias inputs (without the ReLU, g may be grad_out itself).
    grad_residual = (g if g is not grad_out else g.clone()) if residual_grad else x.new_empty((0,))
    compute = statistics_dtype(x)
    # Parameters in the statistics' dtype, as the forward takes them: a half model's weight meets float32
    # statistics here, which torch's kernel refuses.
    weight = None if weight is None else weight.to(compute)
    mean, var = mean.to(compute), var.to(compute)
    if x.numel() == 0:  # torch's CPU kernel divides by the batch size (SIGFPE)
        zeros = mean.new_zeros(mean.shape)
        return torch.empty_like(x, memory_format=fmt), zeros, zeros.clone(), grad_residual
    # The statistics as torch's kernel saves them, and fixed ones also as running statistics: torch's CUDA
    # backward requires the saved ones in eval mode too (an internal assert in torch 2.11's channels-last
    # path: "save_mean should always be defined"), its CPU one reads the running ones.
    save = (mean, torch.rsqrt(var + eps))
    stats = (None, None, *save) if training else (mean, var, *save)
    grad_x, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
        g, x, weight, *stats, training, eps, [True, True, True]
    )
    grad_weight, grad_bias = grad_weight.to(compute), grad_bias.to(compute)
    return grad_x.contiguous(memory_format=fmt), grad_weight, grad_bias, grad_residual


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
