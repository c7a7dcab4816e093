"""The tensor-descriptor (TMA) convolution families, ``gemm_tma`` and ``patch_tma``, and the per-layer-class
choice between them and the gather kernel (:mod:`resnet_fast.kernels.conv`).

Every call goes through the public op under ``backend("triton", strict=True)`` with the family forced by
``RESNET_FAST_CONV_KERNEL``, is checked against float64 with NaN-poisoned outputs, and asserts which
family served it (:func:`~resnet_fast.kernels.conv.record_kernels`). On CPU the kernels run in Triton's
interpreter, which executes host ``TensorDescriptor`` loads and stores (zero fill at negative and
past-the-end coordinates included); the real machine code is compile-checked for sm_90 at the end.
"""

from __future__ import annotations

import collections
import random

import pytest
import torch
from torch import nn

import resnet_fast
from resnet_fast import backends, ops
from resnet_fast.ops import layout
from resnet_fast.ops.layout import conv_output_size

from conftest import requires_cuda
from helpers import (  # noqa: F401 (poisoned_outputs: an autouse fixture)
    DEVICE, INTERPRET, RESNET50_CONVS, SHARED_MEMORY, check_conv, compile_kernels, descriptor_type, poisoned_outputs,
)

pytest.importorskip("triton")
conv = pytest.importorskip("resnet_fast.kernels.conv")
from resnet_fast.kernels import conv_gemm_tma, conv_patch_tma  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16




def _tma_takes(dtype: torch.dtype) -> bool:
    """Whether the TMA families take this dtype here: on a GPU 16-bit only (exact float32 products are
    not wgmma work, and with TF32 on float32 is torch's); the interpreter checks float32 too."""
    return dtype != F32 or INTERPRET


@pytest.fixture
def force(monkeypatch):
    """``force(name)`` sets ``RESNET_FAST_CONV_KERNEL`` for the test (None: the table's defaults)."""

    def set_forced(name: str | None) -> None:
        if name is None:
            monkeypatch.delenv(conv.FORCE_VARIABLE, raising=False)
        else:
            monkeypatch.setenv(conv.FORCE_VARIABLE, name)

    return set_forced


# ---------------------------------------------------------------- parity of each TMA path

# (n, C_in, C_out, (H, W), (kH, kW), stride, padding, dilation, dtype, residual, relu, bn, conv bias).
# H and W are not multiples of the patches or tiles; batch 1 and > 1; every epilogue option.
_PATCH_CASES = [
    (2, 16, 32, (9, 8), (3, 3), 1, 1, 1, F32, True, True, "affine", True),
    (1, 32, 16, (7, 9), (3, 3), 1, 1, 1, F16, False, True, "float32", False),
    (3, 16, 24, (10, 6), (3, 3), 2, 1, 1, F32, True, False, "plain", True),  # stride 2: four phases
    (2, 32, 16, (6, 10), (3, 3), 2, 1, 1, F16, True, True, "none", True),
    (1, 16, 16, (8, 8), (3, 3), 2, 0, 1, F32, False, False, "affine", False),  # no padding, stride 2
    (2, 16, 16, (7, 9), (3, 3), 1, 2, 2, F32, True, True, "float32", True),  # dilation 2
    (1, 16, 8, (11, 6), (3, 3), 1, 3, 3, F16, False, True, "plain", True),  # dilation 3, wide padding
    (2, 16, 32, (10, 10), (1, 1), 2, 0, 1, F32, True, False, "affine", True),  # the strided 1x1 downsample
    (3, 48, 8, (6, 6), (1, 1), 2, 0, 1, F16, False, True, "none", False),
    (2, 16, 16, (12, 12), (7, 7), 2, 3, 1, F32, False, True, "affine", True),  # a 7x7 stride-2 stem, 16 channels
    (1, 16, 16, (9, 8), (5, 5), 1, 2, 1, F16, True, True, "affine", True),
    (2, 16, 8, (6, 9), (1, 3), (2, 1), (0, 1), 1, F32, True, True, "none", True),  # per-axis kernel, stride
    (1, 32, 16, (5, 6), (1, 1), 1, 1, 1, F32, True, True, "plain", True),  # a padded 1x1: not a GEMM
    (2, 16, 8, (9, 8), (3, 3), 1, 1, 1, BF16, True, True, "float32", True),
    (2, 16, 8, (8, 10), (3, 3), 2, 1, 1, BF16, False, True, "affine", False),
]
_GEMM_CASES = [
    (2, 16, 32, (9, 8), (1, 1), 1, 0, 1, F32, True, True, "affine", True),
    (1, 24, 40, (5, 7), (1, 1), 1, 0, 1, F32, False, False, "plain", False),  # channels not powers of two
    (3, 64, 16, (3, 5), (1, 1), 1, 0, 1, F16, True, False, "float32", True),  # several K blocks
    (1, 8, 8, (1, 1), (1, 1), 1, 0, 1, F16, False, True, "none", True),  # one pixel, 16-byte rows
    (2, 32, 24, (7, 7), (1, 1), 1, 0, 2, F16, True, True, "affine", False),  # dilation means nothing at 1x1
    (2, 16, 16, (6, 5), (1, 1), 1, 0, 1, BF16, True, True, "float32", True),
]


def _run(case, **layouts) -> collections.Counter:
    """:func:`helpers.check_conv` on a case tuple; returns the families that served it."""
    n, c_in, c_out, hw, kernel, stride, padding, dilation, dtype, residual, relu, bn, conv_bias = case
    return check_conv(n, c_in, c_out, hw, kernel, stride, padding, dilation, dtype, residual=residual, relu=relu,
                      bn=bn, conv_bias=conv_bias, **layouts)


def _case_id(case) -> str:
    n, c_in, c_out, hw, k, s, p, d, dtype, res, relu, bn, bias = case
    return (f"n{n}-{c_in}to{c_out}-{hw[0]}x{hw[1]}-k{k[0]}x{k[1]}s{s}p{p}d{d}-{str(dtype)[6:]}"
            f"{'-res' if res else ''}{'-relu' if relu else ''}-{bn}{'-bias' if bias else ''}")


@pytest.mark.parametrize("case", [pytest.param(c, id=_case_id(c)) for c in _PATCH_CASES])
def test_patch_tma_parity(case, force):
    force("tma")
    want = "patch_tma" if _tma_takes(case[8]) else "gather"
    assert _run(case, channels_last=True, residual_channels_last=True) == {want: 1}


@pytest.mark.parametrize("case", [pytest.param(c, id=_case_id(c)) for c in _GEMM_CASES])
@pytest.mark.parametrize("family", ["gemm_tma", "patch_tma"])
def test_gemm_tma_parity(case, family, force):
    """1x1 stride-1 convolutions on the GEMM family, and on the patch family (one tap) when forced: that
    one needs C_in in blocks of 16 and leaves the rest to gather."""
    force("tma" if family == "gemm_tma" else family)
    want = family if _tma_takes(case[8]) and (family == "gemm_tma" or case[1] % 16 == 0) else "gather"
    assert _run(case, channels_last=True, residual_channels_last=True) == {want: 1}


@requires_cuda
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("c_in,c_out,k,stride,size,residual,relu", RESNET50_CONVS)
def test_resnet50_conv_shapes_gpu(c_in, c_out, k, stride, size, residual, relu, dtype, force):
    """Every ResNet-50 convolution with TMA forced, on the real kernels: each but the stem on its TMA
    family on Hopper in 16-bit, all on gather in float32 and before Hopper."""
    force("tma")
    served = check_conv(2, c_in, c_out, (size, size), (k, k), stride, k // 2, 1, dtype, True, residual, relu,
                        residual_channels_last=True)
    hopper = torch.cuda.get_device_capability()[0] >= 9
    family = "gemm_tma" if (k, stride) == (1, 1) else "patch_tma"
    assert served == {family if hopper and c_in != 3 and dtype != F32 else "gather": 1}


# ---------------------------------------------------------------- the seeded sweep through the dispatcher


def _expected_family(forced: str | None, c_in: int, c_out: int, hw: tuple, kernel: tuple, stride: tuple,
                     padding: tuple, dtype: torch.dtype, channels_last: bool, residual: str) -> str:
    """The family that must serve a call, from the families' documented requirements (not from conv.py)."""
    if forced in (None, "gather") or not _tma_takes(dtype):
        return "gather"
    one_by_one = kernel == (1, 1) and padding == (0, 0)
    if forced == "tma":
        forced = "gemm_tma" if one_by_one and stride == (1, 1) else "patch_tma"
    item = dtype.itemsize
    descriptors = (channels_last and c_in * item % 16 == 0 and c_out * item % 16 == 0
                   and residual in ("none", "channels_last"))
    if forced == "gemm_tma":
        return forced if descriptors and one_by_one and stride == (1, 1) else "gather"
    phases = hw[0] % stride[0] == 0 and hw[1] % stride[1] == 0
    return forced if descriptors and phases and c_in % 16 == 0 else "gather"


def _sweep_cases(count: int, seed: int) -> list:
    """Random cases: two in three drawn where a TMA family can serve them (forced, 16-byte channel rows,
    even maps at stride 2, channels_last, no NCHW residual), the others from every value, so that they
    cover each reason to fall back to gather."""
    rng = random.Random(seed)
    cases = []
    while len(cases) < count:
        tma = rng.random() < 2 / 3
        k = rng.choice([1, 1, 3, 3, 5])
        kernel = (k, k) if rng.random() < 0.85 else (k, rng.choice([1, 3]))
        s = rng.choice([1, 1, 2])
        stride = (s, s) if rng.random() < 0.85 else (s, 3 - s)
        dilation = rng.choice([1, 1, 2])
        padding = (0, 0) if k == 1 and rng.random() < 0.7 else (rng.randint(0, 2),) * 2
        hw = tuple(d + d % 2 if tma else d for d in (rng.randint(1, 10), rng.randint(1, 10)))
        if any(conv_output_size(hw[i], kernel[i], stride[i], padding[i], dilation) < 1 for i in (0, 1)):
            continue
        case = dict(
            forced=rng.choice(["tma", "tma", "patch_tma"] if tma else [None, "tma", "gemm_tma", "patch_tma", "gather"]),
            n=rng.choice([1, 2, 3]), c_in=rng.choice([16, 32, 48] if tma else [3, 8, 16, 24, 32]),
            c_out=rng.choice([8, 16, 24, 32, 40] if tma else [4, 8, 12, 16, 40]), hw=hw, kernel=kernel, stride=stride,
            padding=padding, dilation=dilation, dtype=rng.choice([F32, F16, F16, BF16]),
            channels_last=tma or rng.random() < 0.7,
            residual=rng.choice(["none", "channels_last"] + ([] if tma else ["nchw"])),
            relu=rng.random() < 0.5, bn=rng.choice(["none", "affine", "plain", "float32"]),
            conv_bias=rng.random() < 0.5,
        )
        case_id = (f"{len(cases)}-{case['forced']}-{case['n']}x{case['c_in']}to{case['c_out']}-{hw[0]}x{hw[1]}"
                   f"-k{kernel[0]}{kernel[1]}s{stride[0]}{stride[1]}p{padding[0]}d{dilation}")
        cases.append(pytest.param(case, id=case_id))
    return cases


@pytest.mark.parametrize("case", _sweep_cases(220, seed=12))
def test_sweep_through_dispatcher(case, force):
    """220 random tiny convolutions (shape, stride, padding, dilation, channels, layouts, dtype, residual,
    ReLU, BatchNorm, bias, forced family): parity, and the family that served each one."""
    c = dict(case)
    force(c.pop("forced"))
    want = _expected_family(case["forced"], c["c_in"], c["c_out"], c["hw"], c["kernel"], c["stride"], c["padding"],
                            c["dtype"], c["channels_last"], c["residual"])
    residual = c.pop("residual")
    served = check_conv(**c, residual=residual != "none", residual_channels_last=residual == "channels_last")
    assert served == {want: 1}


# ---------------------------------------------------------------- what cannot use descriptors


def _conv_inputs(c_in=16, c_out=16, hw=(8, 8), k=3, dtype=F16, channels_last=True):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, c_in, *hw, device=DEVICE, dtype=dtype).to(memory_format=fmt)
    w = torch.randn(c_out, c_in, k, k, device=DEVICE, dtype=dtype).to(memory_format=fmt)
    return x, w


_UNSUPPORTED = {
    "nchw": (lambda: _conv_inputs(channels_last=False), "channels_last"),
    "3-channel stem": (lambda: _conv_inputs(c_in=3), "channels_last with 16-byte"),
    "20 channels in fp16": (lambda: _conv_inputs(c_in=20), "16-byte"),
    "24 channels in fp16": (lambda: _conv_inputs(c_in=24), "blocks of 16"),
    "12 output channels in fp16": (lambda: _conv_inputs(c_out=12), "output channels"),
    "odd map at stride 2": (lambda: _conv_inputs(hw=(7, 8)), "phases"),
    "unaligned view": (lambda: (_conv_inputs(c_in=24)[0][:, 4:20], _conv_inputs()[1]), "16-byte"),  # base + 8 bytes
    "float64": (lambda: _conv_inputs(dtype=torch.float64), "dtype"),
}


@pytest.mark.parametrize("name", list(_UNSUPPORTED))
def test_unsupported_raises_before_launch_and_falls_back_to_gather(name, force, monkeypatch):
    """Each TMA family raises Unsupported with its reason before allocating or launching anything; the
    dispatcher, told to use TMA, runs such calls on the gather kernel instead (never the reference)."""
    make, reason = _UNSUPPORTED[name]
    x, w = make()
    stride = (2, 2) if name == "odd map at stride 2" else (1, 1)
    args = (x, w, None, None, None, None, None, 1e-5, stride, (1, 1), (1, 1), 1, None, True)
    monkeypatch.setattr(layout, "empty_conv_output", lambda *a: pytest.fail("allocated before raising"))
    with pytest.raises(backends.Unsupported, match=reason):
        conv_patch_tma.conv_bn_act(*args)
    monkeypatch.undo()
    if x.dtype == torch.float64:
        return  # no Triton kernel takes float64: the op sends it to the reference
    force("tma")
    with resnet_fast.backend("triton", strict=True), conv.record_kernels() as served:
        ops.conv_bias_act(x, w, stride=stride, padding=1)
    assert served == {"gather": 1}


def test_gemm_unsupported_reasons():
    x, w = _conv_inputs(k=1)
    assert conv_gemm_tma.unsupported_reason(x, w, (1, 1), (0, 0), (1, 1), 1, None) is None
    assert "1x1" in conv_gemm_tma.unsupported_reason(x, w, (2, 2), (0, 0), (1, 1), 1, None)
    assert "1x1" in conv_gemm_tma.unsupported_reason(x, w, (1, 1), (1, 1), (1, 1), 1, None)
    assert "grouped" in conv_gemm_tma.unsupported_reason(x, w[:, :8], (1, 1), (0, 0), (1, 1), 2, None)
    rows_apart = x[:, :, :, :4]  # each row of pixels is half of what x's row stride spans
    assert "matrix" in conv_gemm_tma.unsupported_reason(rows_apart, w, (1, 1), (0, 0), (1, 1), 1, None)
    nchw_residual = torch.randn(2, 16, 8, 8, device=DEVICE, dtype=F16)
    assert "residual" in conv_gemm_tma.unsupported_reason(x, w, (1, 1), (0, 0), (1, 1), 1, nchw_residual)


# ---------------------------------------------------------------- selection


def test_defaults_are_gather_until_measured(force):
    """No GPU measurement has made a TMA family a default: every class runs gather unless forced."""
    force(None)
    assert {default for default, _ in conv.TABLE.values()} == {"gather"}
    for k, stride in ((1, 1), (1, 2), (3, 1), (3, 2)):
        x, w = _conv_inputs(k=k)
        assert conv.select(x, w, (stride, stride), (k // 2,) * 2, (1, 1), 1) == "gather"
        assert conv.kernel_for(x, w, (stride, stride), (k // 2,) * 2, (1, 1), 1, None) == "gather"


def test_layer_classes_and_forcing(force):
    x, w1 = _conv_inputs(k=1)
    _, w3 = _conv_inputs(k=3)
    assert conv.layer_class(w1, (1, 1), (0, 0)) == "1x1"
    assert conv.layer_class(w1, (2, 2), (0, 0)) == "1x1 strided"
    assert conv.layer_class(w1, (1, 1), (1, 1)) == "kxk"
    assert conv.layer_class(w3, (1, 1), (1, 1)) == "kxk"
    force("tma")
    assert conv.kernel_for(x, w1, (1, 1), (0, 0), (1, 1), 1, None) == "gemm_tma"
    assert conv.kernel_for(x, w1, (2, 2), (0, 0), (1, 1), 1, None) == "patch_tma"
    assert conv.kernel_for(x, w3, (1, 1), (1, 1), (1, 1), 1, None) == "patch_tma"
    force("gemm_tma")
    assert conv.kernel_for(x, w3, (1, 1), (1, 1), (1, 1), 1, None) == "gather"  # not a GEMM
    force("patch_tma")
    assert conv.kernel_for(x, w1, (1, 1), (0, 0), (1, 1), 1, None) == "patch_tma"
    force("cudnn")
    with resnet_fast.backend("triton", strict=True), pytest.raises(backends.Unsupported, match="cudnn"):
        ops.conv_bias_act(x, w3, padding=1)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] >= 9,
                    reason="needs a GPU older than Hopper")
def test_tma_falls_back_to_gather_before_hopper(force):
    force("tma")
    x, w = _conv_inputs(k=3)
    assert "compute capability" in conv_patch_tma.unsupported_reason(x, w, (1, 1), (1, 1), (1, 1), 1, None)
    assert conv.kernel_for(x, w, (1, 1), (1, 1), (1, 1), 1, None) == "gather"


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("forced", [None, "tma"])
def test_resnet_convs_get_their_kernel(arch, forced, force, monkeypatch):
    """Every convolution of a channels_last model at 224x224 reaches the family its class names: gather by
    default; with TMA forced, the stem (3 channels) gather, 1x1 stride-1 gemm_tma, the strided 1x1
    downsamples and all 3x3 convs patch_tma. The real dispatch runs; the kernels are stubbed out."""
    served = collections.Counter()

    def stub(name):
        def run(x, weight, bias, bn_weight, bn_bias, mean, var, eps, stride, padding, dilation, groups, residual,
                relu):
            served[name, tuple(weight.shape), tuple(stride)] += 1
            h, w = (conv_output_size(x.shape[2 + i], weight.shape[2 + i], stride[i], padding[i], dilation[i])
                    for i in (0, 1))
            return layout.empty_conv_output(x, weight, h, w).zero_()

        return run

    for name in conv.KERNELS:
        monkeypatch.setitem(conv.KERNELS, name, stub(name))
    force(forced)
    dtype = F32 if INTERPRET else F16  # what the TMA families take here (_tma_takes)
    model = getattr(resnet_fast, arch)().eval().to(DEVICE, dtype, memory_format=torch.channels_last)
    with resnet_fast.backend("triton", strict=True), torch.no_grad():
        model(torch.randn(1, 3, 224, 224, device=DEVICE, dtype=dtype).to(memory_format=torch.channels_last))

    expected = collections.Counter()
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            family = ("gather" if forced is None or m.in_channels == 3
                      else "gemm_tma" if m.kernel_size == (1, 1) and m.stride == (1, 1) else "patch_tma")
            expected[family, tuple(m.weight.shape), m.stride] += 1
    assert served == expected
    if forced:  # resnet18 has no 1x1 stride-1 convolution
        assert {f for f, _, _ in served} == {"gather", "patch_tma", *(["gemm_tma"] if arch == "resnet50" else [])}


# ---------------------------------------------------------------- tiling


def test_resnet50_patches_waste_nothing_at_batch_256():
    for size, patch in ((56, (8, 8)), (28, (4, 4)), (14, (2, 2)), (7, (1, 1))):
        assert conv_patch_tma.patch_shape(256, size, size) == patch
    # Batch 1 at 7x7: one 8x8 patch (64 pixels, 49 used) beats 64 images of one pixel.
    assert conv_patch_tma.patch_shape(1, 7, 7) == (8, 8)


def _descriptor(dtype: torch.dtype) -> TensorDescriptor:
    return TensorDescriptor.from_tensor(torch.empty(8, 8, dtype=dtype), [8, 8])


@pytest.mark.parametrize("dtype", [F16, BF16, F32])
@pytest.mark.parametrize("residual", [False, True])
def test_pruned_configs_fit(dtype, residual):
    """Autotuning only times configs that fit Hopper's shared memory (with the output and residual tiles,
    residual or not, where the kernel keeps them apart) and the problem; at least one always remains."""
    y = _descriptor(dtype)
    block_k = 128 // dtype.itemsize
    gemm = conv_gemm_tma._prune_configs(conv_gemm_tma._GPU_CONFIGS, {"y_desc": y, "r_desc": y if residual else None,
                                                                     "C_out": 2048}, BLOCK_K=block_k)
    patch = conv_patch_tma._prune_configs(conv_patch_tma._GPU_CONFIGS, {"y_desc": y, "C_out": 64, "N": 2},
                                          PATCH_H=8, PATCH_W=8, BLOCK_K=block_k)
    for kept, tiles in ((gemm, 2), (patch, 0)):
        assert kept
        for c in kept:
            m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            assert ((m + n) * block_k * c.num_stages + tiles * m * n) * dtype.itemsize <= SHARED_MEMORY[90]
    assert all(c.kwargs["BLOCK_N"] == 64 and c.kwargs["BLOCK_M"] <= 128 for c in patch)  # 64 channels, 2 images


# ---------------------------------------------------------------- compile for Hopper without a GPU

_CHANNEL_VECTORS = ("bn_weight_ptr", "bn_bias_ptr", "mean_ptr", "var_ptr")


def _tma_spec(kernel: str, dtype: str, config, constants: dict, boxes: dict) -> dict:
    """A compile spec: BatchNorm tensors in float32 (autocast), no conv bias, the given descriptor boxes."""
    types = {n: descriptor_type(dtype, box) for n, box in boxes.items() if box is not None}
    types.update({n: "*fp32" for n in _CHANNEL_VECTORS}, eps="fp32")
    constants = dict(constants, RELU=True, UPCAST=False, GROUP_M=8,
                     BLOCK_M=config.kwargs["BLOCK_M"], BLOCK_N=config.kwargs["BLOCK_N"], bias_ptr=None,
                     **{n: None for n, box in boxes.items() if box is None})
    return dict(kernel=kernel, arch=90, num_warps=config.num_warps, num_stages=config.num_stages, constants=constants,
                types=types)


def _gemm_spec(dtype: str, config, residual: bool) -> dict:
    bm, bn, bk = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], 128 * 8 // int(dtype[2:])
    return _tma_spec("resnet_fast.kernels.conv_gemm_tma:_conv1x1_gemm_kernel", dtype, config, dict(BLOCK_K=bk),
                     dict(x_desc=[bm, bk], w_desc=[bn, bk], r_desc=[bm, bn] if residual else None, y_desc=[bm, bn]))


def _patch_spec(dtype: str, config, kernel: int, patch: tuple[int, int], residual: bool = True) -> dict:
    bm, bn, bk = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], 128 * 8 // int(dtype[2:])
    images = bm // (patch[0] * patch[1])
    box = [images, *patch, bn]
    return _tma_spec("resnet_fast.kernels.conv_patch_tma:_conv_patch_kernel", dtype, config,
                     dict(BLOCK_K=bk, KH=kernel, KW=kernel, PATCH_H=patch[0], PATCH_W=patch[1]),
                     dict(x_desc=[images, patch[0], 1, patch[1], bk], w_desc=[bn, bk], r_desc=box if residual else None,
                          y_desc=box))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels")
def test_tma_kernels_compile_for_hopper():
    """Every bf16 autotune config of both families (with a residual) and the patch family's strided 1x1
    (without one) compile for sm_90 within shared memory, with the main loop on the bulk tensor copy
    (``cp.async.bulk.tensor``) and wgmma, and nothing spilled to local memory."""
    specs = [_gemm_spec("bf16", c, residual=True) for c in conv_gemm_tma._GPU_CONFIGS]
    specs += [_patch_spec("bf16", c, 3, (4, 4)) for c in conv_patch_tma._GPU_CONFIGS]
    specs += [_patch_spec("bf16", conv_patch_tma._FIXED_GPU_CONFIG, 1, (8, 8), residual=False)]
    for spec, got in zip(specs, compile_kernels(specs)):
        where = (spec["kernel"], spec["constants"]["BLOCK_M"], spec["constants"]["BLOCK_N"], spec["num_warps"], got)
        assert got["shared"] <= SHARED_MEMORY[90], where
        assert got["ptx"]["cp.async.bulk.tensor"] and got["ptx"]["wgmma.mma_async"], where
        assert not got["ptx"]["ld.local"] and got["stack"] in (0, None), where
