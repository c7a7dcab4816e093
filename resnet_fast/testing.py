"""How parity is judged, by the tests, the benchmarks and ``python -m resnet_fast`` alike.

The rule (as in flash-attention's tests): a result in a given dtype may be at most twice as far from a
float64 reference as PyTorch's own result in that dtype, with a floor of about one unit of the format's
precision for results PyTorch happens to get exactly.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PRECISION_FLOOR", "parity_tolerance", "randomize_batch_norm", "relative_error"]

PRECISION_FLOOR = {
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
    torch.float32: 1e-5,  # fp32 rounding accumulated over a deep network
    torch.float64: 1e-12,
}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; NaN or Inf anywhere in ``out`` gives ``inf``."""
    out64 = out.detach().double()
    ref64 = ref.detach().double().to(out64.device)
    if not torch.isfinite(out64).all():
        return float("inf")
    return ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-300)).item()


def parity_tolerance(dtype: torch.dtype, torch_error: float) -> float:
    """The largest acceptable :func:`relative_error` for a ``dtype`` result, given PyTorch's own."""
    return max(2.0 * torch_error, PRECISION_FLOOR.get(dtype, 1e-5))


def randomize_batch_norm(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Gives every BatchNorm (``FrozenBatchNorm2d`` included) non-trivial statistics and affine parameters,
    so a bug in applying them shows."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)):
                if m.running_mean is not None:
                    m.running_mean.normal_(0.0, 0.2, generator=generator)
                    m.running_var.uniform_(0.5, 2.0, generator=generator)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5, generator=generator)
                    m.bias.normal_(0.0, 0.2, generator=generator)
    return model
