"""Tests of benchmarks/report.py (CPU; run by ``pytest benchmarks --benchmark-disable``).

One test produces a real pytest-benchmark JSON by running the tiny CPU benchmark in a subprocess, in a
temporary directory; the other builds a JSON in memory to reach every table (kernels, compile, CUDA
graphs). Neither writes anywhere but ``tmp_path``: no figure from here can reach BENCHMARKS.md.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

pytestmark = pytest.mark.cpu


def _report():
    spec = importlib.util.spec_from_file_location("resnet_fast_bench_report", HERE / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def real_json(tmp_path_factory) -> Path:
    """A JSON from an actual (short) run of the CPU smoke benchmarks."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    cmd = [sys.executable, "-m", "pytest", str(HERE / "test_models.py"), "-k", "cpu_tiny", "--benchmark-only",
           f"--benchmark-json={out}", "--benchmark-max-time=0.05", "--benchmark-min-rounds=3", "-q",
           "-p", "no:cacheprovider"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_report_from_real_cpu_run(real_json: Path, tmp_path: Path):
    report = _report()
    data = report.load(real_json)
    assert data["command"].startswith("python -m pytest")
    assert data["wall_s"] > 0
    assert {b["extra_info"]["impl"] for b in data["benchmarks"]} == {"eager", "rf-torch"}
    md = tmp_path / "BENCHMARKS.md"
    shutil.copy(ROOT / "BENCHMARKS.md", md)
    before = md.read_text()
    assert report.main([str(real_json), "--markdown", str(md)]) == 0
    text = md.read_text()
    assert "CPU only" in text and "tiny_resnet10 (CPU)" in text and "rf-torch" in text
    # only the marked section changed
    head = before.split(report.BEGIN)[0]
    tail = before.split(report.END)[1]
    assert text.startswith(head) and text.endswith(tail)
    # medians in the table are the JSON's
    b = next(b for b in data["benchmarks"] if b["extra_info"]["impl"] == "eager" and b["extra_info"]["mode"] == "eval")
    assert f"{b['extra_info']['img_per_s']:,.0f}" in text
    assert abs(b["extra_info"]["median_ms"] / 1e3 - b["stats"]["median"]) < 1e-12


def test_plot_from_real_cpu_run(real_json: Path, tmp_path: Path):
    pytest.importorskip("matplotlib", reason="matplotlib not installed: the plot is optional")
    report = _report()
    png = tmp_path / "plot.png"
    assert report.main([str(real_json), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_says_so(real_json: Path, tmp_path: Path, monkeypatch, capsys):
    report = _report()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    assert report.main([str(real_json), "--plot", str(tmp_path / "p.png")]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err


def _bench(extra: dict, median_s: float) -> dict:
    return {"name": "t", "fullname": "t", "group": None, "params": None, "param": None, "options": {},
            "extra_info": extra, "stats": {"median": median_s, "min": median_s, "max": median_s}}


def test_report_tables_from_constructed_json(tmp_path: Path):
    """Structure only: values invented inside this test, never written outside tmp_path."""
    report = _report()
    model = dict(kind="model", arch="resnet50", mode="eval", batch=256, dtype="bf16", graph=False)
    benches = [
        _bench({**model, "impl": "eager", "img_per_s": 100.0, "parity": {"logits": {"err": 1, "tol": 2}}}, 2.56),
        _bench({**model, "impl": "compile", "img_per_s": 160.0, "compile_s": 30.0, "compile_mode": "default"}, 1.6),
        _bench({**model, "impl": "compile-frozen", "img_per_s": 200.0, "compile_s": 40.0,
                "compile_mode": "default + freezing"}, 1.28),
        _bench({**model, "impl": "rf-triton", "img_per_s": 400.0,
                "dispatch": {"calls": {"conv_bn_act": {"triton": 53}}, "fallbacks": []}}, 0.64),
        _bench({**model, "batch": 1, "impl": "rf-triton", "graph": True, "img_per_s": 50.0, "capture_s": 0.1}, 0.02),
        _bench(dict(kind="kernel", op="conv", shape="3x3s1-64to64-56px-relu-x3", impl="rf-triton",
                    median_ms=1.0, tflops=10.0), 1e-3),
        _bench(dict(kind="kernel", op="conv", shape="3x3s1-64to64-56px-relu-x3", impl="cudnn-conv+bn+act",
                    median_ms=2.0, tflops=5.0), 2e-3),
        _bench(dict(kind="kernel", op="conv", shape="3x3s1-64to64-56px-relu-x3", impl="rf-triton-tma",
                    median_ms=0.5, tflops=20.0), 0.5e-3),
        _bench(dict(kind="kernel", op="conv", shape="3x3s1-64to64-56px-relu-x3", impl="cudnn-fused",
                    median_ms=0.8, tflops=12.5), 0.8e-3),
        _bench(dict(kind="kernel", op="add_relu", shape="256ch56px", direction="fwd", impl="eager",
                    median_ms=3.0, gb_per_s=100.0), 3e-3),
        _bench(dict(kind="kernel", op="add_relu", shape="256ch56px", direction="fwd", impl="rf-cuda",
                    median_ms=1.5, gb_per_s=200.0), 1.5e-3),
    ]
    data = {"machine_info": {"resnet_fast_bench": {"gpu": "Test GPU", "torch": "x"}}, "commit_info": {},
            "benchmarks": benches, "datetime": "2000-01-01T00:00:00", "version": "5", "command": "python -m pytest x"}
    path = tmp_path / "b.json"
    path.write_text(json.dumps(data))
    text = report.render(report.load(path))
    assert "| resnet50 | eval | 256 | bf16 | 100 | 160 | 200 | 400 |" in text
    assert "4.00x | 2.00x |" in text  # best rf over eager, over the best compile (with freezing here)
    assert "rf-triton+graph" in text and "compile 30.0 s (default)" in text
    assert "compile 40.0 s (default + freezing)" in text
    assert "conv_bn_act: triton 53" in text
    # impl columns in CONV_IMPLS order; speedups of the cuDNN variants over the best rf kernel (TMA here)
    assert "rf-triton-tma ms (TFLOP/s) | cudnn-fused ms (TFLOP/s) |" in text
    row = "| 3x3s1-64to64-56px-relu-x3 | 1.000 (10) | 0.500 (20) | 0.800 (12.5) | 2.000 (5) | 4.00x | 1.60x | – |"
    assert row in text
    assert "| 256ch56px | fwd | 1.500 (200) | 3.000 (100) | 2.00x |" in text


def test_report_rejects_other_json(tmp_path: Path):
    report = _report()
    p = tmp_path / "x.json"
    p.write_text("{}")
    with pytest.raises(ValueError, match="not a pytest-benchmark JSON"):
        report.load(p)


def test_report_of_several_runs_is_one_report(tmp_path: Path):
    """The GPU session's model and kernel runs (two JSONs) fill one report section: both tables, both
    commands, the summed wall time. Values invented inside this test."""
    report = _report()
    model = dict(kind="model", arch="resnet50", mode="eval", batch=256, dtype="bf16", graph=False, impl="eager",
                 img_per_s=100.0)
    kernel = dict(kind="kernel", op="add_relu", shape="256ch56px", direction="fwd", impl="eager", median_ms=3.0,
                  gb_per_s=100.0)
    paths = []
    for name, bench, wall in (("models", model, 60.0), ("kernels", kernel, 30.0)):
        data = {"machine_info": {"resnet_fast_bench": {"gpu": "Test GPU"}}, "commit_info": {}, "version": "5",
                "benchmarks": [_bench(bench, 1e-3)], "datetime": "2000-01-01T00:00:00", "wall_s": wall,
                "command": f"pytest {name}"}
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(data))
    md = tmp_path / "B.md"
    md.write_text("head\n<!-- report:begin -->\nold\n<!-- report:end -->\ntail\n")
    assert report.main([str(p) for p in paths] + ["--markdown", str(md)]) == 0
    text = md.read_text()
    assert "`pytest models ; pytest kernels`" in text and "| wall time of the run | 90 s |" in text
    assert "| resnet50 | eval | 256 | bf16 | 100 |" in text and "| 256ch56px | fwd |" in text
    assert text.startswith("head\n") and text.endswith("tail\n") and "old" not in text
