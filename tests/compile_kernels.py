"""Compiles Triton kernels for an NVIDIA architecture on a machine without a GPU, and reports what the
machine code uses. The compile tests run it as a script, in a process without ``TRITON_INTERPRET``
(their own process interprets the kernels):

    python tests/compile_kernels.py '<JSON list of specs>'

A spec: ``{"kernel": "module:function", "arch": 90, "num_warps": 4, "num_stages": 3,
"constants": {name: value}, "types": {name: "*fp16" | "tensordesc<bf16[64, 64]>" | "fp32" | ...}
(the other arguments are "i32"), "aligned": [names Triton may assume 16-divisible]}``.

Prints a JSON list with, per spec: ``shared`` (bytes), ``ptx`` (counts of the instructions the tests
look for), and ``registers`` / ``stack`` (bytes of stack frame: spills) from the cubin, or None where
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


def _resource_usage(cubin: bytes) -> dict:
    """Registers and stack bytes per thread, from ``cuobjdump --dump-resource-usage``."""
    tool = os.path.join(os.path.dirname(importlib.import_module("triton.backends.nvidia").__file__), "bin",
                        "cuobjdump")
    if not os.path.exists(tool):
        return {"registers": None, "stack": None}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return {k: int(re.search(rf"{tag}:(\d+)", usage).group(1)) for k, tag in (("registers", "REG"), ("stack", "STACK"))}


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
