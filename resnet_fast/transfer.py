"""Transfer-learning helpers: porting conv1 to other inputs, freezing stages, per-stage param groups."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

__all__ = [
    "GrayToRGB",
    "adapt_conv_weight",
    "adapt_input_channels",
    "freeze",
    "param_groups",
    "stage_of",
    "stages",
    "unfreeze",
]

ADAPT_METHODS = ("sum", "mean", "luminance", "repeat")
LUMINANCE = (0.299, 0.587, 0.114)


def adapt_conv_weight(weight: torch.Tensor, in_channels: int, method: str = "sum") -> torch.Tensor:
    """Ports a conv weight trained on 3-channel RGB to ``in_channels`` input channels.

    Args:
        weight: ``[C_out, 3, kH, kW]``.
        in_channels: N >= 1.
        method:
            ``"sum"``: each new channel gets ``sum_c W[:, c] / N``. An input whose N channels all equal a
            gray image G gives exactly the RGB model's output for G repeated on R, G and B.
            ``"mean"``: ``mean_c W[:, c] / N`` (a third of ``"sum"``: keeps per-channel filter scale).
            ``"luminance"``: ``(0.299 W_R + 0.587 W_G + 0.114 W_B) / N``, a luminance-weighted mean.
            ``"repeat"``: channel j gets ``W[:, j % 3] * 3 / N``; for N = 3 the weight is unchanged, and an
            input that repeats R, G, B cyclically (N a multiple of 3) gives the RGB model's output.
    Returns:
        ``[C_out, in_channels, kH, kW]`` in weight's dtype and device.
    """
    if weight.dim() != 4 or weight.shape[1] != 3:
        raise ValueError(f"weight must be [C_out, 3, kH, kW] (an RGB conv), got shape {tuple(weight.shape)}")
    if not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
    if method not in ADAPT_METHODS:
        raise ValueError(f"method must be one of {ADAPT_METHODS}, got {method!r}")
    w = weight.detach().float()
    n = in_channels
    if method == "repeat":
        index = torch.arange(n, device=w.device) % 3
        return (w[:, index] * (3.0 / n)).to(weight.dtype)
    if method == "sum":
        gray = w.sum(1, keepdim=True)
    elif method == "mean":
        gray = w.mean(1, keepdim=True)
    else:
        coef = torch.tensor(LUMINANCE, device=w.device).view(1, 3, 1, 1)
        gray = (w * coef).sum(1, keepdim=True)
    return (gray / n).expand(-1, n, -1, -1).contiguous().to(weight.dtype)


def adapt_input_channels(model: nn.Module, in_channels: int, method: str = "sum") -> nn.Module:
    """Replaces ``model.conv1`` (trained on RGB) with a conv taking ``in_channels`` inputs, in place.

    See :func:`adapt_conv_weight` for the methods. Keeps device, dtype, kernel, stride and padding.
    Returns the model.
    """
    conv = model.conv1
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
        raise TypeError(f"model.conv1 must be an ungrouped nn.Conv2d, got {conv!r}")
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        conv.stride,
        conv.padding,
        conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device=conv.weight.device,
        dtype=conv.weight.dtype,
    )
    with torch.no_grad():
        new.weight.copy_(adapt_conv_weight(conv.weight, in_channels, method))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    new.weight.requires_grad_(conv.weight.requires_grad)
    new.train(conv.training)
    model.conv1 = new
    return model


class GrayToRGB(nn.Module):
    """A learnable 1x1 convolution 1 -> 3 channels, initialised to repeat the gray channel.

    Put it in front of an RGB model: ``nn.Sequential(GrayToRGB(), resnet50(weights=...))``.
    Input ``[N, 1, H, W]``; output ``[N, 3, H, W]``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, kernel_size=1, bias=True)
        with torch.no_grad():
            self.conv.weight.fill_(1.0)
            self.conv.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != 1:
            raise ValueError(f"GrayToRGB expects [N, 1, H, W] input, got shape {tuple(x.shape)}")
        return self.conv(x)


def stages(model: nn.Module) -> list[str]:
    """The model's stages in depth order: ``"stem"``, ``"layer1"``... ``"head"``."""
    names = getattr(model, "stage_names", None)
    if names is None:
        names = [n for n, _ in model.named_children() if n.startswith("layer")]
    return ["stem", *names, "head"]


def stage_of(model: nn.Module, parameter_name: str) -> str:
    """The stage a parameter/module name belongs to (``"other"`` for anything outside the ResNet layout)."""
    top = parameter_name.split(".", 1)[0]
    if top in ("conv1", "bn1"):
        return "stem"
    if top == "fc":
        return "head"
    return top if top in stages(model) else "other"


class _EvalBatchNorm2d(nn.BatchNorm2d):
    """A frozen BatchNorm2d: ``train()`` leaves it in eval mode, so its running statistics stay fixed."""

    def train(self, mode: bool = True) -> "_EvalBatchNorm2d":
        return super().train(False)


def _resolve_stages(model: nn.Module, which: int | Iterable[str] | None) -> list[str]:
    order = stages(model)
    if which is None:
        return order[:-1]
    if isinstance(which, int):
        if not 0 <= which <= len(order):
            raise ValueError(f"stages must be between 0 and {len(order)} (stages are {order}), got {which}")
        return order[:which]
    chosen = [which] if isinstance(which, str) else list(which)
    unknown = [s for s in chosen if s not in order]
    if unknown:
        raise ValueError(f"unknown stages {unknown}; this model's stages are {order}")
    return chosen


def _stage_modules(model: nn.Module, chosen: list[str]) -> list[nn.Module]:
    return [m for name, m in model.named_children() if stage_of(model, name) in chosen]


def freeze(model: nn.Module, stages: int | Iterable[str] | None = None) -> nn.Module:
    """Freezes stages for fine-tuning: no gradients, and their BatchNorms kept in eval mode.

    Args:
        stages: None (everything but the head), an int k (the first k of ``stem, layer1, ..., head``),
            or stage names (``["stem", "layer1"]``).
    The BatchNorms stay in eval mode across later ``model.train()`` calls (their class becomes an
    eval-locked BatchNorm2d subclass; state_dict keys are unchanged). :func:`unfreeze` undoes it.
    Returns the model.
    """
    chosen = _resolve_stages(model, stages)
    for module in _stage_modules(model, chosen):
        for p in module.parameters():
            p.requires_grad_(False)
        for m in module.modules():
            if type(m) is nn.BatchNorm2d:
                m.__class__ = _EvalBatchNorm2d
                m.eval()
    return model


def unfreeze(model: nn.Module, stages: int | Iterable[str] | None = None) -> nn.Module:
    """Undoes :func:`freeze` on those stages (default: all but the head); BatchNorms follow ``model.training``."""
    chosen = _resolve_stages(model, stages)
    for module in _stage_modules(model, chosen):
        for p in module.parameters():
            p.requires_grad_(True)
        for m in module.modules():
            if type(m) is _EvalBatchNorm2d:
                m.__class__ = nn.BatchNorm2d
                m.train(model.training)
    return model


def param_groups(
    model: nn.Module, lr: float, weight_decay: float, layer_decay: float | None = None
) -> list[dict]:
    """Optimizer parameter groups: per-stage learning rates, no weight decay on norms and biases.

    Stage i of ``stem, layer1, ..., head`` (n stages) gets ``lr * layer_decay ** (n - 1 - i)``: the head
    trains at ``lr``, earlier stages slower. Parameters with one dimension (BatchNorm weights and
    biases, conv/linear biases) get ``weight_decay=0``. Frozen parameters (``requires_grad=False``) are
    left out. Each group also carries ``"name"`` (e.g. ``"layer2.no_decay"``) and ``"stage"``.
    """
    if layer_decay is not None and not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    order = stages(model)
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        stage = stage_of(model, name)
        depth = order.index(stage) if stage in order else len(order) - 1
        scale = 1.0 if layer_decay is None else layer_decay ** (len(order) - 1 - depth)
        decay = p.dim() > 1
        group = groups.setdefault(
            (stage, decay),
            {
                "params": [],
                "lr": lr * scale,
                "weight_decay": weight_decay if decay else 0.0,
                "name": f"{stage}.{'decay' if decay else 'no_decay'}",
                "stage": stage,
            },
        )
        group["params"].append(p)
    return list(groups.values())
