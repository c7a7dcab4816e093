"""CMakeLists.txt builds csrc/ into a library that torch.ops.load_library loads (no GPU needed)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_LOAD = r"""
import sys, torch
torch.ops.load_library(sys.argv[1])
from resnet_fast.backends import cuda_backend
assert all(hasattr(torch.ops.resnet_fast_cuda, op) for op in cuda_backend.OPS)
print("ok")
"""


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
@pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch")
@pytest.mark.skipif(not (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc").exists(),
                    reason="needs nvcc (CUDA_HOME or /usr/local/cuda)")
def test_cmake_builds_a_loadable_library(tmp_path):
    build = tmp_path / "build"
    configure = [
        "cmake", "-S", str(ROOT), "-B", str(build), f"-DPython3_EXECUTABLE={sys.executable}",
        *([f"-DCMAKE_CUDA_COMPILER={os.environ['CUDA_HOME']}/bin/nvcc"] if "CUDA_HOME" in os.environ else []),
    ]
    for cmd in (configure, ["cmake", "--build", str(build), "-j", "2"]):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    library = build / "libresnet_fast_ops.so"
    assert library.exists()
    # A fresh process: in this one resnet_fast._C may already have registered the same operators.
    done = subprocess.run([sys.executable, "-c", _LOAD, str(library)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
