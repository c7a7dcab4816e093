"""``python -m resnet_fast`` / ``resnet-fast``: parity and throughput of resnet_fast against torchvision.

Builds torchvision's model and resnet_fast's with the same random weights (BatchNorm statistics
randomised so folding is exercised), checks both against a float64 reference, and times eval-mode
forward passes of each on the chosen device.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys
import time

import torch
import torchvision

import resnet_fast
from resnet_fast import backends
from resnet_fast.models.resnet import ARCHS
from resnet_fast.testing import parity_tolerance, randomize_batch_norm, relative_error

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _median_ms(fn, x: torch.Tensor, warmup: int, iters: int) -> float:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for _ in range(warmup):
        fn(x)
    sync()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn(x)
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="resnet-fast", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet50", choices=sorted(ARCHS))
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--batch", type=int, default=None, help="default: 256 on CUDA, 4 on CPU")
    p.add_argument("--size", type=int, default=None, help="image side; default: 224 on CUDA, 128 on CPU")
    p.add_argument("--backend", default="auto", help=f"auto or one of {backends.registered_backends()}")
    p.add_argument("--iters", type=int, default=None, help="timed iterations; default: 50 on CUDA, 5 on CPU")
    args = p.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if on_cuda else "float32")
    args.batch = args.batch or (256 if on_cuda else 4)
    args.size = args.size or (224 if on_cuda else 128)
    args.iters = args.iters or (50 if on_cuda else 5)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    resnet_fast.set_backend(args.backend)
    print(f"resnet_fast {resnet_fast.__version__} | torch {torch.__version__} | torchvision {torchvision.__version__}"
          f" | python {platform.python_version()}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"device {device} ({name}) | {args.arch} | {args.dtype} | batch {args.batch} | {args.size}x{args.size}")
    print(f"backends available: {resnet_fast.available_backends()} | selected: {args.backend}")

    reference = randomize_batch_norm(getattr(torchvision.models, args.arch)()).eval()
    fast = ARCHS[args.arch]()
    fast.load_state_dict(reference.state_dict(), strict=True)
    fast.eval()
    x = torch.randn(args.batch, 3, args.size, args.size)

    parity_batch = x[: min(args.batch, 8)]
    with torch.no_grad():
        ref64 = copy.deepcopy(reference).double()(parity_batch.double())
    models = {"torchvision": reference, "resnet_fast": fast}
    for m in models.values():
        m.to(device=device, dtype=dtype, memory_format=torch.channels_last)
    x = x.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    n = parity_batch.shape[0]
    with torch.no_grad():
        # The whole batch runs and its first n rows are checked: a batch of n alone would be new shapes,
        # which a GPU autotunes (minutes), while the timed batch's shapes are tuned once, or tabled.
        with backends.record_dispatch() as calls:
            out = fast(x)[:n]
        err = {"torchvision": relative_error(reference(x)[:n], ref64), "resnet_fast": relative_error(out, ref64)}
        limit = parity_tolerance(dtype, err["torchvision"])
        ok = err["resnet_fast"] <= limit
        timings = {k: _median_ms(m, x, warmup=3 if device.type == "cpu" else 10, iters=args.iters)
                   for k, m in models.items()}

    ran = ", ".join(f"{op} on {name} x{n}" for (op, name), n in sorted(calls.items()))
    print(f"resnet_fast forward ran: {ran}")
    print("\nparity vs float64 reference (relative L2 error)")
    for k, e in err.items():
        print(f"  {k:<12} {e:.3e}")
    print(f"  {'PASS' if ok else 'FAIL'}: resnet_fast {err['resnet_fast']:.3e} <= limit {limit:.3e}")
    print(f"\neval forward, median of {args.iters}")
    for k, ms in timings.items():
        print(f"  {k:<12} {ms:9.2f} ms  {args.batch / ms * 1e3:10.1f} img/s")
    print(f"  speedup      {timings['torchvision'] / timings['resnet_fast']:.2f}x")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
