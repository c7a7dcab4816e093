"""Turn a pytest-benchmark JSON into BENCHMARKS.md tables and a PNG plot.

    python -m pytest benchmarks --benchmark-only --benchmark-json=bench.json
    python benchmarks/report.py bench.json --markdown BENCHMARKS.md --plot benchmarks/results.png
    python benchmarks/report.py models.json kernels.json ...   # several runs of one session, as one report

``--markdown FILE`` replaces the text between ``<!-- report:begin -->`` and ``<!-- report:end -->`` in
FILE (the rest of the file is left alone); without it the tables go to stdout. ``--plot`` needs
matplotlib (``pip install matplotlib``); it is imported only then. Every figure printed comes from the
JSON: medians over rounds (``stats.median``), throughput from ``extra_info``.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

BEGIN = "<!-- report:begin -->"
END = "<!-- report:end -->"
MODEL_IMPLS = ["eager", "compile", "compile-frozen", "rf-torch", "rf-triton", "rf-cuda"]
GRAPH_IMPLS = [c + "+graph" for c in MODEL_IMPLS if c == "eager" or c.startswith("rf-")]  # batch-1 captures
CONV_IMPLS = ["rf-triton", "rf-triton-gather", "rf-triton-tma", "rf-cuda", "cudnn-conv", "cudnn-fused",
              "cudnn-conv+bn+act"]
ELEMENTWISE_IMPLS = ["rf-cuda", "rf-triton", "eager"]


def load(path: str | Path) -> dict:
    with open(path) as fh:
        data = json.load(fh)
    if "benchmarks" not in data or "machine_info" not in data:
        raise ValueError(f"{path} is not a pytest-benchmark JSON (no 'benchmarks' / 'machine_info')")
    return data


def merge(runs: list[dict]) -> dict:
    """Several runs (e.g. the model and the kernel benchmarks, run one after the other on one machine) as
    one: the first run's machine and commit, every run's benchmarks, commands and wall times."""
    data = {**runs[0], "benchmarks": [b for run in runs for b in run["benchmarks"]]}
    data["command"] = " ; ".join(run.get("command", "?") for run in runs)
    walls = [run.get("wall_s") for run in runs]
    data["wall_s"] = sum(walls) if None not in walls else None
    return data


def _median_s(b: dict) -> float:
    return b["stats"]["median"]


def _fmt_int(x: float | None) -> str:
    return "–" if x is None else f"{x:,.0f}"


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "–"
    if x == 0:
        return "0"
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- sections


def run_section(data: dict) -> str:
    mi = data.get("machine_info", {})
    env = mi.get("resnet_fast_bench", {})
    ci = data.get("commit_info", {}) or {}
    if env.get("gpu"):
        device = f"{env['gpu']} (compute capability {env.get('gpu_capability')}, {env.get('gpu_memory_gib')} GiB)"
    else:
        device = f"CPU only: {mi.get('cpu', {}).get('brand_raw', mi.get('processor', '?'))} (no CUDA device)"
    cudnn = env.get("cudnn")
    if isinstance(cudnn, int):
        cudnn = f"{cudnn // 10000}.{cudnn // 100 % 100}.{cudnn % 100}" if cudnn >= 10000 else str(cudnn)
    commit = ci.get("id")
    commit = f"{commit[:12]}{' (dirty tree)' if ci.get('dirty') else ''}" if commit else "unknown"
    benches = data["benchmarks"]
    kinds = defaultdict(int)
    for b in benches:
        kinds[b.get("extra_info", {}).get("kind", "other")] += 1
    rows = [
        ["device", device],
        ["date (UTC)", data.get("datetime", "?")],
        ["command", f"`{data.get('command', '?')}`"],
        ["wall time of the run", f"{data['wall_s']:.0f} s" if data.get("wall_s") is not None else "not recorded"],
        ["torch / CUDA / cuDNN", f"{env.get('torch')} / {env.get('cuda_runtime')} / {cudnn}"],
        ["torchvision / triton", f"{env.get('torchvision')} / {env.get('triton')}"],
        ["resnet_fast", f"{env.get('resnet_fast')} at commit {commit}; backends loaded: {env.get('resnet_fast_backends')}"],
        ["TF32", f"cuDNN conv {env.get('cudnn_allow_tf32')}, matmul {env.get('matmul_allow_tf32')} (PyTorch defaults unless changed)"],
        ["cudnn.benchmark (GPU benchmarks)", str(env.get("cudnn_benchmark"))],
        ["torch.compile mode", data.get("compile_mode_env") or "default (batch > 1), reduce-overhead (batch 1)"],
        ["recorded", ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + " benchmarks (skipped ones are not in the JSON)"],
        ["pytest-benchmark", str(data.get("version"))],
    ]
    return "### Run\n\n" + _table(["", ""], rows)


def _model_rows(benches: list[dict]):
    """{(arch, mode, batch, dtype): {impl[+graph]: bench}}"""
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for b in benches:
        e = b.get("extra_info", {})
        if e.get("kind") != "model" or "img_per_s" not in e:
            continue
        arch = e["arch"] + (" (CPU)" if e.get("device") == "cpu" else "")  # the smoke case, on a GPU run too
        key = (arch, e["mode"], e["batch"], e["dtype"])
        groups[key][e["impl"] + ("+graph" if e.get("graph") else "")] = b
    order = {"resnet18": 0, "resnet50": 1, "resnet101": 2, "cifar_resnet18": 3}
    return dict(sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 9), kv[0][0], kv[0][1], kv[0][2],
                                                           kv[0][3])))


def _best_rf(impls: dict[str, dict], graph: bool) -> tuple[str | None, float | None]:
    best, best_v = None, None
    for name, b in impls.items():
        if not name.startswith("rf-") or name.endswith("+graph") != graph:
            continue
        v = b["extra_info"]["img_per_s"]
        if best_v is None or v > best_v:
            best, best_v = name, v
    return best, best_v


def models_section(data: dict) -> str:
    groups = _model_rows(data["benchmarks"])
    if not groups:
        return "### Whole models\n\nNo model benchmark in this JSON."
    present = {name for impls in groups.values() for name in impls}
    cols = [c for c in MODEL_IMPLS if c in present]
    gcols = [c for c in GRAPH_IMPLS if c in present]
    header = ["model", "mode", "batch", "dtype", *cols, *gcols, "best rf / eager", "best rf / best compile"]
    rows = []
    for (arch, mode, batch, dtype), impls in groups.items():
        cells = [arch, mode, str(batch), dtype]
        cells += [_fmt_int(impls[c]["extra_info"]["img_per_s"]) if c in impls else "–" for c in cols + gcols]
        _, best = _best_rf(impls, graph=False)
        eager = impls.get("eager", {}).get("extra_info", {}).get("img_per_s")
        # against the faster of compile and compile with freezing: Inductor's best
        comp = max((b["extra_info"]["img_per_s"] for name, b in impls.items() if name.startswith("compile")),
                   default=None)
        cells.append(f"{best / eager:.2f}x" if best and eager else "–")
        cells.append(f"{best / comp:.2f}x" if best and comp else "–")
        rows.append(cells)
    out = ["### Whole models: images/s (median; higher is better)", "",
           "eval = forward of the model cast to the dtype; train = forward + backward + SGD step with float32 "
           "master weights under autocast (fp32: no autocast); channels_last throughout. `+graph`: batch-1 "
           "forward replayed from a CUDA graph.", "", _table(header, rows), ""]
    # details: time, parity, dispatch, compile time
    drows = []
    for (arch, mode, batch, dtype), impls in groups.items():
        for name, b in impls.items():
            e = b["extra_info"]
            parity = e.get("parity", {})
            worst = max((p["err"] / p["tol"] for p in parity.values() if p["tol"]), default=None)
            disp = e.get("dispatch")
            if disp:
                calls = "; ".join(f"{op}: " + ", ".join(f"{k} {v}" for k, v in per.items())
                                  for op, per in disp.get("calls", {}).items())
                if disp.get("fallbacks"):
                    calls += f" ({len(disp['fallbacks'])} fallback warning(s))"
            else:
                calls = ""
            extra = []
            if e.get("compile_s") is not None:
                extra.append(f"compile {e['compile_s']:.1f} s ({e.get('compile_mode')})")
            if "capture_s" in e:
                extra.append(f"capture {e['capture_s']:.2f} s")
            drows.append([f"{arch} {mode} b{batch} {dtype}", name, _fmt(_median_s(b) * 1e3, 4),
                          _fmt(e.get("tflops")), _fmt(worst, 2), calls or "–", "; ".join(extra) or "–"])
    out += ["<details><summary>Per-benchmark details: median ms, achieved TFLOP/s, parity (worst error / "
            "tolerance, must be ≤ 1), which backend each op call ran on</summary>", "",
            _table(["configuration", "impl", "ms", "TFLOP/s", "parity", "dispatch (op: backend calls)", "notes"],
                   drows), "", "</details>"]
    return "\n".join(out)


def _impl_cells(impls: dict, present: list, rate_key: str, rate_fmt) -> list[str]:
    """One "ms (rate)" cell per implementation column; "–" where it did not run."""
    cells = []
    for c in present:
        e = impls[c]["extra_info"] if c in impls else None
        cells.append(f"{e['median_ms']:.3f} ({rate_fmt(e.get(rate_key))})" if e else "–")
    return cells


def _kernel_groups(benches, op):
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for b in benches:
        e = b.get("extra_info", {})
        if e.get("kind") != "kernel" or e.get("op") != op or "median_ms" not in e:
            continue
        groups[(e["shape"], e.get("direction", "fwd"))][e["impl"]] = b
    return groups


def kernels_section(data: dict) -> str:
    benches = data["benchmarks"]
    out = []
    conv = _kernel_groups(benches, "conv")
    if conv:
        present = [c for c in CONV_IMPLS if any(c in v for v in conv.values())]
        header = ["ResNet-50 conv (batch 256, bf16)", *[f"{c} ms (TFLOP/s)" for c in present],
                  "rf / cuDNN+epilogue", "rf / cuDNN fused", "rf / cuDNN conv alone"]
        rows = []
        for (shape, _), impls in conv.items():
            cells = [shape, *_impl_cells(impls, present, "tflops", _fmt)]
            rf = [b["extra_info"]["median_ms"] for c, b in impls.items() if c.startswith("rf-")]
            best = min(rf) if rf else None
            for baseline in ("cudnn-conv+bn+act", "cudnn-fused", "cudnn-conv"):
                ms = impls.get(baseline, {}).get("extra_info", {}).get("median_ms")
                cells.append(f"{ms / best:.2f}x" if best and ms else "–")
            rows.append(cells)
        out += ["### Kernels: ResNet-50 convolutions", "",
                "Shape ids: `KxKsS-CINtoCOUT-Hpx-epilogue-xN` (N = occurrences in ResNet-50). `rf-triton`: the "
                "Triton backend's default kernel per layer class; `rf-triton-gather` / `rf-triton-tma`: that "
                "kernel family forced. `cudnn-fused`: cuDNN's own conv + bias (+ residual) + ReLU over "
                "BN-folded weights. Speedup columns: time of the cuDNN variant over the best resnet_fast "
                "kernel (> 1 means resnet_fast is faster).",
                "", _table(header, rows), ""]
    for op, title in (("add_relu", "add_relu"), ("batch_norm_act", "batch_norm_act (training)")):
        groups = _kernel_groups(benches, op)
        if not groups:
            continue
        present = [c for c in ELEMENTWISE_IMPLS if any(c in v for v in groups.values())]
        header = ["shape (batch 256, bf16)", "direction", *[f"{c} ms (GB/s)" for c in present], "best rf / eager"]
        rows = []
        for (shape, direction), impls in groups.items():
            cells = [shape, direction, *_impl_cells(impls, present, "gb_per_s", _fmt_int)]
            rf = [impls[c]["extra_info"]["median_ms"] for c in ("rf-cuda", "rf-triton") if c in impls]
            eager = impls.get("eager", {}).get("extra_info", {}).get("median_ms")
            cells.append(f"{eager / min(rf):.2f}x" if rf and eager else "–")
            rows.append(cells)
        out += [f"### Kernels: {title}", "",
                "GB/s = ideal bytes (each tensor the op must read or write, once) / median time.", "",
                _table(header, rows), ""]
    if not out:
        return "### Kernels\n\nNo kernel benchmark in this JSON."
    return "\n".join(out).rstrip()


def render(data: dict, plot_name: str | None = None) -> str:
    parts = [run_section(data), models_section(data), kernels_section(data)]
    if plot_name:
        parts.insert(2, f"![images/s per configuration]({plot_name})")
    return "\n\n".join(parts) + "\n"


# ------------------------------------------------------------------------------------------- plot


def plot(data: dict, path: str | Path) -> Path:
    """Dot plot, log scale: images/s per model configuration (one row each) for eager, compile and each
    resnet_fast backend (markers, so no bar length depends on where the log axis happens to start)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError(
            "the plot needs matplotlib, which is not installed: `pip install matplotlib` "
            "(or `pip install -e .[plot]`); the tables do not need it"
        ) from e
    groups = _model_rows(data["benchmarks"])
    if not groups:
        raise RuntimeError("no model benchmark with a throughput in this JSON: nothing to plot")
    series = [s for s in [*MODEL_IMPLS, *GRAPH_IMPLS]
              if any(s in impls for impls in groups.values())]
    markers = "osD^v<>Px*hH"
    labels = [f"{a} {m} b{b} {d}" for (a, m, b, d) in groups]
    n = len(labels)
    fig, ax = plt.subplots(figsize=(10, 1.5 + 0.28 * n))
    for i, s in enumerate(series):
        pts = [(impls[s]["extra_info"]["img_per_s"], j) for j, impls in enumerate(groups.values()) if s in impls]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)], s=36,
                       label=s, alpha=0.85, zorder=3)
    ax.set_yticks(range(n))
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xscale("log")
    ax.grid(True, axis="x", which="both", alpha=0.3)
    ax.grid(True, axis="y", alpha=0.15)
    ax.set_xlabel("images / s (median over rounds, log scale; higher is better)")
    env = data.get("machine_info", {}).get("resnet_fast_bench", {})
    where = env.get("gpu") or "CPU only (smoke run, not a GPU result)"
    ax.set_title(f"resnet_fast vs torchvision: {where}, torch {env.get('torch')}, {data.get('datetime', '')[:10]}",
                 fontsize=9)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------- cli


def update_markdown(md_path: str | Path, body: str) -> None:
    md_path = Path(md_path)
    text = md_path.read_text()
    if BEGIN not in text or END not in text or text.index(BEGIN) > text.index(END):
        raise ValueError(f"{md_path} has no '{BEGIN}' ... '{END}' section to fill")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    md_path.write_text(f"{head}{BEGIN}\n{body}{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+", help="files written by pytest --benchmark-json=FILE (several: one report)")
    p.add_argument("--markdown", help="fill the report section of this file (e.g. BENCHMARKS.md)")
    p.add_argument("--plot", help="write the images/s plot to this PNG (needs matplotlib)")
    args = p.parse_args(argv)
    data = merge([load(path) for path in args.json])
    plot_name = None
    if args.plot and args.markdown:
        try:
            plot_name = str(Path(args.plot).resolve().relative_to(Path(args.markdown).resolve().parent))
        except ValueError:
            plot_name = str(args.plot)
    body = render(data, plot_name)
    if args.markdown:
        update_markdown(args.markdown, body)
        print(f"wrote the report section of {args.markdown}")
    else:
        sys.stdout.write(body)
    if args.plot:
        try:
            print(f"wrote {plot(data, args.plot)}")
        except RuntimeError as e:
            print(f"report.py: no plot: {e}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
