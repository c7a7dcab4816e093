"""benchmarks/kernel_sass.py on a CPU (the stub driver) or a GPU: the gather kernel compiles for sm_90 with
a pinned tile, its main loop is found in the SASS, and that loop stays as lean as it was made: the
3x3 layer's loop issued 378-382 instructions per K block (for 4 wgmma) before its pixels' addresses
and bounds were made loop-invariant, 212-216 after (triton 3.6 and 3.8). The ceiling leaves room for
compiler versions, not for that regression."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from benchmarks.test_triton_host_cost import ROOT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and shutil.which("gcc") is None,
                                reason="without a GPU, builds the stub libcuda with gcc")


def test_the_gather_main_loop_stays_lean(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RESNET_FAST_DIRECT_LAUNCH")}
    env["TMPDIR"] = str(tmp_path)
    done = subprocess.run([sys.executable, "-m", "benchmarks.kernel_sass", "--cases", "1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    row = re.search(r"^128x64x64, 4, 4 +3x3s1-64to64-56px b2 split 1 +(\d+) +(\d+) +(\d+) +(\d+)$", done.stdout,
                    re.MULTILINE)
    assert row, done.stdout
    registers, local, loop, wgmma = map(int, row.groups())
    assert wgmma == 4 and local == 0 and 0 < registers <= 255, done.stdout
    assert loop <= 260, done.stdout
