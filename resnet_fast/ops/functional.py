"""The library ops in the sequences a network runs, as TorchScript-compatible functions of tensors.

:func:`conv_norm_act` is a (conv, BatchNorm) pair of a block, :func:`norm_act` a BatchNorm (+ residual,
ReLU) with ``nn.BatchNorm2d``'s semantics and bookkeeping. The models call them with their modules'
tensors (TorchScript cannot pass modules to functions), and :func:`resnet_fast.ops.batch_norm_act`
validates and calls :func:`norm_act`, so each sequence is written once. They call ``torch.ops``
directly, so eager mode, ``torch.fx``, TorchScript, ``torch.compile`` and ``torch.export`` all see the
fused ops as nodes. :func:`traced_conv_norm_act` is :func:`conv_norm_act` under ``torch.fx`` symbolic
tracing, with its nodes named as torchvision's graph names the values they compute.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from resnet_fast.ops import library

__all__ = ["conv_norm_act", "fixed_statistics", "norm_act", "traced_conv_norm_act"]


def norm_act(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    num_batches_tracked: Optional[Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
    residual: Optional[Tensor],
    relu: bool,
) -> Tensor:
    """``relu?(batch_norm(x) + residual)`` as ``nn.BatchNorm2d`` computes it: batch statistics when
    ``training`` or without running statistics, updating the running statistics (and the counter, when
    given) while training; the running statistics otherwise."""
    if running_mean is None or running_var is None or training:
        mean, var = _batch_stats(x)
        if training and running_mean is not None and running_var is not None:
            _update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, momentum,
                                  x.numel() // x.shape[1])
        return _batch_norm_act(x, weight, bias, mean, var, eps, True, residual, relu)
    return _batch_norm_act(x, weight, bias, running_mean, running_var, eps, False, residual, relu)


# The three ops of norm_act: torch.ops under TorchScript, else library.call (in plain eager mode the kernel
# without the op's dispatch, which costs several times a small BatchNorm's arithmetic).
def _batch_stats(x: Tensor) -> Tuple[Tensor, Tensor]:
    if torch.jit.is_scripting():
        return torch.ops.resnet_fast.batch_stats(x)
    return library.call("batch_stats", x)


def _update_running_stats(
    running_mean: Tensor, running_var: Tensor, num_batches_tracked: Optional[Tensor], mean: Tensor, var: Tensor,
    momentum: Optional[float], count: int,
) -> None:
    if torch.jit.is_scripting():
        torch.ops.resnet_fast.update_running_stats(running_mean, running_var, num_batches_tracked, mean, var,
                                                   momentum, count)
    else:
        library.call("update_running_stats", running_mean, running_var, num_batches_tracked, mean, var, momentum,
                     count)


def _batch_norm_act(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, var: Tensor, eps: float,
    training: bool, residual: Optional[Tensor], relu: bool,
) -> Tensor:
    if torch.jit.is_scripting():
        return torch.ops.resnet_fast.batch_norm_act(x, weight, bias, mean, var, eps, training, residual, relu)
    return library.call("batch_norm_act", x, weight, bias, mean, var, eps, training, residual, relu)


def fixed_statistics(
    running_mean: Optional[Tensor], running_var: Optional[Tensor], training: bool, num_batches_tracked: Optional[Tensor]
) -> bool:
    """Whether a BatchNorm-like norm applies fixed statistics: its running ones in eval mode, or always for a
    ``FrozenBatchNorm2d`` (running statistics, no ``num_batches_tracked``: it never trains them)."""
    return running_mean is not None and running_var is not None and not (training and num_batches_tracked is not None)


def conv_norm_act(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    stride: Tuple[int, int],
    padding: Tuple[int, int],
    dilation: Tuple[int, int],
    groups: int,
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    eps: float,
    training: bool,
    momentum: Optional[float],
    num_batches_tracked: Optional[Tensor],
    residual: Optional[Tensor],
    relu: bool,
) -> Tensor:
    """``relu?(norm(conv2d(x, weight) + bias) + residual)`` for a BatchNorm-like norm.

    Statistics fixed (:func:`fixed_statistics`): one ``conv_bn_act``, the BatchNorm applied in the
    convolution's epilogue from the live tensors. Otherwise the convolution, then :func:`norm_act`.
    """
    if fixed_statistics(running_mean, running_var, training, num_batches_tracked):
        if torch.jit.is_scripting():
            return torch.ops.resnet_fast.conv_bn_act(
                x, weight, bias, norm_weight, norm_bias, running_mean, running_var, eps, stride, padding, dilation,
                groups, residual, relu,
            )
        else:  # not compiled by TorchScript: plain eager mode skips the op's dispatch
            return library.call(
                "conv_bn_act", x, weight, bias, norm_weight, norm_bias, running_mean, running_var, eps, stride,
                padding, dilation, groups, residual, relu,
            )
    out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return norm_act(out, norm_weight, norm_bias, running_mean, running_var, num_batches_tracked, training, momentum,
                    eps, residual, relu)


def traced_conv_norm_act(conv_name: Optional[str], out_name: Optional[str], *args) -> fx.Proxy:
    """:func:`conv_norm_act` of ``args`` (its arguments, in its order; x a Proxy) as ``torch.fx`` nodes,
    named as torchvision's graph names the values they compute: the convolution after the conv module
    (``conv_name``, e.g. ``"conv1"``), the result after the module that gives it there (``out_name``:
    ``"relu"``, so that a block's values are ``layer1.0.relu``, ``layer1.0.relu_1`` ... as
    ``get_graph_node_names`` lists torchvision's); None keeps torch.fx's name.

    With batch statistics the norm is one :func:`norm_act` node, as torchvision's graph has one
    BatchNorm node: every node then computes a tensor (one to pick as a feature), and torch.fx removes
    the whole norm with a branch nobody uses (the running-statistics update, a mutating op, would be
    kept, and the convolutions before it with it).
    """
    (x, weight, bias, stride, padding, dilation, groups, norm_weight, norm_bias, running_mean, running_var, eps,
     training, momentum, num_batches_tracked, residual, relu) = args
    if fixed_statistics(running_mean, running_var, training, num_batches_tracked):
        fused = (x, weight, bias, norm_weight, norm_bias, running_mean, running_var, eps, stride, padding, dilation,
                 groups, residual, relu)
        return library.traced(torch.ops.resnet_fast.conv_bn_act, fused, out_name)
    out = library.traced(F.conv2d, (x, weight, bias, stride, padding, dilation, groups), conv_name)
    norm = (out, norm_weight, norm_bias, running_mean, running_var, num_batches_tracked, training, momentum, eps,
            residual, relu)
    result = library.traced(norm_act, norm, out_name)
    # torch.fx's mark for a function it keeps as one node (torch.fx.wrap's): a GraphModule reloaded from a
    # pickle traces its code again, and would otherwise trace into norm_act.
    result.node.meta["is_wrapped"] = True
    return result
