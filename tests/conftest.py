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
from resnet_fast.testing import parity_tolerance, relative_error  # noqa: E402

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


rel_err = relative_error


def lowp_tolerance(dtype: torch.dtype, torch_same_dtype: torch.Tensor, ref64: torch.Tensor) -> float:
    """The parity rule (resnet_fast.testing) given PyTorch's own same-dtype result."""
    return parity_tolerance(dtype, relative_error(torch_same_dtype, ref64))


@pytest.fixture(autouse=True)
def _exact_float32_convolutions():
    """float32 convolutions without TF32, so torch's float32 results are exact and the Triton kernels
    take float32 calls at all (with TF32 on, torch's default, they leave them to torch: TF32's ~1e-3
    errors would hide a kernel bug). Tests of the TF32 default turn it back on themselves."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


@pytest.fixture(autouse=True)
def _fresh_backend_state():
    """Every test starts in auto mode and with fresh random inputs (no fixed seed)."""
    resnet_fast.set_backend("auto")
    yield
    resnet_fast.set_backend("auto")


@pytest.fixture
def fused_calls(monkeypatch) -> list[torch.dtype]:
    """Selects the fused stem kernel and records the x dtype of each of its calls (the kernel module is
    imported here: it needs Triton, which the other tests do not)."""
    from resnet_fast.kernels import stem as stem_kernels

    monkeypatch.setenv("RESNET_FAST_STEM_KERNEL", "fused")
    calls = []
    fused = stem_kernels.STEM_KERNELS["fused"]

    def counted(x, *args):
        calls.append(x.dtype)
        return fused(x, *args)

    monkeypatch.setitem(stem_kernels.STEM_KERNELS, "fused", counted)
    return calls
