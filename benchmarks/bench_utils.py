"""Shared helpers of the benchmark suite: timing, parity, work counts, ResNet shapes.

Imported by the test modules as ``benchmarks.bench_utils``; nothing here
touches the GPU at import time, so the suite collects on a machine without one.

Timing method (see BENCHMARKS.md, "Methodology"):

* Warm-up outside the timed region: the step runs until it has run ``min_warmup`` times and for at least
  ``warmup_s`` seconds (first-call costs -- Triton autotuning, cuDNN plan selection, torch.compile,
  CUDA-graph capture -- all land here; the first call's time is kept as ``first_call_s``).
* Timed region: ``benchmark.pedantic(step, rounds=R, iterations=I)`` with the CUDA-event clock of
  :func:`cuda_event_clock` as pytest-benchmark's timer. Each clock reading records an event on the
  current stream and waits for it, so a round's time is GPU time from an idle queue to the end of its
  last kernel, including any launch gaps the host causes (those are real costs at batch 1).
  ``I`` is chosen so that a round lasts about ``TARGET_ROUND_S``; ``R`` so that the timed rounds fill
  the budget (at least ``--benchmark-min-rounds``). pytest-benchmark divides each round by
  ``I``; tables and throughput use the **median** over rounds. The timed budget is
  ``--benchmark-max-time`` when given on the command line, else ``DEFAULT_MAX_TIME`` (0.3 s, so the
  full GPU suite stays within minutes).
* Each step reads the next of several input buffers in turn, so repeated runs do not find their input
  in L2 (50 MB on an H100) unless the real workload would.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

from resnet_fast.testing import parity_tolerance, relative_error

DEFAULT_MAX_TIME = 0.3  # seconds of timed rounds per benchmark unless --benchmark-max-time is given
TARGET_ROUND_S = 0.02  # a timed round lasts about this long (amortises the clock's sync)
MAX_ITERATIONS = 1000
MAX_ROUNDS = 2000
ROTATION_BYTES = 1 << 30  # at most this much memory in rotated input buffers
MAX_BUFFERS = 4

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# ---------------------------------------------------------------------------------------------- clock

_ref_event = None


def cuda_event_clock() -> float:
    """Seconds on the GPU's clock: records a CUDA event on the current stream, waits for it and returns
    its time since a reference event. Used as pytest-benchmark's timer for every GPU benchmark."""
    global _ref_event
    ev = torch.cuda.Event(enable_timing=True)
    ev.record()
    ev.synchronize()
    if _ref_event is None:
        _ref_event = ev
        return 0.0
    return _ref_event.elapsed_time(ev) / 1e3


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def n_buffers(bytes_per_set: int) -> int:
    """How many input sets to rotate among: up to MAX_BUFFERS, within ROTATION_BYTES."""
    return max(1, min(MAX_BUFFERS, ROTATION_BYTES // max(1, bytes_per_set)))


class Rotation:
    """Cycles through a list of argument tuples; ``next()`` gives the next one."""

    def __init__(self, sets: list):
        self.sets = sets
        self.i = 0

    def next(self):
        s = self.sets[self.i]
        self.i = (self.i + 1) % len(self.sets)
        return s

    def __len__(self) -> int:
        return len(self.sets)


# ---------------------------------------------------------------------------------------------- measure


@dataclass
class Work:
    """What one call of the step does, for throughput figures (any field may be None)."""

    images: int | None = None
    flops: float | None = None
    bytes: float | None = None


def measure(benchmark, step: Callable[[], object], *, device, work: Work | None = None, min_warmup: int = 3,
            warmup_s: float = 0.25, max_time: float = DEFAULT_MAX_TIME, min_rounds: int = 5) -> dict:
    """Warms ``step`` up, times it with ``benchmark.pedantic`` and stores throughput in ``extra_info``.

    With ``--benchmark-disable`` the step runs once (a smoke test) and nothing is timed. Returns the
    ``extra_info`` dict.
    """
    work = work or Work()
    info = benchmark.extra_info
    sync = functools.partial(synchronize, device)

    if benchmark.disabled:  # --benchmark-disable: run the step once, time nothing
        benchmark.pedantic(step)
        return info
    sync()
    t0 = time.perf_counter()
    step()
    sync()
    info["first_call_s"] = round(time.perf_counter() - t0, 6)

    n = 1
    t_start = time.perf_counter()
    while n < min_warmup or time.perf_counter() - t_start < warmup_s:
        step()
        sync()  # so the host cannot queue seconds of GPU work ahead of the clock
        n += 1
        if n >= 10 * MAX_ITERATIONS:
            break
    sync()
    info["warmup_calls"] = n
    # steady-state estimate of one call, to size rounds
    t0 = time.perf_counter()
    for _ in range(3):
        step()
    sync()
    est = max((time.perf_counter() - t0) / 3, 1e-7)

    iterations = max(1, min(MAX_ITERATIONS, math.ceil(TARGET_ROUND_S / est)))
    rounds = max(min_rounds, min(MAX_ROUNDS, math.ceil(max_time / (est * iterations))))
    benchmark.pedantic(step, rounds=rounds, iterations=iterations, warmup_rounds=1)

    st = benchmark.stats.stats
    med = st.median
    info["median_ms"] = med * 1e3
    info["iqr_ms"] = st.iqr * 1e3
    info["rounds"] = rounds
    info["budget_s"] = max_time
    info["iterations"] = iterations
    info["timer"] = "cuda_event_clock" if torch.device(device).type == "cuda" else "perf_counter"
    if work.images:
        info["images"] = work.images
        info["img_per_s"] = work.images / med
    if work.flops:
        info["flops"] = work.flops
        info["tflops"] = work.flops / med / 1e12
    if work.bytes:
        info["bytes"] = work.bytes
        info["gb_per_s"] = work.bytes / med / 1e9
    return info


# ---------------------------------------------------------------------------------------------- parity


rel_err = relative_error
tolerance = parity_tolerance


def check_parity(info: dict, name: str, out: torch.Tensor, same_dtype: torch.Tensor, ref64: torch.Tensor,
                 dtype: torch.dtype) -> None:
    """Records and asserts ``rel_err(out, ref64) <= tolerance(dtype, rel_err(same_dtype, ref64))``."""
    err = rel_err(out, ref64)
    torch_err = rel_err(same_dtype, ref64)
    tol = tolerance(dtype, torch_err)
    info.setdefault("parity", {})[name] = {"err": err, "torch_err": torch_err, "tol": tol}
    assert err <= tol, (
        f"parity failed for {name}: rel err vs float64 {err:.3e} > tolerance {tol:.3e} "
        f"(PyTorch's own {dtype} error {torch_err:.3e}); a fast wrong answer is a failure"
    )


# ---------------------------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class ConvShape:
    c_in: int
    c_out: int
    k: int
    stride: int
    pad: int
    h: int  # input height (= width)
    epilogue: str  # "relu", "none" (downsample: BN only) or "add_relu" (bn3 + residual + ReLU)
    count: int = 1  # occurrences in the network

    @property
    def h_out(self) -> int:
        return (self.h + 2 * self.pad - self.k) // self.stride + 1

    def layer(self) -> str:
        """The layer without its count: ``3x3s1-64to64-56px-relu``."""
        return f"{self.k}x{self.k}s{self.stride}-{self.c_in}to{self.c_out}-{self.h}px-{self.epilogue}"

    def id(self) -> str:
        return f"{self.layer()}-x{self.count}"

    def flops(self, n: int) -> float:
        return 2.0 * n * self.h_out**2 * self.c_out * self.c_in * self.k * self.k


def conv_bn_act_arguments(shape: ConvShape, device, batch: int = 1) -> tuple:
    """The ``conv_bn_act`` arguments of a ResNet-50 convolution as a model cast to bf16 has them (channels_last,
    its BatchNorm's parameters and statistics bf16 too, the residual where the epilogue adds one)."""
    bf16, cl = torch.bfloat16, torch.channels_last
    x = torch.randn(batch, shape.c_in, shape.h, shape.h, device=device, dtype=bf16).contiguous(memory_format=cl)
    w = torch.randn(shape.c_out, shape.c_in, shape.k, shape.k, device=device, dtype=bf16).contiguous(memory_format=cl)
    gamma, beta, mean = (torch.randn(shape.c_out, device=device, dtype=bf16) for _ in range(3))
    var = torch.rand(shape.c_out, device=device, dtype=bf16) + 0.5
    residual = None
    if shape.epilogue == "add_relu":
        residual = torch.randn(batch, shape.c_out, shape.h_out, shape.h_out, device=device, dtype=bf16)
        residual = residual.contiguous(memory_format=cl)
    return (x, w, None, gamma, beta, mean, var, 1e-5, (shape.stride,) * 2, (shape.pad,) * 2, (1, 1), 1, residual,
            shape.epilogue != "none")


def _trace_convs(model: torch.nn.Module, size: int) -> list[tuple]:
    """(conv module name, conv, input HxW) for every conv, from a forward pass on the meta device."""
    seen = []
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: seen.append((name, mod, inp[0].shape[-1]))))
    try:
        with torch.no_grad():
            model(torch.empty(1, 3, size, size, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return seen


@functools.lru_cache(maxsize=None)
def resnet50_conv_shapes() -> tuple[ConvShape, ...]:
    """Every distinct (conv shape, epilogue) of torchvision's ResNet-50 at 224x224, in network order."""
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.resnet50()
    counts: dict[ConvShape, int] = {}
    for name, conv, h in _trace_convs(model, 224):
        if name.endswith("downsample.0"):
            epi = "none"
        elif name.endswith("conv3"):
            epi = "add_relu"
        else:
            epi = "relu"
        s = ConvShape(conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.padding[0], h,
                      epi)
        counts[s] = counts.get(s, 0) + 1
    return tuple(ConvShape(**{**s.__dict__, "count": c}) for s, c in counts.items())


@functools.lru_cache(maxsize=None)
def model_flops_per_image(arch: str) -> float:
    """Forward FLOPs (2 x multiply-adds of convs and the classifier) per image, counted on the meta device."""
    size = image_size(arch)
    with torch.device("meta"):
        model = make_torchvision(arch)
    total = 0.0
    for _, conv, h in _trace_convs(model, size):
        h_out = (h + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
        total += 2.0 * h_out**2 * conv.out_channels * conv.in_channels // conv.groups * conv.kernel_size[0] ** 2
    fc = model.fc
    total += 2.0 * fc.in_features * fc.out_features
    return total


# ---------------------------------------------------------------------------------------------- models

ARCHS = ("resnet18", "resnet50", "resnet101", "cifar_resnet18")

# arch -> (torchvision factory or layers of a BasicBlock ResNet, input size, classes, CIFAR stem)
_SPECS = {
    "resnet18": ("resnet18", 224, 1000, False),
    "resnet50": ("resnet50", 224, 1000, False),
    "resnet101": ("resnet101", 224, 1000, False),
    "cifar_resnet18": ("resnet18", 32, 10, True),
    # the CPU smoke case: one BasicBlock per stage, CIFAR stem, 16x16 images
    "tiny_resnet10": ((1, 1, 1, 1), 16, 10, True),
}


def _tv_spec(arch: str):
    return _SPECS[arch]


def image_size(arch: str) -> int:
    return _SPECS[arch][1]


def num_classes(arch: str) -> int:
    return _SPECS[arch][2]


def make_torchvision(arch: str) -> torch.nn.Module:
    """torchvision's model; the CIFAR variants get the usual 3x3 stride-1 stem and no max-pool."""
    import torchvision

    name, _, classes, cifar = _SPECS[arch]
    if isinstance(name, tuple):
        model = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, list(name), num_classes=classes)
    else:
        model = getattr(torchvision.models, name)(num_classes=classes)
    if cifar:
        model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = torch.nn.Identity()
    return model


def make_resnet_fast(arch: str) -> torch.nn.Module:
    import resnet_fast

    name, _, classes, cifar = _SPECS[arch]
    stem = {"stem": "cifar"} if cifar else {}
    if isinstance(name, tuple):
        return resnet_fast.ResNet(resnet_fast.BasicBlock, list(name), num_classes=classes, **stem)
    return getattr(resnet_fast, name)(num_classes=classes, **stem)


def load_model(kind: str, arch: str, state: dict, device) -> torch.nn.Module:
    """``kind`` ("torchvision" or "resnet_fast") model with ``state`` loaded strictly on ``device``.
    Built on the meta device (no random init: the weights come from ``state``)."""
    with torch.device("meta"):
        model = make_resnet_fast(arch) if kind == "resnet_fast" else make_torchvision(arch)
    model = model.to_empty(device=device)
    model.load_state_dict(state, strict=True)
    return model


def randomize_and_calibrate(model: torch.nn.Module, size: int, device, batches: int = 4, batch: int = 16) -> None:
    """Gives the BatchNorms non-trivial affine parameters and running statistics that match the
    network's actual activations (so eval-mode activations stay well scaled through 100 layers, and a
    BN-folding bug cannot hide behind gamma = 1, beta = 0, mean = 0, var = 1)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration batches
        model.train()
        for _ in range(batches):
            model(torch.randn(batch, 3, size, size, device=device))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = 0.1
    model.eval()


_STATE_CACHE: dict = {}


def reference_state(arch: str, device) -> dict:
    """A float32 state_dict (torchvision names) with calibrated BatchNorms, built once per arch and device."""
    key = (arch, str(device))
    if key not in _STATE_CACHE:
        model = make_torchvision(arch).to(device)
        small = torch.device(device).type == "cpu"  # keep the CPU smoke case quick
        randomize_and_calibrate(model, image_size(arch), device, batches=2 if small else 4, batch=8 if small else 16)
        _STATE_CACHE[key] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        del model
    return _STATE_CACHE[key]


def versions() -> dict:
    """Versions and device facts recorded with every run (machine_info in the JSON)."""
    info = {
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
    }
    for mod in ("torchvision", "triton", "resnet_fast"):
        try:
            info[mod] = getattr(__import__(mod), "__version__", "unknown")
        except Exception as e:  # noqa: BLE001 - a missing optional package is a fact to record
            info[mod] = f"unavailable ({type(e).__name__})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = p.name
        info["gpu_capability"] = f"{p.major}.{p.minor}"
        info["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
        info["gpu_count"] = torch.cuda.device_count()
    try:
        import resnet_fast

        info["resnet_fast_backends"] = resnet_fast.available_backends()
    except Exception as e:  # noqa: BLE001
        info["resnet_fast_backends"] = f"unavailable ({type(e).__name__}: {e})"
    return info


def backend_usable(name: str, device: torch.device) -> str | None:
    """None if resnet_fast's backend ``name`` is loaded and runs on ``device``; otherwise why not."""
    from resnet_fast import backends

    if name not in backends.registered_backends():
        return f"backend {name!r} is not registered"
    return backends.unavailable_reason(name, device)


def dispatch_census(fn: Callable[[], object]) -> dict:
    """Runs ``fn`` once and counts, per op, which backend really ran each call (after any fallback to
    the reference), with the fallback warnings said during the run; recorded so a report shows what ran."""
    import warnings

    from resnet_fast import backends

    with backends.record_dispatch() as counts, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    calls: dict[str, dict[str, int]] = {}
    for (op, name), n in sorted(counts.items()):
        calls.setdefault(op, {})[name] = n
    fallbacks = sorted({str(w.message) for w in caught if "reference backend" in str(w.message)})
    return {"calls": calls, "fallbacks": fallbacks}


def param_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def flat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.detach().double().reshape(-1) for t in tensors])
