"""What the convolution kernel families share besides the epilogue (:mod:`resnet_fast.kernels.epilogue`).

* The environment: Triton's interpreter (``TRITON_INTERPRET=1``: CPU tensors, no autotuning, and a bf16
  ``tl.dot`` that multiplies raw bit patterns, so operands are upcast) and ``RESNET_FAST_AUTOTUNE=0``
  (one fixed config per family instead of timing candidates on the first call per shape).
* :func:`accumulate`, the main loop's ``acc += a @ b`` with that upcast; :func:`grouped_tile`, the tile
  order that keeps a weight column tile in L2 while ``GROUP_M`` row tiles use it.
* Host side: :func:`float32_unsupported_reason`, :func:`channel_vector` and :func:`configured`, which
  makes a family's :class:`Launcher`: autotuned on a GPU (choices kept across processes by
  :mod:`resnet_fast.kernels.tuning`), a fixed config otherwise, or a config a test pins; it launches
  through :class:`~resnet_fast.kernels.launch.DirectLaunch` where the arguments allow.
* For the tensor-descriptor (TMA) families: the NHWC views their descriptors address (:func:`nhwc`,
  :func:`weight_matrix`) and :func:`descriptor_unsupported_reason`, what every such family requires.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from typing import Callable, Iterator

import torch
import triton
import triton.language as tl

from resnet_fast.backends import warn_once
from resnet_fast.kernels import tuning
from resnet_fast.kernels.launch import MAX_SIGNATURES, DirectLaunch

__all__ = [
    "AUTOTUNE", "INTERPRET", "Launcher", "NotACandidate", "SHARED_MEMORY", "accumulate", "accumulators_fit",
    "capturing", "channel_vector", "configured", "ROW_BYTES", "descriptor_unsupported_reason", "dot_flags", "fits",
    "float32_unsupported_reason", "grouped_tile", "multiprocessors", "nhwc", "set_output_boxes", "tile_config",
    "torch_convolutions_use_tf32", "weight_matrix",
]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = os.environ.get("RESNET_FAST_AUTOTUNE", "1") != "0"
SHARED_MEMORY = 227 * 1024  # per block on Hopper (H100, H200)


@triton.jit
def accumulate(a, b, acc, UPCAST: tl.constexpr):
    """acc += a @ b with float32 accumulation (operands upcast where the interpreter needs it). float32
    products are exact ("ieee"), never TF32: see :func:`float32_unsupported_reason`."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def grouped_tile(tile, num_m, num_n, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of linear tile ``tile``: GROUP_M consecutive row tiles per weight column tile."""
    group = tile // (GROUP_M * num_n)
    first_m = group * GROUP_M
    group_size = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (tile % (GROUP_M * num_n)) % group_size
    pid_n = (tile % (GROUP_M * num_n)) // group_size
    return pid_m, pid_n


def accumulators_fit(config: triton.Config, itemsize: int) -> bool:
    """Whether a ``BLOCK_M x BLOCK_N`` float32 accumulator leaves registers to spare: at most 128 a thread
    with 16-bit operands, 16 with float32 ones (exact products on FMAs, the operand fragments in registers
    too). Beyond these ptxas spills for sm_90 inside the main loop (tests/test_triton.py's compile
    checks)."""
    accumulators = config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] // (32 * config.num_warps)
    return accumulators <= (128 if itemsize < 4 else 16)


def fits(config: triton.Config, block_k: int, itemsize: int, epilogue_tiles: int) -> bool:
    """Whether a ``BLOCK_M x BLOCK_N`` config fits a Hopper multiprocessor: ``num_stages`` A and B blocks
    of ``block_k`` channels plus ``epilogue_tiles`` output-sized tiles in shared memory, and an accumulator
    that :func:`accumulators_fit`."""
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    shared = itemsize * (config.num_stages * (bm + bn) * block_k + epilogue_tiles * bm * bn)
    return shared <= SHARED_MEMORY and accumulators_fit(config, itemsize)


def torch_convolutions_use_tf32() -> bool:
    """Whether torch's own (cuDNN) convolutions may use TF32 for float32 now: ``True`` by default,
    ``False`` after ``torch.backends.cudnn.allow_tf32 = False``. ATen reads the first setting that is not
    ``"none"`` of ``torch.backends.cudnn.conv.fp32_precision``, ``torch.backends.cudnn.fp32_precision`` and
    ``torch.backends.fp32_precision``; reading ``allow_tf32`` instead raises once someone mixed the two
    APIs."""
    if not hasattr(torch.backends, "fp32_precision"):  # older torch: the legacy flag only
        return torch.backends.cudnn.allow_tf32
    cudnn = torch.backends.cudnn
    for precision in (cudnn.conv.fp32_precision, cudnn.fp32_precision, torch.backends.fp32_precision):
        if precision != "none":
            return precision == "tf32"
    return False


def float32_unsupported_reason(x: torch.Tensor) -> str | None:
    """Why a float32 call on a GPU is left to torch's own convolution, or None: while torch's
    convolutions may use TF32 (its default), cuDNN rounds float32 operands to TF32, and Triton's TF32
    ``tl.dot`` truncates them instead, which on an H200 gave 2.0-2.6x cuDNN's own error, over the parity
    bound of 2x (BENCHMARKS.md, 2026-12-04). So float32 keeps torch's numbers there; with TF32 off it
    runs here, with exact products."""
    if x.is_cuda and x.dtype == torch.float32 and torch_convolutions_use_tf32():
        return ("float32 with TF32 on (torch's default) runs on torch's convolution, which rounds operands "
                "to TF32 where Triton truncates them")
    return None


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """The multiprocessor count of a CUDA device (asked once per device: a property lookup per launch costs
    host time at batch 1); 0 for any other device."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0


def channel_vector(t: torch.Tensor | None) -> torch.Tensor | None:
    """A per-channel vector the epilogue indexes with unit stride (a copy only for strided views)."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def dot_flags(dtype: torch.dtype) -> dict:
    """The ``UPCAST`` argument of :func:`accumulate` for operands of this dtype."""
    return {"UPCAST": INTERPRET and dtype == torch.bfloat16}


class NotACandidate(LookupError):
    """A pinned config (:meth:`Launcher.pinned`) that the family's pruning drops for this call."""


class Launcher:
    """``launch(grid_for, *args, **kwargs)`` for one kernel family (made by :func:`configured`).

    Which config a launch uses, first match:

    1. the config pinned by :meth:`pinned` (tests: every candidate checked, on the GPU and interpreted);
    2. ``interpreter`` under the interpreter, ``fixed`` with ``RESNET_FAST_AUTOTUNE=0``;
    3. the one chosen earlier in this process for the launch's autotune key;
    4. a stored choice (:mod:`resnet_fast.kernels.tuning`: this machine's cache, then the committed table
       for this GPU model), if it is still among the candidates ``prune`` keeps for the call;
    5. inside a CUDA graph capture, ``fixed``, with a warning (once): timing candidates synchronizes the
       device, which a capture forbids, and would record every candidate's launches into the graph.
       Nothing is remembered, so the first call outside a capture times the candidates;
    6. Triton's autotuner over those candidates; its choice is added to the cache.

    A config's ``pre_hook`` (e.g. setting tensor descriptors' block shapes) runs before every launch with
    that config; ``grid_for`` gets the launch's keyword arguments and the config's. ``heuristics`` (name ->
    function of the same) derives meta-parameters from them, as ``@triton.heuristics`` would; the launcher
    computes them itself, because Triton's wrapper rebuilds the argument dict for each one at every launch.
    ``do_bench`` replaces the autotuner's timer (:meth:`with_timer`). With ``direct`` (arguments that are
    tensors and scalars only), launches go through :class:`~resnet_fast.kernels.launch.DirectLaunch`, and
    outside a pinned config the launcher keeps, per argument signature, the config, derived
    meta-parameters and grid it worked out, so that a later call with the same signature launches at
    once. Hence ``grid_for`` may depend on the launch's scalar arguments and the config only (not on a
    tensor's shape), which holds for every family here.
    """

    def __init__(self, kernel: triton.JITFunction, *, family: str, configs: list[triton.Config], key: list[str],
                 prune: Callable[..., list[triton.Config]], fixed: triton.Config, interpreter: triton.Config,
                 heuristics: dict[str, Callable[[dict], object]], direct: bool, do_bench: Callable | None = None):
        self.jit, self.family, self.configs, self.key, self.prune = kernel, family, configs, key, prune
        self.fixed, self.interpreter, self.heuristics, self.direct = fixed, interpreter, heuristics, direct
        self.kernel = DirectLaunch(kernel) if direct else kernel  # what launches the chosen config
        self._plans: dict[tuple, tuple[tuple, dict]] = {}  # DirectLaunch.key -> (grid, launch's kwargs)
        tuned = triton.heuristics(heuristics)(kernel) if heuristics else kernel
        self.autotuner = triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune},
                                         do_bench=do_bench)(tuned)
        self._chosen: dict[tuple, triton.Config] = {}  # (device index, autotune key) -> config
        self._pinned: contextvars.ContextVar[triton.Config | None] = contextvars.ContextVar(
            f"resnet_fast_pinned_{family}", default=None)

    def with_timer(self, do_bench: Callable) -> "Launcher":
        """A fresh launcher for the same kernel (nothing chosen yet) whose autotuner times candidates with
        ``do_bench`` (tests count the timings, or fake them on a CPU)."""
        return Launcher(self.jit, family=self.family, configs=self.configs, key=self.key, prune=self.prune,
                        fixed=self.fixed, interpreter=self.interpreter, heuristics=self.heuristics,
                        direct=self.direct, do_bench=do_bench)

    @contextlib.contextmanager
    def pinned(self, config: triton.Config) -> Iterator[None]:
        """Every launch in the block uses ``config``; a launch whose candidates (``prune``) do not include
        it raises :class:`NotACandidate` instead."""
        token = self._pinned.set(config)
        try:
            yield
        finally:
            self._pinned.reset(token)

    def __call__(self, grid_for: Callable[[dict], tuple[int, ...]], *args, **kwargs) -> None:
        config = self._pinned.get()
        planned = config is None and self.direct and self.kernel.compiles
        if planned:
            key = self.kernel.key(args, kwargs)
            plan = self._plans.get(key)
            if plan is not None:
                grid, launch_kwargs = plan
                self.kernel.launch(grid, args, launch_kwargs, key)
                return
        nargs = dict(zip(self.kernel.arg_names, args))
        nargs.update(kwargs)
        if config is not None:
            if config not in self.prune(self.configs, nargs):
                raise NotACandidate(f"{self.family}: {config} is not a candidate for this call")
        elif INTERPRET or not AUTOTUNE:
            config = self.interpreter if INTERPRET else self.fixed
        else:
            config, remembered = self._choose(grid_for, nargs, args, kwargs)
            if config is None:  # the autotuner has launched it
                return
            planned = planned and remembered
        nargs.update(config.kwargs)
        derived = {name: rule(nargs) for name, rule in self.heuristics.items()}
        if config.pre_hook is not None:
            config.pre_hook(nargs)
        grid = grid_for(nargs)
        launch_kwargs = {**kwargs, **derived, **config.kwargs, "num_warps": config.num_warps,
                         "num_stages": config.num_stages}
        if not planned:
            self.kernel[grid](*args, **launch_kwargs)
            return
        self.kernel.launch(grid, args, launch_kwargs, key)
        if len(self._plans) >= MAX_SIGNATURES:
            self._plans.clear()
        self._plans[key] = (grid, launch_kwargs)

    def _choose(self, grid_for, nargs: dict, args: tuple, kwargs: dict) -> tuple[triton.Config | None, bool]:
        """Steps 3-6 of the class docstring: ``(config to launch, whether it is this key's choice)``, or
        ``(None, True)`` where the autotuner has just timed the candidates and launched its choice."""
        device = torch.cuda.current_device()
        key = tuning.key_of(self.key, nargs)
        config = self._chosen.get((device, key))
        if config is not None:
            return config, True
        gpu, text = _gpu(device), tuning.key_text(self.key, key)
        config = self._stored(gpu, text, nargs)
        if config is not None:
            self._chosen[device, key] = config
            return config, True
        if capturing():
            _warn_untuned_in_capture(self.family, text)
            return self.fixed, False
        self.autotuner[grid_for](*args, **kwargs)
        self._chosen[device, key] = self.autotuner.best_config
        if tuning.enabled():
            tuning.store(gpu, self.family, text, self.autotuner.best_config)
        return None, True

    def _stored(self, gpu: tuning.Gpu, key: str, nargs: dict) -> triton.Config | None:
        """The stored choice for the key ``key`` (as the tables write it), if it is one of this call's
        candidates."""
        entry = tuning.lookup(gpu, self.family, key) if tuning.enabled() else None
        if entry is None:
            return None
        return next((c for c in self.prune(self.configs, nargs) if tuning.config_entry(c) == entry), None)


def _gpu(device: int) -> tuning.Gpu:
    """CUDA device ``device`` as the tuning tables know it."""
    return tuning.Gpu(torch.cuda.get_device_name(device), tuple(torch.cuda.get_device_capability(device)),
                      multiprocessors(torch.device("cuda", device)))


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False where there is no CUDA device)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _warn_untuned_in_capture(family: str, key: str) -> None:
    warn_once(("untuned in capture", family),
              f"resnet_fast: a {family} convolution ({key}) was first seen inside a CUDA graph capture, where its "
              "tile configs cannot be timed, so the graph runs an untuned default; run the forward once at this "
              "shape before capturing (resnet_fast.cuda_graph does) to capture the tuned kernel")


def configured(kernel: triton.JITFunction, *, family: str, configs: list[triton.Config], key: list[str],
               prune: Callable[..., list[triton.Config]], fixed: triton.Config, interpreter: triton.Config,
               heuristics: dict[str, Callable[[dict], object]] | None = None, direct: bool = True) -> Launcher:
    """The :class:`Launcher` of ``kernel``: autotuned over ``configs`` (as ``prune`` keeps them for each
    call, keyed by the arguments named in ``key`` and the tensors' dtypes) on a GPU, ``fixed`` with
    ``RESNET_FAST_AUTOTUNE=0`` and ``interpreter`` under the interpreter, with the meta-parameters that
    ``heuristics`` derives. ``family`` names the kernel in the tuning tables; ``direct=False`` for kernels
    that take tensor descriptors (their launches stay Triton's own)."""
    return Launcher(kernel, family=family, configs=configs, key=key, prune=prune, fixed=fixed,
                    interpreter=interpreter, heuristics=heuristics or {}, direct=direct)


# ------------------------------------------------------------------------- tensor descriptors (TMA)

ROW_BYTES = 128  # a K block of the TMA families: one 128-byte (swizzle-wide) row of channels per pixel


def tile_config(block_m: int, block_n: int, stages: int, warps: int,
                set_block_shapes: Callable[[dict], None]) -> triton.Config:
    """A ``BLOCK_M x BLOCK_N`` config whose pre_hook gives the launch's descriptors their boxes."""
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "GROUP_M": 8}, num_stages=stages,
                         num_warps=warps, pre_hook=set_block_shapes)


def set_output_boxes(nargs: dict, box: list[int]) -> None:
    """The residual's (if any) and the output's descriptor boxes: the output tile."""
    for name in ("r_desc", "y_desc"):
        if nargs[name] is not None:
            nargs[name].block_shape = box


def _descriptor_ready(t: torch.Tensor) -> bool:
    """Whether a tensor descriptor can address ``t``: unit last stride, 16-byte aligned base and strides."""
    item = t.element_size()
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(s * item % 16 == 0 for s in t.stride()[:-1])


def nhwc(t: torch.Tensor) -> torch.Tensor | None:
    """The ``[N, H, W, C]`` view of a 4-D tensor if a descriptor can address it (channels_last with
    16-byte aligned rows of channels, any row and image strides), else None."""
    v = t.permute(0, 2, 3, 1)
    return v if _descriptor_ready(v) else None


def weight_matrix(weight: torch.Tensor) -> torch.Tensor | None:
    """The ``[C_out, kH * kW * C_in]`` view of a channels_last weight (column ``(r * kW + s) * C_in + c``
    holds tap (r, s), channel c) if a descriptor can address it, else None."""
    try:
        m = weight.permute(0, 2, 3, 1).view(weight.shape[0], -1)
    except RuntimeError:  # the taps and channels of an output channel are not one run of memory
        return None
    return m if _descriptor_ready(m) else None


def descriptor_unsupported_reason(x: torch.Tensor, weight: torch.Tensor, groups: int,
                                  residual: torch.Tensor | None) -> str | None:
    """What every tensor-descriptor family requires, or None: Hopper or newer (or the interpreter), 16-bit
    operands on a GPU, channels_last x and weight with 16-byte rows of channels, 16-byte output rows,
    a residual laid out as the output (dense channels_last)."""
    if groups != 1:
        return f"grouped convolution (groups={groups})"
    if x.is_cuda and torch.cuda.get_device_capability(x.device)[0] < 9:
        return "tensor descriptors (TMA) need compute capability 9.0 or newer"
    if x.is_cuda and x.dtype == torch.float32:
        # Exact products run on FMAs with operands in registers: these tiles spill thousands of bytes.
        return "exact float32 products are not wgmma work"
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {x.dtype}"
    if nhwc(x) is None or weight_matrix(weight) is None:
        return "x and the weight must be channels_last with 16-byte aligned rows of channels"
    if weight.shape[0] * x.element_size() % 16:
        return f"{weight.shape[0]} output channels are not a 16-byte row"
    if residual is not None and (nhwc(residual) is None or not residual.permute(0, 2, 3, 1).is_contiguous()):
        return "the residual must be dense channels_last"
    return None
