"""The ``"torch"`` backend: the pure-PyTorch reference ops. Runs on every device, with autograd."""

from resnet_fast.backends import register_backend
from resnet_fast.ops import reference

_OPS = {
    "conv_bias_act": reference.conv_bias_act,
    "add_relu": reference.add_relu,
    "batch_norm_act": reference.batch_norm_act,
}

register_backend(
    "torch",
    lambda: _OPS,
    priority=0,
    supports_device=lambda device: True,
    differentiable=frozenset(_OPS),
)
