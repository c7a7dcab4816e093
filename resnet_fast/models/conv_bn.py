"""Which (conv, norm) pairs a block may run as :func:`resnet_fast.ops.functional.conv_norm_act`.

Blocks call ``conv_norm_act`` with their modules' tensors when :func:`fusable` accepts every pair, and call
their modules otherwise (GroupNorm, SyncBatchNorm, a subclass with its own forward, a conv with a
non-zero padding mode). TorchScript cannot ask a norm for its class, so scripted blocks fuse every norm
with running statistics, and :func:`check_scriptable` refuses to script the ones Python mode would not.
"""

from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

__all__ = ["check_scriptable", "fusable"]


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
    for conv, norm in pairs:
        if not (_plain_conv(conv) and _plain_norm(norm)):
            return False
    return True


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
