"""Autotuned configs that outlive the process: committed tables per GPU model, and a cache per machine.

On a GPU, the first call of each (kernel family, shape) compiles and times every candidate config: for a
resnet50 forward, dozens of shapes times up to a dozen candidates. Triton keeps compiled kernels on disk,
but its autotuner's own disk cache gives up on configs with a ``pre_hook`` (the TMA families set their
descriptors' boxes in one), so resnet_fast keeps the choices itself, in one format in two places:

* committed tables, ``resnet_fast/kernels/tuned/<gpu>.json``, recorded on that GPU model (a session with
  the GPU copies its cache file there), so a first process on a fresh machine compiles each shape's
  winner only. A GPU model without a table of its own uses those of its architecture: the same compute
  capability and multiprocessor count, hence the same shared memory per block, candidates and split-K
  (an H100 SXM uses the H200's table: both are sm_90 with 132 multiprocessors); what differs between
  them, memory bandwidth, can cost speed, never correctness;
* a cache, ``$RESNET_FAST_TUNING_CACHE`` (default ``~/.cache/resnet_fast/tuning``) ``/<gpu>.json``, to
  which each process adds the choices it timed, so that a later process on the machine times nothing.

``<gpu>`` is the device name in lower case, runs of other characters as ``-`` (``nvidia-h100-80gb-hbm3``).
A choice is keyed by family and autotune key: the values of the family's key arguments, then the dtype
of each tensor argument, as Triton's autotuner keys them, except that the arguments which grow with the
batch (``M``, output pixels; ``N``, images) are written rounded up to a power of two: a batch of 200 then
finds the choice timed at 256, where the last, partial batch of an epoch would time every layer again
(75 s for a resnet50 on an H200). The launcher
(:func:`resnet_fast.kernels.conv_common.configured`) uses a stored choice only if it is still one of the
family's candidates for that call, so a table older than the candidate list can cost speed, never
correctness. ``RESNET_FAST_TUNING=0`` reads and writes neither (every shape is timed afresh).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import re
import tempfile
import warnings
from dataclasses import dataclass

import triton

from resnet_fast.kernels.launch import next_power_of_2

__all__ = [
    "COMMITTED", "Gpu", "cache_dir", "config_entry", "device_slug", "enabled", "key_of", "key_text", "lookup", "store",
]

# The committed tables; RESNET_FAST_TUNED_DIR names another folder of them (a site's own, or a measurement
# of a fresh machine that has a table: benchmarks/first_call.py).
COMMITTED = pathlib.Path(os.environ.get("RESNET_FAST_TUNED_DIR") or pathlib.Path(__file__).with_name("tuned"))


def enabled() -> bool:
    return os.environ.get("RESNET_FAST_TUNING", "1") != "0"


def cache_dir() -> pathlib.Path:
    configured = os.environ.get("RESNET_FAST_TUNING_CACHE")
    if configured:
        return pathlib.Path(configured)
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "resnet_fast" / "tuning"


@dataclass(frozen=True)
class Gpu:
    """A GPU as the tables know it: its name (the tables' file name, :func:`device_slug`) and its
    architecture, the compute capability and multiprocessor count."""

    name: str
    capability: tuple[int, int]
    multiprocessors: int

    @property
    def architecture(self) -> tuple[int, int, int]:
        return (*self.capability, self.multiprocessors)


def device_slug(name: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"``: the table's file name."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def key_of(key_names: list[str], nargs: dict) -> tuple:
    """The autotune key of a launch with arguments ``nargs`` (name -> value): the key arguments' values,
    then each tensor argument's dtype (a tuple: the launcher's per-process lookup, at every launch)."""
    return tuple(nargs.get(name) for name in key_names) + tuple(v.dtype for v in nargs.values() if hasattr(v, "dtype"))


def _rounded(name: str, value):
    """``value`` of key argument ``name`` as the tables write it (module docstring): M and N rounded up
    to a power of two. The conv families' candidate lists depend on M only through that power of two
    (tests/test_tuning.py checks it), and on N hardly at all."""
    if name in ("M", "N") and isinstance(value, int) and value > 1:
        return next_power_of_2(value)
    return value


def key_text(key_names: list[str], key: tuple) -> str:
    """:func:`key_of`'s key as the tables write it: ``"M=64,C_out=512,torch.bfloat16"`` for M = 49."""
    values = [f"{name}={_rounded(name, value)}" for name, value in zip(key_names, key)]
    return ",".join(values + [str(dtype) for dtype in key[len(key_names):]])


def config_entry(config: triton.Config) -> dict:
    """What a table stores of a config: its meta-parameters, warps and stages."""
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def _read_table(path: pathlib.Path) -> dict:
    """A table file as a dict (``configs`` at least; empty if there is no such file or it is unreadable)."""
    try:
        table = json.loads(path.read_text())
        if not isinstance(table["configs"], dict):
            raise TypeError("'configs' is not an object")
        return table
    except FileNotFoundError:
        return {"configs": {}}
    except (OSError, ValueError, KeyError, TypeError) as e:
        warnings.warn(f"resnet_fast: ignoring the tuning table {path} ({type(e).__name__}: {e})", stacklevel=4)
        return {"configs": {}}


def _architecture(table: dict) -> tuple | None:
    """The ``(major, minor, multiprocessors)`` a table was recorded on, if it says."""
    try:
        return (*map(int, table["capability"]), int(table["multiprocessors"]))
    except (KeyError, TypeError, ValueError):
        return None


@functools.cache
def _committed_tables() -> dict[str, dict]:
    """Every committed table, by file name (:func:`device_slug`), read once."""
    return {path.stem: _read_table(path) for path in sorted(COMMITTED.glob("*.json"))}


def lookup(gpu: Gpu, family: str, key: str) -> dict | None:
    """The stored choice (:func:`config_entry`) for ``family`` at ``key`` on this GPU: this machine's cache
    first (it was timed here), then the committed table of this GPU model, then those of other models of
    its architecture; None if none has one."""
    slug = device_slug(gpu.name)
    committed = _committed_tables()
    tables = [_read_table(cache_dir() / f"{slug}.json"), committed.get(slug, {"configs": {}})]
    tables += [t for name, t in committed.items() if name != slug and _architecture(t) == gpu.architecture]
    for table in tables:
        entry = table["configs"].get(family, {}).get(key)
        if entry is not None:
            return entry
    return None


def store(gpu: Gpu, family: str, key: str, config: triton.Config) -> None:
    """Adds a timed choice to this machine's cache (rewritten whole, atomically; a failure to write
    costs the next process a re-timing, so it warns instead of raising). The file says which GPU and
    architecture it was recorded on, so that it can be committed as that model's table as it is."""
    path = cache_dir() / f"{device_slug(gpu.name)}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        configs = _read_table(path)["configs"]
        configs.setdefault(family, {})[key] = config_entry(config)
        table = {"device": gpu.name, "capability": list(gpu.capability), "multiprocessors": gpu.multiprocessors,
                 "triton": triton.__version__, "configs": configs}
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
            json.dump(table, f, indent=1, sort_keys=True)
        os.replace(f.name, path)
    except OSError as e:
        warnings.warn(f"resnet_fast: could not write the tuning cache {path} ({e})", stacklevel=3)
