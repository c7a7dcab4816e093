"""Model builders and the convolution and stem parity checks shared by the tests."""
import collections
import contextlib
import copy
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
import torchvision

import resnet_fast
from resnet_fast import ops
from resnet_fast.ops import layout, reference
from resnet_fast.ops.layout import conv_output_size
from resnet_fast.testing import randomize_batch_norm

from conftest import lowp_tolerance, rel_err


def model_pair(arch: str, **kwargs):
    """(torchvision model, resnet_fast model) with identical random weights and randomised BN stats."""
    tv = randomize_batch_norm(getattr(torchvision.models, arch)(**kwargs))
    rf = getattr(resnet_fast, arch)(**kwargs)
    rf.load_state_dict(tv.state_dict(), strict=True)
    return tv, rf


def float64_copy(model):
    return copy.deepcopy(model).double()


# ---------------------------------------------------------------- conv kernels against float64

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRET = DEVICE == "cpu"
FP32_TOL = 1e-5
# Under the interpreter float32 -> bfloat16 casts truncate instead of rounding: one more bf16 ulp.
BF16_INTERPRETER_ULP = 2.0**-8 if INTERPRET else 0.0


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every conv kernel's output buffer (and the gather kernel's split-K partial sums) starts as NaN, so
    an element the kernels fail to write fails ``rel_err``: autouse in each test module that imports it."""
    from resnet_fast.kernels import conv_gather

    for owner, name in ((layout, "empty_conv_output"), (conv_gather, "_workspace")):
        allocate = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *args, _allocate=allocate, **kwargs: _allocate(*args, **kwargs)
                            .fill_(float("nan")))


ROOT = pathlib.Path(__file__).resolve().parent.parent

needs_a_driver = pytest.mark.skipif(not torch.cuda.is_available() and shutil.which("gcc") is None,
                                    reason="without a GPU, builds the stub libcuda with gcc")


def run_on_a_driver(code: str) -> str:
    """``code`` in a fresh process on the GPU, or without one on Triton's driver over the stub libcuda
    (benchmarks/stub_driver.py: kernels compile for sm_90, launches reach the driver, nothing runs); its
    output."""
    command = [sys.executable, "-c", code] if torch.cuda.is_available() else \
        [sys.executable, "-m", "benchmarks.stub_driver", "-c", code]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def batch_norm_tensors(c: int, dtype: torch.dtype, affine: bool = True) -> tuple:
    """(weight, bias, running_mean, running_var) of an eval-mode BatchNorm with non-trivial values."""
    mean, var = torch.randn(c, device=DEVICE, dtype=dtype) * 0.2, torch.rand(c, device=DEVICE, dtype=dtype) + 0.5
    if not affine:
        return None, None, mean, var
    return torch.rand(c, device=DEVICE, dtype=dtype) + 0.5, torch.randn(c, device=DEVICE, dtype=dtype) * 0.2, mean, var


def check_conv(
    n: int, c_in: int, c_out: int, hw: tuple[int, int], kernel: tuple[int, int], stride, padding, dilation,
    dtype: torch.dtype, channels_last: bool, residual: bool, relu: bool, bn: str = "none", conv_bias: bool = True,
    residual_channels_last: bool | None = None,
) -> collections.Counter:
    """Runs the conv op on the strict triton backend, checks it against float64 and returns how many calls
    each kernel family served (:func:`resnet_fast.kernels.conv.record_kernels`).

    ``bn``: ``"none"`` (``conv_bias_act``), ``"affine"`` / ``"plain"`` (``conv_bn_act`` with or without
    affine parameters, BN tensors in x's dtype) or ``"float32"`` (BN tensors in float32 while x is not:
    the autocast case). The BatchNorm is applied in the kernel's epilogue from these live tensors.
    The residual is in the other layout than x unless ``residual_channels_last`` says which.
    """
    from resnet_fast.kernels.conv import record_kernels

    fmt = memory_format(channels_last)
    # .to() restrides even where C_in = 1 makes NCHW and NHWC both 'contiguous' (.contiguous() would not).
    x = torch.randn(n, c_in, *hw, device=DEVICE, dtype=dtype).to(memory_format=fmt)
    # The weight in x's layout (models keep both channels_last on CUDA); scaled so outputs stay O(1).
    w = (torch.randn(c_out, c_in, *kernel, device=DEVICE) / (c_in * kernel[0] * kernel[1]) ** 0.5).to(dtype)
    w = w.to(memory_format=fmt)
    b = torch.randn(c_out, device=DEVICE, dtype=dtype) if conv_bias else None
    norm = () if bn == "none" else batch_norm_tensors(c_out, torch.float32 if bn == "float32" else dtype, bn != "plain")
    geometry = dict(stride=stride, padding=padding, dilation=dilation)
    h_out = conv_output_size(hw[0], kernel[0], *(pair(v)[0] for v in (stride, padding, dilation)))
    w_out = conv_output_size(hw[1], kernel[1], *(pair(v)[1] for v in (stride, padding, dilation)))
    r_fmt = memory_format(not channels_last if residual_channels_last is None else residual_channels_last)
    r = torch.randn(n, c_out, h_out, w_out, device=DEVICE, dtype=dtype).to(memory_format=r_fmt) if residual else None

    with resnet_fast.backend("triton", strict=True), record_kernels() as served:
        if norm:
            out = ops.conv_bn_act(x, w, b, *norm, 1e-3, residual=r, relu=relu, **geometry)
        else:
            out = ops.conv_bias_act(x, w, b, residual=r, relu=relu, **geometry)

    def ref(cast):
        norm_args = [None if t is None else cast(t) for t in norm] if norm else [None] * 4
        return reference.conv_bn_act(
            cast(x), cast(w), None if b is None else cast(b), *norm_args, 1e-3, pair(stride), pair(padding),
            pair(dilation), 1, None if r is None else cast(r), relu,
        )

    ref64 = ref(torch.Tensor.double)
    assert out.shape == ref64.shape and out.dtype == dtype
    fmt = layout.conv_output_format(x, w)
    assert out.is_contiguous(memory_format=fmt), f"output strides {out.stride()} are not {fmt}"
    err = rel_err(out, ref64)
    if dtype == torch.float32:  # exact products (float32 with TF32 on is torch's: conv_common)
        assert err <= FP32_TOL, err
    else:  # 16-bit: within 2x torch's own error
        tol = lowp_tolerance(dtype, ref(lambda t: t), ref64)
        if dtype == torch.bfloat16:
            tol += BF16_INTERPRETER_ULP
        assert err <= tol, (err, tol)
    return served


# Every distinct ResNet-50 convolution with the epilogue it runs with in the network:
# (C_in, C_out, kernel, stride, input size, residual, relu). The block's last 1x1 adds the residual
# and applies ReLU; the strided downsample 1x1 has neither; the others apply ReLU.
RESNET50_CONVS = [
    (3, 64, 7, 2, 224, False, True),
    (64, 64, 1, 1, 56, False, True), (64, 64, 3, 1, 56, False, True), (64, 256, 1, 1, 56, True, True),
    (256, 64, 1, 1, 56, False, True),
    (256, 128, 1, 1, 56, False, True), (128, 128, 3, 2, 56, False, True), (128, 512, 1, 1, 28, True, True),
    (256, 512, 1, 2, 56, False, False), (512, 128, 1, 1, 28, False, True), (128, 128, 3, 1, 28, False, True),
    (512, 256, 1, 1, 28, False, True), (256, 256, 3, 2, 28, False, True), (256, 1024, 1, 1, 14, True, True),
    (512, 1024, 1, 2, 28, False, False), (1024, 256, 1, 1, 14, False, True), (256, 256, 3, 1, 14, False, True),
    (1024, 512, 1, 1, 14, False, True), (512, 512, 3, 2, 14, False, True), (512, 2048, 1, 1, 7, True, True),
    (1024, 2048, 1, 2, 14, False, False), (2048, 512, 1, 1, 7, False, True), (512, 512, 3, 1, 7, False, True),
]  # fmt: skip


# ---------------------------------------------------------------- the stem against float64


def stem_tensors(c_in: int, c_out: int, dtype: torch.dtype, bias: bool = True) -> tuple:
    """(weight, bias, bn_weight, bn_bias, running_mean, running_var): weight and bias in ``dtype``, scaled so
    outputs stay O(1); the BatchNorm in float32, as a cast model or autocast keeps it."""
    w = (torch.randn(c_out, c_in, 7, 7, device=DEVICE) / (c_in * 49) ** 0.5).to(dtype)
    b = torch.randn(c_out, device=DEVICE).to(dtype) if bias else None
    f32 = dict(device=DEVICE)
    return w, b, torch.rand(c_out, **f32) + 0.5, torch.randn(c_out, **f32) * 0.2, torch.randn(c_out, **f32) * 0.2, \
        torch.rand(c_out, **f32) + 0.5


def check_stem(x: torch.Tensor, tensors: tuple, calls: list, autocast: torch.dtype | None = None) -> None:
    """The fused op on ``x`` against the float64 reference of x cast to the compute dtype (the spec casts
    before convolving), within 2x PyTorch's own error in that dtype."""
    w, b, *norm = tensors
    cast = contextlib.nullcontext() if autocast is None else torch.autocast(DEVICE, autocast)
    with resnet_fast.backend("triton", strict=True), cast:
        out = ops.stem(x, w, b, *norm, eps=1e-3)
    compute = autocast or w.dtype
    assert calls == [x.dtype], "the fused kernel must run once, on x as given (no cast before the op)"
    w, b = w.to(compute), None if b is None else b.to(compute)  # what the autocast rule does
    ref64 = reference.stem(*(None if t is None else t.double() for t in (x.to(compute), w, b, *norm)), 1e-3)
    assert out.shape == ref64.shape and out.dtype == compute
    assert out.is_contiguous(memory_format=layout.conv_output_format(x, w)), out.stride()
    tol = FP32_TOL
    if compute != torch.float32:
        tol = lowp_tolerance(compute, reference.stem(x, w, b, *norm, 1e-3), ref64)
        # The interpreter truncates float32 -> bfloat16 casts: the output's, and x's in the load when x
        # is cast there (a GPU rounds both).
        if compute == torch.bfloat16:
            tol += BF16_INTERPRETER_ULP * (2 if x.dtype != compute else 1)
    assert rel_err(out, ref64) <= tol, (rel_err(out, ref64), tol)



# ---------------------------------------------------------------- compiling kernels without a GPU

# Shared memory one block may use: A100 (sm_80) 163 KB, Ada (sm_89: L4, RTX 40xx) 99 KB, Hopper 227 KB.
SHARED_MEMORY = {80: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def compile_kernels(specs: list[dict]) -> list[dict]:
    """Compiles each spec for its architecture in processes without ``TRITON_INTERPRET`` (as many as
    there are cores, each compiling its share in turn); what each machine code uses, as
    ``tests/compile_kernels.py`` describes."""
    pytest.importorskip("triton.backends.nvidia")
    here = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(here), env.get("PYTHONPATH")]))
    shares = [specs[i::max(1, os.cpu_count() or 1)] for i in range(min(len(specs), os.cpu_count() or 1))]
    procs = [subprocess.Popen([sys.executable, os.path.join(here, "compile_kernels.py"), json.dumps(share)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for share in shares]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate()
        assert proc.returncode == 0, stderr[-3000:]
        results.append(json.loads(stdout))
    # share i holds specs i, i + len(shares), ...: deal the results back into the specs' order
    return [results[i % len(shares)][i // len(shares)] for i in range(len(specs))]


def descriptor_type(dtype: str, block_shape: list[int]) -> str:
    """The signature type of a host ``TensorDescriptor`` argument with this element type and box."""
    return f"tensordesc<{dtype}[{', '.join(map(str, block_shape))}]>"
