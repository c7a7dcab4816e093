"""The ``"triton"`` backend: fused Triton kernels for ``conv_bias_act`` and ``add_relu``.

Chosen automatically for CUDA tensors (priority 20). It also runs on CPU tensors under Triton's
interpreter (``TRITON_INTERPRET=1``), but only when selected explicitly, which is how the tests use it.
Inference only: calls that need a gradient go to the reference. Grouped convolutions raise
:class:`~resnet_fast.backends.Unsupported` and are answered by the reference too.
"""

from __future__ import annotations

import os

import torch

from resnet_fast.backends import BackendUnavailable, register_backend


def _load() -> dict:
    # Imported here, not at module level: importing resnet_fast must not import (or need) Triton.
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(f"triton is not installed ({e})") from e
    from resnet_fast.kernels.add_relu import add_relu
    from resnet_fast.kernels.conv_bias_act import conv_bias_act

    return {"conv_bias_act": conv_bias_act, "add_relu": add_relu}


def _supports_device(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


register_backend(
    "triton",
    _load,
    priority=20,
    supports_device=_supports_device,
    auto_select=lambda device: device.type == "cuda",
)
