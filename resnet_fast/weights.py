"""Loading pretrained weights into a resnet_fast model: torchvision enums or names, state_dicts, files."""

from __future__ import annotations

import os
import warnings
from typing import Any, Mapping

import torch
from torch import nn

from resnet_fast.transfer import adapt_conv_weight

__all__ = ["load_pretrained", "resolve_state_dict"]


def _torchvision_weights(name: str, arch: str):
    """``'ResNet50_Weights.IMAGENET1K_V2'``, or ``'IMAGENET1K_V2'`` / ``'DEFAULT'`` for ``arch``."""
    from torchvision.models import get_model_weights, get_weight

    if "." in name:
        return get_weight(name)
    enum = get_model_weights(arch)
    try:
        return enum[name]
    except KeyError:
        raise ValueError(
            f"weights={name!r} is neither a file nor a weights name of {arch}; expected a path or one of "
            f"{[w.name for w in enum] + ['DEFAULT']}"
        ) from None


def resolve_state_dict(weights: Any, arch: str, progress: bool = True) -> dict[str, torch.Tensor]:
    """Turns any accepted ``weights`` value into a state_dict (on CPU for files and downloads).

    Accepts a torchvision ``WeightsEnum`` member (fetched by torchvision, whose errors surface as they
    are when offline), its name, a state_dict (a mapping of names to tensors; a checkpoint holding one
    under ``"state_dict"`` or ``"model"`` is unwrapped, and a DDP ``"module."`` prefix is removed), or a
    path to a file saved with ``torch.save``.
    """
    from torchvision.models import WeightsEnum

    if isinstance(weights, WeightsEnum):
        state = weights.get_state_dict(progress=progress, check_hash=True)
    elif isinstance(weights, Mapping):
        state = weights
    elif isinstance(weights, (str, os.PathLike)):
        if os.path.isfile(weights):
            state = torch.load(weights, map_location="cpu", weights_only=True)
        else:
            state = _torchvision_weights(str(weights), arch).get_state_dict(progress=progress, check_hash=True)
    else:
        raise TypeError(
            f"weights must be a torchvision weights enum or name, a state_dict or a file path; got {type(weights).__name__}"
        )
    for key in ("state_dict", "model"):
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_pretrained(model: nn.Module, weights: Any, *, arch: str, progress: bool = True) -> nn.Module:
    """Loads ``weights`` into ``model`` strictly, except for two ported parts.

    * A classifier of another size (``num_classes != 1000``): the backbone loads, ``fc`` stays freshly
      initialised, and a warning says so once.
    * A conv1 for other input channels (``in_channels != 3``): the RGB conv1 is ported with
      :func:`resnet_fast.adapt_conv_weight` (method ``"sum"``).
    """
    state = resolve_state_dict(weights, arch, progress)
    own = model.state_dict()
    skip_head = False
    if "fc.weight" in state and "fc.weight" in own and state["fc.weight"].shape != own["fc.weight"].shape:
        skip_head = True
        state_fc_shape = state["fc.weight"].shape
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        warnings.warn(
            f"{arch}: the checkpoint's classifier (fc.weight {tuple(state_fc_shape)}) does not match the model's "
            f"({tuple(own['fc.weight'].shape)}); the backbone is loaded and the head (fc) is left newly initialised",
            UserWarning,
            stacklevel=3,
        )
    w = state.get("conv1.weight")
    if w is not None and w.shape != own["conv1.weight"].shape:
        if w.shape[1] == 3 and w.shape[2:] == own["conv1.weight"].shape[2:] and w.shape[0] == own["conv1.weight"].shape[0]:
            state["conv1.weight"] = adapt_conv_weight(w, model.conv1.in_channels, "sum")
        else:
            raise ValueError(
                f"conv1.weight in the checkpoint has shape {tuple(w.shape)}, the model's is "
                f"{tuple(own['conv1.weight'].shape)} (a different stem?); they cannot be ported"
            )
    result = model.load_state_dict(state, strict=not skip_head)
    if skip_head:  # (result read only here, as torchvision reads it nowhere: its tests mock load_state_dict)
        missing = [k for k in result.missing_keys if not k.startswith("fc.")]
        unexpected = result.unexpected_keys
        if missing or unexpected:
            raise RuntimeError(f"{arch}: checkpoint does not match the model: missing {missing}, unexpected {unexpected}")
    return model
