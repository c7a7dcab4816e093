"""resnet_fast: torchvision-compatible ResNets whose blocks run fused Triton and CUDA kernels.

Models (same arguments, attributes and state_dict keys as torchvision): ``resnet18`` ... ``resnet152``,
``resnext50_32x4d``, ``resnext101_32x8d``, ``resnext101_64x4d``, ``wide_resnet50_2``, ``wide_resnet101_2``,
``ResNet``, ``BasicBlock``, ``Bottleneck``; ``convert`` upgrades torchvision models in place;
``cuda_graph`` captures an eval forward for low-latency serving.
Functional ops live in ``resnet_fast.ops``; backends are chosen with ``set_backend`` / ``backend``.
"""

from resnet_fast import ops
from resnet_fast.backends import available_backends, backend, get_backend, set_backend
from resnet_fast.convert import convert
from resnet_fast.cuda_graph import cuda_graph
from resnet_fast.models.resnet import (
    BasicBlock,
    Bottleneck,
    ResNet,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    resnext50_32x4d,
    resnext101_32x8d,
    resnext101_64x4d,
    wide_resnet50_2,
    wide_resnet101_2,
)
from resnet_fast.transfer import (
    GrayToRGB,
    adapt_conv_weight,
    adapt_input_channels,
    freeze,
    param_groups,
    unfreeze,
)

__version__ = "0.1.0"

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "GrayToRGB",
    "ResNet",
    "adapt_conv_weight",
    "adapt_input_channels",
    "available_backends",
    "backend",
    "convert",
    "cuda_graph",
    "freeze",
    "get_backend",
    "ops",
    "param_groups",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "set_backend",
    "unfreeze",
    "wide_resnet50_2",
    "wide_resnet101_2",
]
