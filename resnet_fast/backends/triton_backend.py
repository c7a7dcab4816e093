"""The ``"triton"`` backend: fused Triton kernels for ``conv_bn_act``, ``add_relu`` and ``stem``.

Chosen automatically for CUDA tensors (priority 20). It also runs on CPU tensors under Triton's
interpreter (``TRITON_INTERPRET=1``), but only when selected explicitly, which is how the tests use it.
Forward kernels only: the library ops' backward formulas use torch's own convolution backward. Grouped
convolutions raise :class:`~resnet_fast.backends.Unsupported` and are answered by the reference.
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
    from resnet_fast.kernels.conv import conv_bn_act
    from resnet_fast.kernels.stem import stem

    return {"conv_bn_act": conv_bn_act, "add_relu": add_relu, "stem": stem}


def _supports_device(device: torch.device) -> bool:
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


register_backend(
    "triton",
    _load,
    priority=20,
    supports_device=_supports_device,
    auto_select=lambda device: device.type == "cuda",
)
