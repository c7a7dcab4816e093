"""Host time of the Triton backend's convolutions at batch 1: what eager inference pays per fused op.

At batch 1 a resnet50 forward is launch-bound: its convolutions' GPU work is a few microseconds each, so
the time is the host's (issue 10). This times one call of the ``"triton"`` backend's ``conv_bn_act`` (kernel
choice, output allocation, the launcher, Triton's argument binding and launch; the split-K reduction's
launch where the layer splits) for every distinct ResNet-50 convolution at batch 1 (bf16, channels_last,
eval BatchNorm, the residual where there is one), and sums them by occurrence: the host time of a batch-1
forward's 53 convolutions.

    python3 -m benchmarks.triton_host_cost             # on a GPU: the real driver; else the stub below
    python3 -m benchmarks.triton_host_cost --profile   # and a cProfile of the Triton calls, by own time

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


def _conv_arguments(torch, shape, device) -> tuple:
    """The ``conv_bn_act`` arguments of one ResNet-50 convolution at batch 1, as a model cast to bf16 has
    them (its BatchNorm's parameters and statistics bf16 too)."""
    bf16, cl = torch.bfloat16, torch.channels_last
    x = torch.randn(1, shape.c_in, shape.h, shape.h, device=device, dtype=bf16).contiguous(memory_format=cl)
    w = torch.randn(shape.c_out, shape.c_in, shape.k, shape.k, device=device, dtype=bf16).contiguous(memory_format=cl)
    gamma, beta, mean = (torch.randn(shape.c_out, device=device, dtype=bf16) for _ in range(3))
    var = torch.rand(shape.c_out, device=device, dtype=bf16) + 0.5
    residual = None
    if shape.epilogue == "add_relu":
        residual = torch.randn(1, shape.c_out, shape.h_out, shape.h_out, device=device, dtype=bf16)
        residual = residual.contiguous(memory_format=cl)
    return (x, w, None, gamma, beta, mean, var, 1e-5, (shape.stride,) * 2, (shape.pad,) * 2, (1, 1), 1, residual,
            shape.epilogue != "none")


def _host_times(fn, args, calls: int, synchronize, profiler) -> list[float]:
    """Host seconds of ``calls`` calls of ``fn(*args)`` (queued work synchronized after them)."""
    times = []
    if profiler is not None:
        profiler.enable()
    for _ in range(calls):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    if profiler is not None:
        profiler.disable()
    synchronize()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="timed calls per shape (in three passes)")
    parser.add_argument("--profile", action="store_true", help="print a cProfile of the timed calls")
    parser.add_argument("--shapes", type=int, help="only the first N distinct shapes (a quick check)")
    args = parser.parse_args()
    from benchmarks import stub_driver

    if not stub_driver.active():
        import torch

        if not torch.cuda.is_available():
            stub_driver.main(["-m", __spec__.name, *sys.argv[1:]])  # runs this again, on the stub
        if os.environ.get("TRITON_INTERPRET") == "1":
            parser.error("this times compiled kernels' launches: unset TRITON_INTERPRET")
    import torch

    stub = stub_driver.active()
    torch.set_num_threads(1)

    import benchmarks.bench_utils as bu
    from resnet_fast.kernels import conv, conv_gather
    from resnet_fast.kernels.launch import cdiv
    from resnet_fast.ops import reference

    device = "cpu" if stub else "cuda"
    synchronize = (lambda: None) if stub else torch.cuda.synchronize
    impls = {"triton": conv.conv_bn_act} if stub else {"triton": conv.conv_bn_act, "torch": reference.conv_bn_act}
    shapes = bu.resnet50_conv_shapes()[: args.shapes]
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
    cases = []
    for shape in shapes:
        call = _conv_arguments(torch, shape, device)
        m, k_blocks = shape.h_out**2, shape.k**2 * cdiv(shape.c_in, 64)
        if stub:  # the H200's split (on CPU tensors the launcher would never split)
            split = conv_gather.split_k(m, shape.c_out, k_blocks, stub_driver.MULTIPROCESSORS)
        else:
            split = conv_gather._split_k_for(call[0], m, shape.c_out, k_blocks)
        cases.append((shape, call, split))
    # Warm-up (compilation, autotuning), then the timed calls in passes over all the shapes, so that the
    # machine's drift spreads over every shape rather than landing on the first ones.
    times = {(shape, name): [] for shape, _, _ in cases for name in impls}
    for calls, kept in [(3, False)] + [(max(1, args.calls // 3), True)] * 3:
        for shape, call, split in cases:
            if stub:
                os.environ["RESNET_FAST_SPLIT_K"] = str(split)
            for name, fn in impls.items():
                timed = _host_times(fn, call, calls, synchronize, profiler if kept and name == "triton" else None)
                if kept:
                    times[shape, name] += timed
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
    driver = f"stub libcuda ({stub_driver.DEVICE}'s table, {stub_driver.MULTIPROCESSORS} multiprocessors)" if stub else \
        torch.cuda.get_device_name()
    import triton

    print(f"driver: {driver}; torch {torch.__version__}, triton {triton.__version__}, Python {sys.version.split()[0]}")
    if profiler is not None:
        import pstats

        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
