"""Which Triton convolution kernel serves a ``conv_bn_act`` call: one table, chosen per layer class.

Every kernel family (one file each, sharing :mod:`resnet_fast.kernels.epilogue`) takes the arguments of
:func:`resnet_fast.ops.reference.conv_bn_act` and raises :class:`~resnet_fast.backends.Unsupported` for
calls it cannot serve. :func:`select` names the family for a call; an entry becomes the default for a
layer class only once a GPU run has measured it faster than the one it replaces (BENCHMARKS.md names
that run). ``RESNET_FAST_CONV_KERNEL=<name>`` forces one family for every call it supports, which is how
the tests and benchmarks reach a path before it is a default.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from resnet_fast.backends import Unsupported
from resnet_fast.kernels import conv_gather

__all__ = ["KERNELS", "conv_bn_act", "select"]

KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    "gather": conv_gather.conv_bn_act,
}


def select(x: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int], padding: tuple[int, int],
           dilation: tuple[int, int], groups: int) -> str:
    """The kernel family for this convolution (measured defaults; see the module docstring)."""
    return "gather"


def conv_bn_act(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, stride, padding, dilation,
                groups, residual, relu):
    """The ``"triton"`` backend's ``conv_bn_act``: the selected (or forced) kernel family."""
    name = os.environ.get("RESNET_FAST_CONV_KERNEL") or select(x, weight, stride, padding, dilation, groups)
    if name not in KERNELS:
        raise Unsupported(f"RESNET_FAST_CONV_KERNEL={name!r} is not one of {sorted(KERNELS)}")
    return KERNELS[name](x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, stride, padding,
                         dilation, groups, residual, relu)
