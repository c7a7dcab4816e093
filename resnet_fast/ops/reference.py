"""Pure-PyTorch reference implementations: the specification every backend is tested against.

They receive arguments already validated and normalised by ``resnet_fast.ops`` (tuples for
stride/padding/dilation, matching devices and dtypes) and run anywhere torch runs, with autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def conv_bias_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    groups: int,
    residual: torch.Tensor | None,
    relu: bool,
) -> torch.Tensor:
    """``relu?(conv2d(x, weight) + bias + residual)``; output in x's memory format and dtype."""
    out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


def add_relu(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``relu(x + y)``."""
    return torch.relu(x + y)


def batch_norm_act(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    residual: torch.Tensor | None,
    relu: bool,
) -> torch.Tensor:
    """``relu?(batch_norm(x) + residual)``, updating running statistics in place when training.

    Exactly ``torch.nn.functional.batch_norm``: batch statistics with the biased variance for
    normalising, the unbiased variance (n / (n - 1)) for ``running_var``, and
    ``running = (1 - momentum) * running + momentum * batch``.
    """
    out = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out
