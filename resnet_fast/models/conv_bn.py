"""How a block runs ``conv -> BatchNorm (-> + residual) (-> ReLU)``: one TorchScript-compatible function.

:func:`conv_norm_act` takes the tensors of one (conv, norm) pair and calls the ``torch.library`` ops, so
the same code runs in eager mode, under ``torch.fx`` tracing, in TorchScript, under ``torch.compile``
and in ``torch.export`` graphs, where the fused ops appear as nodes:

* statistics fixed (an ``nn.BatchNorm2d`` in eval mode, a ``FrozenBatchNorm2d`` in any mode): one
  ``conv_bn_act``, the BatchNorm applied in the convolution's epilogue from the live tensors;
* batch statistics (an ``nn.BatchNorm2d`` in training mode, or one without running statistics): the
  convolution, then ``batch_norm_act`` (normalise + residual + ReLU) and ``update_running_stats``.

Blocks pass their modules' tensors explicitly (TorchScript cannot pass modules to functions) and fall back
to calling their modules for anything :func:`fusable` rejects (GroupNorm, SyncBatchNorm, a subclass with
its own forward, a conv with non-zero padding modes).
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

__all__ = ["conv_norm_act", "fusable"]


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

    The norm normalises with its running statistics unless it is training them: ``training`` and a
    ``num_batches_tracked`` counter (an ``nn.BatchNorm2d`` that tracks statistics), or no running
    statistics at all. A norm without the counter (``FrozenBatchNorm2d``) never trains them.
    """
    if running_mean is not None and running_var is not None and not (training and num_batches_tracked is not None):
        return torch.ops.resnet_fast.conv_bn_act(
            x, weight, bias, norm_weight, norm_bias, running_mean, running_var, eps, stride, padding, dilation,
            groups, residual, relu,
        )
    out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    out, mean, invstd = torch.ops.resnet_fast.batch_norm_act(
        out, norm_weight, norm_bias, None, None, True, eps, residual, relu
    )
    if running_mean is not None and running_var is not None:
        torch.ops.resnet_fast.update_running_stats(
            running_mean, running_var, num_batches_tracked, mean, invstd, eps, momentum, out.numel() // out.shape[1]
        )
    return out


def _plain_conv(conv: nn.Module) -> bool:
    return (
        isinstance(conv, nn.Conv2d)
        and type(conv).forward is nn.Conv2d.forward
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    )


def _plain_norm(norm: nn.Module) -> bool:
    """A norm whose forward is ``nn.BatchNorm2d``'s or ``FrozenBatchNorm2d``'s, so its semantics are known."""
    return (isinstance(norm, nn.BatchNorm2d) and type(norm).forward is nn.BatchNorm2d.forward) or (
        isinstance(norm, FrozenBatchNorm2d) and type(norm).forward is FrozenBatchNorm2d.forward
    )


def fusable(*pairs: tuple[nn.Module, nn.Module]) -> bool:
    """Whether every (conv, norm) pair can run as :func:`conv_norm_act` (checked on every Python-mode
    forward, so modules swapped after construction are honoured)."""
    return all(_plain_conv(conv) and _plain_norm(norm) for conv, norm in pairs)


def check_scriptable(module: nn.Module, pairs: list[tuple[nn.Module, nn.Module]]) -> None:
    """TorchScript cannot test a norm's class, so scripted blocks fuse every norm with running statistics;
    refuse to script the ones whose Python forward would not fuse (rather than change their semantics)."""
    for conv, norm in pairs:
        if hasattr(norm, "running_var") and not (_plain_conv(conv) and _plain_norm(norm)):
            raise NotImplementedError(
                f"torch.jit.script of {type(module).__name__} with {type(conv).__name__} + {type(norm).__name__}: "
                "resnet_fast scripts nn.BatchNorm2d, FrozenBatchNorm2d and norms without running statistics "
                "(GroupNorm, ...). Use torch.export or torch.compile for this model, or convert the norm "
                "(e.g. nn.SyncBatchNorm -> nn.BatchNorm2d) before scripting."
            )
