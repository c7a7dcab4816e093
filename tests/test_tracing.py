"""The same fused ops in every execution mode: eager, torch.fx, TorchScript (scripted and traced),
torch.compile, torch.export.

Each mode must give the eager result, its graph must contain the fused op (not the plain modules), and
in strict mode the kernel backend must be the one that ran. The Triton cases run through the
interpreter on CPU, so they use a tiny network.
"""

import io
import warnings

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import resnet_fast
from resnet_fast import backends
from resnet_fast.testing import randomize_batch_norm
from conftest import rel_err
from helpers import model_pair

FUSED = "resnet_fast.conv_bn_act"


def _script(model: nn.Module) -> torch.jit.ScriptModule:
    """torch.jit.script, then a save/load round trip as torchvision's own test_models does."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated upstream
        scripted = torch.jit.script(model)
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
        buffer.seek(0)
        return torch.jit.load(buffer)


def _graph_text(mode: str, model: nn.Module, x: torch.Tensor) -> tuple[str, torch.Tensor]:
    """(the graph the mode builds, as text; the output of running it). The module that ran is
    ``model`` itself, or for "script" a reloaded copy, left in ``_graph_text.ran``."""
    _graph_text.ran = model
    if mode == "eager":
        return FUSED, model(x)
    if mode == "fx":
        gm = torch.fx.symbolic_trace(model)
        return str(gm.graph), gm(x)
    if mode == "script":
        scripted = _graph_text.ran = _script(model)
        return str(scripted.inlined_graph).replace("::", "."), scripted(x)
    if mode == "trace":
        traced = torch.jit.trace(model, x)
        return str(traced.inlined_graph).replace("::", "."), traced(x)
    if mode == "compile":
        graphs = []

        def keep(gm, example_inputs):
            graphs.append(str(gm.graph))
            return gm.forward

        torch._dynamo.reset()
        out = torch.compile(model, fullgraph=True, backend=keep)(x)
        return "\n".join(graphs), out
    if mode == "export":
        exported = torch.export.export(model, (x,))
        return str(exported.graph), exported.module()(x)
    raise AssertionError(mode)


MODES = ["eager", "fx", "script", "trace", "compile", "export"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_every_mode_runs_the_fused_op_and_matches(arch, mode):
    tv, rf = model_pair(arch)
    tv.eval(), rf.eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = tv(x)
        graph, out = _graph_text(mode, rf, x)
    assert FUSED in graph and "batch_norm" not in graph.replace("batch_norm_act", "")
    assert rel_err(out, expected) <= 1e-5


@pytest.mark.parametrize("mode", ["fx", "script", "compile", "export"])
def test_train_mode_graphs_keep_the_statistics_update(mode):
    """Training graphs call batch_norm_act and update_running_stats (an FX graph calls norm_act, which
    calls them: one node per BatchNorm, see traced_conv_norm_act), so running statistics and
    num_batches_tracked move exactly as in eager mode (FX and TorchScript included)."""
    _, rf = model_pair("resnet18", num_classes=4)
    rf.train()
    eager = resnet_fast.resnet18(num_classes=4).train()
    eager.load_state_dict(rf.state_dict())
    # 32 values per channel at layer4: batch statistics over fewer can amplify rounding without bound.
    x = torch.randn(8, 3, 64, 64)
    graph, out = _graph_text(mode, rf, x)
    expected = eager(x)
    if mode == "fx":
        assert "resnet_fast.ops.functional.norm_act" in graph and "update_running_stats" not in graph
    else:
        assert "resnet_fast.batch_norm_act" in graph and "resnet_fast.update_running_stats" in graph
    assert rel_err(out, expected) <= 1e-5
    for (name, a), (_, b) in zip(_graph_text.ran.named_buffers(), eager.named_buffers()):
        assert rel_err(a.float(), b.float()) <= 1e-5, name


@pytest.mark.parametrize("mode", MODES)
def test_strict_triton_backend_serves_every_mode(mode):
    """On a tiny CIFAR-stem net (the interpreter on CPU): the fused kernel, not a fallback, ran."""
    net = randomize_batch_norm(resnet_fast.ResNet(resnet_fast.Bottleneck, [1, 1], widths=(4, 8), stem="cifar",
                                                  num_classes=3)).eval()
    if torch.cuda.is_available():
        net = net.cuda()
    x = torch.randn(2, 3, 8, 8, device=net.conv1.weight.device)
    with torch.no_grad():
        expected = net(x)
        with resnet_fast.backend("triton", strict=True), backends.record_dispatch() as calls:
            graph, out = _graph_text(mode, net, x)
    assert FUSED in graph
    assert calls[("conv_bn_act", "triton")] >= 8 and set(calls) == {("conv_bn_act", "triton")}
    assert rel_err(out, expected) <= 1e-5


@pytest.mark.parametrize("norm", ["group", "frozen"])
def test_script_other_norms(norm):
    """TorchScript scripts non-BatchNorm norms unfused and FrozenBatchNorm2d fused, matching eager."""
    layer = (lambda c: nn.GroupNorm(4, c)) if norm == "group" else FrozenBatchNorm2d
    tv, rf = model_pair("resnet18", norm_layer=layer)
    tv.eval(), rf.eval()
    x = torch.randn(1, 3, 32, 32)
    scripted = _script(rf)
    with torch.no_grad():
        assert rel_err(scripted(x), tv(x)) <= 1e-5
    assert (FUSED.replace(".", "::") in str(scripted.inlined_graph)) == (norm == "frozen")


def test_script_refuses_norms_it_cannot_fuse_faithfully():
    rf = resnet_fast.resnet18(norm_layer=nn.SyncBatchNorm)
    with pytest.raises(NotImplementedError, match="SyncBatchNorm"):
        _script(rf)


def test_export_with_dynamic_batch_and_image_size():
    """A serving export (dynamic batch and image size): the fake implementations' shape formulas hold
    symbolically, and the exported program matches eager at shapes it was not traced at."""
    _, rf = model_pair("resnet18", num_classes=5)
    rf.eval()
    batch, size = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("size", min=33, max=512)
    exported = torch.export.export(rf, (torch.randn(2, 3, 64, 64),), dynamic_shapes={"x": {0: batch, 2: size, 3: size}})
    assert FUSED in str(exported.graph)
    for n, s in [(1, 97), (3, 40)]:
        x = torch.randn(n, 3, s, s)
        with torch.no_grad():
            assert rel_err(exported.module()(x), rf(x)) <= 1e-6


def test_saved_scripted_and_exported_models_load_in_a_fresh_process(tmp_path):
    """A saved TorchScript model and a saved exported program hold the fused ops: a fresh process that
    imports resnet_fast loads and runs them and gets this process's output (README, "TorchScript")."""
    import subprocess
    import sys

    model = randomize_batch_norm(resnet_fast.resnet18(num_classes=5)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(model), tmp_path / "scripted.pt")
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "exported.pt2")
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")
    check = (
        "import sys, torch, resnet_fast\n"
        "d = torch.load(sys.argv[1] + '/io.pt')\n"
        "scripted = torch.jit.load(sys.argv[1] + '/scripted.pt')\n"
        "exported = torch.export.load(sys.argv[1] + '/exported.pt2').module()\n"
        "assert 'resnet_fast::conv_bn_act' in str(scripted.inlined_graph)\n"
        "with torch.no_grad():\n"
        "    for out in (scripted(d['x']), exported(d['x'])):\n"
        "        err = ((out - d['expected']).norm() / d['expected'].norm()).item()\n"
        "        assert err <= 1e-6, err\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", check, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
