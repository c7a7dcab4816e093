"""Compiles Triton kernels for an NVIDIA architecture on a machine without a GPU, and reports what the
machine code uses. The compile tests run it as a script, in a process without ``TRITON_INTERPRET``
(their own process interprets the kernels):

    python tests/compile_kernels.py '<JSON list of specs>'

A spec: ``{"kernel": "module:function", "arch": 90, "num_warps": 4, "num_stages": 3,
"constants": {name: value}, "types": {name: "*fp16" | "tensordesc<bf16[64, 64]>" | "fp32" | ...}
(the other arguments are "i32"), "aligned": [names Triton may assume 16-divisible]}``.

Prints a JSON list with, per spec: ``shared`` (bytes), ``ptx`` (counts of the instructions the tests
look for), and from the cubin ``registers``, ``stack`` (bytes of stack frame: spills) and ``loop_spills``
(local-memory loads and stores, ``LDL``/``STL``, inside the machine code's loops: spills that the main
loop pays on every K block, as opposed to once per tile in the prologue or epilogue), or None where
Triton ships no ``cuobjdump``. Compiling catches what the interpreter cannot: types, ``tl.dot`` shapes,
shared memory per pipeline stage, the instructions chosen and ptxas's register allocation.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

PTX_INSTRUCTIONS = ("cp.async.bulk.tensor", "wgmma.mma_async", "mma.sync", "cp.async.", "ld.local", "st.local")


def _loop_spills(sass: str) -> int:
    """``LDL``/``STL`` instructions inside loops of ``cuobjdump -sass`` output. A loop is the address
    range from a backward branch's target up to the branch (``/*addr*/ ... BRA 0xtarget``)."""
    code = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = [(int(t.group(1), 16), addr) for addr, ins in code
             if (t := re.search(r"\bBRA\s+0x([0-9a-f]+)", ins)) and int(t.group(1), 16) < addr]
    return sum(1 for addr, ins in code if re.search(r"\b(LDL|STL)\b", ins) and any(a <= addr <= b for a, b in loops))


def _resource_usage(cubin: bytes) -> dict:
    """Registers and stack bytes per thread (``cuobjdump --dump-resource-usage``) and the spills inside
    loops (``cuobjdump -sass``)."""
    tool = os.path.join(os.path.dirname(importlib.import_module("triton.backends.nvidia").__file__), "bin",
                        "cuobjdump")
    if not os.path.exists(tool):
        return {"registers": None, "stack": None, "loop_spills": None}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True).stdout
    found = {k: int(re.search(rf"{tag}:(\d+)", usage).group(1)) for k, tag in (("registers", "REG"), ("stack", "STACK"))}
    return {**found, "loop_spills": _loop_spills(sass)}


def compile_spec(spec: dict) -> dict:
    module, name = spec["kernel"].split(":")
    jit = getattr(importlib.import_module(module), name)
    while not isinstance(jit, triton.runtime.JITFunction):  # under @triton.heuristics / @triton.autotune
        jit = jit.fn
    constants = spec["constants"]
    signature = {n: "constexpr" if n in constants else spec["types"].get(n, "i32") for n in jit.arg_names}
    attrs = {(jit.arg_names.index(n),): [["tt.divisibility", 16]] for n in spec.get("aligned", ())}
    kernel = triton.compile(ASTSource(jit, signature, constants, attrs), target=GPUTarget("cuda", spec["arch"], 32),
                            options=dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"]))
    ptx = kernel.asm["ptx"]
    return {"shared": kernel.metadata.shared, "ptx": {i: ptx.count(i) for i in PTX_INSTRUCTIONS},
            **_resource_usage(kernel.asm["cubin"])}


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    print(json.dumps([compile_spec(s) for s in json.loads(sys.argv[1])]))
