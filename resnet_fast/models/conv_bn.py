"""How a block runs ``conv -> norm (-> + residual) (-> ReLU)``: the one place that picks the fused op.

* BatchNorm in eval mode: folded into the convolution (``ops.fold_bn``) and run as one
  ``ops.conv_bias_act``. The folded weight and bias are cached in a :class:`FoldCache` and rebuilt
  whenever any source tensor changes (see :meth:`FoldCache.folded`).
* BatchNorm in training mode: the module's convolution, then ``ops.batch_norm_act`` (batch statistics,
  running-statistics update, residual, ReLU), with exactly ``nn.BatchNorm2d``'s bookkeeping.
* Any other norm layer (GroupNorm, a custom BatchNorm subclass, SyncBatchNorm...): the modules as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from resnet_fast import ops


def _stamp(t: torch.Tensor | None) -> tuple | None:
    # In-place edits bump _version (load_state_dict, optimizer steps, running-stat updates);
    # .to()/.half() swap the storage, which changes data_ptr, dtype or device.
    if t is None:
        return None
    return id(t), t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class FoldCache:
    """Folded (weight, bias) per conv/BN pair of one module, keyed by the pair's source tensors.

    Not part of the state_dict; pickling and deepcopy drop it (it is rebuilt on the next forward).
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple] = {}

    def __getstate__(self) -> dict:
        return {"_entries": {}}

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def folded(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight, bias)`` of ``bn(conv(.))`` folded, cast to ``dtype``, weight in channels_last.

        channels_last (``[C_out, kH, kW, C_in]`` in memory) is the layout the NHWC kernels read.
        When autograd needs the fold (trainable parameters, grad enabled) it is computed afresh so
        gradients reach the conv and BN parameters; nothing is cached then.
        """
        sources = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        if _needs_grad(*sources):
            return self._fold(conv, bn, dtype)
        stamp = tuple(_stamp(t) for t in (*sources, bn.num_batches_tracked)) + (bn.eps, dtype)
        entry = self._entries.get(id(conv))
        if entry is None or entry[0] != stamp:
            # Normal tensors even when first folded under inference_mode: a later autograd forward
            # (frozen layers, input gradients) must be able to save them for backward.
            with torch.inference_mode(False), torch.no_grad():
                entry = (stamp, *self._fold(conv, bn, dtype))
            self._entries[id(conv)] = entry
        return entry[1], entry[2]

    @staticmethod
    def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        weight, bias = ops.fold_bn(
            conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps
        )
        return weight.to(dtype).contiguous(memory_format=torch.channels_last), bias.to(dtype)


def fold_cache(module: nn.Module) -> FoldCache:
    """The module's FoldCache, created on first use (so converted torchvision modules get one too)."""
    cache = module.__dict__.get("_fold_cache")
    if cache is None:
        cache = module.__dict__["_fold_cache"] = FoldCache()
    return cache


def _plain_batch_norm(norm: nn.Module) -> bool:
    """A BatchNorm2d whose forward is torch's own (so its semantics are known and can be fused)."""
    return isinstance(norm, nn.BatchNorm2d) and type(norm).forward is nn.BatchNorm2d.forward


def _foldable(conv: nn.Module, norm: nn.Module) -> bool:
    return (
        isinstance(conv, nn.Conv2d)
        and type(conv).forward is nn.Conv2d.forward
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
        and _plain_batch_norm(norm)
        and not norm.training
        and norm.running_mean is not None
    )


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    return ops.autocast_dtype(x.device) or weight.dtype


def batch_norm_act(
    bn: nn.BatchNorm2d, x: torch.Tensor, residual: torch.Tensor | None = None, relu: bool = True
) -> torch.Tensor:
    """``relu?(bn(x) + residual)`` through ``ops.batch_norm_act``, with nn.BatchNorm2d's bookkeeping
    (num_batches_tracked, cumulative average when momentum is None, batch stats without running stats)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:
            factor = 1.0 / float(bn.num_batches_tracked)
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    return ops.batch_norm_act(
        x,
        bn.weight,
        bn.bias,
        bn.running_mean if track else None,
        bn.running_var if track else None,
        training=use_batch_stats,
        momentum=factor,
        eps=bn.eps,
        residual=residual,
        relu=relu,
    )


def conv_bn_act(
    conv: nn.Conv2d,
    norm: nn.Module,
    x: torch.Tensor,
    cache: FoldCache,
    *,
    residual: torch.Tensor | None = None,
    relu: bool,
) -> torch.Tensor:
    """``relu?(norm(conv(x)) + residual)`` by the fastest route the modules' state allows."""
    if torch.compiler.is_compiling():
        # Under torch.compile the plain modules are traced: the compiler fuses (and, with freezing,
        # folds) them itself, while the fold cache's identity and version checks would break the graph.
        out = norm(conv(x))
        if residual is not None:
            out = out + residual
        return torch.relu(out) if relu else out
    if _foldable(conv, norm):
        weight, bias = cache.folded(conv, norm, _compute_dtype(x, conv.weight))
        return ops.conv_bias_act(
            x,
            weight,
            bias,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            residual=residual,
            relu=relu,
        )
    out = conv(x)
    if _plain_batch_norm(norm):
        return batch_norm_act(norm, out, residual, relu)
    out = norm(out)
    if residual is not None:
        return ops.add_relu(out, residual) if relu else out + residual
    return torch.relu(out) if relu else out


def downsample(module: nn.Module, x: torch.Tensor, cache: FoldCache) -> torch.Tensor:
    """A block's shortcut: torchvision's ``Sequential(conv1x1, norm)`` fused, anything else called."""
    if isinstance(module, nn.Sequential) and len(module) == 2 and isinstance(module[0], nn.Conv2d):
        return conv_bn_act(module[0], module[1], x, cache, relu=False)
    return module(x)
