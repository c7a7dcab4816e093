"""Finding, checking and JIT-building the CUDA library of the ``"cuda"`` backend.

The backend asks three questions before it uses a kernel:

* **Where are the sources?** :func:`find_sources`: the copy installed with the package
  (``resnet_fast/csrc``, package data, so a wheel installed without nvcc can still JIT-build), else
  the checkout's top-level ``csrc/`` (editable installs and running from the source tree).
* **Does the prebuilt library run on these GPUs?** :func:`check_prebuilt` reads which architectures
  ``resnet_fast._C`` carries code for (:func:`device_code`: the fatbinary in its ``.nv_fatbin`` ELF
  section, the data ``cuobjdump --list-elf --list-ptx`` prints) and raises
  :class:`~resnet_fast.backends.BackendUnavailable` for a GPU it cannot run on. This happens *before*
  the import: a kernel without code for the GPU would otherwise fail only at its first launch, in
  the middle of a forward ("no kernel image is available"), and once ``_C`` has registered its ops a
  JIT-built library could no longer register them.
* **Can it be built here instead?** :func:`jit_build`: ``torch.utils.cpp_extension.load`` of the
  sources for the visible GPUs, when nvcc, ninja and a GPU are there.

Everything takes the GPUs' compute capabilities as an argument (default: the visible GPUs), so the
decisions are tested on machines without a GPU.
"""

from __future__ import annotations

import importlib.util
import os
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from resnet_fast.backends import BackendUnavailable

__all__ = [
    "CSRC",
    "PACKAGED_CSRC",
    "SOURCES",
    "DeviceCode",
    "build_library",
    "check_prebuilt",
    "device_code",
    "find_sources",
    "jit_build",
    "visible_capabilities",
]

#: The translation units of the library (setup.py and CMakeLists.txt compile the same files).
SOURCES: tuple[str, ...] = ("add_relu.cu", "batch_norm_act.cu", "ops.cpp")
#: The sources as installed with the package (package data; see setup.py / pyproject.toml).
PACKAGED_CSRC = Path(__file__).resolve().parents[1] / "csrc"
#: The sources in a checkout of the repository.
CSRC = Path(__file__).resolve().parents[2] / "csrc"

Capability = tuple[int, int]


# ------------------------------------------------------------------------------------------------
# Sources.
def find_sources(candidates: Sequence[Path] | None = None) -> Path:
    """The first directory that holds every file in :data:`SOURCES`: of ``candidates``, by default
    :data:`PACKAGED_CSRC` then :data:`CSRC`.

    Raises :class:`BackendUnavailable` naming the directories it looked in otherwise.
    """
    candidates = (PACKAGED_CSRC, CSRC) if candidates is None else candidates
    for directory in candidates:
        if all((directory / name).is_file() for name in SOURCES):
            return directory
    looked = ", ".join(str(d) for d in candidates)
    raise BackendUnavailable(f"the CUDA sources ({', '.join(SOURCES)}) are in none of: {looked}")


# ------------------------------------------------------------------------------------------------
# Which GPUs a library runs on.
def _sm(arch: int) -> str:
    return f"sm_{arch}"


def _arch(capability: Capability) -> int:
    major, minor = capability
    return 10 * major + minor


def _names(capabilities: Iterable[Capability]) -> str:
    return ", ".join(_sm(_arch(c)) for c in capabilities)


@dataclass(frozen=True)
class DeviceCode:
    """The GPU code in a library, by architecture number (``90`` for sm_90 / compute_90).

    Attributes:
        sass: architectures with machine code (cubins).
        ptx: virtual architectures with PTX, which the driver compiles for its GPU at load time.
        exact: architecture-specific code (``sm_90a``, ``compute_90a``), which runs on exactly
            that architecture and no later one.
    """

    sass: frozenset[int] = frozenset()
    ptx: frozenset[int] = frozenset()
    exact: frozenset[int] = frozenset()

    def runs_on(self, capability: Capability) -> bool:
        """Whether a GPU of this compute capability can run the library's kernels.

        CUDA's compatibility rules: a cubin runs on GPUs of its major version with an equal or higher
        minor one (sm_80 code runs on sm_86 and sm_89, not on sm_90); PTX is compiled by the driver
        for any GPU of its architecture or a later one (compute_90 runs on sm_90, sm_100, sm_120),
        given a driver as recent as the toolkit that wrote it, which torch's CUDA runtime needs anyway.
        """
        major, _ = capability
        arch = _arch(capability)
        return (
            arch in self.exact
            or any(a // 10 == major and a <= arch for a in self.sass)
            or any(a <= arch for a in self.ptx)
        )

    def describe(self) -> str:
        """``"sm_80, sm_90 and PTX for compute_90"`` (what ``cuobjdump`` would list)."""
        names = sorted([(a, _sm(a)) for a in self.sass] + [(a, f"{_sm(a)}a") for a in self.exact])
        text = ", ".join(name for _, name in names) or "no machine code"
        if self.ptx:
            text += " and PTX for " + ", ".join(f"compute_{a}" for a in sorted(self.ptx))
        return text

    def missing(self, capabilities: Iterable[Capability]) -> list[Capability]:
        """The capabilities of those GPUs that cannot run this code, sorted, without repeats."""
        return sorted({tuple(c) for c in capabilities if not self.runs_on(tuple(c))})

    def check(self, capabilities: Iterable[Capability], what: str) -> None:
        """Raises :class:`BackendUnavailable` if a GPU of these capabilities cannot run ``what``."""
        missing = self.missing(capabilities)
        if missing:
            archs = ";".join(f"{major}.{minor}" for major, minor in missing)
            raise BackendUnavailable(
                f"{what} was built for {self.describe()} only, not for {_names(missing)}: "
                f'rebuild it with TORCH_CUDA_ARCH_LIST="{archs}"'
            )

    @classmethod
    def from_gencode_flags(cls, flags: Iterable[str]) -> "DeviceCode":
        """The code nvcc produces for ``-gencode=arch=compute_XX,code=sm_XX``-style flags (family
        code, ``sm_100f``, runs like ``sm_100``)."""
        sass, ptx, exact = set(), set(), set()
        for flag in flags:
            _, _, codes = flag.rpartition("code=")
            for code in codes.strip("[]").split(","):
                match = re.fullmatch(r"(sm|compute)_(\d+)([af]?)", code)
                if match:
                    kind, number, suffix = match.groups()
                    (exact if suffix == "a" else sass if kind == "sm" else ptx).add(int(number))
        return cls(frozenset(sass), frozenset(ptx), frozenset(exact))


# Layout of the fatbinary that nvcc embeds in the ``.nv_fatbin`` section (one per CUDA translation
# unit). The format is not documented; these are the fields every fatbin reader (cuobjdump included)
# relies on, checked against cuobjdump's listing in tests/test_packaging.py:
#   container header (16 bytes): u32 magic 0xBA55ED50, u16 version, u16 header size, u64 size of the entries;
#   entry header: u16 kind (1 = PTX, 2 = cubin), u16, u32 header size, u64 payload size, u32, u32,
#     u16 minor, u16 major, u32 architecture (90 for sm_90), u32, u32, u64 flags, ...;
#   the payload follows its header; the next entry follows the payload.
_FATBIN_MAGIC = 0xBA55ED50
_FATBIN_HEADER = struct.Struct("<IHHQ")
_ENTRY_HEADER = struct.Struct("<HHIQIIHHIIIQ")
_KIND_PTX, _KIND_CUBIN = 1, 2
_FLAG_ARCH_SPECIFIC = 0x100000  # set by nvcc for sm_90a / compute_90a code (not for family code, sm_100f)


def _elf_section(data: bytes, wanted: str) -> bytes | None:
    """The contents of a section of a 64-bit little-endian ELF file (x86-64, aarch64), or None."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_offset = sections[shstrndx][4]
    for name, _type, _flags, _addr, offset, size in sections:
        start = names_offset + name
        if data[start : data.index(b"\0", start)].decode() == wanted:
            return data[offset : offset + size]
    return None


def _fatbin_entries(section: bytes) -> Iterator[tuple[int, int, int]]:
    """``(kind, architecture, flags)`` of every entry of the fatbinaries in a ``.nv_fatbin`` section."""
    pos = 0
    while pos + _FATBIN_HEADER.size <= len(section):
        magic, _version, header_size, entries_size = _FATBIN_HEADER.unpack_from(section, pos)
        if magic != _FATBIN_MAGIC:  # padding between the fatbins of two translation units
            pos += 8
            continue
        entry, end = pos + header_size, pos + header_size + entries_size
        while entry < end:
            kind, _, entry_header, payload, *_, arch, _, _, flags = _ENTRY_HEADER.unpack_from(section, entry)
            if entry_header < _ENTRY_HEADER.size:
                raise ValueError(f"corrupt fatbinary entry header at offset {entry}")
            yield kind, arch, flags
            entry += entry_header + payload
        pos = end


def device_code(library: str | os.PathLike) -> DeviceCode:
    """The GPU code in a shared library: every cubin and PTX entry of its fatbinaries.

    The translation units of a build share their ``-gencode`` flags, so the union over them is what
    each kernel has. A library without CUDA code gives an empty :class:`DeviceCode`; a file that is
    not a 64-bit ELF library raises ``ValueError``.
    """
    path = Path(library)
    sass, ptx, exact = set(), set(), set()
    try:
        section = _elf_section(path.read_bytes(), ".nv_fatbin")
        for kind, arch, flags in _fatbin_entries(section or b""):
            if flags & _FLAG_ARCH_SPECIFIC:
                exact.add(arch)
            elif kind == _KIND_CUBIN:
                sass.add(arch)
            elif kind == _KIND_PTX:
                ptx.add(arch)
    except (ValueError, struct.error, IndexError) as e:
        raise ValueError(f"cannot read the GPU code in {path}: {e}") from None
    return DeviceCode(frozenset(sass), frozenset(ptx), frozenset(exact))


def visible_capabilities() -> list[Capability]:
    """The compute capabilities of the visible GPUs (none without a GPU)."""
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]


def check_prebuilt(capabilities: Iterable[Capability] | None = None) -> None:
    """Raises :class:`BackendUnavailable` if ``resnet_fast._C`` exists but has no code for a GPU.

    Checks the file without importing it. ``capabilities`` defaults to the visible GPUs; with none
    there is nothing to check (the library imports and registers its ops on a CPU machine too).
    """
    spec = importlib.util.find_spec("resnet_fast._C")
    if spec is None or spec.origin is None:
        return  # not built: the import says so, and the caller JIT-builds
    capabilities = visible_capabilities() if capabilities is None else list(capabilities)
    if capabilities:
        device_code(spec.origin).check(capabilities, "resnet_fast._C")


# ------------------------------------------------------------------------------------------------
# JIT build.
def _flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def build_library(csrc: Path, name: str) -> None:
    """Compiles the sources in ``csrc`` with ``torch.utils.cpp_extension.load`` and loads the result
    (its ``TORCH_LIBRARY`` blocks register the ops).

    Targets ``TORCH_CUDA_ARCH_LIST`` if set, else the visible GPUs; builds are cached in torch's
    extensions directory (``TORCH_EXTENSIONS_DIR``), as ``name/name.so``.
    """
    from torch.utils import cpp_extension

    cpp_extension.load(
        name=name,
        sources=[str(csrc / s) for s in SOURCES],
        extra_include_paths=[str(csrc)],
        extra_cflags=["-O3"],
        extra_cuda_cflags=["-O3", "-lineinfo"],
        is_python_module=False,
        verbose=_flag("RESNET_FAST_VERBOSE_BUILD"),
    )


def jit_build(prebuilt_error: BaseException, capabilities: Iterable[Capability] | None = None) -> str:
    """Builds and loads the library for the visible GPUs because ``resnet_fast._C`` cannot serve.

    ``prebuilt_error`` says why (the import failed, or :func:`check_prebuilt` found no code for the
    GPU); it starts the message of the :class:`BackendUnavailable` raised when no build is possible
    (``RESNET_FAST_NO_JIT=1``, no CUDA torch, no GPU, no sources, no nvcc or ninja, or a
    ``TORCH_CUDA_ARCH_LIST`` without this GPU). Returns how the library was loaded.
    """
    if isinstance(prebuilt_error, BackendUnavailable):
        why = str(prebuilt_error)
    else:
        why = f"resnet_fast._C is not importable ({type(prebuilt_error).__name__}: {prebuilt_error})"
    if _flag("RESNET_FAST_NO_JIT"):
        raise BackendUnavailable(f"{why} and RESNET_FAST_NO_JIT is set")
    if torch.version.cuda is None:
        raise BackendUnavailable(f"{why} and torch {torch.__version__} is not a CUDA build")
    capabilities = visible_capabilities() if capabilities is None else list(capabilities)
    if not capabilities:
        raise BackendUnavailable(f"{why} and no GPU is visible, so it is not JIT-built")
    try:
        csrc = find_sources()
    except BackendUnavailable as e:
        raise BackendUnavailable(f"{why} and it cannot be JIT-built: {e}") from None
    # torch.utils.cpp_extension reads CUDA_HOME when first imported.
    if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and os.path.isdir("/usr/local/cuda"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    from torch.utils import cpp_extension

    if cpp_extension.CUDA_HOME is None:
        raise BackendUnavailable(f"{why} and nvcc was not found (set CUDA_HOME) to JIT-build it")
    if not cpp_extension.is_ninja_available():
        raise BackendUnavailable(f"{why} and ninja is not installed to JIT-build it")
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch_list:
        # torch builds for this list instead of the visible GPUs: refuse a build that could not run.
        missing = DeviceCode.from_gencode_flags(cpp_extension._get_cuda_arch_flags()).missing(capabilities)
        if missing:
            raise BackendUnavailable(
                f"{why}, and TORCH_CUDA_ARCH_LIST={arch_list} has no code for {_names(missing)} either: "
                "unset it to JIT-build for the visible GPUs"
            )
    # One cache entry per torch version (a library built against another torch does not load) and
    # per set of GPUs.
    archs = "_".join(_sm(a) for a in sorted({_arch(c) for c in capabilities}))
    name = "resnet_fast_C_" + re.sub(r"[^0-9A-Za-z]", "_", torch.__version__) + "_" + archs
    warnings.warn(f"{why}; JIT-building the CUDA kernels for this GPU ({name}, cached after the first time)",
                  RuntimeWarning, stacklevel=2)
    build_library(csrc, name)
    return f"JIT-built ({name}) from {csrc}"
