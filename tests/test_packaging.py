"""Packaging, and which GPUs the CUDA library runs on (resnet_fast/backends/cuda_build.py).

Fast tests: the arch check's decision for Ampere ... Blackwell GPUs given an arch list, its messages,
the check running before ``_C`` is imported, the JIT build's refusals, the source lookup, and setup.py,
CMakeLists.txt and cuda_build agreeing on the sources and the default arch list.

Slow tests (``-m slow``; CI runs them): one ``python -m build`` makes the sdist and, from it, the wheel
with the default arch list, as a build machine without a GPU makes it (about 40 s on 2 cores). That
one wheel serves the contents checks, ``cuobjdump --list-elf`` on its ``_C``, and a venv it is
installed into, where ``python -m resnet_fast`` runs from outside the source tree and the JIT fallback
builds the sources the wheel carries.
"""
from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from packaging.specifiers import SpecifierSet

from resnet_fast.backends import BackendUnavailable, cuda_build
from resnet_fast.backends.cuda_build import DeviceCode

from test_cuda_ext import _extension_expected

ROOT = Path(__file__).resolve().parents[1]
# What a wheel built without a GPU must carry: machine code for Ampere, Ada and Hopper, and PTX for
# the newest, which the driver compiles for later GPUs.
FULL_LIST_CODE = DeviceCode(sass=frozenset({80, 86, 89, 90}), ptx=frozenset({90}))
GPUS = {"A100": (8, 0), "A10": (8, 6), "L4": (8, 9), "H100": (9, 0), "B200": (10, 0), "RTX 5090": (12, 0)}

needs_cuda_torch = pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch")


def _require(available: bool, reason: str) -> None:
    """Skips a test whose tool is missing here, but fails in CI, which installs every tool it needs."""
    if not available:
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: CI must run this test")
        pytest.skip(reason)


def _run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _toolkit_program(name: str) -> str | None:
    """A CUDA toolkit program, where torch's extension builder finds the toolkit."""
    from torch.utils.cpp_extension import CUDA_HOME

    path = Path(CUDA_HOME or "/nonexistent") / "bin" / name
    return str(path) if path.exists() else shutil.which(name)


def _cuobjdump() -> str | None:
    """cuobjdump from the toolkit (a full one has it), or from the nvidia-cuda-cuobjdump wheel (the
    test extra; /usr/local/cuda here is a minimal toolkit without it)."""
    spec = importlib.util.find_spec("nvidia")
    wheels = [p for root in (spec.submodule_search_locations if spec else []) for p in Path(root).glob("*/bin/cuobjdump")]
    return _toolkit_program("cuobjdump") or (str(sorted(wheels)[0]) if wheels else None)


def _cuobjdump_code(library: Path) -> DeviceCode:
    """The GPU code in ``library`` as cuobjdump lists it (``add_relu.sm_80.cubin``, ``k.sm_90a.cubin``,
    ``add_relu.sm_90.ptx``)."""
    cuobjdump = _cuobjdump()
    _require(cuobjdump is not None, "needs cuobjdump (pip install nvidia-cuda-cuobjdump)")
    names = _run([cuobjdump, "--list-elf", "--list-ptx", library]).stdout
    found = re.findall(r"sm_(\d+)(a?)\.(cubin|ptx)", names)
    return DeviceCode(
        sass=frozenset(int(n) for n, a, kind in found if kind == "cubin" and not a),
        ptx=frozenset(int(n) for n, a, kind in found if kind == "ptx" and not a),
        exact=frozenset(int(n) for n, a, kind in found if a),
    )


def _code_for_arch_list(arch_list: str, monkeypatch) -> DeviceCode:
    """What torch's extension builder compiles for ``TORCH_CUDA_ARCH_LIST=arch_list``."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    return DeviceCode.from_gencode_flags(cpp_extension._get_cuda_arch_flags())


def _setup_py_constant(name: str):
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py defines no {name}")


def _csrc_files() -> list[str]:
    """The files of csrc/ that the JIT build needs (csrc/emulation is for the CPU tests only)."""
    return sorted(p.name for p in (ROOT / "csrc").iterdir() if p.suffix in (".cu", ".cuh", ".cpp", ".h"))


def _package_modules() -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / "resnet_fast").rglob("*.py") if "__pycache__" not in p.parts}


# ================================================================================================
# The arch check.
@pytest.mark.parametrize(
    "arch_list, runs_on",
    [
        ("8.0;8.6;8.9;9.0+PTX", set(GPUS)),  # the default: machine code to Hopper, PTX beyond
        ("9.0", {"H100"}),  # the old default
        ("8.0", {"A100", "A10", "L4"}),  # an sm_80 cubin runs on every 8.x GPU
        ("8.9", {"L4"}),
        ("8.0+PTX", set(GPUS)),  # PTX runs on its architecture and every later one
        ("9.0a", {"H100"}),  # architecture-specific code runs on exactly that architecture
        ("10.0", {"B200"}),
    ],
)
@needs_cuda_torch
def test_which_gpus_an_arch_list_runs_on(arch_list, runs_on, monkeypatch):
    code = _code_for_arch_list(arch_list, monkeypatch)
    assert {gpu for gpu, capability in GPUS.items() if code.runs_on(capability)} == runs_on
    assert code.missing(GPUS.values()) == sorted(c for gpu, c in GPUS.items() if gpu not in runs_on)


def test_check_says_what_was_built_and_how_to_rebuild():
    code = DeviceCode(sass=frozenset({90}))
    code.check([], "resnet_fast._C")  # no GPU: nothing to check
    code.check([(9, 0)], "resnet_fast._C")
    with pytest.raises(BackendUnavailable) as e:
        code.check([(8, 6), (9, 0), (8, 6)], "resnet_fast._C")
    assert str(e.value) == 'resnet_fast._C was built for sm_90 only, not for sm_86: rebuild it with TORCH_CUDA_ARCH_LIST="8.6"'
    assert FULL_LIST_CODE.describe() == "sm_80, sm_86, sm_89, sm_90 and PTX for compute_90"
    assert DeviceCode(exact=frozenset({90})).describe() == "sm_90a"


def test_device_code_reads_a_library_like_cuobjdump(tmp_path):
    """A library with a cubin, architecture-specific code and PTX, read by cuda_build and cuobjdump."""
    nvcc = _toolkit_program("nvcc")
    _require(nvcc is not None, "needs nvcc")
    (tmp_path / "k.cu").write_text("__global__ void k(float* x) { x[threadIdx.x] += 1.f; }\n")
    library = tmp_path / "k.so"
    _run([nvcc, "-shared", "-Xcompiler", "-fPIC", "-gencode", "arch=compute_80,code=sm_80",
          "-gencode", "arch=compute_90a,code=sm_90a", "-gencode", "arch=compute_89,code=compute_89",
          tmp_path / "k.cu", "-o", library], timeout=300)
    expected = DeviceCode(sass=frozenset({80}), ptx=frozenset({89}), exact=frozenset({90}))
    assert cuda_build.device_code(library) == expected
    assert _cuobjdump_code(library) == expected


def test_device_code_of_other_files(tmp_path):
    c10 = Path(torch.__file__).parent / "lib" / "libc10.so"  # a library without GPU code
    assert cuda_build.device_code(c10) == DeviceCode()
    not_elf = tmp_path / "notes.txt"
    not_elf.write_text("not a library")
    with pytest.raises(ValueError, match="cannot read the GPU code in .*notes.txt: not a 64-bit"):
        cuda_build.device_code(not_elf)


_LOAD_ON_A_TURING_GPU = """
import sys
from resnet_fast.backends import BackendUnavailable, cuda_backend, cuda_build
cuda_build.visible_capabilities = lambda: [(7, 5)]  # a GPU that the default arch list leaves out
try:
    cuda_backend.load_library()
except BackendUnavailable as e:
    print(e)
print("imported:", "resnet_fast._C" in sys.modules)
"""


@needs_cuda_torch
def test_prebuilt_library_is_checked_before_it_is_imported():
    """_C without code for the GPU is never imported (a JIT build could not register its ops after
    it): the backend is unavailable with a reason that says how to rebuild."""
    _require(_extension_expected(), "resnet_fast._C is not built here")
    env = {**os.environ, "RESNET_FAST_NO_JIT": "1"}
    out = _run([sys.executable, "-c", _LOAD_ON_A_TURING_GPU], cwd=ROOT, env=env, timeout=300).stdout
    assert re.search(r'resnet_fast\._C was built for sm_\d.* only, not for sm_75: rebuild it with '
                     r'TORCH_CUDA_ARCH_LIST="7\.5" and RESNET_FAST_NO_JIT is set', out), out
    assert "imported: False" in out


def test_prebuilt_library_passes_on_the_gpus_it_was_built_for():
    _require(_extension_expected(), "resnet_fast._C is not built here")
    library = importlib.util.find_spec("resnet_fast._C").origin
    built_for = cuda_build.device_code(library)
    assert built_for.sass or built_for.ptx
    capabilities = [(a // 10, a % 10) for a in built_for.sass | built_for.ptx]
    cuda_build.check_prebuilt(capabilities)


# ================================================================================================
# Sources and the JIT build's refusals.
def _fill(directory: Path) -> Path:
    directory.mkdir()
    for name in cuda_build.SOURCES:
        (directory / name).write_text("")
    return directory


def test_find_sources_prefers_the_installed_copy(tmp_path, monkeypatch):
    installed, checkout = _fill(tmp_path / "installed"), _fill(tmp_path / "checkout")
    assert cuda_build.find_sources([installed, checkout]) == installed
    (installed / cuda_build.SOURCES[0]).unlink()  # incomplete: the next place
    assert cuda_build.find_sources([installed, checkout]) == checkout
    monkeypatch.setattr(cuda_build, "PACKAGED_CSRC", installed)
    monkeypatch.setattr(cuda_build, "CSRC", tmp_path / "missing")
    with pytest.raises(BackendUnavailable, match=r"the CUDA sources \(add_relu\.cu, .*\) are in none of: .*installed, .*missing"):
        cuda_build.find_sources()


def test_find_sources_in_the_checkout():
    found = cuda_build.find_sources()
    assert sorted(p.name for p in found.iterdir() if p.suffix in (".cu", ".cuh", ".cpp", ".h")) == _csrc_files()


@needs_cuda_torch
def test_jit_build_without_sources_says_so(tmp_path, monkeypatch):
    monkeypatch.delenv("RESNET_FAST_NO_JIT", raising=False)
    monkeypatch.setattr(cuda_build, "PACKAGED_CSRC", tmp_path / "a")
    monkeypatch.setattr(cuda_build, "CSRC", tmp_path / "b")
    with pytest.raises(BackendUnavailable, match=r"^resnet_fast\._C is not importable \(ImportError: gone\) and it "
                                                 r"cannot be JIT-built: the CUDA sources .* are in none of"):
        cuda_build.jit_build(ImportError("gone"), capabilities=[(9, 0)])


@needs_cuda_torch
def test_jit_build_refuses_an_arch_list_without_the_gpu(monkeypatch):
    from torch.utils import cpp_extension

    _require(cpp_extension.CUDA_HOME is not None and cpp_extension.is_ninja_available(), "needs nvcc and ninja")
    monkeypatch.delenv("RESNET_FAST_NO_JIT", raising=False)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    monkeypatch.setattr(cuda_build, "build_library", lambda *a: pytest.fail("built a library that cannot run"))
    prebuilt = BackendUnavailable('resnet_fast._C was built for sm_90 only, not for sm_86: ...')
    with pytest.raises(BackendUnavailable, match=r"^resnet_fast\._C was built for sm_90 only, not for sm_86: \.\.\., "
                                                 r"and TORCH_CUDA_ARCH_LIST=9\.0 has no code for sm_86 either: unset it"):
        cuda_build.jit_build(prebuilt, capabilities=[(8, 6)])


# ================================================================================================
# Build definitions.
def test_setup_cmake_and_cuda_build_agree(monkeypatch):
    cmake = (ROOT / "CMakeLists.txt").read_text()
    cmake_sources = re.search(r"add_library\(resnet_fast_ops SHARED\s+([^)]*)\)", cmake).group(1).split()
    expected = [f"csrc/{name}" for name in cuda_build.SOURCES]
    assert _setup_py_constant("SOURCES") == expected
    assert cmake_sources == expected
    default = _setup_py_constant("DEFAULT_ARCH_LIST")
    assert re.search(r'set\(TORCH_CUDA_ARCH_LIST "([^"]*)"\)', cmake).group(1) == default
    if torch.version.cuda is not None:
        assert _code_for_arch_list(default, monkeypatch) == FULL_LIST_CODE


def test_python_version_is_one_ci_tests():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert version in SpecifierSet(project["requires-python"])
    assert f"Programming Language :: Python :: {version}" in project["classifiers"]


# ================================================================================================
# The sdist and the wheel (slow: one build, shared).
@pytest.fixture(scope="session")
def dists(tmp_path_factory) -> tuple[Path, Path]:
    """(sdist, wheel) built by ``python -m build`` (the wheel from the sdist) as a build machine
    without a GPU makes them."""
    try:
        importlib.metadata.distribution("build")
    except importlib.metadata.PackageNotFoundError:
        _require(False, "needs the 'build' package (the test extra)")
    out = tmp_path_factory.mktemp("dist")
    # No arch list and no visible GPU: the default list, even on a GPU machine.
    env = {k: v for k, v in os.environ.items() if k != "TORCH_CUDA_ARCH_LIST"} | {"CUDA_VISIBLE_DEVICES": ""}
    # cwd: not the checkout, whose build/ directory would shadow the build package.
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT], cwd=out, env=env, timeout=1500)
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return sdist, wheel


@pytest.mark.slow
def test_sdist_has_what_builds_the_package(dists):
    sdist, _ = dists
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    expected = {"LICENSE", "CHANGELOG.md", "README.md", "pyproject.toml", "setup.py", "MANIFEST.in",
                "CMakeLists.txt", "resnet_fast/py.typed"}
    assert expected | {f"csrc/{name}" for name in _csrc_files()} | _package_modules() <= names
    assert not [n for n in names if n.endswith(".so") or n.startswith("tests/")]


@pytest.mark.slow
def test_wheel_has_the_package_sources_license_and_extension(dists):
    _, wheel = dists
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (metadata,) = [z.read(n).decode() for n in names if n.endswith(".dist-info/METADATA")]
    assert _package_modules() | {"resnet_fast/py.typed"} <= names
    assert {n for n in names if n.startswith("resnet_fast/csrc/")} == {f"resnet_fast/csrc/{f}" for f in _csrc_files()}
    assert [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    assert "License-Expression: BSD-3-Clause" in metadata
    extensions = [n for n in names if re.fullmatch(r"resnet_fast/_C\..*\.so", n)]
    assert len(extensions) == (1 if _extension_expected() else 0), extensions


@pytest.fixture(scope="session")
def wheel_extension(dists, tmp_path_factory) -> Path:
    _require(_extension_expected(), "no nvcc or no CUDA torch: the wheel has no resnet_fast._C")
    _, wheel = dists
    out = tmp_path_factory.mktemp("wheel")
    with zipfile.ZipFile(wheel) as z:
        (name,) = [n for n in z.namelist() if n.startswith("resnet_fast/_C.")]
        return Path(z.extract(name, out))


@pytest.mark.slow
def test_wheel_extension_runs_on_ampere_ada_and_hopper(wheel_extension):
    assert cuda_build.device_code(wheel_extension) == FULL_LIST_CODE
    assert _cuobjdump_code(wheel_extension) == FULL_LIST_CODE
    listing = _run([_cuobjdump(), "--list-elf", wheel_extension]).stdout
    for unit in ("add_relu", "batch_norm_act"):  # every translation unit, not just one
        assert set(re.findall(rf"\b{unit}\.sm_(\d+)\.cubin", listing)) == {"80", "86", "89", "90"}, listing


def _in_venv(python: Path, args: list, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """Runs the venv's python from ``cwd`` (outside the source tree), without PYTHONPATH."""
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return _run([python, *args], cwd=cwd, env={**base, **env}, timeout=600)


@pytest.fixture(scope="session")
def installed(dists, tmp_path_factory) -> tuple[Path, Path]:
    """(python, site-packages) of a venv with the wheel installed. Its other dependencies (torch:
    gigabytes) come from this interpreter's site-packages; resnet_fast only from the wheel (asserted)."""
    _, wheel = dists
    venv = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv])
    python = venv / "bin" / "python"
    # This interpreter's pip installs into the venv; --no-index keeps it offline.
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-index", wheel], timeout=600)
    site = _in_venv(python, ["-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], venv).stdout
    return python, Path(site.strip())


@pytest.mark.slow
def test_installed_wheel_runs_the_report_outside_the_source_tree(installed, tmp_path):
    python, site = installed
    where = _in_venv(python, ["-c", "import resnet_fast; from resnet_fast.backends import cuda_build; "
                                       "print(resnet_fast.__file__); print(cuda_build.find_sources())"], tmp_path)
    assert where.stdout.split() == [str(site / "resnet_fast" / "__init__.py"), str(site / "resnet_fast" / "csrc")]
    report = _in_venv(python, ["-m", "resnet_fast", "--device", "cpu", "--arch", "resnet18", "--batch", "2",
                                  "--size", "64", "--iters", "1"], tmp_path)
    assert "PASS" in report.stdout, report.stdout
    if _extension_expected():
        assert "'cuda'" in report.stdout  # the wheel's _C imports: the backend is available


_JIT_ON_A_TURING_GPU = """
import sys, warnings
from resnet_fast.backends import cuda_backend, cuda_build
cuda_build.visible_capabilities = lambda: [(7, 5)]  # a GPU the wheel's _C has no code for
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    print(cuda_backend.load_library())
print("imported:", "resnet_fast._C" in sys.modules)
print("warned:", *[str(w.message) for w in caught])
"""


@pytest.mark.slow
@needs_cuda_torch
def test_jit_fallback_builds_the_sources_the_wheel_carries(installed, tmp_path):
    """The issue's case end to end, except that the GPU is pretended: the installed _C has no code for
    it, so load_library JIT-builds the packaged sources for it instead of importing _C."""
    from torch.utils import cpp_extension

    _require(_extension_expected() and cpp_extension.is_ninja_available(), "needs nvcc and ninja")
    python, site = installed
    extensions = tmp_path / "extensions"
    # TORCH_CUDA_ARCH_LIST: torch cannot ask a pretended GPU its architecture.
    out = _in_venv(python, ["-c", _JIT_ON_A_TURING_GPU], tmp_path, TORCH_CUDA_ARCH_LIST="7.5",
                   TORCH_EXTENSIONS_DIR=str(extensions)).stdout
    assert re.search(rf"^JIT-built \(resnet_fast_C_\w+_sm_75\) from {re.escape(str(site / 'resnet_fast' / 'csrc'))}$", out, re.M), out
    assert "imported: False" in out
    assert re.search(r"warned: resnet_fast\._C was built for .* only, not for sm_75: .*; JIT-building", out), out
    (library,) = extensions.glob("resnet_fast_C_*/*.so")
    assert cuda_build.device_code(library) == DeviceCode(sass=frozenset({75}))
