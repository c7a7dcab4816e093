"""First-call cost: how long the first eval forward of a resnet_fast model takes in a fresh process.

On a GPU the first forward compiles the Triton kernels for each convolution shape and autotunes them;
Triton keeps compiled kernels in its cache directory and resnet_fast keeps the autotuner's choices
(:mod:`resnet_fast.kernels.tuning`). Each ``--case`` runs one fresh process with its own caches and prints
the first forward's seconds, the next forward's milliseconds, and how many kernels were compiled and
choices timed:

* ``cold``: empty caches, no committed table (a fresh machine before any table was recorded);
* ``warm``: the caches ``cold`` left (a second process on the same machine);
* ``table``: an empty Triton cache and no tuning cache, but ``cold``'s choices given as the committed
  table (a fresh machine of a GPU model with a committed table); without an earlier ``cold`` in
  ``--work``, the package's own committed tables.

    python3 benchmarks/first_call.py                           # resnet50, batch 256, bf16 on a GPU
    python3 benchmarks/first_call.py --case warm --case table  # after an earlier cold run in --work
    python3 benchmarks/first_call.py --json first_call.json

On CPU the model runs on the reference backend (nothing is compiled): a small default that checks the
script works.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

CASES = ("cold", "warm", "table")

_CHILD = """
import json, sys, time, torch, resnet_fast
arch, batch, size, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), getattr(torch, sys.argv[4])
device = "cuda" if torch.cuda.is_available() else "cpu"
model = getattr(resnet_fast, arch)().eval().to(device, dtype).to(memory_format=torch.channels_last)
x = torch.randn(batch, 3, size, size, device=device, dtype=dtype).to(memory_format=torch.channels_last)
sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
times = []
with torch.no_grad():
    for _ in range(2):
        sync()
        t0 = time.perf_counter()
        model(x)
        sync()
        times.append(time.perf_counter() - t0)
print(json.dumps({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                  "first_s": round(times[0], 3), "second_ms": round(times[1] * 1e3, 3)}))
"""


def _files(d: pathlib.Path) -> int:
    return sum(1 for p in d.rglob("*") if p.is_file()) if d.exists() else 0


def _choices(d: pathlib.Path) -> int:
    return sum(len(entries) for p in d.glob("*.json") for entries in json.loads(p.read_text())["configs"].values())


def run_case(case: str, work: pathlib.Path, arch: str, batch: int, size: int, dtype: str) -> dict:
    """One fresh process for ``case`` (see the module docstring); its caches live under ``work``."""
    triton_cache, tuning_cache, tuned_dir = work / "triton", work / "tuning", work / "tuned"
    if case == "cold":
        shutil.rmtree(work, ignore_errors=True)
    elif case == "table":
        tuned_dir.mkdir(parents=True, exist_ok=True)
        for table in tuning_cache.glob("*.json"):
            shutil.copy(table, tuned_dir / table.name)
        shutil.rmtree(triton_cache, ignore_errors=True)
        shutil.rmtree(tuning_cache, ignore_errors=True)
    env = {**os.environ, "TRITON_CACHE_DIR": str(triton_cache), "RESNET_FAST_TUNING_CACHE": str(tuning_cache)}
    env.pop("RESNET_FAST_AUTOTUNE", None)
    if case != "table":  # cold and warm: no committed table either
        (work / "no-table").mkdir(parents=True, exist_ok=True)
        env["RESNET_FAST_TUNED_DIR"] = str(work / "no-table")
    elif any(tuned_dir.glob("*.json")):  # cold's choices; else the package's committed tables
        env["RESNET_FAST_TUNED_DIR"] = str(tuned_dir)
    before = _files(triton_cache)
    done = subprocess.run([sys.executable, "-c", _CHILD, arch, str(batch), str(size), dtype], env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the {case} process failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"case": case, "arch": arch, "batch": batch, "size": size, "dtype": dtype, **result,
            "triton_cache_files_added": _files(triton_cache) - before,
            "tuning_choices": _choices(tuning_cache) if tuning_cache.exists() else 0}


def main(argv: list[str] | None = None) -> list[dict]:
    import torch

    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", action="append", choices=CASES, help="default: all three, in order")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch", type=int, default=256 if cuda else 1)
    p.add_argument("--size", type=int, default=224 if cuda else 64)
    p.add_argument("--dtype", default="bfloat16" if cuda else "float32")
    p.add_argument("--work", type=pathlib.Path, default=pathlib.Path(tempfile.gettempdir()) / "resnet_fast-first-call",
                   help="where the cases keep their caches (cold empties it)")
    p.add_argument("--json", type=pathlib.Path, help="also write the results here")
    args = p.parse_args(argv)
    results = []
    print(f"{'case':<6} {'device':<24} {'first forward s':>15} {'next ms':>9} {'compiled files':>14} {'choices':>7}")
    for case in args.case or CASES:
        r = run_case(case, args.work, args.arch, args.batch, args.size, args.dtype)
        results.append(r)
        print(f"{case:<6} {r['device']:<24} {r['first_s']:>15.3f} {r['second_ms']:>9.3f} "
              f"{r['triton_cache_files_added']:>14} {r['tuning_choices']:>7}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
