"""resnet_fast.kernels.launch: DirectLaunch calls a compiled kernel exactly as Triton's own launch would.

Two checks. :func:`~resnet_fast.kernels.launch.signature` must tell apart every pair of arguments that
Triton compiles different kernels for (it may split more finely, never less), against Triton's own
specialization function. And the launches themselves, on Triton's driver over the stub libcuda
(benchmarks/stub_driver.py, no GPU needed) or on a GPU: what reaches the driver from a DirectLaunch call is
what Triton's ``kernel[grid](...)`` passes, for the split-K reduction, add_relu and the gather convolution
(45 arguments, None pointers among them, launched from the plan its Launcher keeps), and a misaligned
tensor gets a kernel of its own.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.runtime.jit import native_specialize_impl

from helpers import needs_a_driver, run_on_a_driver
from resnet_fast.kernels.launch import cdiv, next_power_of_2, signature


def _values() -> list:
    buffers = {dtype: torch.zeros(64, dtype=dtype) for dtype in (torch.float16, torch.bfloat16, torch.float32)}
    tensors = [buf[offset:] for buf in buffers.values() for offset in (0, 1, 4, 8)]
    ints = [0, 1, 2, 3, 8, 15, 16, 17, 32, 48, -1, -16, 2**31 - 16, 2**31 - 1, 2**31, 2**31 + 16, 2**40, 2**63 - 16,
            2**63, -(2**31), -(2**31) - 16]
    return [*tensors, torch.nn.Parameter(torch.zeros(8)), *ints, 0.0, 1.0, 1e-5, -0.0, True, False, None]


def test_signature_is_at_least_as_fine_as_tritons_specialization():
    backend = CUDABackend(GPUTarget("cuda", 90, 32))

    def triton_key(v):
        return native_specialize_impl(backend, v, False, True, True)

    values = _values()
    keys = [signature([v]) for v in values]
    for (a, key_a), (b, key_b) in itertools.combinations(zip(values, keys), 2):
        if key_a == key_b:
            assert triton_key(a) == triton_key(b), (a, b, triton_key(a), triton_key(b))
    hash(tuple(keys))  # the launch cache's keys


def test_integer_helpers():
    for a in range(0, 70):
        for b in (1, 2, 3, 16, 64):
            assert cdiv(a, b) == -(-a // b) == (a + b - 1) // b
    assert [next_power_of_2(n) for n in (0, 1, 2, 3, 4, 5, 49, 64, 65, 3136)] == [1, 1, 2, 4, 4, 8, 64, 64, 128, 4096]


_CHILD = r"""
import os
os.environ["RESNET_FAST_AUTOTUNE"] = "0"  # the fixed config: the stub cannot time an autotuning
import torch
from triton.compiler.compiler import LazyDict
from resnet_fast.kernels import conv_gather
from resnet_fast.kernels.add_relu import _add_relu
from resnet_fast.ops import layout

device = "cuda" if torch.cuda.is_available() else "cpu"  # on the stub: CPU tensors, nothing runs

def same(a, b):
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, LazyDict):  # the launch metadata for hooks: built afresh at each launch
        return isinstance(b, LazyDict) and a.get() == b.get()
    return a is b or (not isinstance(a, torch.Tensor) and a == b)

def record(kernels, call):
    # (kernel, arguments) of every launch that reaches the driver, at the compiled kernels' launchers.
    records = []
    for kernel in kernels:
        launcher = kernel.run
        launcher.__dict__.setdefault("driver_launch", launcher.launch)
        launcher.launch = lambda *a, k=kernel, l=launcher: (records.append((k, a)), l.driver_launch(*a))[1]
    call()
    return records

def check(directs, call):
    # The call's DirectLaunch launches against the same call's launches by Triton: DirectLaunch's cache
    # emptied, so that each launch is Triton's own again (which refills it). Returns the kernels used.
    call()  # compiles
    kernels = [k for d in directs for k in d._compiled.values()]
    ours = record(kernels, call)
    for d in directs:
        d._compiled.clear()
    theirs = record(kernels, call)
    assert ours and same(ours, theirs), (ours, theirs)
    return [k for k, _ in ours]

# add_relu, aligned and misaligned (a 2-byte offset: Triton specializes pointers on 16-byte alignment).
buf = torch.randn(3 * 4097, device=device, dtype=torch.bfloat16)
used = []
for offset in (0, 1):
    x, y, out = (buf[offset + i * 4097:][:4096] for i in range(3))
    used += check([_add_relu], lambda: _add_relu[(1,)](x, y, out, 4096, BLOCK=4096, num_warps=8))
assert len(used) == 2 and used[0] is not used[1], used

# The gather convolution with split-K (both its kernels, 45 and 21 arguments, None pointers among them)
# through the family's launcher, into one output and workspace buffer so that the calls' arguments match.
n, c, h = 1, 64, 7
x = torch.randn(n, c, h, h, device=device, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
w = torch.randn(c, c, 3, 3, device=device, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
v = [torch.rand(c, device=device) + 0.5 for _ in range(4)]
fixed = layout.empty_conv_output(x, w, h, h)
layout.empty_conv_output = lambda *a, **k: fixed
workspace = torch.empty(4, n * h * h, c, device=device)
conv_gather._workspace = lambda split, m, c_out, device: workspace
os.environ["RESNET_FAST_SPLIT_K"] = "4"
used = check([conv_gather._launch.kernel, conv_gather._split_k_reduce],
             lambda: conv_gather.conv_bn_act(x, w, None, *v, 1e-5, (1, 1), (1, 1), (1, 1), 1, None, True))
assert len(used) == 2, used
# The launcher kept one plan (config, grid) for the call; a batch of two is another signature, with its
# own plan and grid.
plans = conv_gather._launch._plans
assert len(plans) == 1, plans.keys()
x2 = torch.randn(2, c, h, h, device=device, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
conv_gather.conv_bn_act(x2, w, None, *v, 1e-5, (1, 1), (1, 1), (1, 1), 1, None, True)
assert len(plans) == 2 and len({grid for grid, _ in plans.values()}) == 2, plans.values()
print("launches match")
"""

_CHILD_DISABLED = r"""
import os
os.environ["RESNET_FAST_DIRECT_LAUNCH"] = "0"
from resnet_fast.kernels import conv_gather
assert not conv_gather._launch.kernel.compiles and not conv_gather._split_k_reduce.compiles
print("Triton launches")
"""


@needs_a_driver
def test_direct_launches_pass_the_driver_what_tritons_launches_pass():
    assert "launches match" in run_on_a_driver(_CHILD)


@needs_a_driver
def test_direct_launch_can_be_turned_off():
    assert "Triton launches" in run_on_a_driver(_CHILD_DISABLED)
