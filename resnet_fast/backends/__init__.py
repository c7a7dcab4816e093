"""Backend registry: which implementation serves each functional op in ``resnet_fast.ops``.

A backend is a name, a priority and a ``load`` function returning ``{op_name: implementation}``.
``load`` runs once, on first use, so importing resnet_fast never compiles or imports anything heavy;
if it raises :class:`BackendUnavailable`, the backend is unavailable and the reason is kept.

Selection (per call in :func:`call`; once, for many calls, in :func:`bind`, which a model's forward uses
through :func:`resnet_fast.ops.library.resolve_once`):

* ``"auto"`` (the default): the highest-priority backend that implements the op, loaded and supports
  the tensors' device. ``"torch"`` (the reference) always qualifies, so on CPU auto mode is simply the
  reference.
* An explicit name (``set_backend("triton")`` or ``with backend("triton")``): that backend, or, if it
  cannot serve this call, the reference with a warning said once per (backend, op, reason).
  With ``strict=True`` the same situation raises :class:`BackendUnavailable` instead, which is how
  tests prove a kernel really ran.

A kernel that raises at run time (a compile failure, say) is also answered by the reference with one
warning, unless strict. Input validation happens in ``resnet_fast.ops`` before dispatch, so bad input
raises a clear error and never reaches this fallback.

The registry is called from inside the ``torch.library`` ops (:mod:`resnet_fast.ops.library`, which in
plain eager mode calls the kernels directly), which own the backward formulas: implementations compute
forward values only and never see autograd.

A new backend is one file that calls :func:`register_backend`; models and blocks never change.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import importlib
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import torch

__all__ = [
    "Backend",
    "BackendUnavailable",
    "Unsupported",
    "available_backends",
    "backend",
    "bind",
    "call",
    "get_backend",
    "record_dispatch",
    "register_backend",
    "registered_backends",
    "resolve",
    "set_backend",
    "unavailable_reason",
    "unregister_backend",
    "warn_once",
]

AUTO = "auto"


class BackendUnavailable(RuntimeError):
    """A backend cannot serve a call: not installed, not built, or not for this device or op."""


class Unsupported(BackendUnavailable):
    """Raised by an implementation, before it launches anything, for arguments it does not handle
    (grouped convolutions, say). The call is answered by the reference: silently in ``"auto"`` mode,
    with one warning for an explicitly selected backend, and not at all in strict mode (it raises)."""


@dataclass
class Backend:
    """One implementation family of the functional ops.

    Attributes:
        name: what users pass to :func:`set_backend`.
        priority: order in ``"auto"`` mode, highest first.
        load: returns ``{op_name: fn}``; raises :class:`BackendUnavailable` with a reason.
        supports_device: whether the implementations run on tensors of this device.
        auto_select: whether ``"auto"`` mode may pick it for a device (default: ``supports_device``);
            Triton's interpreter runs on CPU tensors, but only tests should choose it there.
    """

    name: str
    priority: int
    load: Callable[[], Mapping[str, Callable]]
    supports_device: Callable[[torch.device], bool]
    auto_select: Callable[[torch.device], bool] | None = None
    _ops: Mapping[str, Callable] | None = field(default=None, repr=False)
    _error: str | None = field(default=None, repr=False)

    def ops(self) -> Mapping[str, Callable]:
        """Loads the backend once; raises :class:`BackendUnavailable` if it cannot be loaded."""
        if self._ops is None and self._error is None:
            try:
                self._ops = dict(self.load())
            except BackendUnavailable as e:
                self._error = str(e)
            except Exception as e:  # an import or build failure is a reason, never a crash
                self._error = f"{type(e).__name__}: {e}"
        if self._error is not None:
            raise BackendUnavailable(f"backend {self.name!r} is unavailable: {self._error}")
        return self._ops

    def is_available(self) -> bool:
        try:
            self.ops()
        except BackendUnavailable:
            return False
        return True


_REGISTRY: dict[str, Backend] = {}
_BY_PRIORITY: list[Backend] = []  # _REGISTRY's backends, highest priority first (resolve runs per op call)
_AUTO: dict[tuple[str, str], tuple[str, Callable]] = {}  # "auto"'s choice per (op, device type)


@dataclass(frozen=True)
class _Selection:
    name: str = AUTO
    strict: bool = False


_selection: contextvars.ContextVar[_Selection] = contextvars.ContextVar("resnet_fast_backend", default=_Selection())
_warned: set[tuple] = set()


def register_backend(
    name: str,
    load: Callable[[], Mapping[str, Callable]],
    *,
    priority: int,
    supports_device: Callable[[torch.device], bool],
    auto_select: Callable[[torch.device], bool] | None = None,
) -> Backend:
    """Adds (or replaces) a backend. ``load`` is not called until the backend is first used."""
    if name == AUTO:
        raise ValueError(f"backend name {AUTO!r} is reserved")
    b = Backend(name, priority, load, supports_device, auto_select)
    _REGISTRY[name] = b
    _BY_PRIORITY[:] = sorted(_REGISTRY.values(), key=lambda b: -b.priority)
    _AUTO.clear()
    return b


def unregister_backend(name: str) -> None:
    """Removes a backend added by :func:`register_backend` (a plugin unloading, a test cleaning up)."""
    if name not in _REGISTRY or name == "torch":
        raise ValueError(f"cannot unregister {name!r}; registered: {registered_backends()} (the reference stays)")
    del _REGISTRY[name]
    _BY_PRIORITY[:] = [b for b in _BY_PRIORITY if b.name != name]
    _AUTO.clear()


def registered_backends() -> list[str]:
    """Every registered backend name, available or not, highest priority first."""
    return [b.name for b in _BY_PRIORITY]


def available_backends() -> list[str]:
    """Backends that load on this machine (loading them if needed), highest priority first."""
    return [n for n in registered_backends() if _REGISTRY[n].is_available()]


def get_backend() -> str:
    """The current selection: ``"auto"`` or a backend name."""
    return _selection.get().name


def _check_name(name: str) -> None:
    if name != AUTO and name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; expected one of {[AUTO, *registered_backends()]}")


def set_backend(name: str, *, strict: bool = False) -> None:
    """Selects the backend for the current context (thread / task) from now on.

    Args:
        name: ``"auto"`` or a registered name (``"torch"``, ``"triton"``, ``"cuda"``).
        strict: raise instead of falling back to the reference when the backend cannot serve a call.
    """
    _check_name(name)
    _selection.set(_Selection(name, strict))


@contextlib.contextmanager
def backend(name: str, *, strict: bool = False) -> Iterator[None]:
    """Context manager form of :func:`set_backend`; restores the previous selection on exit."""
    _check_name(name)
    token = _selection.set(_Selection(name, strict))
    try:
        yield
    finally:
        _selection.reset(token)


def warn_once(key: tuple, message: str) -> None:
    """A RuntimeWarning said once per process for ``key`` (resnet_fast's fallbacks and defaults)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _usable(b: Backend, op: str, device: torch.device) -> str | None:
    """None if ``b`` can serve this call, else the reason it cannot."""
    try:
        ops = b.ops()
    except BackendUnavailable as e:
        return str(e)
    if op not in ops:
        return f"backend {b.name!r} does not implement {op!r}"
    if not b.supports_device(device):
        return f"backend {b.name!r} does not run on {device.type} tensors"
    return None


def resolve(op: str, device: torch.device) -> tuple[str, Callable]:
    """The (backend name, implementation) that :func:`call` would use for this op."""
    sel = _selection.get()
    if sel.name == AUTO:
        # Backends decide by device type, and a backend's availability is settled on its first load.
        key = (op, device.type)
        if key not in _AUTO:
            for b in _BY_PRIORITY:
                if (b.auto_select is None or b.auto_select(device)) and _usable(b, op, device) is None:
                    _AUTO[key] = b.name, b.ops()[op]
                    break
            else:
                raise BackendUnavailable(f"no backend implements {op!r}")
        return _AUTO[key]
    reason = _usable(_REGISTRY[sel.name], op, device)
    if reason is None:
        return sel.name, _REGISTRY[sel.name].ops()[op]
    if sel.strict:
        raise BackendUnavailable(reason)
    warn_once((sel.name, op, reason), f"{reason}; using the 'torch' reference backend instead")
    return "torch", _REGISTRY["torch"].ops()[op]


def call(op: str, *args, device: torch.device, **kwargs):
    """Runs ``op`` on the selected backend, falling back to the reference if its kernel fails."""
    return _run(op, *resolve(op, device), *args, **kwargs)


def bind(op: str, device: torch.device) -> Callable:
    """``call`` for ``op`` on ``device`` with the backend resolved now rather than at every call: what a
    model resolves once at the entry of its forward. Same kernel, fallbacks, warnings and
    :func:`record_dispatch` counts as :func:`call` under the current selection."""
    return functools.partial(_run, op, *resolve(op, device))


def _run(op: str, name: str, fn: Callable, *args, **kwargs):
    """``fn``, backend ``name``'s implementation of ``op``; the reference if it cannot serve the call."""
    if name == "torch":
        out = fn(*args, **kwargs)
    else:
        try:
            out = fn(*args, **kwargs)
        except torch.cuda.OutOfMemoryError:
            raise
        except Unsupported as e:
            sel = _selection.get()
            if sel.strict:
                raise
            if sel.name != AUTO:
                warn_once((name, op, str(e)), f"backend {name!r}: {e}; using the 'torch' reference backend for these calls")
            name, out = "torch", _REGISTRY["torch"].ops()[op](*args, **kwargs)
        except Exception as e:
            if _selection.get().strict:
                raise
            warn_once(
                (name, op, "failed"),
                f"backend {name!r} failed on {op!r} ({type(e).__name__}: {e}); using the 'torch' reference backend",
            )
            name, out = "torch", _REGISTRY["torch"].ops()[op](*args, **kwargs)
    counts = _recording.get()
    if counts is not None:
        counts[(op, name)] += 1
    return out


_recording: contextvars.ContextVar[collections.Counter | None] = contextvars.ContextVar(
    "resnet_fast_dispatch_record", default=None
)


@contextlib.contextmanager
def counting(recording: contextvars.ContextVar[collections.Counter | None]) -> Iterator[collections.Counter]:
    """Sets ``recording`` to a fresh Counter for the block (the code it watches adds to it) and restores
    the outer one after: nested recorders each see their own block."""
    counts: collections.Counter = collections.Counter()
    token = recording.set(counts)
    try:
        yield counts
    finally:
        recording.reset(token)


def record_dispatch() -> contextlib.AbstractContextManager[collections.Counter]:
    """Counts the op calls made inside the block by ``(op, backend that ran it)``, fallbacks included.

    ``with record_dispatch() as calls: model(x)`` then ``calls[("conv_bn_act", "triton")]``.
    """
    return counting(_recording)


def dispatch_state() -> tuple:
    """The current selection and :func:`record_dispatch` counter, for :func:`dispatching` to restore
    where a backward runs: autograd runs the backward of CUDA tensors on its own device threads, which
    do not see the contextvars of the thread that ran the forward."""
    return _selection.get(), _recording.get()


@contextlib.contextmanager
def dispatching(state: tuple) -> Iterator[None]:
    """Runs the block under a :func:`dispatch_state` taken earlier (in the forward)."""
    selection, recording = state
    tokens = _selection.set(selection), _recording.set(recording)
    try:
        yield
    finally:
        _recording.reset(tokens[1])
        _selection.reset(tokens[0])


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """None if backend ``name`` loads and runs on ``device``; otherwise why not."""
    _check_name(name)
    b = _REGISTRY[name]
    try:
        b.ops()
    except BackendUnavailable as e:
        return str(e)
    if not b.supports_device(device):
        return f"backend {name!r} does not run on {device.type} tensors"
    return None


def _register_builtin() -> None:
    # Each module registers itself; a missing optional dependency only makes that backend unavailable.
    for module in ("reference", "triton_backend", "cuda_backend"):
        try:
            importlib.import_module(f"{__name__}.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{module}":
                raise


_register_builtin()
