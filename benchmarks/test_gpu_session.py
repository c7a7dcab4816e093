"""benchmarks/gpu_session.sh on CPU: its phases run, write their logs and summary, and one cut at its limit
ends in time while the next phase still runs. (The first GPU run lost a call to a phase runner that could
not run the script's own functions: this is the check that would have caught it.)"""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import tarfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _session(tmp_path: pathlib.Path, *phases: str, **env: str) -> str:
    out = tmp_path / "out"
    environment = {**os.environ, "OUT": str(out), "WORK": str(tmp_path / "work"), "TEST_WORKERS": "1",
                   "BUDGET_S": "240", **env}
    done = subprocess.run(["bash", str(SCRIPT), *phases], cwd=ROOT, env=environment, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return (out / "summary.txt").read_text()


def test_the_phases_run_the_scripts_functions_and_write_their_logs(tmp_path):
    summary = _session(tmp_path, "tests", "table", TESTS="tests/test_cuda_graph.py", TESTS_K="argument_checks")
    assert "phase tests: rc=0" in summary and "phase table: rc=0" in summary, summary
    assert "\ntable " in summary  # the first-call table's row
    with tarfile.open(tmp_path / "out" / "logs.tar.gz") as logs:
        names = logs.getnames()
    assert {"logs/tests.log", "logs/tests.xml", "logs/table.log", "logs/first-call-table.json"} <= set(names), names


def test_a_phase_over_its_limit_is_cut_and_the_next_one_runs(tmp_path):
    summary = _session(tmp_path, "tests", "table", TESTS="tests/test_cuda_graph.py", LIMIT_TESTS="1")
    assert "phase tests: rc=124" in summary and "cut at its limit" in summary, summary
    assert "phase table: rc=0" in summary, summary


def test_the_host_phase_reports_its_table(tmp_path):
    summary = _session(tmp_path, "host", HOST_ARGS="--shapes 2 --calls 6 --forwards 3")
    assert "phase host: rc=0" in summary, summary
    table = summary.split("--- host time per batch-1 convolution")[1]
    assert "\n7x7s2-3to64-224px-relu-x1 " in table and "sum over the 2 convolutions" in table, summary
    assert '\n  resnet_fast forward_features ("triton") ' in table and "\nops of forward_features" in table, summary


def test_the_profile_phase_reports_where_the_time_goes(tmp_path):
    summary = _session(tmp_path, "profile", GRAPH_PROFILE_ARGS="--device cpu --arch tiny_resnet10 --calls 3 --dtype fp32",
                       PATH=f"{os.path.dirname(shutil.which('python3'))}:/usr/bin:/bin")  # no ncu on the path
    assert "phase profile: rc=0" in summary, summary
    report = summary.split("--- where the time goes")[1]
    assert "\nresnet_fast tiny_resnet10 b1 fp32 (eager, CPU ops): " in report, summary
    assert "\ntorchvision tiny_resnet10 b1 fp32 (eager, CPU ops): " in report, summary
    assert "\nncu: not found, so no hardware counters" in report, summary
