"""The fused ops in differentiable, batchable torch operations: what they run under a ``torch.func``
transform (``grad``, ``vmap``, ``jacrev``, ``jvp`` ...).

torch.library's custom-op autograd does not support those transforms (pytorch/pytorch#168393) and the ops
have no batching rules, so :func:`resnet_fast.ops.library.call` runs these instead, with the ops'
arguments. The models never get here (under a transform their blocks run torchvision's forward); the
public ``resnet_fast.ops`` functions do. Same values as :mod:`resnet_fast.ops.reference`, written for
autograd and vmap: no in-place arithmetic on results (vmap cannot write a batched value into an unbatched
tensor), and a training BatchNorm's statistics are differentiable functions of x, so autograd takes the
whole gradient through them (the ops' own backward does that by hand). Outputs have the layouts torch's
operations give (vmap cannot be asked for a tensor's memory format).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from resnet_fast.ops import reference

# The dimensions a per-channel statistic reduces over, and the view that broadcasts it (NCHW); the
# library's formulas use these too.
REDUCE = (0, 2, 3)
CHANNEL = (1, -1, 1, 1)


def _residual_relu(out: torch.Tensor, residual: torch.Tensor | None, relu: bool) -> torch.Tensor:
    if residual is not None:
        out = out + residual
    return out.relu() if relu else out


def conv_bn_act(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, stride, padding, dilation,
                groups, residual, relu):
    out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if running_var is not None:
        out = F.batch_norm(out, running_mean, running_var, bn_weight, bn_bias, False, 0.0, eps)
    return _residual_relu(out, residual, relu)


def add_relu(x, y):
    return (x + y).relu()


def batch_stats(x):
    compute = reference.statistics_dtype(x)
    if reference.values_per_channel(x) == 0:
        return reference.batch_stats(x)
    var, mean = torch.var_mean(x.to(compute), dim=REDUCE, correction=0)
    return mean, var


def update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, momentum, count):
    # vmap cannot write the batched statistics into unbatched buffers: say what to do instead. (Under grad,
    # torch.func refuses in-place updates of captured buffers itself, as for nn.BatchNorm2d's.)
    if torch._C._functorch.is_batchedtensor(mean) and not torch._C._functorch.is_batchedtensor(running_mean):
        raise RuntimeError(
            "batch_norm_act: under vmap the batch statistics are batched but running_mean and running_var, "
            "which training updates in place, are not: pass running_mean=None and running_var=None (what "
            "torch.func.replace_all_batch_norm_modules_ does to a model's BatchNorms), or training=False"
        )
    reference.update_running_stats(running_mean, running_var, num_batches_tracked, mean.detach(), var.detach(),
                                   momentum, count)


def batch_norm_act(x, weight, bias, mean, var, eps, training, residual, relu):
    # Written out rather than F.batch_norm, which does not differentiate with respect to its statistics
    # (here x's own when training); in the statistics' dtype, as torch's kernel computes.
    compute = reference.statistics_dtype(x)
    mean, var = mean.to(compute), var.to(compute)
    out = (x.to(compute) - mean.view(CHANNEL)) * torch.rsqrt(var + eps).view(CHANNEL)
    if weight is not None:
        out = out * weight.to(compute).view(CHANNEL)
    if bias is not None:
        out = out + bias.to(compute).view(CHANNEL)
    return _residual_relu(out.to(x.dtype), residual, relu)


def stem(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps):
    _, stride, padding = reference.STEM_CONV
    out = conv_bn_act(x.to(weight.dtype), weight, bias, bn_weight, bn_bias, running_mean, running_var, eps,
                      (stride, stride), (padding, padding), (1, 1), 1, None, True)
    return F.max_pool2d(out, *reference.STEM_POOL)


# op -> its transformable definition (batch_norm_act_backward is not here: autograd derives the backward).
OPS = {
    "conv_bn_act": conv_bn_act,
    "add_relu": add_relu,
    "batch_stats": batch_stats,
    "update_running_stats": update_running_stats,
    "batch_norm_act": batch_norm_act,
    "stem": stem,
}
