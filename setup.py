"""Build script. Metadata lives in pyproject.toml; this file says what goes into the package.

* The Python packages ``resnet_fast*``, and ``py.typed``.
* The CUDA sources of csrc/ as package data, installed as ``resnet_fast/csrc``: with them an install
  made without nvcc (or whose ``_C`` was built for other GPUs) can still JIT-build the kernels on a
  GPU machine that has nvcc (see resnet_fast/backends/cuda_build.py).
* The optional CUDA extension ``resnet_fast._C`` (the kernels in csrc/, registered as
  ``torch.ops.resnet_fast.*``), built when torch is a CUDA build and nvcc is found. No GPU is needed
  to build it. Otherwise, or with ``RESNET_FAST_NO_CUDA_EXT=1``, the package installs as pure Python.

Defaults, each only when the variable is unset:
  CUDA_HOME=/usr/local/cuda (if that directory exists; otherwise torch looks for nvcc on PATH),
  TORCH_CUDA_ARCH_LIST=8.0;8.6;8.9;9.0+PTX when no GPU is visible (A100, A10/RTX 30xx, L4/L40/RTX 40xx,
    H100/H200, and PTX that the driver compiles for later GPUs; with a GPU, torch targets the visible one),
  MAX_JOBS=2.
Use ``pip install --no-build-isolation -e .`` so the build sees the installed torch.
"""
import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ["csrc/add_relu.cu", "csrc/batch_norm_act.cu", "csrc/ops.cpp"]
# Ampere (A100: 8.0; A10, RTX 30xx: 8.6), Ada (L4, L40, RTX 40xx: 8.9), Hopper (9.0), and PTX for the
# newest so that later GPUs JIT-compile it. Keep CMakeLists.txt's default the same.
DEFAULT_ARCH_LIST = "8.0;8.6;8.9;9.0+PTX"


def _log(msg: str) -> None:
    print(f"resnet_fast setup: {msg}", file=sys.stderr)


def _cuda_extension():
    """([ext_modules], {cmdclass}) for the CUDA extension, or ([], {}) with the reason logged."""
    if os.environ.get("RESNET_FAST_NO_CUDA_EXT", "0") not in ("", "0"):
        _log("RESNET_FAST_NO_CUDA_EXT is set: skipping the CUDA extension")
        return [], {}
    # torch.utils.cpp_extension reads CUDA_HOME when imported: set the default first.
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and os.path.isdir("/usr/local/cuda"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    try:
        import torch
        from torch.utils import cpp_extension
    except Exception as e:  # noqa: BLE001 - any import problem means "no extension"
        _log(f"torch is not importable ({type(e).__name__}: {e}): installing without the CUDA extension")
        return [], {}
    if torch.version.cuda is None:
        _log(f"torch {torch.__version__} is not a CUDA build: installing without the CUDA extension")
        return [], {}
    cuda_home = cpp_extension.CUDA_HOME
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    if not nvcc or not os.path.exists(nvcc):
        nvcc = shutil.which("nvcc")
        if nvcc is None or cuda_home is None:
            _log("nvcc not found (set CUDA_HOME): installing without the CUDA extension")
            return [], {}
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        try:
            visible = torch.cuda.is_available()
        except Exception:  # noqa: BLE001
            visible = False
        if not visible:
            # torch cannot infer the architecture without a GPU (it raises IndexError), and a wheel
            # built here must run on the GPUs of the people who install it.
            os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCH_LIST
    os.environ.setdefault("MAX_JOBS", "2")
    _log(
        f"building resnet_fast._C with {nvcc} (CUDA_HOME={cuda_home}, "
        f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST', '<visible GPU>')}, "
        f"MAX_JOBS={os.environ['MAX_JOBS']})"
    )
    ext = cpp_extension.CUDAExtension(
        name="resnet_fast._C",
        sources=SOURCES,  # relative paths: setuptools rejects absolute ones
        include_dirs=[os.path.join(HERE, "csrc")],
        define_macros=[("RESNET_FAST_PYTHON_MODULE", "1")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _cuda_extension()
setup(
    packages=find_packages(include=["resnet_fast", "resnet_fast.*"]) + ["resnet_fast.csrc"],
    # The sources stay at the top of the repository (CMakeLists.txt builds them too) and are
    # installed inside the package, where resnet_fast.backends.cuda_build looks first.
    package_dir={"resnet_fast.csrc": "csrc"},
    package_data={"resnet_fast": ["py.typed", "kernels/tuned/*.json"], "resnet_fast.csrc": ["*.cu", "*.cuh", "*.cpp", "*.h"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
