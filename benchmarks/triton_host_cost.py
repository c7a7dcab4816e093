"""Host time of the Triton backend's convolutions at batch 1: what eager inference pays per fused op.

At batch 1 a resnet50 forward is launch-bound: its convolutions' GPU work is a few microseconds each, so
the time is the host's (issue 10). This times one call of the ``"triton"`` backend's ``conv_bn_act`` (kernel
choice, output allocation, the launcher, Triton's argument binding and launch; the split-K reduction's
launch where the layer splits) for every distinct ResNet-50 convolution at batch 1 (bf16, channels_last,
eval BatchNorm, the residual where there is one), and sums them by occurrence: the host time of a batch-1
forward's 53 convolutions.

    python3 -m benchmarks.triton_host_cost             # on a GPU: the real driver; else the stub below
    python3 -m benchmarks.triton_host_cost --profile   # then cProfiles of as many more calls, by own time

It then times whole batch-1 forwards the same way: resnet_fast's resnet50 ``forward_features`` (the stem
and the four stages: every op of resnet_fast's, so the layers above the backend included) on the
``"triton"`` backend, and on a GPU also resnet_fast's and torchvision's whole forwards. Host time per call,
with queued work synchronized after each pass: at batch 1 the GPU finishes first, so on a GPU this is the
eager latency as well.

On a GPU the calls run for real (autotuned as usual; warm-up excluded), beside the ``"torch"`` backend's
(cuDNN and the eager epilogue) for the same shapes. Without one, the script runs again on Triton's driver
over a stub libcuda (:mod:`benchmarks.stub_driver`): Triton compiles each kernel for sm_90 and its
launcher runs up to the driver call, which is everything but the driver's own launch cost, on CPU
tensors, with the committed H200 table's configs and split-K decided for the H200's 132
multiprocessors, as on that GPU. Triton's kernel cache makes reruns quick (the first compiles about 20
kernels for sm_90).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time


def _host_times(fn, args, calls: int, synchronize) -> list[float]:
    """Host seconds of ``calls`` calls of ``fn(*args)`` (queued work synchronized after them)."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    synchronize()
    return times


def _timed_passes(calls: dict, count: int, synchronize) -> dict:
    """``{key: host seconds of each timed call}`` for ``calls = {key: (fn, args)}``: a warm-up (compilation,
    autotuning), then three passes of ``count // 3`` calls of each over all of them, so that the machine's
    drift spreads over every case rather than landing on the first ones."""
    times = {key: [] for key in calls}
    for n, kept in [(3, False)] + [(max(1, count // 3), True)] * 3:
        for key, (fn, args) in calls.items():
            timed = _host_times(fn, args, n, synchronize)
            if kept:
                times[key] += timed
    return times


def _print_profile(title: str, calls: list[tuple], repeat: int, synchronize) -> None:
    """A cProfile of ``repeat`` more calls of each ``(fn, args)``, by own time; never of the timed calls,
    which it would slow down."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for fn, args in calls:
        for _ in range(repeat):
            fn(*args)
    profiler.disable()
    synchronize()
    print(f"profile of {title}:")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(30)


def _forward_cases(torch, device, stub: bool) -> list[tuple[str, object, object]]:
    """``(name, forward, x)`` of the whole-model rows: batch-1 resnet50s in bf16, channels_last, eval, with
    random weights (host time does not depend on their values)."""
    import torchvision

    import resnet_fast

    def prepared(model):
        return model.to(device=device, dtype=torch.bfloat16, memory_format=torch.channels_last).eval()

    x = torch.randn(1, 3, 224, 224, device=device, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    ours = prepared(resnet_fast.resnet50())
    cases = [('resnet_fast forward_features ("triton")', ours.forward_features, x)]
    if stub:
        # The stem's max-pool is torch's (the fused stem is not the default yet), so here it computes on
        # the CPU: timed alone, to be told apart from the host's work.
        conv1 = torch.randn(1, 64, 112, 112, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        cases.append(("  of which the stem's max-pool, on the CPU", lambda t: torch.max_pool2d(t, 3, 2, 1), conv1))
    else:  # (on the stub the head's matmul would compute on the CPU too)
        theirs = prepared(torchvision.models.resnet50())
        cases += [('resnet_fast forward ("triton")', ours, x), ("torchvision forward", theirs, x)]
    return cases


def _time_forwards(torch, cases, forwards: int, synchronize, profile: bool) -> None:
    """Prints the median host ms per call of each case, and which backend served the features' ops."""
    import resnet_fast
    from resnet_fast import backends

    with resnet_fast.backend("triton", strict=True), torch.no_grad():
        times = _timed_passes({name: (fn, (x,)) for name, fn, x in cases}, forwards, synchronize)
        with backends.record_dispatch() as counts:
            cases[0][1](cases[0][2])
        print("batch-1 resnet50 (bf16, channels_last, eval, no grad): median host ms per call")
        for name, _, _ in cases:
            print(f"  {name:<44} {statistics.median(times[name]) * 1e3:>8.3f}")
        print("ops of forward_features by backend: "
              + ", ".join(f"{op}: {b} {n}" for (op, b), n in sorted(counts.items())))
        if profile:
            _print_profile("the features", [(cases[0][1], (cases[0][2],))], max(1, forwards // 3), synchronize)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="timed calls per shape (in three passes)")
    parser.add_argument("--profile", action="store_true", help="then print cProfiles of more such calls")
    parser.add_argument("--shapes", type=int, help="only the first N distinct shapes (a quick check)")
    parser.add_argument("--forwards", type=int, default=90, help="timed whole forwards per model (0: none)")
    args = parser.parse_args()
    from benchmarks import stub_driver

    stub_driver.rerun_without_gpu(__spec__.name, sys.argv[1:])
    if not stub_driver.active() and os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("this times compiled kernels' launches: unset TRITON_INTERPRET")
    import torch

    stub = stub_driver.active()
    if stub:
        stub_driver.launch_as_on_the_h200()
    torch.set_num_threads(1)

    import benchmarks.bench_utils as bu
    from resnet_fast.kernels import conv, conv_gather
    from resnet_fast.kernels.launch import cdiv
    from resnet_fast.ops import reference

    device = "cpu" if stub else "cuda"
    synchronize = (lambda: None) if stub else torch.cuda.synchronize
    impls = {"triton": conv.conv_bn_act} if stub else {"triton": conv.conv_bn_act, "torch": reference.conv_bn_act}
    shapes = bu.resnet50_conv_shapes()[: args.shapes]
    cases = []
    for shape in shapes:
        call = bu.conv_bn_act_arguments(shape, device)
        # The split the launch makes (on the stub, the H200's).
        split = conv_gather._split_k_for(call[0], shape.h_out**2, shape.c_out, shape.k**2 * cdiv(shape.c_in, 64))
        cases.append((shape, call, split))
    times = _timed_passes({(shape, name): (fn, call) for shape, call, _ in cases for name, fn in impls.items()},
                          args.calls, synchronize)
    print(f"{'shape (batch 1, bf16)':<34} {'split-K':>7} " + " ".join(f"{name + ' us':>10}" for name in impls))
    totals = dict.fromkeys(impls, 0.0)
    for shape, _, split in cases:
        row = {name: statistics.median(times[shape, name]) * 1e6 for name in impls}
        for name in impls:
            totals[name] += row[name] * shape.count
        print(f"{shape.id():<34} {split:>7} " + " ".join(f"{row[name]:>10.1f}" for name in impls))
    count = sum(s.count for s in shapes)
    print(f"sum over the {count} convolutions of a batch-1 forward: "
          + ", ".join(f"{name} {total / 1e3:.2f} ms" for name, total in totals.items()))
    if stub:
        driver = f"stub libcuda ({stub_driver.DEVICE}'s table, {stub_driver.MULTIPROCESSORS} multiprocessors)"
    else:
        driver = torch.cuda.get_device_name()
    import triton

    print(f"driver: {driver}; torch {torch.__version__}, triton {triton.__version__}, Python {sys.version.split()[0]}")
    if args.profile:
        repeat = max(1, args.calls // 3)
        convolutions = [(impls["triton"], call) for _, call, _ in cases]
        _print_profile("the Triton convolutions", convolutions, repeat, synchronize)
    if args.forwards > 0:
        _time_forwards(torch, _forward_cases(torch, device, stub), args.forwards, synchronize, args.profile)


if __name__ == "__main__":
    main()
