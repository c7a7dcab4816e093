"""Triton's CUDA driver on a machine without a GPU: ``benchmarks/stub_libcuda.c`` loaded as libcuda, so that
Triton compiles kernels for sm_90 and its launcher runs up to the driver call, on CPU tensors (every
driver call succeeds and nothing runs). What it is for: timing the host side of a launch
(``benchmarks/triton_host_cost.py``) and checking what a launch passes to the driver
(``tests/test_launch.py``), both without a GPU.

    python3 -m benchmarks.stub_driver -m MODULE [ARGS...]   # run a module with the stub active
    python3 -m benchmarks.stub_driver -c CODE [ARGS...]     # run code with the stub active

torch itself sees no GPU (its CUDA runtime cannot use the stub), so torch's device queries are answered
here as the H200's, whose committed tuning table (``resnet_fast/kernels/tuned/nvidia-h200.json``) then
serves the launches: the stub cannot time an autotuning. The tuning cache is an empty folder of its own.
:func:`launch_as_on_the_h200` then makes resnet_fast's launches on CPU tensors those it makes on the H200.
"""

from __future__ import annotations

import os
import pathlib
import runpy
import subprocess
import sys
import tempfile
import warnings

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCE = pathlib.Path(__file__).with_name("stub_libcuda.c")
DEVICE = "NVIDIA H200"
MULTIPROCESSORS = 132  # as stub_libcuda.c answers
_MARK = "RESNET_FAST_STUB_LIBCUDA"


def active() -> bool:
    """Whether this process runs on the stub (started by :func:`main`)."""
    return os.environ.get(_MARK) == "1"


def environment() -> dict:
    """The environment of a process on the stub: the stub built (in ``$TMPDIR``) and first on the loader's
    path, which the loader reads at process start; Triton's driver module links libcuda.so.1."""
    folder = pathlib.Path(tempfile.gettempdir()) / "resnet_fast_stub_libcuda"
    folder.mkdir(exist_ok=True)
    # Built under a name of its own, then renamed: other processes may be loading the last one.
    built = folder / f"libcuda.so.1.{os.getpid()}"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O1", "-o", str(built), str(SOURCE)], check=True)
    os.replace(built, folder / "libcuda.so.1")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compiled kernels, not interpreted
    env.update({
        _MARK: "1",
        "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("LD_LIBRARY_PATH")])),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "RESNET_FAST_TUNING_CACHE": str(folder / "tuning-cache"),
    })
    return env


def activate() -> None:
    """Makes Triton's CUDA driver over the stub the active one (device 0, stream 0, sm_90), and torch's
    device queries answer as the H200."""
    warnings.filterwarnings("ignore", message="CUDA initialization")  # torch's runtime cannot use the stub
    import torch
    from triton.backends.nvidia.driver import CudaDriver
    from triton.runtime import driver

    stub = CudaDriver()
    stub.get_current_device = lambda: 0
    stub.get_current_stream = lambda device=None: 0
    stub.get_device_capability = lambda device=0: (9, 0)
    driver.set_active(stub)
    torch.cuda.current_device = lambda: 0
    torch.cuda.get_device_name = lambda device=None: DEVICE
    torch.cuda.get_device_capability = lambda device=None: (9, 0)


def launch_as_on_the_h200() -> None:
    """resnet_fast's ``"triton"`` backend serves CPU tensors (when selected), and the kernels see the H200's
    multiprocessors (the gather kernel's split-K, the persistent GEMM's programs), as they do for that
    GPU's tensors. Not part of :func:`activate`: it imports resnet_fast, which reads its environment
    settings at import."""
    from resnet_fast import backends
    from resnet_fast.kernels import conv_common

    backends._REGISTRY["triton"].supports_device = lambda device: True
    conv_common.multiprocessors = lambda device: MULTIPROCESSORS


def rerun_without_gpu(module: str, argv: list[str]) -> None:
    """A script's entry: returns where the script should run here (a GPU, or already on the stub); without
    a GPU, runs ``python -m module argv`` again on the stub instead (and does not return)."""
    if active():
        return
    import torch

    if not torch.cuda.is_available():
        main(["-m", module, *argv])


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] not in ("-m", "-c"):
        raise SystemExit(__doc__)
    if not active():
        os.execvpe(sys.executable, [sys.executable, "-m", "benchmarks.stub_driver", *argv], environment())
    activate()
    kind, target, rest = argv[0], argv[1], argv[2:]
    if kind == "-m":
        sys.argv = [target, *rest]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.argv = ["-c", *rest]
        exec(compile(target, "<stub_driver -c>", "exec"), {"__name__": "__main__"})


if __name__ == "__main__":
    main(sys.argv[1:])
