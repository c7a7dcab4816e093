"""Why a fused convolution kernel is slower than cuDNN's: Nsight Compute's counters for chosen ResNet-50 layers.

The per-layer table (BENCHMARKS.md) says how long each kernel takes; these counters say what bounds it:
the DRAM and SM throughput against their peaks, achieved occupancy, registers, what its warps stall on,
shared-memory bank conflicts. Two commands, which ``benchmarks/gpu_session.sh``'s ``profile`` phase runs:

    ncu --profile-from-start off --set full -o layers python3 -m benchmarks.ncu_layers run --manifest m.txt
    ncu --import layers.ncu-rep --csv --page raw > layers.csv
    python3 -m benchmarks.ncu_layers summary layers.csv m.txt

``run`` warms every (layer, family) up first (compilation, autotuning: nothing profiled), then launches
each once between ``cudaProfilerStart`` and ``cudaProfilerStop``, so ncu profiles exactly those launches,
one kernel each (split-K off; batch 256 never splits anyway), in the order ``run`` writes to the manifest. The families are
``gather`` and the layer class's tensor-descriptor family where it serves the layer
(:data:`resnet_fast.kernels.conv.TABLE`). ``summary`` reads ncu's raw CSV (one row per kernel, a column
per metric) and prints a row per kernel: the layer and family from the manifest, duration, DRAM and SM
throughput (% of peak), achieved occupancy, registers per thread, the three longest stall reasons (warp
cycles per issued instruction) and shared-memory bank conflicts.

Without a GPU, ``run`` goes through the stub driver (:mod:`benchmarks.stub_driver`): the kernels compile
for sm_90 and launch as on the H200, nothing runs (a check of this script, with ``--batch 2``).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

# The layers whose fused kernel lost the most time to cuDNN on the H200 run (2026-12-04), the stem included.
DEFAULT_LAYERS = (
    "1x1s1-256to1024-14px-add_relu",
    "1x1s1-64to256-56px-add_relu",
    "1x1s1-128to512-28px-add_relu",
    "3x3s1-64to64-56px-relu",
    "1x1s1-1024to256-14px-relu",
    "1x1s1-256to64-56px-relu",
    "7x7s2-3to64-224px-relu",
)

# (column title, raw metric, scale): ncu's raw metric names for the summary's columns.
COLUMNS = (
    ("us", "gpu__time_duration.sum", 1e-3),  # ncu reports nanoseconds
    ("DRAM %", "dram__throughput.avg.pct_of_peak_sustained_elapsed", 1.0),
    ("SM %", "sm__throughput.avg.pct_of_peak_sustained_elapsed", 1.0),
    ("issue %", "sm__inst_issued.avg.pct_of_peak_sustained_active", 1.0),
    ("occup %", "sm__warps_active.avg.pct_of_peak_sustained_active", 1.0),
    ("regs", "launch__registers_per_thread", 1.0),
)
_STALL = ("smsp__average_warps_issue_stalled_", "_per_issue_active.ratio")
_BANK_CONFLICTS = ("l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum",
                   "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum")


def _layer_shapes(names: list[str]) -> list:
    """The :class:`~benchmarks.bench_utils.ConvShape` of each named layer (:meth:`~ConvShape.layer`)."""
    from benchmarks import bench_utils as bu

    shapes = {s.layer(): s for s in bu.resnet50_conv_shapes()}
    unknown = [name for name in names if name not in shapes]
    if unknown:
        raise SystemExit(f"unknown layers {unknown}; ResNet-50's are {sorted(shapes)}")
    return [shapes[name] for name in names]


def _launches(layers: list[str], batch: int) -> list[tuple[str, str, object, tuple]]:
    """``(layer, family, kernel, arguments)`` for every family that serves each layer."""
    import torch

    from benchmarks import bench_utils as bu
    from resnet_fast.kernels import conv

    device = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the stub driver serves CPU tensors
    launches = []
    for name, shape in zip(layers, _layer_shapes(layers)):
        args = bu.conv_bn_act_arguments(shape, device, batch)
        x, weight, stride, padding, dilation, groups, residual = *args[:2], *args[8:13]
        tma = conv.TABLE[conv.layer_class(weight, stride, padding)][1]
        for family in ("gather", tma):
            os.environ[conv.FORCE_VARIABLE] = family
            if conv.kernel_for(x, weight, stride, padding, dilation, groups, residual) == family:
                launches.append((name, family, conv.KERNELS[family], args))
    os.environ.pop(conv.FORCE_VARIABLE, None)
    return launches


def run(layers: list[str], batch: int, manifest: str) -> None:
    """The ncu target: every launch warmed up, then each once inside the profiled range; the manifest
    gets a ``layer family`` line per profiled launch, in order."""
    from benchmarks import stub_driver

    argv = ["run", "--batch", str(batch), "--manifest", manifest, "--layers", *layers]
    stub_driver.rerun_without_gpu(__spec__.name, argv)
    if stub_driver.active():
        stub_driver.launch_as_on_the_h200()
    import torch

    os.environ["RESNET_FAST_SPLIT_K"] = "1"  # one kernel per launch at any batch (256 never splits anyway)
    launches = _launches(layers, batch)
    for _, _, kernel, args in launches:  # compilation and autotuning, outside the profiled range
        kernel(*args)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.profiler.start()
    for name, family, kernel, args in launches:
        kernel(*args)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
    with open(manifest, "w") as f:
        f.writelines(f"{name} {family}\n" for name, family, _, _ in launches)
    print(f"profiled {len(launches)} launches of {len(layers)} layers at batch {batch}: see {manifest}")


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def read_raw_csv(path: str) -> list[dict[str, str]]:
    """ncu's ``--page raw --csv`` report: a header row of metric names, a row of units, a row per kernel."""
    with open(path, newline="") as f:
        rows = list(csv.reader(line for line in f if not line.startswith("==")))  # ncu's own messages
    header, body = rows[0], rows[1:]
    if body and not any(_number(value) is not None for value in body[0]):
        body = body[1:]  # the units row
    return [dict(zip(header, row)) for row in body]


def summary_rows(kernels: list[dict[str, str]], labels: list[str]) -> list[list[str]]:
    """One row per profiled kernel: label, kernel name, the :data:`COLUMNS`, the three longest stalls and
    the shared-memory bank conflicts (loads + stores)."""
    if len(labels) != len(kernels):
        labels = [f"kernel {i} (the manifest has {len(labels)} launches for {len(kernels)} kernels)"
                  for i in range(len(kernels))]
    rows = []
    for label, kernel in zip(labels, kernels):
        row = [label, (kernel.get("Kernel Name") or kernel.get("Function Name") or "?")[:40]]
        for _, metric, scale in COLUMNS:
            value = _number(kernel.get(metric, ""))
            row.append("-" if value is None else f"{value * scale:.1f}")
        stalls = sorted(((value, name[len(_STALL[0]):-len(_STALL[1])]) for name, text in kernel.items()
                         if name.startswith(_STALL[0]) and name.endswith(_STALL[1])
                         and (value := _number(text)) is not None), reverse=True)
        row.append(", ".join(f"{name} {value:.1f}" for value, name in stalls[:3]) or "-")
        conflicts = [_number(kernel.get(metric, "")) for metric in _BANK_CONFLICTS]
        row.append("-" if None in conflicts else f"{sum(conflicts):.0f}")
        rows.append(row)
    return rows


def summary(csv_path: str, manifest: str) -> None:
    kernels = read_raw_csv(csv_path)
    with open(manifest) as f:
        labels = [line.strip() for line in f if line.strip()]
    titles = ["layer family", "kernel", *(title for title, _, _ in COLUMNS), "longest stalls (cycles/issue)",
              "smem bank conflicts"]
    rows = [titles, *summary_rows(kernels, labels)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(titles))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    target = commands.add_parser("run", help="the ncu target: each (layer, family) launched once, profiled")
    target.add_argument("--layers", nargs="+", default=list(DEFAULT_LAYERS), help="layer ids (default: %(default)s)")
    target.add_argument("--batch", type=int, default=256)
    target.add_argument("--manifest", required=True, help="where to write the profiled launches, in order")
    report = commands.add_parser("summary", help="a row per kernel from ncu's raw CSV and the manifest")
    report.add_argument("csv")
    report.add_argument("manifest")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.layers, args.batch, args.manifest)
    else:
        summary(args.csv, args.manifest)


if __name__ == "__main__":
    main(sys.argv[1:])
