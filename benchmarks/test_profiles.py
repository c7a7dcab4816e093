"""The GPU-time profilers on CPU: benchmarks/graph_profile.py (its arithmetic on made-up records, and the
whole script on CPU op records) and benchmarks/ncu_layers.py (the ncu target on the stub driver, the
summary of a raw CSV as ncu writes it)."""
from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

from benchmarks import graph_profile, ncu_layers
from benchmarks.graph_profile import Record

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _call(offset: float) -> list[Record]:
    """A made-up call: an input copy, two convolutions with a split-K reduction after the second, a
    pool, the classifier; 1 us between records."""
    names_and_lengths = [("copy_kernel", 2), ("_conv_gather_kernel", 10), ("_conv_gather_kernel", 30),
                         ("_split_k_reduce_kernel", 3), ("max_pool2d_kernel", 4), ("sm90_xmma_gemm_bf16", 5)]
    records, t = [], offset
    for name, length in names_and_lengths:
        records.append(Record(name, t, t + length))
        t += length + 1
    return records


def test_a_calls_time_splits_into_categories_and_gaps():
    records = _call(100.0) + _call(0.0)  # out of order: the split sorts by start
    calls = graph_profile.split_calls(records, 2)
    summary = graph_profile.summarize(calls, top=2)
    assert summary["records"] == 6
    assert summary["busy"] == 54 and summary["span"] == 59  # five 1-us gaps
    assert summary["categories"] == {"conv gather": (2, 40), "classifier": (1, 5), "pooling": (1, 4),
                                     "split-K reduce": (1, 3), "copy": (1, 2)}
    assert summary["longest"] == [(2, "_conv_gather_kernel", 30), (1, "_conv_gather_kernel", 10)]
    text = graph_profile.format_summary("made up", summary)
    assert "busy 54.0 us, between records 5.0 us" in text and "\n  conv gather         2 records      40.0 us" in text


def test_calls_that_differ_are_refused():
    with pytest.raises(ValueError, match="do not divide"):
        graph_profile.split_calls(_call(0.0) + _call(100.0)[:-1], 2)
    other = [Record("other_kernel", r.start, r.end) if i == 1 else r for i, r in enumerate(_call(100.0))]
    with pytest.raises(ValueError, match="same sequence"):
        graph_profile.split_calls(_call(0.0) + other, 2)


def test_nested_cpu_ops_count_once():
    outer, inner, after = Record("aten::conv2d", 0, 10), Record("aten::convolution", 1, 9), Record("aten::relu", 10, 12)
    assert graph_profile.outermost([inner, after, outer]) == [outer, after]


@pytest.mark.parametrize("name,expected", [
    ("_conv_gather_kernel", "conv gather"), ("_conv1x1_gemm_kernel", "conv gemm_tma"),
    ("_conv_patch_kernel", "conv patch_tma"), ("_stem_kernel", "stem"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "torch conv"),
    ("void at::native::batch_norm_transform_input_channels_last_kernel", "batch norm"),
    ("void at::native::(anonymous namespace)::max_pool_forward_nhwc", "pooling"),
    ("Memcpy DtoD (Device -> Device)", "copy"), ("something_new", "other"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::direct_copy_kernel_cuda(...)>", "copy"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::(anonymous namespace)::launch_clamp_scalar>",
     "elementwise"),
])
def test_kernel_names_map_to_categories(name, expected):
    assert graph_profile.category(name) == expected


def test_the_graph_profile_runs_end_to_end_on_cpu(capsys):
    """The script's whole path (the two models built with the same weights, profiled calls, the report)
    on CPU op records of eager forwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        graph_profile.main(["--device", "cpu", "--arch", "tiny_resnet10", "--calls", "3", "--dtype", "fp32"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for model in ("resnet_fast", "torchvision"):
        assert f"{model} tiny_resnet10 b1 fp32 (eager, CPU ops): " in out, out
    assert "aten::conv2d" in out and "device: cpu" in out, out


_RAW_CSV = """==PROF== Connected to process 1234
"ID","Process ID","Kernel Name","gpu__time_duration.sum","dram__throughput.avg.pct_of_peak_sustained_elapsed",\
"sm__throughput.avg.pct_of_peak_sustained_elapsed","sm__inst_issued.avg.pct_of_peak_sustained_active",\
"sm__warps_active.avg.pct_of_peak_sustained_active","launch__registers_per_thread",\
"smsp__average_warps_issue_stalled_long_scoreboard_per_issue_active.ratio",\
"smsp__average_warps_issue_stalled_barrier_per_issue_active.ratio",\
"smsp__average_warps_issue_stalled_wait_per_issue_active.ratio",\
"smsp__average_warps_issue_stalled_mio_throttle_per_issue_active.ratio",\
"l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum","l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum"
"","","","nsecond","%","%","%","%","register/thread","ratio","ratio","ratio","ratio","",""
"0","1234","_conv_gather_kernel","193,456","41.5","35.2","60.1","12.4","168","7.25","1.5","0.75","3.0","1,024","2,048"
"1","1234","_conv1x1_gemm_kernel","150,000","55.0","30.0","20.0","11.0","154","2.0","9.0","0.5","","0","0"
"""


def test_the_ncu_summary_reads_a_raw_csv(tmp_path, capsys):
    path = tmp_path / "raw.csv"
    path.write_text(_RAW_CSV)
    kernels = ncu_layers.read_raw_csv(str(path))
    assert [k["Kernel Name"] for k in kernels] == ["_conv_gather_kernel", "_conv1x1_gemm_kernel"]  # no units row
    rows = ncu_layers.summary_rows(kernels, ["1x1s1-256to1024-14px-add_relu gather", "1x1s1-256to1024-14px-add_relu "
                                                                                     "gemm_tma"])
    assert rows[0] == ["1x1s1-256to1024-14px-add_relu gather", "_conv_gather_kernel", "193.5", "41.5", "35.2",
                       "60.1", "12.4", "168.0", "long_scoreboard 7.2, mio_throttle 3.0, barrier 1.5", "3072"]
    assert rows[1][-2] == "barrier 9.0, long_scoreboard 2.0, wait 0.5"  # an empty value is left out
    manifest = tmp_path / "manifest.txt"
    manifest.write_text("only one\n")
    ncu_layers.summary(str(path), str(manifest))
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("layer family") and "kernel 1 (the manifest has 1 launches for 2" in out


@pytest.mark.skipif(shutil.which("gcc") is None, reason="builds the stub libcuda with gcc")
@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, run profiles the real kernels (under ncu)")
def test_the_ncu_target_launches_every_family_on_the_stub(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RESNET_FAST_CONV_KERNEL")}
    env.update(TMPDIR=str(tmp_path), RESNET_FAST_AUTOTUNE="0")  # the stub cannot time an autotuning
    manifest = tmp_path / "manifest.txt"
    done = subprocess.run([sys.executable, "-m", "benchmarks.ncu_layers", "run", "--batch", "2", "--manifest",
                           str(manifest), "--layers", "1x1s1-256to64-56px-relu", "3x3s1-64to64-56px-relu",
                           "7x7s2-3to64-224px-relu"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert manifest.read_text().splitlines() == [
        "1x1s1-256to64-56px-relu gather", "1x1s1-256to64-56px-relu gemm_tma", "3x3s1-64to64-56px-relu gather",
        "3x3s1-64to64-56px-relu patch_tma", "7x7s2-3to64-224px-relu gather",  # no TMA family takes 3 channels
    ]


def test_unknown_layers_are_named():
    with pytest.raises(SystemExit, match="unknown layers"):
        ncu_layers._layer_shapes(["1x1s1-3to3-1px-relu"])
