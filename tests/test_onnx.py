"""``torch.onnx.export`` of the models, as deployment pipelines (ONNX Runtime, TensorRT, OpenVINO) run it.

The fused ops have no ONNX translation, and ONNX runtimes fuse conv + BatchNorm themselves, so during an
export the blocks run torchvision's forward (see ``resnet_fast.models.conv_bn``): the file is the graph
torchvision's model exports, standard ONNX operators only. Both exporters (``dynamo=True``, the default,
and the TorchScript-based one), checked by running the file in ONNX Runtime.
"""

import pytest
import torch

from resnet_fast import backends
from conftest import rel_err
from helpers import model_pair

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")


def _export(model, x, path, dynamo: bool, dynamic_batch: bool = False):
    kwargs = {}
    if dynamic_batch:
        kwargs = {"dynamic_shapes": {"x": {0: torch.export.Dim("batch", min=1, max=64)}}} if dynamo else {
            "input_names": ["x"], "dynamic_axes": {"x": {0: "batch"}}}
    torch.onnx.export(model, (x,), path, dynamo=dynamo, **kwargs)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _run(session, x):
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_export_runs_in_onnx_runtime_as_torchvisions(arch, dynamo, tmp_path):
    tv, rf = model_pair(arch, num_classes=7)
    tv.eval(), rf.eval()
    x = torch.randn(2, 3, 64, 64)
    session = _export(rf, x, tmp_path / "model.onnx", dynamo)
    with torch.no_grad():
        expected = tv(x)
    assert rel_err(_run(session, x), expected) <= 1e-5
    nodes = onnx.load(tmp_path / "model.onnx").graph.node
    assert "Conv" in {node.op_type for node in nodes} and {node.domain for node in nodes} <= {"", "ai.onnx"}
    with backends.record_dispatch() as calls, torch.no_grad():
        rf(x)
    assert calls[("conv_bn_act", "torch")] > 0  # fused again after the export


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_export_with_a_dynamic_batch(dynamo, tmp_path):
    tv, rf = model_pair("resnet18", num_classes=7)
    tv.eval(), rf.eval()
    session = _export(rf, torch.randn(2, 3, 64, 64), tmp_path / "model.onnx", dynamo, dynamic_batch=True)
    for n in (1, 5):
        x = torch.randn(n, 3, 64, 64)
        with torch.no_grad():
            assert rel_err(_run(session, x), tv(x)) <= 1e-5
