"""Where a batch-1 forward's GPU time goes, kernel by kernel: resnet_fast's CUDA graph against torchvision's.

A batch-1 resnet50 replayed from a CUDA graph is a chain of small dependent kernels; on the H200
(2026-12-04) resnet_fast's replay took 0.455 ms and torchvision's 0.922 ms, and issue 10's target is
0.30 ms. The benchmarks time whole replays; this says where a replay's time goes. It profiles R calls of
each model's captured forward (:func:`resnet_fast.cuda_graph`: the input copied in, the graph replayed,
the output copied out) with ``torch.profiler`` (CUPTI's records of every kernel, memcpy and memset,
those a graph launches included), splits the records into the R calls, and reports per call (medians):

* ``span``: the first record's start to the last one's end, and ``busy``, the sum of their durations;
  ``span - busy`` is the time the GPU spent between dependent kernels (launch latency, tails);
* per category (resnet_fast's convolution kernels by family, the split-K reduction, the stem, torch's
  (cuDNN's) convolutions, batch norm, pooling, the classifier, copies, other elementwise kernels, the rest):
  records and microseconds;
* the longest records, with their position in the call (the convolutions run in network order, so a
  late position is a late layer).

    python3 -m benchmarks.graph_profile                       # resnet50, bf16, 224x224, 20 calls (a GPU)
    python3 -m benchmarks.graph_profile --device cpu --arch tiny_resnet10   # the same report on CPU op
        # records of eager forwards: a smoke test of this script, whose figures say nothing of a GPU

Categories come from kernel names (:data:`CATEGORIES`); a record no pattern names is ``other``.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from dataclasses import dataclass

# (category, pattern searched in the record's name), first match wins.
CATEGORIES = [
    ("conv gather", r"_conv_gather_kernel"),
    ("conv gemm_tma", r"_conv1x1_gemm_kernel"),
    ("conv patch_tma", r"_conv_patch_kernel"),
    ("split-K reduce", r"_split_k_reduce_kernel"),
    ("stem", r"_stem_kernel"),
    ("add_relu", r"_add_relu_kernel"),
    ("torch conv", r"conv|fprop|implicit_gemm|cudnn"),  # cuDNN's on a GPU
    ("batch norm", r"batch_norm|batchnorm|bn_fw"),
    ("pooling", r"pool|adaptive_avg|avg_pool|reduce_kernel|mean"),
    ("classifier", r"gemm|gemv|cublas|addmm|linear|matmul"),
    ("copy", r"copy|memcpy|memset|clone|contiguous"),  # before elementwise: torch's copy is an elementwise kernel
    ("elementwise", r"elementwise|relu|clamp"),
]
_COMPILED = [(name, re.compile(pattern, re.IGNORECASE)) for name, pattern in CATEGORIES]


@dataclass(frozen=True)
class Record:
    """One kernel (or memcpy, memset; on CPU one op) as the profiler recorded it, in microseconds."""

    name: str
    start: float
    end: float

    @property
    def duration(self) -> float:
        return self.end - self.start


def category(name: str) -> str:
    """The :data:`CATEGORIES` entry whose pattern the name holds, else ``"other"``."""
    return next((cat for cat, pattern in _COMPILED if pattern.search(name)), "other")


def outermost(records: list[Record]) -> list[Record]:
    """The records not inside another one (CPU ops nest: aten::conv2d holds aten::convolution). Kernels on
    one stream never overlap, so on a GPU this keeps every record."""
    kept: list[Record] = []
    for r in sorted(records, key=lambda r: (r.start, -r.end)):
        if not kept or r.start >= kept[-1].end:
            kept.append(r)
    return kept


def split_calls(records: list[Record], calls: int) -> list[list[Record]]:
    """The records of ``calls`` identical calls, in time order, cut into one list per call (every call
    launches the same sequence)."""
    records = sorted(records, key=lambda r: r.start)
    if calls < 1 or not records or len(records) % calls:
        raise ValueError(f"{len(records)} records do not divide into {calls} identical calls")
    per_call = len(records) // calls
    split = [records[i * per_call:(i + 1) * per_call] for i in range(calls)]
    for call in split[1:]:
        if [r.name for r in call] != [r.name for r in split[0]]:
            raise ValueError("the calls did not launch the same sequence of kernels")
    return split


def summarize(calls: list[list[Record]], top: int = 8) -> dict:
    """Per-call medians of ``span`` and ``busy`` (µs), ``{category: (records, µs)}`` per call, and the
    ``top`` longest records of a call as ``(position, name, median µs)``."""
    spans = [call[-1].end - call[0].start for call in calls]
    busy = [sum(r.duration for r in call) for call in calls]
    by_category: dict[str, tuple[int, float]] = {}
    first = calls[0]
    for cat in dict.fromkeys(category(r.name) for r in first):
        positions = [i for i, r in enumerate(first) if category(r.name) == cat]
        micros = statistics.median(sum(call[i].duration for i in positions) for call in calls)
        by_category[cat] = (len(positions), micros)
    medians = [statistics.median(call[i].duration for call in calls) for i in range(len(first))]
    longest = sorted(range(len(first)), key=lambda i: -medians[i])[:top]
    return {
        "records": len(first),
        "span": statistics.median(spans),
        "busy": statistics.median(busy),
        "categories": dict(sorted(by_category.items(), key=lambda kv: -kv[1][1])),
        "longest": [(i, first[i].name, medians[i]) for i in sorted(longest, key=lambda i: -medians[i])],
    }


def format_summary(title: str, summary: dict) -> str:
    lines = [f"{title}: {summary['records']} records per call; median span {summary['span']:.1f} us, busy "
             f"{summary['busy']:.1f} us, between records {summary['span'] - summary['busy']:.1f} us"]
    for cat, (count, micros) in summary["categories"].items():
        lines.append(f"  {cat:<16} {count:>4} records {micros:>9.1f} us")
    lines.append("  longest records (position in the call, median us):")
    for position, name, micros in summary["longest"]:
        lines.append(f"    {position:>4} {micros:>8.1f}  {name[:100]}")
    return "\n".join(lines)


def profile_calls(fn, x, calls: int, device_type) -> list[Record]:
    """The profiler's records of ``calls`` calls of ``fn(x)`` on devices of ``device_type`` (kernels,
    memcpys and memsets on CUDA; ops on CPU), after everything queued before has finished."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device_type == torch.autograd.DeviceType.CUDA
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn(x)
        if cuda:
            torch.cuda.synchronize()
    records = [Record(e.name(), e.start_ns() / 1e3, e.end_ns() / 1e3)
               for e in prof.profiler.kineto_results.events() if e.device_type() == device_type]
    return records if cuda else outermost(records)


def _models(arch: str, device, dtype) -> dict:
    """``{name: forward}``: each model's eval forward in ``dtype``, channels_last, the same calibrated
    weights; captured in a CUDA graph on a GPU (torchvision's by the same helper), eager on CPU."""
    import torch

    import resnet_fast
    from benchmarks import bench_utils as bu

    state = bu.reference_state(arch, device)
    forwards = {}
    for kind in ("resnet_fast", "torchvision"):
        model = bu.load_model(kind, arch, state, device).to(memory_format=torch.channels_last).eval().to(dtype)
        example = torch.randn(1, 3, bu.image_size(arch), bu.image_size(arch), device=device, dtype=dtype)
        if device.type == "cuda":
            forwards[kind] = resnet_fast.cuda_graph(model, example.contiguous(memory_format=torch.channels_last))
        else:
            forwards[kind] = torch.no_grad()(model)
    return forwards


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50", help="a benchmarks.bench_utils arch (default resnet50)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--calls", type=int, default=20, help="profiled calls per model")
    parser.add_argument("--device", default=None, help="cuda (default where there is one) or cpu")
    args = parser.parse_args(argv)
    import torch

    import resnet_fast
    from benchmarks import bench_utils as bu

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False")
    device_type = torch.autograd.DeviceType.CUDA if device.type == "cuda" else torch.autograd.DeviceType.CPU
    dtype = bu.DTYPES[args.dtype]
    # On a GPU the Triton backend, as "auto" picks; on CPU the reference, the only one there.
    with resnet_fast.backend("triton" if device.type == "cuda" else "torch"):
        forwards = _models(args.arch, device, dtype)
        x = torch.randn(1, 3, bu.image_size(args.arch), bu.image_size(args.arch), device=device, dtype=dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        for name, fn in forwards.items():
            for _ in range(3):  # past any first-call work
                fn(x)
            calls = split_calls(profile_calls(fn, x, args.calls, device_type), args.calls)
            how = "graph replay" if device.type == "cuda" else "eager, CPU ops"
            print(format_summary(f"{name} {args.arch} b1 {args.dtype} ({how})", summarize(calls)))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {where}; torch {torch.__version__}, Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
