"""What the gather convolution's main loop costs in machine instructions, without running it.

For a set of representative (tile config, ResNet-50 layer) pairs, this compiles the gather kernel for
sm_90 as a launch would (the family's launcher, the config pinned) and reads its SASS: registers, local
memory (spills), and the instructions of the main loop (the backward branch enclosing the wgmma
instructions), with how many of them are wgmma. Per K block, every warp issues each loop instruction
once, so a loop that issues more than its wgmma need cycles is bound by instruction issue, not by the
tensor cores (BENCHMARKS.md, "The gather kernel's main loop").

    python3 -m benchmarks.kernel_sass              # on a GPU; without one, on the stub driver (stub_driver.py)
    python3 -m benchmarks.kernel_sass --cases 1    # the first case only

The batch-256 layers compile at batch 2: the kernel's code does not depend on the number of pixels.

The counts are static: they say what each iteration issues, not how long it waits. Speed is for the
kernel benchmarks on a GPU to say.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import tempfile

# (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps), then (kernel, C_in, C_out, H, stride, batch, split-K):
# the 16-bit tiles the H200 table picks most, on the layers they serve (batch 256 and batch 1).
CASES = [
    ((128, 64, 64, 4, 4), (3, 64, 64, 56, 1, 2, 1)),
    ((128, 128, 64, 4, 8), (3, 128, 128, 28, 1, 2, 1)),
    ((128, 256, 64, 3, 8), (3, 256, 256, 14, 1, 2, 1)),
    ((256, 128, 64, 3, 8), (3, 128, 128, 56, 2, 2, 1)),
    ((128, 64, 64, 4, 4), (1, 256, 64, 56, 1, 2, 1)),
    ((64, 128, 64, 4, 4), (3, 512, 512, 7, 1, 1, 16)),
    ((16, 128, 64, 4, 4), (1, 1024, 256, 14, 1, 1, 4)),
    # The 7x7 stem on 3 channels (K flattened over taps and channels), as the table runs it when the
    # stem op is the gather convolution and a max-pool.
    ((64, 64, 32, 4, 8), (7, 3, 64, 224, 2, 2, 1)),
    ((64, 32, 32, 5, 4), (7, 3, 64, 224, 2, 1, 1)),
]

_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s*(.*?)\s*;")


def _cuobjdump() -> str:
    import triton

    return str(pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def main_loop(sass: str) -> list[str]:
    """The instructions of the innermost loop (the shortest span of a backward branch) that holds a wgmma
    (or mma). Innermost, because a longer span can enclose the epilogue too (a barrier's retry branch in
    the TMA kernels does)."""
    code = [(int(m.group(1), 16), m.group(2)) for m in map(_INSTRUCTION.match, sass.splitlines()) if m]
    best: list[str] | None = None
    for at, text in code:
        branch = re.search(r"\bBRA (?:`\()?(0x[0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < at:
            body = [t for a, t in code if int(branch.group(1), 16) <= a <= at]
            if any("MMA" in t for t in body) and (best is None or len(body) < len(best)):
                best = body
    return best or []


def compile_case(config: tuple, layer: tuple):
    """The CompiledKernel of the gather kernel for ``layer`` with ``config`` pinned (bf16, channels_last)."""
    import torch
    import triton

    from benchmarks.bench_utils import ConvShape, conv_bn_act_arguments
    from resnet_fast.kernels import conv_gather

    bm, bn, bk, stages, warps = config
    k, c_in, c_out, h, stride, batch, split = layer
    device = "cuda" if torch.cuda.is_available() else "cpu"
    call = conv_bn_act_arguments(ConvShape(c_in, c_out, k, stride, k // 2, h, "relu"), device, batch)
    pinned = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=stages,
                           num_warps=warps)
    direct = conv_gather._launch.kernel
    if not direct.compiles:
        raise SystemExit("needs compiled kernels: unset TRITON_INTERPRET and RESNET_FAST_DIRECT_LAUNCH")
    direct._compiled.clear()
    os.environ["RESNET_FAST_SPLIT_K"] = str(split)
    with conv_gather._launch.pinned(pinned):
        conv_gather.conv_bn_act(*call)
    (compiled,) = direct._compiled.values()
    return compiled


def describe(compiled) -> str:
    """Registers, local memory (bytes per thread) and the main loop's instructions and wgmma count."""
    with tempfile.TemporaryDirectory() as folder:
        cubin = pathlib.Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_cuobjdump(), "-res-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([_cuobjdump(), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    registers = re.search(r"REG:(\d+)", usage).group(1)
    local = re.search(r"LOCAL:(\d+)", usage).group(1)
    loop = main_loop(sass)
    mma = sum("MMA" in t for t in loop)
    return f"{registers:>4} {local:>6} {len(loop):>6} {mma:>5}"


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, help="only the first N cases")
    args = parser.parse_args()
    from benchmarks import stub_driver

    stub_driver.rerun_without_gpu(__spec__.name, sys.argv[1:])
    import torch
    import triton

    print(f"{'tile (M x N x K, stages, warps)':<28} {'layer (bf16)':<34} {'regs':>4} {'local':>6} {'loop':>6} "
          f"{'wgmma':>5}")
    for config, layer in CASES[: args.cases]:
        bm, bn, bk, stages, warps = config
        k, c_in, c_out, h, stride, batch, split = layer
        tile = f"{bm}x{bn}x{bk}, {stages}, {warps}"
        name = f"{k}x{k}s{stride}-{c_in}to{c_out}-{h}px b{batch} split {split}"
        print(f"{tile:<28} {name:<34} {describe(compile_case(config, layer))}")
    where = "stub driver (sm_90)" if stub_driver.active() else torch.cuda.get_device_name()
    print(f"compiled for {where}; torch {torch.__version__}, triton {triton.__version__}")


if __name__ == "__main__":
    main()
