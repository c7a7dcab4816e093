"""The fused ImageNet stem (``resnet_fast.ops.stem``): the op, its Triton kernel, and the models' use of it.

Kernel cases run the public op on ``backend("triton", strict=True)`` with the fused kernel selected
(``RESNET_FAST_STEM_KERNEL=fused``) and counted, against a float64 reference, with NaN-poisoned outputs;
on CPU through Triton's interpreter, so shapes stay small (batch 1-2, few output channels).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

import resnet_fast
from resnet_fast import backends, ops
from resnet_fast.ops import reference
from resnet_fast.testing import randomize_batch_norm

from conftest import lowp_tolerance, rel_err
from helpers import (  # noqa: F401 (poisoned_outputs: an autouse fixture)
    BF16_INTERPRETER_ULP, DEVICE, FP32_TOL, check_stem, compile_kernels, poisoned_outputs, stem_tensors,
)

pytest.importorskip("triton")
stem_kernels = pytest.importorskip("resnet_fast.kernels.stem")

CL = torch.channels_last


# Channels 1, 3, 4; sizes where the pool's last window hangs over the edge (H_conv even: 223, 7, 97, 33)
# or not (225, odd H_conv), odd and non-square; both layouts; x float32 with float32, bfloat16 and float16
# weights (a cast model), and x in the model's dtype. Rotated rather than multiplied out (interpreter cost).
_PARITY = [
    (3, (223, 223), False, torch.float32, torch.bfloat16),
    (3, (225, 225), True, torch.float32, torch.float16),
    (1, (97, 97), True, torch.float32, torch.float32),
    (4, (33, 33), False, torch.float32, torch.bfloat16),
    (3, (7, 7), True, torch.bfloat16, torch.bfloat16),
    (1, (7, 12), False, torch.float32, torch.float16),
    (4, (9, 1), True, torch.float32, torch.float32),
    (3, (1, 1), False, torch.float16, torch.float16),
    (1, (33, 30), False, torch.float16, torch.float32),
]


@pytest.mark.parametrize("c_in,hw,channels_last,x_dtype,dtype", _PARITY,
                         ids=[f"c{c}-{h}x{w}-{'cl' if cl else 'nchw'}-{str(xd)[6:]}-{str(d)[6:]}"
                              for c, (h, w), cl, xd, d in _PARITY])
def test_stem_parity(c_in, hw, channels_last, x_dtype, dtype, fused_calls):
    x = torch.randn(1 if hw[0] > 100 else 2, c_in, *hw, device=DEVICE).to(x_dtype)
    x = x.to(memory_format=CL if channels_last else torch.contiguous_format)
    check_stem(x, stem_tensors(c_in, 5, dtype, bias=c_in != 4), fused_calls)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stem_under_autocast_casts_x_in_the_load(dtype, fused_calls):
    """A float32 model and float32 x under autocast: the op computes in the autocast dtype and x reaches
    the kernel as float32 (the autocast rule casts only the weight and bias)."""
    x = torch.randn(2, 3, 21, 19, device=DEVICE)
    check_stem(x, stem_tensors(3, 6, torch.float32), fused_calls, autocast=dtype)


def test_stem_tiles_strips_and_channel_blocks(fused_calls):
    """Row tiles that straddle images, several strips of pooled rows, two channel blocks, no BatchNorm
    affine parameters and a strided (neither NCHW nor NHWC) input."""
    x = torch.randn(9, 2, 33, 130, device=DEVICE).transpose(2, 3)[:, :, :129]  # [9, 2, 129, 33]
    w, b, _, _, mean, var = stem_tensors(2, 80, torch.float32)
    check_stem(x, (w, b, None, None, mean, var), fused_calls)


def test_stem_without_batch_norm(fused_calls):
    x = torch.randn(2, 3, 15, 17, device=DEVICE).to(memory_format=CL)
    w, b, *_ = stem_tensors(3, 7, torch.float16)
    check_stem(x, (w, b, None, None, None, None), fused_calls)


def test_empty_batch(fused_calls):
    w, b, *norm = stem_tensors(3, 4, torch.float32)
    with resnet_fast.backend("triton", strict=True):
        out = ops.stem(torch.randn(0, 3, 16, 16, device=DEVICE), w, b, *norm)
    assert out.shape == (0, 4, 4, 4)


def test_the_default_triton_stem_is_conv_then_pool(monkeypatch):
    """Until a GPU run measures the fused kernel, the triton backend's stem is the gather convolution then
    torch's max-pool; RESNET_FAST_STEM_KERNEL forces either, and an unknown name is refused."""
    monkeypatch.delenv("RESNET_FAST_STEM_KERNEL", raising=False)
    ran = []
    for name, fn in list(stem_kernels.STEM_KERNELS.items()):
        monkeypatch.setitem(stem_kernels.STEM_KERNELS, name, lambda *a, _n=name, _f=fn: ran.append(_n) or _f(*a))
    x = torch.randn(1, 3, 12, 12, device=DEVICE)
    w, b, *norm = stem_tensors(3, 4, torch.float32)
    expected = reference.stem(x, w, b, *norm, 1e-5)
    with resnet_fast.backend("triton", strict=True):
        assert rel_err(ops.stem(x, w, b, *norm), expected) <= FP32_TOL
        monkeypatch.setenv("RESNET_FAST_STEM_KERNEL", "fused")
        assert rel_err(ops.stem(x, w, b, *norm), expected) <= FP32_TOL
        monkeypatch.setenv("RESNET_FAST_STEM_KERNEL", "im2col")
        with pytest.raises(backends.Unsupported, match="RESNET_FAST_STEM_KERNEL='im2col'"):
            ops.stem(x, w, b, *norm)
    assert ran == ["conv_then_pool", "fused"]


def test_huge_images_go_to_the_reference(fused_calls):
    """Past the kernel's 32-bit offsets: Unsupported before anything is launched."""
    x = torch.zeros(1, 1, 1, 1, device=DEVICE).expand(2**25, 3, 1, 1024)  # 2^33 (image, column) pairs, no memory
    w, b, *norm = stem_tensors(3, 4, torch.float32)
    with resnet_fast.backend("triton", strict=True), pytest.raises(backends.Unsupported, match="32-bit offsets"):
        ops.stem(x, w, b, *norm)


# ---------------------------------------------------------------- the op: reference, validation, autograd


def test_reference_is_torchvisions_stem():
    """conv1 -> bn1 -> relu -> maxpool of torchvision's ResNet, in float64."""
    tv = randomize_batch_norm(torchvision.models.resnet18()).eval().double()
    x = torch.randn(2, 3, 45, 38, dtype=torch.float64)
    expected = tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))
    n = tv.bn1
    out = reference.stem(x, tv.conv1.weight, None, n.weight, n.bias, n.running_mean, n.running_var, n.eps)
    assert rel_err(out, expected) < 1e-13


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"x": torch.randn(3, 16, 16)}, ValueError, "x must be a 4-D"),
        ({"x": torch.ones(1, 3, 16, 16, dtype=torch.uint8)}, TypeError, "x must be a floating-point"),
        ({"x": torch.randn(1, 3, 0, 16)}, ValueError, "at least 1x1"),
        ({"x": torch.randn(1, 4, 16, 16)}, ValueError, r"weight must be a \[C_out, 4, 7, 7\] tensor"),
        ({"weight": torch.randn(4, 3, 3, 3)}, ValueError, r"weight must be a \[C_out, 3, 7, 7\] tensor"),
        ({"weight": torch.ones(4, 3, 7, 7, dtype=torch.int32)}, TypeError, "weight must be a floating-point"),
        ({"bias": torch.randn(4).half()}, TypeError, "bias has dtype torch.float16 but weight has torch.float32"),
        ({"bias": torch.randn(5)}, ValueError, r"bias must have shape \(4,\)"),
        ({"running_var": torch.rand(3)}, ValueError, r"running_var must have shape \(4,\)"),
        ({"running_var": None}, ValueError, "running_mean and running_var must both be"),
        ({"running_mean": None, "running_var": None}, ValueError, "bn_weight and bn_bias need running_mean"),
        ({"bn_bias": torch.randn(4, device="meta")}, ValueError, "bn_bias is on meta but x is on cpu"),
    ],
)
def test_stem_rejects_bad_input(kwargs, error, match):
    w, b, gamma, beta, mean, var = (t.cpu() for t in stem_tensors(3, 4, torch.float32))
    args = dict(x=torch.randn(1, 3, 16, 16), weight=w, bias=b, bn_weight=gamma, bn_bias=beta, running_mean=mean,
                running_var=var)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        ops.stem(**args)


def _op_samples():
    x = torch.randn(2, 3, 13, 10)
    w, b, *norm = (t.cpu() for t in stem_tensors(3, 4, torch.float32))
    return [
        (x, w, b, *norm, 1e-5),
        (x.to(memory_format=CL), w.to(memory_format=CL), None, None, None, None, None, 0.0),
        (torch.randn(1, 1, 5, 8).to(memory_format=CL), torch.randn(6, 1, 7, 7), None, None, None, torch.randn(6),
         torch.rand(6) + 0.5, 1e-3),
    ]


@pytest.mark.parametrize("args", _op_samples())
def test_opcheck(args):
    """Schema, fake implementation (shapes and strides), autograd registration and AOT tracing."""
    args = tuple(a.clone().requires_grad_(i in (0, 1, 2)) if isinstance(a, torch.Tensor) else a
                 for i, a in enumerate(args))
    torch.library.opcheck(torch.ops.resnet_fast.stem.default, args)


def test_gradients_reach_every_input():
    """gradcheck in float64 through x, the weight and bias and every BatchNorm tensor: the pool's gradient
    routed to its argmax, then conv_bn_act's backward."""
    d = torch.float64
    args = [torch.randn(2, 2, 11, 9, dtype=d), torch.randn(3, 2, 7, 7, dtype=d) / 7, torch.randn(3, dtype=d),
            torch.rand(3, dtype=d) + 0.5, torch.randn(3, dtype=d), torch.randn(3, dtype=d) * 0.2,
            torch.rand(3, dtype=d) + 0.5]
    assert torch.autograd.gradcheck(lambda *a: ops.stem(*a, eps=1e-3), [a.requires_grad_() for a in args])


def test_gradient_of_a_float32_image_reaches_it_in_float32():
    """Judged against float64 by the parity rule: in bfloat16 the max-pool's window values tie or swap, and
    each such argmax sends a whole gradient elsewhere, so torch's own bfloat16 gradient is 10-15% off in
    about one draw of ten (a fixed 2e-2 failed as often)."""
    x = torch.randn(1, 3, 16, 16, requires_grad=True)
    w = torch.randn(4, 3, 7, 7, dtype=torch.bfloat16, requires_grad=True)
    ops.stem(x, w).sum().backward()
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.bfloat16
    x_torch = x.detach().clone().requires_grad_()
    torch.nn.functional.max_pool2d(
        torch.nn.functional.conv2d(x_torch.to(torch.bfloat16), w.detach(), None, 2, 3).relu(), 3, 2, 1
    ).float().sum().backward()
    x64 = x.detach().to(torch.bfloat16).double().requires_grad_()
    reference.stem(x64, w.detach().double(), None, None, None, None, None, 0.0).sum().backward()
    assert rel_err(x.grad, x64.grad) <= lowp_tolerance(torch.bfloat16, x_torch.grad, x64.grad)


# ---------------------------------------------------------------- the models


def _model(arch: str, **kwargs) -> torch.nn.Module:
    return randomize_batch_norm(getattr(resnet_fast, arch)(**kwargs)).eval().to(DEVICE)


def _tiny_imagenet_net() -> torch.nn.Module:
    """Two narrow stages behind the ImageNet stem: cheap under the interpreter."""
    net = resnet_fast.ResNet(resnet_fast.BasicBlock, [1, 1], widths=(8, 16), num_classes=5)
    return randomize_batch_norm(net).eval().to(DEVICE)


class _StemOutput(Exception):
    """Raised by layer1 with its input: runs a model's stem alone (its blocks cost minutes interpreted)."""


def _stem_output(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    def stop(first_block_input):
        raise _StemOutput(first_block_input)

    model.layer1.forward = stop
    try:
        model(x)
    except _StemOutput as e:
        return e.args[0]
    finally:
        del model.layer1.forward
    raise AssertionError("layer1 was not reached")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_models_run_the_fused_stem_in_strict_mode(arch, fused_calls):
    """A bfloat16 model with channels_last weights (the models' CUDA layout) on the caller's float32 NCHW
    batch: the stem is the fused kernel, and the first block gets NHWC bfloat16 straight from it."""
    model = _model(arch, num_classes=10).to(torch.bfloat16).to(memory_format=CL)
    x = torch.randn(2, 3, 33, 33, device=DEVICE)
    with torch.no_grad(), resnet_fast.backend("triton", strict=True), backends.record_dispatch() as calls:
        out = _stem_output(model, x)
    assert fused_calls == [torch.float32] and calls == {("stem", "triton"): 1}
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=CL)
    modules = (model.conv1, model.bn1, model.relu, model.maxpool)
    with torch.no_grad():
        ref64 = torch.nn.Sequential(*modules).double()(x.to(torch.bfloat16).double())
        same = torch.nn.Sequential(*modules).to(torch.bfloat16)(x.to(torch.bfloat16))
    assert rel_err(out, ref64) <= lowp_tolerance(torch.bfloat16, same, ref64) + BF16_INTERPRETER_ULP


@pytest.mark.parametrize("switch", ["fused", None])
def test_tiny_net_end_to_end_in_strict_mode(switch, monkeypatch):
    """A whole eval forward on the strict triton backend, fused stem selected or not (the default: the
    gather convolution then torch's max-pool), against the torch backend."""
    if switch is None:
        monkeypatch.delenv("RESNET_FAST_STEM_KERNEL", raising=False)
    else:
        monkeypatch.setenv("RESNET_FAST_STEM_KERNEL", switch)
    model = _tiny_imagenet_net()
    x = torch.randn(2, 3, 29, 31, device=DEVICE)
    with torch.no_grad():
        with resnet_fast.backend("torch"):
            expected = model(x)
        with resnet_fast.backend("triton", strict=True), backends.record_dispatch() as calls:
            out = model(x)
    assert calls[("stem", "triton")] == 1 and not any(backend == "torch" for _, backend in calls)
    assert rel_err(out, expected) <= FP32_TOL


class _TopLevelOps(TorchDispatchMode):
    """Records the operators a forward calls at its own level (not those inside the fused ops)."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def test_eval_forward_launches_no_layout_cast_or_pool_pass():
    """The census of one eval forward of a bfloat16 channels_last resnet18 on the caller's float32 NCHW
    batch: the stem op first, then the blocks' fused ops and the head; no copy, cast, layout conversion,
    max-pool or unfused convolution of its own. (Which kernel serves each op is the backend's business:
    the strict tests above show the fused stem takes x as given.)"""
    model = _model("resnet18", num_classes=10).to(torch.bfloat16).to(memory_format=CL)
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    census = _TopLevelOps()
    with torch.no_grad(), census:
        out = model(x)
    assert out.dtype == torch.bfloat16
    assert census.names[0] == "resnet_fast::stem" and census.names.count("resnet_fast::stem") == 1
    passes = [n for n in census.names if not n.startswith("resnet_fast::")]
    forbidden = ("_to_copy", "copy", "clone", "contiguous", "max_pool", "convolution", "batch_norm")
    assert not [n for n in passes if any(word in n for word in forbidden)], passes


def test_float32_images_for_a_half_model_and_the_unfused_paths():
    """A float32 batch is accepted by a bfloat16 model in eval (fused stem op) and training (the conv + pool
    path casts it itself), with the results of the batch cast by hand."""
    model = _model("resnet18", num_classes=10).to(torch.bfloat16)
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        assert torch.equal(model(x), model(x.to(torch.bfloat16)))
        model.train()
        with backends.record_dispatch() as calls:
            out = model(x)
        assert ("stem", "torch") not in calls and torch.isfinite(out).all()
    with pytest.raises(TypeError, match="x has dtype torch.float16 but the model's parameters are torch.bfloat16"):
        model(x.half())


@pytest.mark.parametrize(
    "build,fused",
    [
        (lambda: resnet_fast.resnet18(num_classes=4), True),
        (lambda: resnet_fast.resnet18(num_classes=4, in_channels=1), True),
        (lambda: resnet_fast.resnet18(num_classes=4, norm_layer=torchvision.ops.FrozenBatchNorm2d), True),
        (lambda: resnet_fast.resnet18(num_classes=4, stem="cifar"), False),
        (lambda: resnet_fast.ResNet(resnet_fast.BasicBlock, [1], num_classes=4,
                                    norm_layer=lambda c: torch.nn.GroupNorm(2, c)), False),
    ],
    ids=["imagenet", "grayscale", "frozen-bn", "cifar", "group-norm"],
)
def test_which_stems_fuse(build, fused):
    """The stem op serves the eval-mode ImageNet stem (any in_channels, BatchNorm or FrozenBatchNorm2d) and
    nothing else; each model still matches its modules run one by one."""
    model = randomize_batch_norm(build()).eval()
    x = torch.randn(2, model.in_channels, 32, 32)
    with torch.no_grad(), backends.record_dispatch() as calls:
        out = model(x)
        stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        expected = model.forward_head(torch.nn.Sequential(*(getattr(model, n) for n in model.stage_names))(stem))
    assert (("stem", "torch") in calls) == fused
    assert rel_err(out, expected) <= FP32_TOL
    model.maxpool.ceil_mode = True  # a retuned pool is honoured on the next forward
    with torch.no_grad(), backends.record_dispatch() as calls:
        model(x)
    assert ("stem", "torch") not in calls


def test_fx_script_and_compile_keep_working():
    """The eval stem as one node under torch.fx and torch.compile(fullgraph); TorchScript keeps the conv +
    pool path; all agree with eager. TorchScript gets a copy made before torch.compile runs, so that
    neither sees the other's state on the module (once, on torch 2.11, scripting the model torch.compile had
    run on failed inside Conv2d's source with "builtin cannot be used as a value"; not reproduced since)."""
    model = _tiny_imagenet_net().cpu()
    untouched = copy.deepcopy(model)
    x = torch.randn(2, 3, 29, 31)
    with torch.no_grad():
        expected = model(x)
        traced = torch.fx.symbolic_trace(model)
        assert any(n.target is torch.ops.resnet_fast.stem for n in traced.graph.nodes)
        assert rel_err(traced(x), expected) <= FP32_TOL
        assert rel_err(torch.compile(model, fullgraph=True)(x), expected) <= FP32_TOL
        assert rel_err(torch.jit.script(untouched)(x), expected) <= FP32_TOL


# ---------------------------------------------------------------- compile for Hopper without a GPU

# The real kernel compiled for sm_90 (tests/compile_kernels.py): every GPU config, in turn with the dtype
# pairs the models use (float32 images into bfloat16/float16 weights; x already in the weights' dtype)
# and each layout of x and the weight (the unit stride Triton specialises on). What
# Triton sees as 16-divisible at batch 256, 224x224, 64 channels (the weight's 147 and 21 are not).
_STEM_ALIGNED = {"x_ptr", "w_ptr", "y_ptr", "M", "C_out", "sx_n", "sx_c", "sx_h", "sy_n", "sy_h", "sy_w"}
_STEM_PAIRS = [("fp32", "bf16"), ("fp32", "fp16"), ("bf16", "bf16"), ("fp16", "fp16")]


def _stem_spec(i: int, config) -> dict:
    x_type, w_type = _STEM_PAIRS[i % len(_STEM_PAIRS)]
    # x NCHW or NHWC, the weight channels_last (the models' CUDA layout) or not, the output NHWC; the
    # BatchNorm tensors in float32, no conv bias (None: specialised away).
    unit = {("sx_w", "sx_c")[i % 2]: 1, ("sw_c", "sw_w")[i // 2 % 2]: 1}
    constants = dict(UPCAST=False, BLOCK_N=64, sy_c=1, bias_ptr=None, **unit, **config.kwargs)
    types = {"x_ptr": "*" + x_type, "w_ptr": "*" + w_type, "y_ptr": "*" + w_type, "eps": "fp32",
             **{n: "*fp32" for n in ("bn_weight_ptr", "bn_bias_ptr", "mean_ptr", "var_ptr")}}
    return dict(kernel="resnet_fast.kernels.stem:_stem_kernel", arch=90, num_warps=config.num_warps,
                num_stages=config.num_stages, constants=constants, types=types,
                aligned=sorted(_STEM_ALIGNED - set(constants)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernel")
def test_compiles_for_hopper():
    """The main loop is Hopper's wgmma and ptxas spills nothing: the cubin's stack frame is empty (which
    the PTX alone cannot show)."""
    configs = stem_kernels._GPU_CONFIGS
    for config, got in zip(configs, compile_kernels([_stem_spec(i, c) for i, c in enumerate(configs)])):
        assert got["ptx"]["wgmma.mma_async"] and not got["ptx"]["ld.local"], (config, got)
        assert got["stack"] in (0, None), (config, got)


# ---------------------------------------------------------------- GPU only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_imagenet_batch_gpu(dtype, fused_calls):
    """The benchmark's shape class: float32 NCHW images, channels_last weights, 64 channels, 224x224."""
    w, b, *norm = stem_tensors(3, 64, dtype, bias=False)
    check_stem(torch.randn(8, 3, 224, 224, device=DEVICE), (w.to(memory_format=CL), b, *norm), fused_calls)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_int64_offsets_gpu(fused_calls):
    """A batch past 2^31 elements: the last images' offsets overflow int32 (checked on the last image)."""
    if torch.cuda.mem_get_info()[0] < 16 * 2**30:
        pytest.skip("needs 16 GiB of free GPU memory")
    x = torch.empty(14300, 3, 224, 224, device=DEVICE, dtype=torch.bfloat16).normal_()  # 2.15e9 elements
    w, b, *norm = stem_tensors(3, 64, torch.bfloat16)
    with torch.no_grad(), resnet_fast.backend("triton", strict=True):
        out = ops.stem(x, w.to(memory_format=CL), b, *norm)
    last = (x[-1:], w, b, *norm)
    ref64 = reference.stem(*(t.double() for t in last), 1e-5)
    assert rel_err(out[-1:], ref64) <= lowp_tolerance(torch.bfloat16, reference.stem(*last, 1e-5), ref64)
