"""Benchmark-suite setup: GPU skip logic, the CUDA-event timer, markers, and run metadata.

* Every test marked ``gpu`` is skipped, with the reason shown by ``-ra``, when ``torch.cuda.is_available()``
  is False; on a GPU it gets :func:`bench_utils.cuda_event_clock` as pytest-benchmark's timer.
* Markers: ``gpu`` (needs CUDA), ``headline`` (the configurations quoted in BENCHMARKS.md; a few
  minutes), ``sweep`` (the rest of the matrix), ``cpu`` (the tiny case CI runs).
* The JSON written by ``--benchmark-json`` gets the versions (torch, torchvision, triton, cuDNN, CUDA,
  resnet_fast and its available backends, GPU name) in ``machine_info["resnet_fast_bench"]`` and the
  exact command line in ``"command"``; ``benchmarks/report.py`` turns it into BENCHMARKS.md tables.
"""
from __future__ import annotations

import os
import shlex
import sys
import time

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:  # the repository root (pytest puts it first already)
    sys.path.append(os.path.dirname(HERE))

from benchmarks import bench_utils  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
# cuDNN autotuning for the eager / compile baselines (and resnet_fast's own cuDNN fallbacks), as
# torchvision's reference training scripts do; RESNET_FAST_BENCH_CUDNN_BENCHMARK=0 turns it off.
CUDNN_BENCHMARK = os.environ.get("RESNET_FAST_BENCH_CUDNN_BENCHMARK", "1") != "0"
NO_GPU_REASON = (
    "needs a CUDA GPU: torch.cuda.is_available() is False on this machine "
    f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); GPU benchmarks are skipped"
)


def pytest_configure(config):
    for line in (
        "gpu: needs a CUDA GPU; skipped with a reason on machines without one",
        "headline: the configurations quoted in BENCHMARKS.md (select with -m headline)",
        "sweep: the full configuration matrix (deselect with -m 'not sweep')",
        "cpu: the tiny CPU case CI runs so the suite cannot rot",
    ):
        config.addinivalue_line("markers", line)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason=NO_GPU_REASON)
    here = os.path.dirname(os.path.abspath(__file__))
    for item in items:
        if not str(item.path).startswith(here):
            continue
        if item.get_closest_marker("gpu") is None:
            continue
        if not HAS_CUDA:
            item.add_marker(skip_gpu)
        elif item.get_closest_marker("benchmark") is None:
            item.add_marker(pytest.mark.benchmark(timer=bench_utils.cuda_event_clock))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A benchmark whose test failed after timing (a parity check, say) is dropped from the JSON:
    pytest-benchmark leaves out benchmarks flagged ``has_error``, so no wrong answer gets a figure."""
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        fixture = getattr(item, "funcargs", {}).get("benchmark")
        if fixture is not None:
            fixture.has_error = True


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["resnet_fast_bench"] = dict(bench_utils.versions(), cudnn_benchmark=CUDNN_BENCHMARK)


_SESSION_START = time.perf_counter()


def pytest_benchmark_update_json(config, benchmarks, output_json):
    args = shlex.join(str(a) for a in config.invocation_params.args)
    output_json["command"] = f"python -m pytest {args}"
    output_json["wall_s"] = round(time.perf_counter() - _SESSION_START, 1)  # whole session, setup included
    output_json["compile_mode_env"] = os.environ.get("RESNET_FAST_BENCH_COMPILE_MODE")


@pytest.fixture(autouse=True)
def _clean_state(request):
    """Each benchmark starts in resnet_fast's auto mode (GPU ones with cuDNN autotuning on, see
    CUDNN_BENCHMARK) and leaves no GPU memory, compiled graphs or changed settings behind."""
    try:
        import resnet_fast

        resnet_fast.set_backend("auto")
    except Exception:  # noqa: BLE001 - the tests report import problems themselves
        resnet_fast = None
    gpu = HAS_CUDA and request.node.get_closest_marker("gpu") is not None
    cudnn_benchmark = torch.backends.cudnn.benchmark
    if gpu:
        torch.backends.cudnn.benchmark = CUDNN_BENCHMARK
    yield
    torch.backends.cudnn.benchmark = cudnn_benchmark
    if resnet_fast is not None:
        resnet_fast.set_backend("auto")
    if gpu:
        import gc

        torch._dynamo.reset()  # drop compiled graphs (and their CUDA-graph pools), even after a failure
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


@pytest.fixture
def measure(request, benchmark):
    """``measure(step, device=..., work=bench_utils.Work(...))``: warm up, time, record throughput.
    Timed budget: ``--benchmark-max-time`` if given on the command line, else 0.3 s per benchmark."""

    config = request.config
    explicit = any(str(a).startswith("--benchmark-max-time") for a in config.invocation_params.args)
    max_time = float(config.getoption("benchmark_max_time")) if explicit else bench_utils.DEFAULT_MAX_TIME
    min_rounds = int(config.getoption("benchmark_min_rounds"))

    def run(step, *, device, work=None, **kwargs):
        return bench_utils.measure(benchmark, step, device=device, work=work, max_time=max_time,
                                   min_rounds=min_rounds, **kwargs)

    return run
