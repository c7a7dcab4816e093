"""Autotuning: every candidate config of every kernel family computes the right answer, and the choices
persist across processes (:mod:`resnet_fast.kernels.tuning`).

Only one candidate wins for a shape, so testing the autotuned kernel checks one config. Here each
candidate is pinned in turn (:meth:`~resnet_fast.kernels.conv_common.Launcher.pinned`) and checked against
float64 on shapes where it is a candidate: on a GPU, where a config can miscompile (Inductor's Triton
conv template gave wrong results at 8 warps), in every dtype; under the interpreter, which ignores warps
and stages, once per tile shape, in two dtypes (float16 and float32; the stem's weights float32 and
bfloat16).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import requires_cuda
from helpers import (  # noqa: F401 (poisoned_outputs: an autouse fixture)
    DEVICE, INTERPRET, check_conv, check_stem, needs_a_driver, poisoned_outputs, run_on_a_driver, stem_tensors,
)

triton = pytest.importorskip("triton")
from resnet_fast.kernels import conv, conv_common, conv_gather, conv_gemm_tma, conv_patch_tma, stem, tuning  # noqa: E402
from resnet_fast.kernels.conv_common import Launcher, NotACandidate  # noqa: E402

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# float32 with exact products (conftest turns TF32 off: with it on, float32 is torch's), which on a GPU
# only gather takes; the interpreter's bf16 is emulated.
DTYPES = [F32, F16, BF16] if not INTERPRET else [F16, F32]

CONV_FAMILIES = {"gather": conv_gather, "gemm_tma": conv_gemm_tma, "patch_tma": conv_patch_tma}
# Per family, shapes that between them make every candidate a candidate somewhere (checked below):
# (n, C_in, C_out, (H, W), kernel, stride, padding, residual, relu, bn, split-K). Sizes are not
# multiples of the tiles; C_out above 128 keeps the 256-wide tiles.
CONV_SHAPES = {
    "gather": [
        (1, 72, 160, (13, 13), 3, 1, 1, True, True, "affine", 1),  # 169 pixels: large and small-M tiles
        (1, 128, 96, (7, 7), 3, 1, 1, False, True, "float32", 4),  # batch 1's layer4: split-K partials
    ],
    "gemm_tma": [(2, 80, 160, (9, 8), 1, 1, 0, True, True, "affine", 1)],
    "patch_tma": [
        (4, 32, 160, (8, 8), 3, 1, 1, True, True, "affine", 1),  # 8x8 patches, four images: 256-pixel tiles
        (2, 32, 96, (12, 10), 3, 2, 1, False, True, "float32", 1),  # stride 2: four phase views
    ],
}


def _config_id(family: str, config: triton.Config) -> str:
    tile = "x".join(str(config.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "ROWS") if k in config.kwargs)
    return f"{family}-{tile}-s{config.num_stages}-w{config.num_warps}"


def _tiles(config: triton.Config) -> tuple:
    return tuple(sorted(config.kwargs.items()))


def _cases(families: dict) -> list:
    """(family, config) for every candidate; under the interpreter one per tile shape (it ignores warps
    and stages), the others skipped."""
    cases, seen = [], {}
    for family, module in families.items():
        for config in module._GPU_CONFIGS:
            first = seen.setdefault((family, _tiles(config)), _config_id(family, config))
            marks = []
            if INTERPRET and first != _config_id(family, config):
                marks = pytest.mark.skip(reason=f"the interpreter runs the same tiles as {first}")
            cases.append(pytest.param(family, config, id=_config_id(family, config), marks=marks))
    return cases


class _RecordingKernel:
    """Stands in for a launcher's kernel and records the meta-parameters, warps and stages of each launch."""

    def __init__(self, kernel, launches: list):
        self.kernel, self.launches, self.arg_names = kernel, launches, kernel.arg_names

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.launches.append({k: v for k, v in kwargs.items() if k.isupper() or k.startswith("num_")})
            return self.kernel[grid](*args, **kwargs)

        return run


def _record_launches(monkeypatch, launcher: Launcher) -> list:
    launches = []
    monkeypatch.setattr(launcher, "kernel", _RecordingKernel(launcher.kernel, launches))
    return launches


def _assert_launched(launches: list, config: triton.Config) -> None:
    want = tuning.config_entry(config)
    assert launches and all({k: launch.get(k) for k in want} == want for launch in launches), (launches, want)


@pytest.mark.parametrize("family,config", _cases(CONV_FAMILIES))
def test_every_conv_candidate_is_correct(family, config, monkeypatch):
    monkeypatch.setenv(conv.FORCE_VARIABLE, family)
    launcher: Launcher = CONV_FAMILIES[family]._launch
    launches = _record_launches(monkeypatch, launcher)
    ran = []
    for n, c_in, c_out, hw, k, stride, padding, residual, relu, bn, split in CONV_SHAPES[family]:
        monkeypatch.setenv("RESNET_FAST_SPLIT_K", str(split))
        for dtype in DTYPES:
            if dtype == F32 and family != "gather" and not INTERPRET:
                continue  # conv_common.descriptor_unsupported_reason: exact float32 is not wgmma work
            try:
                with launcher.pinned(config):
                    served = check_conv(n, c_in, c_out, hw, (k, k), stride, padding, 1, dtype, True, residual,
                                        relu, bn, residual_channels_last=True)
            except NotACandidate:
                continue
            assert served == {family: 1}, (served, dtype)
            ran.append((c_in, c_out, dtype))
    assert ran, f"{config} is a candidate for none of the shapes here, so nothing checks it"
    _assert_launched(launches, config)


@pytest.mark.parametrize("family,config", _cases({"stem": stem}))
def test_every_stem_candidate_is_correct(family, config, monkeypatch, fused_calls):
    launches = _record_launches(monkeypatch, stem._launch)
    for dtype in [F32, BF16] if INTERPRET else [F32, F16, BF16]:
        fused_calls.clear()
        x = torch.randn(2, 3, 43, 37, device=DEVICE)  # 11 pooled rows: a strip ends early at every ROWS
        with stem._launch.pinned(config):
            check_stem(x, stem_tensors(3, 64, dtype), fused_calls)
    _assert_launched(launches, config)


def test_a_pinned_config_that_pruning_drops_raises():
    widest = conv_gather._GPU_CONFIGS[0]  # 128 x 256: taller and wider than 49 pixels x 40 channels need
    with conv_gather._launch.pinned(widest), pytest.raises(NotACandidate, match="gather: .* not a candidate"):
        check_conv(1, 16, 40, (7, 7), (3, 3), 1, 1, 1, F16, True, False, True)


# ---------------------------------------------------------------- choices that outlive the process

GPU_NAME = "Test GPU 80GB"
GPU_CAPABILITY, GPU_MULTIPROCESSORS = (9, 0), 132
_SHAPE = (1, 16, 40, (7, 7), (3, 3), 1, 1, 1, F16, True, False, True)  # 49 pixels, 40 channels: 5 candidates


@pytest.fixture
def tuned_on_cpu(monkeypatch, tmp_path):
    """The GPU path of the gather family's launcher, on CPU tensors: autotuning on, the interpreter
    running each candidate, a CPU timer counting its calls, a fake GPU name, the tuning cache and the
    committed tables in ``tmp_path``. ``new_process()`` replaces the launcher by a fresh one (no choice
    remembered in memory), as a new process starts."""
    if not INTERPRET:
        pytest.skip("runs the GPU path on CPU tensors")
    monkeypatch.setattr(conv_common, "INTERPRET", False)
    monkeypatch.setattr(conv_common, "AUTOTUNE", True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: GPU_NAME)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: GPU_CAPABILITY)
    monkeypatch.setattr(conv_common, "multiprocessors", lambda device: GPU_MULTIPROCESSORS)
    monkeypatch.setenv("RESNET_FAST_TUNING_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tuning, "COMMITTED", tmp_path / "tuned")
    tuning._committed_tables.cache_clear()
    monkeypatch.setenv(conv.FORCE_VARIABLE, "gather")
    monkeypatch.setenv("RESNET_FAST_SPLIT_K", "1")
    timed = []

    def cpu_timer(kernel_call, quantiles):
        timed.append(kernel_call)
        kernel_call()
        return [float(len(timed))] * len(quantiles)  # the first candidate timed wins

    class State:
        """What the tests read: the timer's calls and the two table files."""

        cache_file = tmp_path / "cache" / "test-gpu-80gb.json"
        committed_file = tmp_path / "tuned" / "test-gpu-80gb.json"

        def __init__(self):
            self.timed = timed

        def new_process(self) -> Launcher:
            tuning._committed_tables.cache_clear()
            launcher = conv_gather._launch.with_timer(cpu_timer)
            monkeypatch.setattr(conv_gather, "_launch", launcher)
            timed.clear()
            return launcher

    yield State()
    tuning._committed_tables.cache_clear()


def _chosen(launcher: Launcher) -> triton.Config:
    (config,) = launcher._chosen.values()
    return config


def _candidates() -> list[triton.Config]:
    nargs = {"x_ptr": torch.empty(0, dtype=F16), "C_out": 40, "M": 49}
    return conv_gather._prune_configs(conv_gather._GPU_CONFIGS, nargs)


def test_a_timed_choice_is_cached_and_the_next_process_times_nothing(tuned_on_cpu):
    first = tuned_on_cpu.new_process()
    check_conv(*_SHAPE)
    assert len(tuned_on_cpu.timed) == len(_candidates()) >= 2
    chosen = _chosen(first)
    table = json.loads(tuned_on_cpu.cache_file.read_text())
    assert table["device"] == GPU_NAME and table["triton"] == triton.__version__
    assert table["capability"] == list(GPU_CAPABILITY) and table["multiprocessors"] == GPU_MULTIPROCESSORS
    (entry,) = table["configs"]["gather"].values()
    assert entry == tuning.config_entry(chosen)

    tuned_on_cpu.timed.clear()
    check_conv(*_SHAPE)  # the same process: the choice is remembered in memory
    assert tuned_on_cpu.timed == []

    second = tuned_on_cpu.new_process()
    check_conv(*_SHAPE)
    assert tuned_on_cpu.timed == [] and _chosen(second) is chosen


def test_the_committed_table_spares_the_timing(tuned_on_cpu):
    slowest = _candidates()[-1]
    tuned_on_cpu.new_process()
    check_conv(*_SHAPE)  # records the key of this call
    (key,) = json.loads(tuned_on_cpu.cache_file.read_text())["configs"]["gather"]
    tuned_on_cpu.cache_file.unlink()
    tuned_on_cpu.committed_file.parent.mkdir()
    tuned_on_cpu.committed_file.write_text(json.dumps(
        {"device": GPU_NAME, "configs": {"gather": {key: tuning.config_entry(slowest)}}}))

    launcher = tuned_on_cpu.new_process()
    check_conv(*_SHAPE)
    assert tuned_on_cpu.timed == [] and _chosen(launcher) is slowest
    assert not tuned_on_cpu.cache_file.exists()  # nothing was timed, so nothing is added


@pytest.mark.parametrize("multiprocessors,timed", [(GPU_MULTIPROCESSORS, False), (114, True)])
def test_a_table_of_the_same_architecture_serves_another_gpu_model(tuned_on_cpu, multiprocessors, timed):
    """A GPU model without a table of its own uses one recorded on another model with the same compute
    capability and multiprocessor count (an H100 SXM the H200's), not one of another architecture."""
    slowest = _candidates()[-1]
    tuned_on_cpu.new_process()
    check_conv(*_SHAPE)
    (key,) = json.loads(tuned_on_cpu.cache_file.read_text())["configs"]["gather"]
    tuned_on_cpu.cache_file.unlink()
    tuned_on_cpu.committed_file.parent.mkdir()
    (tuned_on_cpu.committed_file.parent / "other-gpu-141gb.json").write_text(json.dumps(
        {"device": "Other GPU 141GB", "capability": list(GPU_CAPABILITY), "multiprocessors": multiprocessors,
         "configs": {"gather": {key: tuning.config_entry(slowest)}}}))

    launcher = tuned_on_cpu.new_process()
    check_conv(*_SHAPE)
    assert bool(tuned_on_cpu.timed) is timed
    assert (_chosen(launcher) is slowest) is not timed


def test_a_stored_choice_that_is_no_longer_a_candidate_is_timed_again(tuned_on_cpu):
    tuned_on_cpu.new_process()
    check_conv(*_SHAPE)
    table = json.loads(tuned_on_cpu.cache_file.read_text())
    (key,) = table["configs"]["gather"]
    table["configs"]["gather"][key] = {"BLOCK_M": 48, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4,
                                       "num_stages": 3}  # not in the candidate list
    tuned_on_cpu.cache_file.write_text(json.dumps(table))

    launcher = tuned_on_cpu.new_process()
    check_conv(*_SHAPE)
    assert len(tuned_on_cpu.timed) == len(_candidates())
    stored = json.loads(tuned_on_cpu.cache_file.read_text())["configs"]["gather"][key]
    assert stored == tuning.config_entry(_chosen(launcher))


def test_tuning_off_reads_and_writes_nothing(tuned_on_cpu, monkeypatch):
    tuned_on_cpu.new_process()
    check_conv(*_SHAPE)
    monkeypatch.setenv("RESNET_FAST_TUNING", "0")
    tuned_on_cpu.cache_file.rename(tuned_on_cpu.cache_file.with_suffix(".kept"))
    tuned_on_cpu.new_process()
    check_conv(*_SHAPE)
    assert len(tuned_on_cpu.timed) == len(_candidates()) and not tuned_on_cpu.cache_file.exists()


def test_an_unreadable_cache_is_ignored_with_a_warning(tuned_on_cpu):
    tuned_on_cpu.cache_file.parent.mkdir(parents=True)
    tuned_on_cpu.cache_file.write_text("{not json")
    tuned_on_cpu.new_process()
    with pytest.warns(UserWarning, match="ignoring the tuning table"):
        check_conv(*_SHAPE)
    assert len(tuned_on_cpu.timed) == len(_candidates())
    assert json.loads(tuned_on_cpu.cache_file.read_text())["configs"]["gather"]  # rewritten whole


def test_keys_and_file_names():
    assert tuning.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert tuning.device_slug("NVIDIA H200") == "nvidia-h200"
    nargs = {"x_ptr": torch.empty(2, dtype=BF16), "M": 49, "C_out": 512, "KH": 3, "eps": 1e-5, "w": torch.empty(1)}
    key = tuning.key_of(["M", "C_out", "KH"], nargs)
    assert key == (49, 512, 3, BF16, F32)
    # The batch's arguments (M, N) are written rounded up to a power of two, the others as they are.
    assert tuning.key_text(["M", "C_out", "KH"], key) == "M=64,C_out=512,KH=3,torch.bfloat16,torch.float32"
    assert tuning.key_text(["N", "C_in", "M"], (200, 3, 1)) == "N=256,C_in=3,M=1"
    assert tuning.key_text(["M"], (802816,)) == tuning.key_text(["M"], (524289,)) == "M=1048576"


@pytest.mark.parametrize("dtype", [F16, F32])
def test_gather_candidates_depend_on_m_only_through_its_power_of_two(dtype):
    """What lets a stored choice serve every M its key rounds to (tuning.key_text): the same candidates
    for each M up to the same power of two, small-M tiles included."""
    for top in (64, 4096, 8192, 2**20):
        candidates = {m: conv_gather._prune_configs(conv_gather._GPU_CONFIGS,
                                                    {"x_ptr": torch.empty(0, dtype=dtype), "C_out": 256, "M": m})
                      for m in (top // 2 + 1, top * 3 // 4, top - 1, top)}
        assert len({tuple(map(str, c)) for c in candidates.values()}) == 1, (top, dtype)


def test_a_partial_batch_uses_the_choice_timed_for_the_full_one(tuned_on_cpu):
    """A batch of 3 (147 pixels) after one of 4 (196, the same power of two): nothing is timed; a batch
    of 1 (49 pixels, another power of two) is timed."""
    n, *rest = (4, *_SHAPE[1:])
    tuned_on_cpu.new_process()
    check_conv(n, *rest)
    assert tuned_on_cpu.timed
    launcher = tuned_on_cpu.new_process()
    check_conv(3, *rest)
    assert tuned_on_cpu.timed == [] and len(launcher._chosen) == 1
    check_conv(1, *rest)
    assert tuned_on_cpu.timed


def test_a_shape_first_seen_in_a_graph_capture_is_not_timed_there(tuned_on_cpu, monkeypatch):
    """Timing candidates synchronizes the device, which a CUDA graph capture forbids (and would record every
    candidate's launches into the graph): inside a capture a shape with no choice yet runs the fixed
    config, says so once, and nothing is remembered, so the first call outside times the candidates."""
    from resnet_fast import backends

    launcher = tuned_on_cpu.new_process()
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setattr(conv_common, "capturing", lambda: True)
    with pytest.warns(RuntimeWarning, match="first seen inside a CUDA graph capture"):
        check_conv(*_SHAPE)
    assert tuned_on_cpu.timed == [] and launcher._chosen == {} and not tuned_on_cpu.cache_file.exists()
    monkeypatch.setattr(conv_common, "capturing", lambda: False)
    check_conv(*_SHAPE)
    assert len(tuned_on_cpu.timed) == len(_candidates()) and len(launcher._chosen) == 1


_CAPTURED_CHILD = r"""
import os, warnings
os.environ["RESNET_FAST_AUTOTUNE"] = "1"
import torch
from resnet_fast.kernels import conv_common, conv_gather

conv_common.capturing = lambda: True
device = "cuda" if torch.cuda.is_available() else "cpu"  # on the stub: CPU tensors, nothing runs
if device == "cpu":
    from benchmarks import stub_driver

    stub_driver.launch_as_on_the_h200()  # the device queries a launch makes, answered as the H200's
cl, bf16 = torch.channels_last, torch.bfloat16
x = torch.randn(1, 40, 7, 7, device=device, dtype=bf16).contiguous(memory_format=cl)  # in no committed table
w = torch.randn(40, 40, 3, 3, device=device, dtype=bf16).contiguous(memory_format=cl)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(2):
        conv_gather.conv_bn_act(x, w, None, None, None, None, None, 1e-5, (1, 1), (1, 1), (1, 1), 1, None, True)
assert [str(w.message) for w in caught if "graph capture" in str(w.message)], [str(w.message) for w in caught]
launcher = conv_gather._launch
assert launcher._chosen == {} and launcher._plans == {}, (launcher._chosen, launcher._plans)
((_, _, constexprs),) = launcher.kernel._compiled
fixed = {**launcher.fixed.kwargs, "num_warps": launcher.fixed.num_warps, "num_stages": launcher.fixed.num_stages}
assert {name: value for name, _, value in constexprs if name in fixed} == fixed, constexprs
print("the fixed config, nothing kept")
"""


@needs_a_driver
def test_a_launch_inside_a_capture_keeps_no_plan():
    """The compiled path (DirectLaunch, on the stub driver or a GPU): a capture's fixed config is launched
    but neither chosen nor kept as the signature's plan, which would otherwise serve every later call."""
    assert "the fixed config, nothing kept" in run_on_a_driver(_CAPTURED_CHILD)


def _committed_tables() -> list:
    return sorted(tuning.COMMITTED.glob("*.json"))


@pytest.mark.skipif(not _committed_tables(), reason="no committed tuning table yet (a GPU session records them)")
def test_committed_tables_name_only_candidate_configs():
    families = {**CONV_FAMILIES, "stem": stem}
    for path in _committed_tables():
        table = json.loads(path.read_text())
        assert path.stem == tuning.device_slug(table["device"]), path
        assert len(table["capability"]) == 2 and table["multiprocessors"] > 0, path  # its architecture
        for family, entries in table["configs"].items():
            known = [tuning.config_entry(c) for c in families[family]._GPU_CONFIGS]
            assert all(entry in known for entry in entries.values()), (path, family)


@requires_cuda
def test_a_second_process_times_nothing_gpu(tmp_path):
    """On the GPU, end to end: a resnet18 forward in a fresh process fills the cache; a second process
    with that cache runs the same forward without timing a candidate."""
    script = (
        "import torch, resnet_fast, triton, triton.testing\n"
        "from resnet_fast.kernels import conv_gather\n"
        "timed = []\n"
        "bench = lambda f, quantiles: timed.append(1) or triton.testing.do_bench(f, quantiles=quantiles)\n"
        "conv_gather._launch = conv_gather._launch.with_timer(bench)\n"
        "m = resnet_fast.resnet18().eval().cuda().to(memory_format=torch.channels_last).half()\n"
        "with torch.no_grad(), resnet_fast.backend('triton'):\n"
        "    m(torch.randn(2, 3, 64, 64, device='cuda').half())\n"
        "print(len(timed))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RESNET_FAST_AUTOTUNE", "RESNET_FAST_TUNED_DIR")}
    env.update(RESNET_FAST_TUNING_CACHE=str(tmp_path), RESNET_FAST_CONV_KERNEL="gather")
    runs = [subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
            for _ in range(2)]
    first, second = (int(r.stdout.split()[-1]) for r in runs)
    assert first > 0 and second == 0, (first, second)
    assert list(tmp_path.glob("*.json"))
