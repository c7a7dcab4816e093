"""The "triton" backend against the float64 reference.

On CPU these run through Triton's interpreter (conftest sets ``TRITON_INTERPRET=1``), so shapes stay
small. Every kernel call goes through the public op under ``backend("triton", strict=True)``: a
silent fallback to the reference would raise instead of passing. Outputs are poisoned with NaN at
allocation so an element the kernel fails to write cannot go unnoticed.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import types
import warnings

import pytest
import torch

import resnet_fast
from resnet_fast import backends, ops
from resnet_fast.backends import Unsupported
from resnet_fast.ops import reference
from resnet_fast.testing import randomize_batch_norm

from conftest import lowp_tolerance, rel_err, requires_cuda
from helpers import (  # noqa: F401 (poisoned_outputs: an autouse fixture)
    DEVICE, FP32_TOL, RESNET50_CONVS, SHARED_MEMORY, batch_norm_tensors, check_conv, compile_kernels,
    poisoned_outputs,
)

triton = pytest.importorskip("triton")
conv_kernels = pytest.importorskip("resnet_fast.kernels.conv_gather")

# Every (kernel, stride, dilation) geometry with every channel count; the remaining dimensions
# (layout, dtype, residual, ReLU, C_out parity, padding, BatchNorm) rotate through the cases so each value
# of each appears many times without a full cartesian product (which the interpreter could not afford).
_GEOMETRIES = list(itertools.product((1, 3, 7), (1, 2), (1, 2)))
_C_IN = (1, 3, 5, 16, 32)
_BN = ("affine", "none", "plain", "float32")
_SWEEP = []
for i, ((k, s, d), c_in) in enumerate(itertools.product(_GEOMETRIES, _C_IN)):
    # No padding, 'same' padding, or one more; at least enough that a 13-wide dilated 7x7 fits the 9x8 image.
    pad = max((0, (k // 2) * d, (k // 2) * d + 1)[i % 3], -(-((k - 1) * d + 1 - 8) // 2))
    dtype = (torch.float32, torch.float16)[(i // 2) % 2]
    bn = _BN[(i // 5) % 4] if dtype != torch.float32 else _BN[(i // 5) % 3]
    _SWEEP.append(
        pytest.param(
            c_in, (7, 8)[i % 2] + (i % 5) * 2, k, s, pad, d, dtype, bool(i % 3 % 2), bool((i // 3) % 2),
            bool(i % 4 < 3), bn, bool(i % 7 % 2),
            id=f"k{k}s{s}d{d}p{pad}-cin{c_in}-{bn}-{i}",
        )
    )


@pytest.mark.parametrize("c_in,c_out,k,stride,pad,dil,dtype,channels_last,residual,relu,bn,conv_bias", _SWEEP)
def test_conv_sweep(c_in, c_out, k, stride, pad, dil, dtype, channels_last, residual, relu, bn, conv_bias):
    check_conv(2, c_in, c_out, (9, 8), (k, k), stride, pad, dil, dtype, channels_last, residual, relu, bn, conv_bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_conv_epilogue_and_layouts(dtype, channels_last, residual, relu):
    """The full product of the epilogue options and layouts on one 3x3 conv (C_in not a multiple of 16)."""
    check_conv(1, 20, 9, (6, 7), (3, 3), 1, 1, 1, dtype, channels_last, residual, relu)


@pytest.mark.parametrize(
    "c_in,kernel,stride,padding,dilation,hw",
    [
        (4, (1, 3), (1, 2), (0, 1), 1, (5, 9)),  # non-square kernel, per-axis stride and padding
        (6, (3, 1), (2, 1), (2, 0), (2, 1), (9, 4)),  # per-axis dilation
        # every axis its own (kernel, stride, padding, dilation) on the tap-by-tap path (C_in >= BLOCK_K)
        (20, (3, 5), (2, 1), (1, 3), (2, 1), (11, 9)),
        (3, (7, 7), 2, 3, 1, (17, 15)),  # the ImageNet stem on an odd image
        (24, (3, 3), 2, 0, 1, (3, 3)),  # a single output pixel
        (8, (1, 1), 1, 0, 1, (1, 1)),  # a 1x1 image
        (40, (1, 1), 2, 0, 1, (11, 11)),  # the strided 1x1 downsample
        (8, (1, 1), 1, 0, 1, (23, 19)),  # 21 row tiles x 2 column tiles: a partial last GROUP_M group
    ],
)
def test_conv_odd_geometry(c_in, kernel, stride, padding, dilation, hw):
    check_conv(3, c_in, 33, hw, kernel, stride, padding, dilation, torch.float32, True, True, True)


@pytest.mark.parametrize("c_in,k,stride,pad", [(16, 3, 1, 1), (3, 7, 2, 3)])
def test_conv_bfloat16(c_in, k, stride, pad):
    """bf16 runs in the interpreter too (operands upcast for tl.dot there); fully checked on GPU below."""
    check_conv(2, c_in, 12, (9, 8), (k, k), stride, pad, 1, torch.bfloat16, True, True, True)


@pytest.mark.parametrize("split", [2, 3, 5])
@pytest.mark.parametrize(
    "c_in,k,stride,pad,hw,dtype,residual,bn",
    [
        (48, 3, 1, 1, (7, 7), torch.float32, True, "affine"),  # layer4 at batch 1: 49 pixels, the case it is for
        (40, 1, 1, 0, (5, 6), torch.float16, False, "float32"),
        (24, 3, 2, 1, (9, 8), torch.float16, True, "none"),
        (3, 7, 2, 3, (9, 9), torch.float32, False, "plain"),  # flattened K (the stem's branch)
    ],
)
def test_split_k(monkeypatch, split, c_in, k, stride, pad, hw, dtype, residual, bn):
    """The reduction split across programs (partials in a NaN-poisoned workspace, then the reduce kernel's
    epilogue): the same results, including splits with fewer K blocks than programs."""
    monkeypatch.setenv("RESNET_FAST_SPLIT_K", str(split))
    check_conv(1, c_in, 20, hw, (k, k), stride, pad, 1, dtype, True, residual, True, bn)


def test_split_k_choice():
    """Batch-1 ResNet-50 on 132 multiprocessors: the small late layers split, the big early ones do not."""
    blocks = lambda c_in, k: k * k * -(-c_in // 64)  # noqa: E731
    sms = 132
    assert conv_kernels.split_k(49, 512, blocks(512, 3), sms) == 16  # layer4 3x3: 8 tiles
    assert conv_kernels.split_k(49, 2048, blocks(512, 1), sms) == 2  # layer4 1x1 expand: 16 tiles, 8 K blocks
    assert conv_kernels.split_k(196, 256, blocks(256, 3), sms) == 8  # layer3 3x3: 8 tiles, 36 K blocks
    assert conv_kernels.split_k(3136, 64, blocks(64, 3), sms) == 2  # layer1 3x3: 49 tiles
    assert conv_kernels.split_k(12544, 64, blocks(3, 7), sms) == 1  # the stem: plenty of tiles
    assert conv_kernels.split_k(802816, 64, blocks(64, 3), sms) == 1  # batch 256


def test_conv_without_bias_and_with_strided_views():
    """No bias; x, weight and residual as non-contiguous views (neither NCHW nor NHWC dense)."""
    x = torch.randn(2, 10, 9, 16, device=DEVICE)[:, 1:8, :, ::2]  # [2, 7, 9, 8]
    w = torch.randn(12, 3, 3, 14, device=DEVICE).permute(0, 3, 1, 2)[:, ::2]  # [12, 7, 3, 3]
    r = torch.randn(2, 12, 6, 7, device=DEVICE).transpose(2, 3)  # [2, 12, 7, 6]
    with resnet_fast.backend("triton", strict=True):
        out = ops.conv_bias_act(x, w, None, stride=1, padding=0, residual=r, relu=True)
    ref = reference.conv_bn_act(x.double(), w.double(), None, None, None, None, None, 0.0, (1, 1), (0, 0), (1, 1), 1,
                                r.double(), True)
    assert rel_err(out, ref) <= FP32_TOL


def test_grouped_conv_goes_to_reference_explicitly(monkeypatch):
    x = torch.randn(1, 8, 5, 5, device=DEVICE)
    w = torch.randn(6, 4, 3, 3, device=DEVICE)
    with resnet_fast.backend("triton", strict=True):
        with pytest.raises(backends.Unsupported, match="grouped convolution"):
            ops.conv_bias_act(x, w, groups=2)
    monkeypatch.setattr(backends, "_warned", set())
    with resnet_fast.backend("triton"), pytest.warns(RuntimeWarning, match="grouped convolution"):
        out = ops.conv_bias_act(x, w, groups=2, relu=False)
    torch.testing.assert_close(out, torch.nn.functional.conv2d(x, w, groups=2))


def test_too_many_pixels_goes_to_reference():
    """Over 2^31 output pixels (int32 pixel index): Unsupported before anything is allocated."""
    x = torch.zeros(1, 1, 1, 1, device=DEVICE).expand(2, 1, 2**15, 2**15)  # no memory behind it
    w = torch.ones(1, 1, 1, 1, device=DEVICE)
    with resnet_fast.backend("triton", strict=True), pytest.raises(backends.Unsupported, match="32-bit pixel index"):
        ops.conv_bias_act(x, w)


def test_kernel_wider_than_31_taps_goes_to_reference():
    """A pixel's in-image taps are a 31-bit mask per axis: a 1x33 kernel is Unsupported (strict), and
    answered by the reference otherwise."""
    x = torch.randn(1, 16, 2, 40, device=DEVICE)
    w = torch.randn(4, 16, 1, 33, device=DEVICE)
    with resnet_fast.backend("triton", strict=True), pytest.raises(backends.Unsupported, match="31 taps per axis"):
        ops.conv_bias_act(x, w, padding=(0, 16))
    with resnet_fast.backend("triton"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = ops.conv_bias_act(x, w, padding=(0, 16), relu=False)
    torch.testing.assert_close(out, torch.nn.functional.conv2d(x, w, padding=(0, 16)))


def test_selection():
    """Auto mode picks triton for CUDA only (never the interpreter); loading is lazy."""
    name, _ = backends.resolve("conv_bn_act", torch.device("cpu"))
    assert name == "torch"
    if torch.cuda.is_available():
        assert backends.resolve("conv_bn_act", torch.device("cuda"))[0] == "triton"
    code = "import sys, resnet_fast; assert 'resnet_fast.kernels' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_training_through_the_kernel_forward():
    """With gradients needed the kernel still runs the forward (strict mode); the library op's backward
    gives the reference's gradients for x, the weight and every BatchNorm tensor."""
    x = torch.randn(2, 4, 6, 5, device=DEVICE)
    w = torch.randn(6, 4, 3, 3, device=DEVICE) / 6
    norm = batch_norm_tensors(6, torch.float32)
    r = torch.randn(2, 6, 6, 5, device=DEVICE)
    grads = []
    for name in ("triton", "torch"):
        leaves = [t.clone().requires_grad_() for t in (x, w, *norm, r)]
        with resnet_fast.backend(name, strict=True), backends.record_dispatch() as calls:
            out = ops.conv_bn_act(*leaves[:2], None, *leaves[2:6], padding=1, residual=leaves[6])
        assert calls == {("conv_bn_act", name): 1}
        (out * torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out)).sum().backward()
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads):
        assert rel_err(got, want) <= FP32_TOL


def test_batch_norm_is_read_live():
    """Edits to the BatchNorm tensors and the weight through .data (no version bump) show up in the next
    call: the kernel reads the tensors it is given, nothing is folded or kept."""
    x = torch.randn(1, 4, 5, 5, device=DEVICE)
    w = torch.randn(6, 4, 3, 3, device=DEVICE)
    gamma, beta, mean, var = batch_norm_tensors(6, torch.float32)
    with resnet_fast.backend("triton", strict=True):
        before = ops.conv_bn_act(x, w, None, gamma, beta, mean, var, padding=1, relu=False)
        for t in (gamma, beta, mean, var, w):
            t.data.mul_(2)
        after = ops.conv_bn_act(x, w, None, gamma, beta, mean, var, padding=1, relu=False)
    expected = reference.conv_bn_act(*(t.double() for t in (x, w)), None, gamma.double(), beta.double(),
                                     mean.double(), var.double(), 1e-5, (1, 1), (1, 1), (1, 1), 1, None, False)
    assert rel_err(after, expected) <= FP32_TOL and rel_err(after, before) > 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: torch.randn(1), id="1"),
        pytest.param(lambda: torch.randn(7), id="7"),
        pytest.param(lambda: torch.randn(1023), id="1023"),
        pytest.param(lambda: torch.randn(4097), id="4097"),
        pytest.param(lambda: torch.randn(()), id="0-d"),
        pytest.param(lambda: torch.randn(0, 3), id="empty"),
        pytest.param(lambda: torch.randn(3, 5, 7), id="3-D"),
        pytest.param(lambda: torch.randn(2, 3, 2, 5, 3), id="5-D"),
        pytest.param(lambda: torch.randn(2, 5, 3, 7).contiguous(memory_format=torch.channels_last), id="channels_last"),
        pytest.param(lambda: torch.randn(6, 9).t(), id="transposed"),
        pytest.param(lambda: torch.randn(4, 10, 3)[:, ::3], id="strided"),
    ],
)
@pytest.mark.parametrize("y_layout", ["same", "contiguous"])
def test_add_relu(make, dtype, y_layout):
    x = make().to(DEVICE, dtype)
    y = torch.randn_like(x) if y_layout == "same" else torch.randn(x.shape, device=DEVICE, dtype=dtype)
    with resnet_fast.backend("triton", strict=True):
        out = ops.add_relu(x, y)
    torch.testing.assert_close(out, torch.relu(x.double() + y.double()).to(dtype))
    assert out.stride() == torch.empty_like(x).stride()


# ---------------------------------------------------------------- compile without a GPU

# The real (not interpreted) gather kernel compiled for Ampere, Ada and Hopper (tests/compile_kernels.py):
# the NHWC fast path (unit channel strides and 16-divisible sizes, as Triton specialises them), the
# BatchNorm tensors in float32 (autocast), a conv without bias (None: specialised away), a residual.
_GATHER_ALIGNED = ["x_ptr", "w_ptr", "r_ptr", "y_ptr", "M", "C_in", "C_out", "H", "W", "sx_n", "sx_h", "sx_w", "sw_o",
                   "sw_h", "sw_w", "sr_n", "sr_h", "sr_w", "sy_n", "sy_h", "sy_w"]
# (dtype, kernel size, FLAT_K, BLOCK_M, BLOCK_N, BLOCK_K, stages, warps[, SPLIT_K])
_GATHER_CASES = {
    90: [
        ("fp16", 3, False, 128, 128, 64, 4, 8),  # a 3x3 body conv, BN + residual epilogue
        ("bf16", 7, True, 64, 64, 64, 5, 4),  # the 7x7 stem on 3 channels (flattened K)
        ("fp32", 1, False, 64, 64, 32, 4, 8),
        ("fp32", 3, False, 32, 64, 32, 3, 4),  # the fixed config of RESNET_FAST_AUTOTUNE=0
        ("bf16", 3, False, 32, 64, 64, 4, 4, 8),  # batch 1's layer4: a small-M tile, split-K partials
        # The widest tile, which spills (128 accumulators a thread): outside the main loop only.
        ("fp16", 3, False, 128, 256, 64, 3, 8),
    ],
    # Ampere and Ada keep the gather kernel: configs that fit their shared memory.
    80: [("fp16", 3, False, 128, 128, 32, 4, 8), ("bf16", 7, True, 64, 64, 64, 3, 4), ("fp32", 3, False, 32, 64, 32, 3, 4)],
    89: [("fp16", 3, False, 64, 64, 64, 4, 4), ("bf16", 7, True, 64, 64, 64, 3, 4), ("fp32", 3, False, 32, 64, 32, 3, 4)],
}


def _gather_spec(arch: int, dtype: str, kh: int, flat: bool, bm: int, bn: int, bk: int, stages: int, warps: int,
                 split: int = 1) -> dict:
    jit = conv_kernels._conv_gather_kernel
    types = {n: "*fp32" if n in ("bn_weight_ptr", "bn_bias_ptr", "mean_ptr", "var_ptr", "ws_ptr") else "*" + dtype
             for n in jit.arg_names if n.endswith("_ptr")}
    return dict(
        kernel="resnet_fast.kernels.conv_gather:_conv_gather_kernel", arch=arch, num_warps=warps, num_stages=stages,
        constants=dict(KH=kh, KW=kh, RELU=True, UPCAST=False, FLAT_K=flat, BLOCK_M=bm,
                       BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, sx_c=1, sw_c=1, bias_ptr=None, SPLIT_K=split,
                       **({} if split > 1 else {"ws_ptr": None})),
        types={**types, "eps": "fp32"}, aligned=_GATHER_ALIGNED,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels")
@pytest.mark.parametrize("arch", [80, 89, 90])
def test_gather_compiles(arch):
    """Every config compiles and fits the architecture's shared memory with all its pipeline stages; the
    main loop is cp.async-pipelined tensor-core MMA (except exact fp32): wgmma on Hopper (mma.sync for
    tiles under 64 channels), mma.sync (never wgmma) on Ampere and Ada. The main loop never touches local
    memory; ptxas spills the widest 16-bit tiles (128 accumulators a thread: ~100 stack bytes) in the
    prologue and epilogue only, once per tile."""
    cases = _GATHER_CASES[arch]
    for case, got in zip(cases, compile_kernels([_gather_spec(arch, *c) for c in cases])):
        dtype, kh, _, bm, bn, bk, stages = case[:7]
        stage_bytes = (bm + bn) * bk * int(dtype[2:]) // 8
        assert (stages - 1) * stage_bytes <= got["shared"] <= SHARED_MEMORY[arch], (case, got)
        assert got["ptx"]["cp.async."] and not got["ptx"]["ld.local"], (case, got)
        assert got["loop_spills"] in (0, None), (case, got)
        if bm * bn <= 64 * 64 and got["stack"] is not None:  # the stem and batch-1 tiles keep to registers
            assert got["stack"] <= 8, (case, got)
        tensor_cores = dtype != "fp32"  # exact float32 products run on FMAs
        # The product is transposed (channels x pixels): wgmma's 64-row minimum applies to BLOCK_N.
        if arch >= 90 and bn >= 64:
            assert bool(got["ptx"]["wgmma.mma_async"]) == tensor_cores, (case, got)
        else:
            assert not got["ptx"]["wgmma.mma_async"] and bool(got["ptx"]["mma.sync"]) == tensor_cores, (case, got)


def _fixed_config_case() -> tuple:
    c = conv_kernels._FIXED_GPU_CONFIG
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages, c.num_warps


def test_gather_compile_cases_hold_the_fixed_config():
    assert ("fp32", 3, False, *_fixed_config_case()) in _GATHER_CASES[90]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels")
def test_float32_autotune_candidates_compile_without_loop_spills():
    """Every config the autotuner would time for a large float32 3x3 layer keeps its main loop out of
    local memory (exact products run on FMAs, whose operand fragments take registers too)."""
    nargs = {"x_ptr": torch.empty(0), "C_out": 256, "M": 802816}
    kept = conv_kernels._prune_configs(conv_kernels._GPU_CONFIGS, nargs)
    cases = [("fp32", 3, False, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages,
              c.num_warps) for c in kept]
    assert len(cases) >= 2
    for case, got in zip(cases, compile_kernels([_gather_spec(90, *c) for c in cases])):
        assert got["loop_spills"] in (0, None) and not got["ptx"]["ld.local"], (case, got)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels")
def test_16bit_autotune_candidates_compile_for_hopper():
    """Every config the autotuner may time for a 16-bit 3x3 layer (batch 256's, and batch 1's where the
    small-M tiles join) compiles for sm_90 within its shared memory, keeps its main loop out of local
    memory, and runs its product on wgmma where the channel tile (BLOCK_N, the product's M side) is 64 or
    more: a candidate that failed here would fail on the GPU in the middle of autotuning. Those already in
    _GATHER_CASES are not compiled twice."""
    kept = []
    for m in (802816, 49):
        nargs = {"x_ptr": torch.empty(0, dtype=torch.float16), "C_out": 512, "M": m}
        kept += [c for c in conv_kernels._prune_configs(conv_kernels._GPU_CONFIGS, nargs) if c not in kept]
    assert len(kept) == len(conv_kernels._GPU_CONFIGS)
    cases = [("fp16", 3, False, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages,
              c.num_warps) for c in kept]
    cases = [c for c in cases if c not in _GATHER_CASES[90]]
    for case, got in zip(cases, compile_kernels([_gather_spec(90, *c) for c in cases])):
        assert got["shared"] <= SHARED_MEMORY[90] and not got["ptx"]["ld.local"], (case, got)
        assert got["loop_spills"] in (0, None), (case, got)
        assert bool(got["ptx"]["wgmma.mma_async"]) == (case[4] >= 64), (case, got)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels")
def test_loop_spill_check_sees_spills():
    """The check above can fail: a float32 256 x 256 tile on 4 warps (512 accumulators a thread) spills
    inside its main loop, and compile_kernels reports it."""
    (got,) = compile_kernels([_gather_spec(90, "fp32", 1, False, 256, 256, 16, 2, 4)])
    if got["loop_spills"] is None:
        pytest.skip("this Triton ships no cuobjdump")
    assert got["stack"] > 0 and got["loop_spills"] > 0, got


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels")
def test_split_k_reduce_compiles():
    """The split-K reduce kernel (sum of float32 partials, the shared epilogue, a bf16 store) for sm_90."""
    spec = dict(
        kernel="resnet_fast.kernels.conv_gather:_split_k_reduce_kernel", arch=90, num_warps=4, num_stages=1,
        constants=dict(RELU=True, SPLIT_K=8, bias_ptr=None, **conv_kernels._REDUCE_BLOCK),
        types={"ws_ptr": "*fp32", "bn_weight_ptr": "*fp32", "bn_bias_ptr": "*fp32", "mean_ptr": "*fp32",
               "var_ptr": "*fp32", "r_ptr": "*bf16", "y_ptr": "*bf16", "eps": "fp32"},
        aligned=["ws_ptr", "r_ptr", "y_ptr", "M", "C_out"],
    )
    (got,) = compile_kernels([spec])
    assert got["shared"] <= SHARED_MEMORY[90] and not got["ptx"]["ld.local"] and got["stack"] in (0, None), got


@pytest.mark.parametrize("dtype,c_out", [(torch.float16, 2048), (torch.float32, 2048), (torch.float32, 64), (torch.float16, 1)])
@pytest.mark.parametrize("m", [802816, 49])
def test_autotune_pruning(dtype, c_out, m):
    """GPU autotuning only times configs that fit Hopper's shared memory, C_out and M (at least one), with
    the small-M tiles only for small M (batch 1)."""
    configs = conv_kernels._GPU_CONFIGS
    kept = conv_kernels._prune_configs(configs, {"x_ptr": torch.empty(0, dtype=dtype), "C_out": c_out, "M": m})
    assert kept and set(kept) <= set(configs)
    for c in kept:
        bm, n, k = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"]
        assert (bm + n) * k * dtype.itemsize * c.num_stages <= 227 * 1024
        assert bm * n // (32 * c.num_warps) <= (128 if dtype != torch.float32 else 16)
        assert n <= max(32, c_out) and bm <= max(16, triton.next_power_of_2(m))
        assert bm >= 64 or m <= conv_kernels._SMALL_M
    if m == 49 and c_out >= 64:
        assert any(c.kwargs["BLOCK_M"] < 64 for c in kept)


@pytest.fixture
def fp32_precision_settings():
    """Restores torch's TF32 settings, legacy flag and fp32_precision tree, after a test that edits them."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    legacy, cudnn_all, generic, matmul_tf32 = (cudnn.allow_tf32, cudnn.fp32_precision, torch.backends.fp32_precision,
                                               matmul.allow_tf32)
    yield
    cudnn.fp32_precision, torch.backends.fp32_precision = cudnn_all, generic
    cudnn.allow_tf32, matmul.allow_tf32 = legacy, matmul_tf32


@pytest.mark.skipif(not hasattr(torch.backends, "fp32_precision"), reason="torch without fp32_precision settings")
def test_float32_declined_exactly_where_torchs_convolutions_use_tf32(fp32_precision_settings):
    """float32 CUDA calls are left to torch exactly where its cuDNN convolutions would use TF32 (by
    default, through the legacy flag or through the fp32_precision tree: conv, then cuDNN, then global),
    whatever the matmul setting; 16-bit and CPU (interpreter) calls never."""
    from resnet_fast.kernels import conv_common

    cudnn = torch.backends.cudnn
    cuda_f32, cuda_f16 = (types.SimpleNamespace(is_cuda=True, dtype=d) for d in (torch.float32, torch.float16))

    def declined(matmul_tf32=False):
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
        return conv_common.float32_unsupported_reason(cuda_f32) is not None

    cudnn.allow_tf32 = True  # torch's default
    assert declined() and conv_common.float32_unsupported_reason(cuda_f16) is None
    assert conv_common.float32_unsupported_reason(torch.empty(1)) is None
    cudnn.allow_tf32 = False
    assert not declined(matmul_tf32=True)
    cudnn.fp32_precision = "tf32"  # every cuDNN op, conv included
    assert declined()
    cudnn.conv.fp32_precision = "ieee"  # the conv setting wins over cuDNN's
    assert not declined()
    cudnn.conv.fp32_precision, cudnn.fp32_precision, torch.backends.fp32_precision = "none", "none", "tf32"
    assert declined()
    torch.backends.fp32_precision = "ieee"
    assert not declined()
    cudnn.conv.fp32_precision = "tf32"  # mixed APIs: reading cudnn.allow_tf32 would raise here
    assert declined()


# ---------------------------------------------------------------- GPU only



@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("c_in,c_out,k,stride,size,residual,relu", RESNET50_CONVS)
def test_resnet50_conv_shapes_gpu(c_in, c_out, k, stride, size, residual, relu, dtype):
    check_conv(2, c_in, c_out, (size, size), (k, k), stride, k // 2, 1, dtype, True, residual, relu)


@requires_cuda
def test_float32_with_tf32_runs_on_torchs_convolution_gpu(monkeypatch):
    """Under torch's default (TF32 for cuDNN convolutions) a float32 conv is torch's own: the Triton
    backend declines it (strict mode raises, auto mode answers with the reference), so it carries
    cuDNN's TF32 rounding, not Triton's truncation (2-2.6x the error on an H200)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    x = torch.randn(2, 64, 28, 28, device="cuda").to(memory_format=torch.channels_last)
    w = (torch.randn(64, 64, 3, 3, device="cuda") / 24).to(memory_format=torch.channels_last)
    with resnet_fast.backend("triton", strict=True), torch.no_grad(), pytest.raises(Unsupported, match="TF32"):
        ops.conv_bias_act(x, w, None, padding=1, relu=False)
    with backends.record_dispatch() as calls, torch.no_grad():
        out = ops.conv_bias_act(x, w, None, padding=1, relu=False)
    assert dict(calls) == {("conv_bn_act", "torch"): 1}
    torch.testing.assert_close(out, torch.nn.functional.conv2d(x, w, padding=1))


@requires_cuda
def test_int64_offsets_gpu():
    """Activations past 2^31 elements: the last image's offsets overflow int32 (checked on it alone)."""
    if torch.cuda.mem_get_info()[0] < 20 * 2**30:
        pytest.skip("needs 20 GiB of free GPU memory")
    shape, cl = (132, 64, 512, 512), torch.channels_last  # 2.2e9 elements
    x = torch.empty(shape, device="cuda", dtype=torch.float16, memory_format=cl).normal_()
    r = torch.empty(shape, device="cuda", dtype=torch.float16, memory_format=cl).normal_()
    w = (torch.randn(64, 64, 3, 3, device="cuda") / 24).half().contiguous(memory_format=cl)
    b = torch.randn(64, device="cuda", dtype=torch.float16)
    with resnet_fast.backend("triton", strict=True), torch.no_grad():
        out = ops.conv_bias_act(x, w, b, padding=1, residual=r, relu=True)
        summed = ops.add_relu(x, r)

    def ref(*ts):
        return reference.conv_bn_act(*ts[:3], None, None, None, None, 0.0, (1, 1), (1, 1), (1, 1), 1, ts[3], True)

    last = (x[-1:], w, b, r[-1:])
    ref64 = ref(*(t.double() for t in last))
    assert rel_err(out[-1:], ref64) <= lowp_tolerance(torch.float16, ref(*last), ref64)
    torch.testing.assert_close(summed[-1], torch.relu(x[-1] + r[-1]))


@requires_cuda
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_model_vs_torchvision_gpu(name, dtype):
    """Eval outputs within 2x torchvision's own same-dtype error against a float64 torchvision."""
    tv_models = pytest.importorskip("torchvision.models")
    tv = randomize_batch_norm(getattr(tv_models, name)()).eval()  # so the BN epilogue is really exercised
    model = getattr(resnet_fast, name)().eval()
    model.load_state_dict(tv.state_dict())
    x = torch.randn(2, 3, 224, 224, device="cuda")
    with torch.no_grad():
        ref64 = tv.cuda().double()(x.double())
        torch_same = tv.to(dtype)(x.to(dtype))
        model = model.cuda().to(dtype)
        with resnet_fast.backend("triton", strict=True):
            out = model(x.to(dtype))
    tol = FP32_TOL * 10 if dtype == torch.float32 else lowp_tolerance(dtype, torch_same, ref64)
    assert rel_err(out, ref64) <= max(tol, 2 * rel_err(torch_same, ref64))


# ---------------------------------------------------------------- end to end, interpreter or GPU


@pytest.mark.parametrize("block", ["BasicBlock", "Bottleneck"])
def test_tiny_net_end_to_end(block):
    """A two-stage CIFAR-stem net in eval mode: triton backend (strict) against the torch backend."""
    net = resnet_fast.ResNet(getattr(resnet_fast, block), [1, 1], widths=(8, 16), stem="cifar", num_classes=10)
    net = randomize_batch_norm(net).eval().to(DEVICE)
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    with torch.no_grad():
        with resnet_fast.backend("torch"):
            ref = net(x)
        with resnet_fast.backend("triton", strict=True):
            out = net(x)
    assert rel_err(out, ref) <= FP32_TOL
