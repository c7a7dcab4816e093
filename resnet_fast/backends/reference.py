"""The ``"torch"`` backend: the pure-PyTorch reference ops. Runs on every device."""

from resnet_fast.backends import register_backend
from resnet_fast.ops import reference

_OPS = {
    "conv_bn_act": reference.conv_bn_act,
    "add_relu": reference.add_relu,
    "batch_stats": reference.batch_stats,
    "batch_norm_act": reference.batch_norm_act,
    "batch_norm_act_backward": reference.batch_norm_act_backward,
    "stem": reference.stem,
}

register_backend("torch", lambda: _OPS, priority=0, supports_device=lambda device: True)
