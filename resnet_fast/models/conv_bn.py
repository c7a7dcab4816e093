"""Which modules a block may stand in for with :func:`resnet_fast.ops.functional.conv_norm_act` calls.

A fused call replaces calls to the block's convs, norms and ReLU, so it may stand in for them only where
those calls would have done nothing else: the modules' forwards are the ones the op implements, and no
hook would see the calls (a forward or backward hook on the module, e.g. ``torch.nn.utils.prune``'s, which
recomputes ``weight`` before every call, or a global module hook), and no ``torch.func`` transform is
running (``grad``, ``vmap``, ``jacrev``: torch.library's custom-op autograd does not support them,
pytorch/pytorch#168393, and the ops have no batching rules), no forward-mode AD (dual tensors: the ops
define no forward-mode derivative) and no ONNX export (the ops have no ONNX
translation; ONNX runtimes fuse conv + BatchNorm themselves). Blocks call ``conv_norm_act`` when
:func:`fusable` accepts their modules and call the modules otherwise (GroupNorm, SyncBatchNorm, a subclass
with its own forward, a conv with a non-zero padding mode, an activation other than ``nn.ReLU``, a hooked
module). TorchScript cannot ask a norm for its class, so scripted blocks fuse every norm with running
statistics, and :func:`check_scriptable` refuses to script the modules Python mode would not fuse.
"""

from typing import Optional

import torch
from torch import nn
from torch.nn.modules import module as _module
from torchvision.ops.misc import FrozenBatchNorm2d

from resnet_fast.ops import library

__all__ = ["check_scriptable", "fusable", "hooked"]


def hooked(module: nn.Module) -> bool:
    """Whether a forward or backward hook would see a call of ``module``."""
    return bool(
        module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks or module._backward_hooks
    )


def _known(module: nn.Module, cls: type) -> bool:
    """``module`` is a ``cls`` whose forward is ``cls.forward``, so its semantics are known. (This runs for
    every module of every forward: the exact-type test first.)"""
    kind = type(module)
    return kind is cls or (isinstance(module, cls) and kind.forward is cls.forward)


def _plain(module: nn.Module, cls: type) -> bool:
    return _known(module, cls) and not hooked(module)


def _plain_conv(conv: nn.Module) -> bool:
    return _plain(conv, nn.Conv2d) and conv.padding_mode == "zeros" and type(conv.padding) is not str


def _plain_norm(norm: nn.Module) -> bool:
    """A norm whose forward is ``nn.BatchNorm2d``'s or ``FrozenBatchNorm2d``'s, so its semantics are known."""
    return _plain(norm, nn.BatchNorm2d) or _plain(norm, FrozenBatchNorm2d)


def _global_hooks() -> bool:
    """Whether a hook registered for every module (``register_module_forward_hook`` ...) would see calls."""
    return bool(
        _module._global_forward_pre_hooks
        or _module._global_forward_hooks
        or _module._global_backward_pre_hooks
        or _module._global_backward_hooks
    )


def _ops_unsupported() -> bool:
    """Whether the forward runs where the fused ops cannot: in ``torch.onnx.export``, which traces the
    model with torch.export or the TorchScript tracer (asked only then: the question costs 1.5 µs), or
    under a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev`` ...; torch.compile traces the models'
    forwards without one) or forward-mode AD (:func:`resnet_fast.ops.library.autograd_unsupported`)."""
    if torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None:
        return torch.onnx.is_in_onnx_export()
    return library.autograd_unsupported()


def fusable(pairs: list[tuple[nn.Module, nn.Module]], relu: Optional[nn.Module] = None) -> bool:
    """Whether every (conv, norm) pair, followed by ``relu`` (the activation module the fused calls apply,
    None for none), can run as :func:`conv_norm_act` calls: plain modules, no hooks, no ``torch.func``
    transform or ONNX export. Checked on every Python-mode forward, so modules swapped and hooks
    registered after construction are honoured."""
    if _global_hooks() or _ops_unsupported() or (relu is not None and not _plain(relu, nn.ReLU)):
        return False
    for conv, norm in pairs:
        if not (_plain_conv(conv) and _plain_norm(norm)):
            return False
    return True


def check_scriptable(module: nn.Module, pairs: list[tuple[nn.Module, nn.Module]], relu: Optional[nn.Module]) -> None:
    """TorchScript cannot test a module's class, so scripted blocks fuse every norm with running statistics
    and always apply ReLU; refuse to script the modules whose Python forward would not fuse (rather than
    change their semantics)."""
    workaround = "Use torch.export or torch.compile for this model"
    if relu is not None and not _known(relu, nn.ReLU):
        raise NotImplementedError(
            f"torch.jit.script of {type(module).__name__} with activation {type(relu).__name__}: resnet_fast "
            f"scripts blocks whose activation is nn.ReLU. {workaround}."
        )
    for child in (*(m for pair in pairs for m in pair), *([] if relu is None else [relu])):
        if hooked(child):
            raise NotImplementedError(
                f"torch.jit.script of {type(module).__name__} with a hook on its {type(child).__name__}: the "
                f"scripted block may run it fused, where the hook would not see it. {workaround}, or remove the hook."
            )
    for conv, norm in pairs:
        if hasattr(norm, "running_var") and not (_plain_conv(conv) and _plain_norm(norm)):
            raise NotImplementedError(
                f"torch.jit.script of {type(module).__name__} with {type(conv).__name__} + {type(norm).__name__}: "
                "resnet_fast scripts nn.BatchNorm2d, FrozenBatchNorm2d and norms without running statistics "
                f"(GroupNorm, ...). {workaround}, or convert the norm "
                "(e.g. nn.SyncBatchNorm -> nn.BatchNorm2d) before scripting."
            )
