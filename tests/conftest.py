"""Shared test setup and helpers.

Without a GPU, Triton kernels run through Triton's interpreter on CPU tensors; the variable must be set
before any kernel module is imported, hence here, first.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import resnet_fast  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN or Inf anywhere in out counts as failure (inf)."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    return ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-300)).item()


def lowp_tolerance(dtype: torch.dtype, torch_same_dtype: torch.Tensor, ref64: torch.Tensor) -> float:
    """The project's parity rule for half precision: at most 2x torch's own same-dtype error against
    float64 (with a floor of one unit of the format's precision, for results torch gets exactly)."""
    floor = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}.get(dtype, 1e-6)
    return max(2 * rel_err(torch_same_dtype, ref64), floor)


@pytest.fixture(autouse=True)
def _fresh_backend_state():
    """Every test starts in auto mode and with fresh random inputs (no fixed seed)."""
    resnet_fast.set_backend("auto")
    yield
    resnet_fast.set_backend("auto")
