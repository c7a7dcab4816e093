"""Issue 10's CPU measure, paired: resnet_fast's and torchvision's resnet50 forward on one 1x3x8x8 image,
timed alternately (one call of each per round, the order swapped every round), so that the machine's
drift, which on a shared machine is as large as the difference sought, hits both models alike. Reports
each model's median and the median of the per-round ratios.

    python3 benchmarks/paired_overhead.py                 # the issue's measure
    python3 benchmarks/paired_overhead.py --stub-conv     # convolutions replaced by a shape-only stub
    python3 benchmarks/paired_overhead.py --same-model    # control: torchvision against itself
    python3 benchmarks/paired_overhead.py --theirs-first  # torchvision's model built (allocated) first
    python3 benchmarks/paired_overhead.py --train --rounds 40  # a training step at batch 8, 112 px
    python3 benchmarks/paired_overhead.py --train --batch 2 --size 32 --threads 1  # its Python overhead

``--stub-conv`` leaves the Python layers, dispatch and the small ops (BatchNorm, ReLU, add): the
difference between the two medians is then the Python-side cost alone. ``--same-model`` times two
torchvision models, which shows how small a ratio this method resolves on this machine. Where each
model's weights land in memory moves the ratio by 1-2% from one process to the next (the forward streams
100 MB of weights): run both build orders (``--theirs-first`` builds torchvision's model first).

``--train`` times a training step instead (train mode, forward and backward of the output's sum, the
gradients set to None before each step), by default on an 8x3x112x112 batch with torch's default threads:
there the time is the arithmetic, BatchNorm's statistics and backward included, rather than the Python
layers. ``--batch``, ``--size`` and ``--threads`` change the input and the thread count of either measure.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
import torchvision

import resnet_fast
from resnet_fast.ops import reference
from resnet_fast.ops.layout import conv_output_size


def _stub_conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """A zero tensor of F.conv2d's output shape (square kernels, one stride and padding for both axes)."""
    s, p, d = (v if isinstance(v, int) else v[0] for v in (stride, padding, dilation))
    h, w = (conv_output_size(n, weight.shape[2], s, p, d) for n in x.shape[2:])
    return x.new_zeros(x.shape[0], weight.shape[0], h, w)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=600)
    parser.add_argument("--stub-conv", action="store_true")
    parser.add_argument("--same-model", action="store_true")
    parser.add_argument("--theirs-first", action="store_true")
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--batch", type=int, help="default: 8 with --train, else 1")
    parser.add_argument("--size", type=int, help="image height and width; default: 112 with --train, else 8")
    parser.add_argument("--threads", type=int, help="torch's threads; default: torch's own with --train, else 1")
    args = parser.parse_args()
    if args.stub_conv:  # both models call torch.nn.functional.conv2d, through these two names
        F.conv2d = reference.F.conv2d = _stub_conv2d
    threads = args.threads or (None if args.train else 1)
    if threads:
        torch.set_num_threads(threads)
    build_ours = torchvision.models.resnet50 if args.same_model else resnet_fast.resnet50
    if args.theirs_first:
        theirs, ours = torchvision.models.resnet50(), build_ours()
    else:
        ours, theirs = build_ours(), torchvision.models.resnet50()
    ours.load_state_dict(theirs.state_dict())
    batch, size = args.batch or (8 if args.train else 1), args.size or (112 if args.train else 8)
    x = torch.randn(batch, 3, size, size)
    if args.train:

        def call(model: torch.nn.Module) -> None:
            model.zero_grad(set_to_none=True)
            model(x).sum().backward()
    else:

        @torch.no_grad()
        def call(model: torch.nn.Module) -> None:
            model(x)
    times: dict[str, list[float]] = {"ours": [], "theirs": []}
    with resnet_fast.backend("torch", strict=True):
        for model in (ours, theirs):
            model.train(args.train)
            for _ in range(2 if args.train else 20):
                call(model)
        for i in range(args.rounds):
            order = (("ours", ours), ("theirs", theirs)) if i % 2 else (("theirs", theirs), ("ours", ours))
            for name, model in order:
                start = time.perf_counter()
                call(model)
                times[name].append(time.perf_counter() - start)
    ratio = statistics.median(a / b for a, b in zip(times["ours"], times["theirs"]))
    label = "torchvision (second copy)" if args.same_model else "resnet_fast"
    print(f"{label}: median {statistics.median(times['ours']) * 1e3:.3f} ms; torchvision: median "
          f"{statistics.median(times['theirs']) * 1e3:.3f} ms; median per-round ratio {ratio:.3f} "
          f"({args.rounds} rounds{', convolutions stubbed' if args.stub_conv else ''}"
          f"{', torchvision built first' if args.theirs_first else ''}{', training step' if args.train else ''}, "
          f"{batch}x3x{size}x{size}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
