"""Host-side launch helpers shared by the kernel files: integer arithmetic and :class:`DirectLaunch`.

At batch 1 a forward is launch-bound (BENCHMARKS.md, "Host time of the Triton launches"), and most of a
launch's host time was Triton's: ``kernel[grid](*args)`` binds and specializes every argument, builds the
compiled-kernel cache key and checks the kernel's globals at each call, about 19 µs above the driver
call for the gather kernel's 45 arguments. :class:`DirectLaunch` pays that once per argument signature
and then calls the compiled kernel itself (``CompiledKernel[grid](*args, stream=...)``, as code compiled
ahead of time is launched), which is what torch.compile's generated launchers do too. What a direct call
skips: re-reading Triton's compile options from its knobs and environment (a process that changes them
keeps the kernels it has), the check that the kernel's globals have not changed (these kernels read
none), and ``JITFunction`` pre-run hooks. Launch hooks (profilers) still see every launch.
``RESNET_FAST_DIRECT_LAUNCH=0`` (read at import) leaves every launch to Triton.
"""

from __future__ import annotations

import os
from typing import Sequence

import triton
from triton.runtime import driver

__all__ = ["DirectLaunch", "cdiv", "next_power_of_2", "signature"]


# triton.cdiv and triton.next_power_of_2 are constexpr functions (triton 3.6 and 3.8), about 2 µs a call
# on the host, and a launch made several.
def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative ints."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


_SCALARS = (float, bool, type(None))  # besides int, the common case
_ENABLED = os.environ.get("RESNET_FAST_DIRECT_LAUNCH", "1") != "0"
MAX_SIGNATURES = 1024  # per kernel; beyond this (a workload of ever new shapes) the cache starts over


def signature(args: Sequence) -> tuple:
    """What of ``args`` the compiled kernel depends on, at least as finely as Triton specializes them
    (tests/test_launch.py checks it against Triton's own specialization): a tensor's dtype and whether
    its address is 16-byte aligned; a scalar's type and value (Triton keys an int by ``== 1``, its
    divisibility by 16 and its width, so equal ints always share a kernel; the type keeps ``1``, ``1.0``
    and ``True`` apart)."""
    return tuple([a if a.__class__ is int else (a.__class__, a) if a.__class__ in _SCALARS
                  else (a.dtype, not a.data_ptr() & 15) for a in args])


class DirectLaunch:
    """``launch[grid](*args, **constexprs)``: ``kernel[grid](...)`` with Triton's argument binding paid once
    per argument :func:`signature`, the compiled kernel called directly after that.

    ``args`` are the kernel's leading parameters, tensors and scalars only (no tensor descriptors: their
    host objects are rebuilt per call); ``constexprs`` name all the others, and ``num_warps`` and
    ``num_stages``. Under the interpreter (``TRITON_INTERPRET=1``: ``kernel`` is interpreted, not compiled)
    or with ``RESNET_FAST_DIRECT_LAUNCH=0``, every call is Triton's own (:attr:`compiles` is False).
    """

    def __init__(self, kernel: triton.JITFunction):
        self.kernel = kernel
        self.arg_names = kernel.arg_names
        self.compiles = isinstance(kernel, triton.runtime.JITFunction) and _ENABLED
        self._compiled: dict[tuple, object] = {}  # (device, signature, constexprs) -> CompiledKernel

    def __getitem__(self, grid: tuple[int, ...]):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    @staticmethod
    def key(args: tuple, kwargs: dict) -> tuple:
        """``(device, signature(args), constexprs by name, type and value)``: what a compiled kernel is
        kept under (only where :attr:`compiles`)."""
        return (driver.active.get_current_device(), signature(args),
                tuple([(name, v.__class__, v) for name, v in kwargs.items()]))

    def launch(self, grid: tuple[int, ...], args: tuple, kwargs: dict, key: tuple | None = None) -> None:
        """``kernel[grid](*args, **kwargs)``. ``key`` may stand for :meth:`key` of these arguments, or of
        others that determine them (the :class:`~resnet_fast.kernels.conv_common.Launcher`'s, before it
        adds its config), as long as one key never stands for two different launches."""
        if not self.compiles:
            self.kernel[grid](*args, **kwargs)
            return
        if key is None:
            key = self.key(args, kwargs)
        compiled = self._compiled.get(key)
        if compiled is None:
            # Triton binds, specializes, compiles or finds the kernel, and launches it.
            compiled = self.kernel[grid](*args, **kwargs)
            if len(self._compiled) >= MAX_SIGNATURES:
                self._compiled.clear()
            if compiled is not None:
                self._compiled[key] = compiled
            return
        # Every parameter in order, constexprs included, as Triton's own launch passes them.
        bound = [*args, *[kwargs[name] for name in self.arg_names[len(args):]]]
        grid3 = (*grid, 1, 1)[:3]
        compiled[grid3](*bound, stream=driver.active.get_current_stream(key[0]))
