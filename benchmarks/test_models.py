"""Whole-model benchmarks: resnet_fast (each backend) against torchvision eager and torch.compile.

Every configuration runs channels_last. Eval runs the model cast to the dtype (pure bf16 / fp16 / fp32
inference); a train step is forward + cross-entropy + backward + SGD(momentum) on float32 master
weights, under ``torch.autocast`` for bf16 / fp16 (fp16 with a GradScaler, as real fp16 training does).

Implementations (the ``impl`` part of each id):

* ``eager``   -- torchvision's model, eager PyTorch (cuDNN convs, separate BN / add / ReLU kernels).
* ``compile`` -- ``torch.compile`` of torchvision's model (headline configurations only); the first
  call (compilation, autotuning) is excluded from the timing and kept as ``compile_s`` in extra_info.
  Mode: ``RESNET_FAST_BENCH_COMPILE_MODE`` if set, else inductor's default at batch > 1 and
  ``"reduce-overhead"`` (CUDA graphs) at batch 1.
* ``compile-frozen`` -- eval only: the same with ``torch._inductor.config.freezing = True`` (weights
  become constants, BatchNorm folded into the convolutions): Inductor's best inference, the one to beat.
* ``rf-<b>``  -- resnet_fast's model with the same weights under ``resnet_fast.backend("<b>")``; which
  backend each op call really ran on is recorded in extra_info["dispatch"] (fallbacks included).
* ``+graph``  -- batch 1 eval only: the forward captured in a CUDA graph and replayed (input copied
  into the static buffer inside the timed step).

Parity is asserted inside every benchmark against a float64 torchvision reference with the same
weights (relative error at most 2x PyTorch's own same-dtype error): eval compares the timed model's
logits on its first input buffer (first 16 images); train compares the full-batch train-mode logits
of the benchmarked model after timing, and (except ``compile``) the logits, loss and every parameter
gradient of one fwd+bwd at batch min(B, 16).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from benchmarks import bench_utils as bu

RF_BACKENDS = ("triton", "cuda", "torch")
HEADLINE = {
    ("resnet50", "eval", 256, "bf16"),
    ("resnet50", "eval", 1, "bf16"),
    ("resnet50", "train", 256, "bf16"),
    ("cifar_resnet18", "eval", 256, "bf16"),
    ("cifar_resnet18", "train", 256, "bf16"),
}
COMPILED = {("resnet50", "eval", 256, "bf16"), ("resnet50", "eval", 1, "bf16"), ("resnet50", "train", 256, "bf16")}
PARITY_ROWS = 16


@dataclass(frozen=True)
class Cfg:
    arch: str
    mode: str  # "eval" or "train"
    batch: int
    dtype: str  # "bf16", "fp16", "fp32"
    impl: str  # "eager", "compile", "compile-frozen", "rf-<backend>"
    graph: bool = False
    device: str = "cuda"

    @property
    def id(self) -> str:
        return f"{self.arch}-{self.mode}-b{self.batch}-{self.dtype}-{self.impl}{'+graph' if self.graph else ''}"

    @property
    def group(self) -> str:
        return f"{self.arch} {self.mode} b{self.batch} {self.dtype}"


def _model_configs() -> list:
    base = []
    for arch in bu.ARCHS:
        for batch in (256, 32, 1):  # batch 256 first: a short lease cuts the end of the list
            for mode in ("eval", "train"):
                base.append((arch, mode, batch, "bf16"))
        for dtype in ("fp16", "fp32"):
            for mode in ("eval", "train"):
                base.append((arch, mode, 256, dtype))
    params = []
    for key in base:
        arch, mode, batch, dtype = key
        mark = pytest.mark.headline if key in HEADLINE else pytest.mark.sweep
        impls = ["eager", *(f"rf-{b}" for b in RF_BACKENDS)]
        if key in COMPILED:
            impls += ["compile", "compile-frozen"] if mode == "eval" else ["compile"]
        for impl in impls:
            c = Cfg(arch, mode, batch, dtype, impl)
            params.append(pytest.param(c, id=c.id, marks=[mark]))
        if mode == "eval" and batch == 1 and dtype == "bf16":
            for impl in ["eager", *(f"rf-{b}" for b in RF_BACKENDS)]:
                c = Cfg(arch, mode, batch, dtype, impl, graph=True)
                params.append(pytest.param(c, id=c.id, marks=[mark]))
    return params


# ------------------------------------------------------------------------------------------- building


def _compile_mode(batch: int) -> str | None:
    env = os.environ.get("RESNET_FAST_BENCH_COMPILE_MODE")
    if env:
        return None if env == "default" else env
    return "reduce-overhead" if batch == 1 else None


def _build(cfg: Cfg, device: torch.device, state: dict, kind: str | None = None) -> torch.nn.Module:
    """A model of ``kind`` ("torchvision" or "resnet_fast"; default from cfg.impl) with ``state`` loaded
    strictly, on ``device``, channels_last; eval models cast to the dtype, train models float32."""
    kind = kind or ("resnet_fast" if cfg.impl.startswith("rf-") else "torchvision")
    model = bu.load_model(kind, cfg.arch, state, device).to(memory_format=torch.channels_last)
    if cfg.mode == "eval":
        model = model.eval().to(bu.DTYPES[cfg.dtype])
    else:
        model.train()
    return model


def _reference64(cfg: Cfg, device, state: dict, train: bool) -> torch.nn.Module:
    ref = bu.load_model("torchvision", cfg.arch, state, device).to(dtype=torch.float64)
    return ref.train() if train else ref.eval()


def _backend_ctx(cfg: Cfg, device: torch.device):
    if not cfg.impl.startswith("rf-"):
        return contextlib.nullcontext()
    import resnet_fast

    from resnet_fast import backends

    name = cfg.impl[3:]
    reason = bu.backend_usable(name, device)
    if reason is not None:
        pytest.skip(f"resnet_fast backend {name!r} unavailable here: {reason}")
    if name != "torch":
        # the fused ops this mode's forward calls; a backend serving none of them would only re-measure rf-torch
        ops = ("conv_bn_act",) if cfg.mode == "eval" else ("batch_norm_act", "batch_norm_act_backward")
        with resnet_fast.backend(name), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            served = [op for op in ops if backends.resolve(op, device)[0] == name]
        if not served:
            pytest.skip(f"resnet_fast backend {name!r} serves none of {ops} in {cfg.mode} mode (they would run on "
                        "the reference): the rf-torch row measures that path")
    return resnet_fast.backend(name)


def _autocast(cfg: Cfg, device: torch.device):
    dtype = bu.DTYPES[cfg.dtype]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


# ------------------------------------------------------------------------------------------- eval


def _setup(cfg: Cfg, benchmark, **details):
    """(device, dtype, image size, reference weights, extra_info) of a model benchmark, its info filled in."""
    device = torch.device(cfg.device)
    info = benchmark.extra_info
    info.update(kind="model", arch=cfg.arch, mode=cfg.mode, batch=cfg.batch, dtype=cfg.dtype, impl=cfg.impl,
                memory_format="channels_last", device=str(device), **details)
    benchmark.group = cfg.group
    return device, bu.DTYPES[cfg.dtype], bu.image_size(cfg.arch), bu.reference_state(cfg.arch, device), info


def _bench_eval(cfg: Cfg, measure, benchmark) -> None:
    device, dtype, size, state, info = _setup(cfg, benchmark, graph=cfg.graph)

    model = _build(cfg, device, state)
    per_set = cfg.batch * 3 * size * size * dtype.itemsize
    xs = [torch.randn(cfg.batch, 3, size, size, device=device, dtype=dtype).contiguous(
        memory_format=torch.channels_last) for _ in range(bu.n_buffers(per_set))]
    rot = bu.Rotation(xs)
    work = bu.Work(images=cfg.batch, flops=cfg.batch * bu.model_flops_per_image(cfg.arch))

    frozen = cfg.impl == "compile-frozen"
    # Inductor reads the flag when it compiles, at the first call inside the timed warm-up.
    freezing = torch._inductor.config.patch(freezing=True) if frozen else contextlib.nullcontext()
    with _backend_ctx(cfg, device), freezing:
        fwd = model
        if cfg.impl.startswith("compile"):
            mode = _compile_mode(cfg.batch)
            info["compile_mode"] = (mode or "default") + (" + freezing" if frozen else "")
            fwd = torch.compile(model, mode=mode)
        if cfg.graph and cfg.impl.startswith("rf-"):
            import resnet_fast

            t0 = time.perf_counter()
            captured = resnet_fast.cuda_graph(model, xs[0])  # the product's own capture helper
            torch.cuda.synchronize()
            info["capture_s"] = time.perf_counter() - t0

            def step():
                return captured(rot.next())
        elif cfg.graph:
            static_x = xs[0].clone()
            t0 = time.perf_counter()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.no_grad():
                for _ in range(3):
                    model(static_x)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(graph):
                static_out = model(static_x)
            torch.cuda.synchronize()
            info["capture_s"] = time.perf_counter() - t0

            def step():
                static_x.copy_(rot.next())
                graph.replay()
                return static_out
        else:

            def step():
                with torch.no_grad():
                    return fwd(rot.next())

        res = measure(step, device=device, work=work)
        if cfg.impl.startswith("compile"):
            info["compile_s"] = res.get("first_call_s")  # None under --benchmark-disable
        if cfg.impl.startswith("rf-"):
            with torch.no_grad():
                info["dispatch"] = bu.dispatch_census(lambda: model(xs[0]))

        # parity on the first input buffer, through the same step
        rot.i = 0
        out = step().detach().float().clone()
        bu.synchronize(device)

    k = min(cfg.batch, PARITY_ROWS)
    x_k = xs[0][:k]
    with torch.no_grad():
        ref = _reference64(cfg, device, state, train=False)(x_k.double().contiguous())
        same = _build(cfg, device, state, kind="torchvision")(x_k)
    bu.check_parity(info, "logits", out[:k], same, ref, dtype)


# ------------------------------------------------------------------------------------------- train


def _fwd_bwd(model, x, y, cfg, device):
    model.zero_grad(set_to_none=True)
    with _autocast(cfg, device):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    loss.backward()
    grads = bu.param_grads(model)
    return logits.detach().float(), loss.detach(), grads


def _check_grads(cfg: Cfg, device, state, info) -> None:
    """Logits, loss and all parameter gradients of one fwd+bwd at batch min(B, 16), judged on a second fresh
    draw if the first fails: a ReLU input within rounding of zero falls on either side depending on the
    rounding order, and one flipped mask in a small late layer moves the whole gradient by ~1e-3 (seen once
    in ~40 runs of the tiny CPU model, ours and torchvision's alike). A wrong formula fails both draws."""
    try:
        _check_grads_once(cfg, device, state, info)
    except AssertionError as first:
        info["parity_redrawn"] = str(first)
        _check_grads_once(cfg, device, state, info)


def _check_grads_once(cfg: Cfg, device, state, info) -> None:
    dtype = bu.DTYPES[cfg.dtype]
    size = bu.image_size(cfg.arch)
    pb = min(cfg.batch, PARITY_ROWS)
    x = torch.randn(pb, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, bu.num_classes(cfg.arch), (pb,), device=device)
    fast = _build(cfg, device, state)
    same = _build(cfg, device, state, kind="torchvision")
    ref = _reference64(cfg, device, state, train=True)
    lf, lossf, gf = _fwd_bwd(fast, x, y, cfg, device)
    ls, losss, gs = _fwd_bwd(same, x, y, cfg, device)
    ref.zero_grad(set_to_none=True)
    lr = ref(x.double().contiguous())
    lossr = F.cross_entropy(lr, y)
    lossr.backward()
    gr = bu.param_grads(ref)
    names = list(gr)
    missing = [n for n in names if n not in gf]
    assert not missing, f"{cfg.impl}: no gradient for parameters {missing[:5]}"
    bu.check_parity(info, f"logits@b{pb}", lf, ls, lr, dtype)
    bu.check_parity(info, f"loss@b{pb}", lossf.reshape(1), losss.reshape(1), lossr.reshape(1), dtype)
    bu.check_parity(info, f"grads@b{pb}", bu.flat(gf[n] for n in names), bu.flat(gs[n] for n in names),
                    bu.flat(gr[n] for n in names), dtype)


def _bench_train(cfg: Cfg, measure, benchmark) -> None:
    precision = "fp32" if cfg.dtype == "fp32" else "autocast"
    device, dtype, size, state, info = _setup(cfg, benchmark, graph=False, precision=precision)

    with _backend_ctx(cfg, device):
        if cfg.impl != "compile":
            _check_grads(cfg, device, state, info)

        model = _build(cfg, device, state)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        per_set = cfg.batch * 3 * size * size * 4
        sets = [(torch.randn(cfg.batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last),
                 torch.randint(0, bu.num_classes(cfg.arch), (cfg.batch,), device=device))
                for _ in range(bu.n_buffers(per_set))]
        rot = bu.Rotation(sets)
        fwd = model
        if cfg.impl == "compile":
            mode = _compile_mode(cfg.batch)
            info["compile_mode"] = mode or "default"
            fwd = torch.compile(model, mode=mode)

        def step():
            x, y = rot.next()
            opt.zero_grad(set_to_none=True)
            with _autocast(cfg, device):
                loss = F.cross_entropy(fwd(x), y)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            return loss

        work = bu.Work(images=cfg.batch, flops=3 * cfg.batch * bu.model_flops_per_image(cfg.arch))
        res = measure(step, device=device, work=work)
        if cfg.impl.startswith("compile"):
            info["compile_s"] = res.get("first_call_s")  # None under --benchmark-disable
        if cfg.impl.startswith("rf-"):
            info["dispatch"] = bu.dispatch_census(step)

        # full-batch train-mode logits of the benchmarked model, at its current weights
        x0 = sets[0][0]
        with _autocast(cfg, device):
            out = fwd(x0)
        out = out.detach().float()
        current = {k: v.detach().float() if v.is_floating_point() else v.detach()
                   for k, v in model.state_dict().items()}

    with torch.no_grad():
        ref = _reference64(cfg, device, current, train=True)(x0.double().contiguous())
        same_model = _build(cfg, device, current, kind="torchvision")
        with _autocast(cfg, device):
            same = same_model(x0).float()
    bu.check_parity(info, f"train-logits@b{cfg.batch}", out, same, ref, dtype)


# ------------------------------------------------------------------------------------------- tests


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", _model_configs())
def test_model(cfg: Cfg, measure, benchmark):
    (_bench_eval if cfg.mode == "eval" else _bench_train)(cfg, measure, benchmark)


CPU_CONFIGS = [Cfg("tiny_resnet10", mode, 2, "fp32", impl, device="cpu")
               for mode in ("eval", "train") for impl in ("rf-torch", "eager")]


@pytest.mark.cpu
@pytest.mark.parametrize("cfg", [pytest.param(c, id=c.id) for c in CPU_CONFIGS])
def test_cpu_tiny_model(cfg: Cfg, measure, benchmark):
    """A tiny CIFAR-stem ResNet (one BasicBlock per stage, 16x16 images) at batch 2 on the CPU, through exactly the GPU benchmarks' code path (model
    building, dispatch census, timing harness, parity): CI runs it with ``--benchmark-disable``.
    Single-threaded: on a loaded 2-core machine OpenMP's worker threads make tiny ops 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        (_bench_eval if cfg.mode == "eval" else _bench_train)(cfg, measure, benchmark)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.cpu
@pytest.mark.parametrize("impl", ["rf-torch", "eager"])
def test_cpu_python_overhead(impl, measure, benchmark):
    """The per-forward overhead of the Python layers (issue 10's measure): a resnet50 forward on one 8x8
    image, whose arithmetic is small, on one CPU thread with the reference backend, against torchvision.
    NCHW, as a caller's image comes."""
    import torchvision

    import resnet_fast

    info = benchmark.extra_info
    info.update(kind="model", arch="resnet50@8px", mode="eval", batch=1, dtype="fp32", impl=impl, device="cpu",
                memory_format="contiguous", threads=1)
    benchmark.group = "resnet50@8px eval b1 fp32 (CPU, one thread)"
    model = (resnet_fast.resnet50() if impl == "rf-torch" else torchvision.models.resnet50()).eval()
    x = torch.randn(1, 3, 8, 8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with resnet_fast.backend("torch", strict=True), torch.no_grad():
            measure(lambda: model(x), device=torch.device("cpu"), work=bu.Work(images=1))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.cpu
@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("impl", ["rf-torch", "eager"])
def test_cpu_op_overhead(impl, grad, measure, benchmark):
    """The Python cost of one public fused op (issue 10's per-op measure): ``ops.conv_bias_act`` against
    ``F.relu(F.conv2d(...))`` for a 1x1 convolution on a 1x64x2x2 map, one CPU thread, reference
    backend; with autograd recording (x requires grad) or without."""
    import torch.nn.functional as F

    import resnet_fast
    from resnet_fast import ops

    info = benchmark.extra_info
    info.update(kind="op", op="conv_bias_act 1x1 64->64 @2x2", mode="train" if grad else "eval", batch=1,
                dtype="fp32", impl=impl, device="cpu", memory_format="contiguous", threads=1)
    benchmark.group = f"conv_bias_act 1x1 64->64 @2x2 fp32 {'grad' if grad else 'no_grad'} (CPU, one thread)"
    x = torch.randn(1, 64, 2, 2, requires_grad=grad)
    weight, bias = torch.randn(64, 64, 1, 1), torch.randn(64)

    def run():
        return ops.conv_bias_act(x, weight, bias) if impl == "rf-torch" else F.relu(F.conv2d(x, weight, bias))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with resnet_fast.backend("torch", strict=True), torch.set_grad_enabled(grad):
            measure(run, device=torch.device("cpu"), work=bu.Work(images=1))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.cpu
@pytest.mark.parametrize("flags", [["--stub-conv"], ["--theirs-first"], ["--same-model"], ["--train", "--batch", "2", "--size", "32"]])
def test_paired_overhead_script_runs(flags):
    """``benchmarks/paired_overhead.py``, issue 10's paired measure (and its training-step variant), runs
    and reports two medians and their ratio (three rounds: a check that it works, not a measurement)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "paired_overhead.py"), "--rounds", "3",
                           *flags], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    found = re.search(r"median ([\d.]+) ms; torchvision: median ([\d.]+) ms; median per-round ratio ([\d.]+) "
                      r"\(3 rounds", done.stdout)
    assert found and all(float(v) > 0 for v in found.groups()), done.stdout


@pytest.mark.cpu
def test_first_call_script_runs(tmp_path):
    """``benchmarks/first_call.py`` (issue 11's first-call cost) runs its fresh processes and reports each
    case (on CPU: the reference backend, nothing compiled; a check that it works, not a measurement)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = tmp_path / "first_call.json"
    done = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "first_call.py"), "--arch", "resnet18",
                           "--size", "32", "--work", str(tmp_path / "work"), "--json", str(out)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    results = json.loads(out.read_text())
    assert [r["case"] for r in results] == ["cold", "warm", "table"]
    assert all(r["first_s"] > 0 and r["second_ms"] > 0 and r["arch"] == "resnet18" for r in results), results
    assert all(line.split()[0] in ("case", "cold", "warm", "table") for line in done.stdout.splitlines())
