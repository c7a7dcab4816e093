"""``convert``: give an existing pipeline's torchvision ResNets the fused forward, in place."""

from __future__ import annotations

import torchvision.models.resnet as tv
from torch import nn

from resnet_fast.models.resnet import ResNet, use_fused_classes

__all__ = ["convert"]


def convert(module: nn.Module) -> nn.Module:
    """Turns every torchvision ``ResNet``, ``BasicBlock`` and ``Bottleneck`` inside ``module`` (or
    ``module`` itself) into resnet_fast's, and returns ``module``.

    The conversion is in place: the same module objects, parameters and buffers (so an optimizer
    built on them still holds the right tensors), device, dtype, train/eval mode and hooks; only the
    classes change (resnet_fast's subclass torchvision's, so ``isinstance`` checks still hold; a block's
    shortcut ``Sequential(conv, norm)`` becomes :class:`~resnet_fast.models.resnet.Downsample`, same
    children and keys). Outputs are the same up to floating-point rounding. Subclasses of torchvision's
    classes are left alone: their forward may differ. Conv weights on CUDA become channels_last.
    """
    use_fused_classes(module)
    for m in module.modules():
        if type(m) is tv.ResNet:
            m.__class__ = ResNet
            m._init_runtime_state()
            m._use_kernel_weight_layout()
    return module
