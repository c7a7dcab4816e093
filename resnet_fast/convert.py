"""``convert``: give an existing pipeline's torchvision ResNets the fused forward, in place."""

from __future__ import annotations

import torchvision.models.resnet as tv
from torch import nn

from resnet_fast.models.resnet import BasicBlock, Bottleneck, ResNet

__all__ = ["convert"]

_CLASSES = {tv.BasicBlock: BasicBlock, tv.Bottleneck: Bottleneck}


def convert(module: nn.Module) -> nn.Module:
    """Turns every torchvision ``ResNet``, ``BasicBlock`` and ``Bottleneck`` inside ``module`` (or
    ``module`` itself) into resnet_fast's, and returns ``module``.

    The conversion is in place: the same module objects, parameters and buffers (so an optimizer
    built on them still holds the right tensors), device, dtype, train/eval mode and hooks; only the
    class changes (resnet_fast's subclass torchvision's, so ``isinstance`` checks still hold). Outputs
    are the same up to floating-point rounding. Subclasses of torchvision's classes are left alone:
    their forward may differ.
    """
    for m in module.modules():
        if type(m) in _CLASSES:
            m.__class__ = _CLASSES[type(m)]
        elif type(m) is tv.ResNet:
            m.__class__ = ResNet
            m._init_runtime_state()
    return module
