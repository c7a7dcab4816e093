"""resnet_fast: torchvision-compatible ResNets whose eval-mode blocks run fused kernels."""
from resnet_fast.backends import available_backends, backend, get_backend, set_backend
from resnet_fast import ops

__all__ = ["available_backends", "backend", "get_backend", "ops", "set_backend"]
