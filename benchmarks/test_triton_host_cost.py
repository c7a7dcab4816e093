"""benchmarks/triton_host_cost.py on a CPU: the stub libcuda builds and loads, Triton compiles the kernels for
sm_90 and launches them through it, the committed H200 table serves the batch-1 shapes (the stub cannot
time an autotuning), split-K is the H200's, and a whole resnet50's features run on the Triton backend."""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("gcc") is None, reason="builds the stub libcuda with gcc")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the script times the real driver")
def test_host_cost_times_launches_through_the_stub_driver(tmp_path):
    # The tests' own settings (the interpreter, a fixed config, a forced split) are not the script's.
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "RESNET_FAST_AUTOTUNE", "RESNET_FAST_SPLIT_K", "RESNET_FAST_CONV_KERNEL")}
    env["TMPDIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-m", "benchmarks.triton_host_cost", "--shapes", "3", "--calls", "6",
                           "--forwards", "3"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rows = dict(re.findall(r"^(\S+-x\d+)\s+(\d+\s+[\d.]+)$", done.stdout, re.MULTILINE))
    assert list(rows) == ["7x7s2-3to64-224px-relu-x1", "1x1s1-64to64-56px-relu-x1", "3x3s1-64to64-56px-relu-x3"], \
        done.stdout
    splits = {shape: int(row.split()[0]) for shape, row in rows.items()}
    assert splits["3x3s1-64to64-56px-relu-x3"] == 2 and splits["1x1s1-64to64-56px-relu-x1"] == 1, splits
    assert all(float(row.split()[1]) > 0 for row in rows.values()), rows
    assert "sum over the 5 convolutions of a batch-1 forward: triton" in done.stdout, done.stdout
    assert (tmp_path / "resnet_fast_stub_libcuda" / "libcuda.so.1").exists()
    # Every op of the features on the Triton backend (strict: a fallback would have raised), timed.
    assert "ops of forward_features by backend: conv_bn_act: triton 52, stem: triton 1" in done.stdout, done.stdout
    features = re.search(r'resnet_fast forward_features \("triton"\)\s+([\d.]+)$', done.stdout, re.MULTILINE)
    assert features and float(features.group(1)) > 0, done.stdout
