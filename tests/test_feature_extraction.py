"""torchvision's FX feature extraction (``create_feature_extractor``, ``get_graph_node_names``) on
resnet_fast models, held to what it gives on torchvision's: the node names it lists name the same
values, every node is a tensor, unused branches drop out, the extractor's parameters come in
torchvision's order, and the extractor scripts and trains.

The fused graph has fewer nodes (one per conv + BatchNorm + ReLU in eval mode), named after the node
torchvision's graph gives the same value: ``layer1.2.relu_2``, the block output torchvision's
documentation picks, is a block output here too.
"""

import copy
import io

import pytest
import torch
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names
from torchvision.ops.misc import FrozenBatchNorm2d

import resnet_fast
from resnet_fast.ops.functional import norm_act
from resnet_fast.testing import randomize_batch_norm
from conftest import lowp_tolerance, rel_err
from helpers import float64_copy, model_pair

FUSED = "resnet_fast.conv_bn_act"
# torchvision's documented return nodes for resnet50: each stage's last block output.
DOCUMENTED_NODES = ["layer1.2.relu_2", "layer2.3.relu_2", "layer3.5.relu_2", "layer4.2.relu_2"]
TOL64 = 1e-9


def _node_names(model, train: bool) -> list[str]:
    train_nodes, eval_nodes = get_graph_node_names(model, suppress_diff_warning=True)
    return train_nodes if train else eval_nodes


def _extract(model, nodes, x):
    """``nodes`` of the model's graph in its current mode (the other mode's graph, which
    create_feature_extractor builds too, returns the logits)."""
    train = model.training
    modes = {"train_return_nodes": nodes if train else ["fc"], "eval_return_nodes": ["fc"] if train else nodes}
    return create_feature_extractor(model, suppress_diff_warning=True, **modes)(x)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("train", [False, True])
def test_node_names_name_torchvisions_values(arch, train):
    """Every node name the two graphs share gives the same value (float64, so any difference is a
    misnamed node, not rounding); the names only ours has are the cast to the weights' dtype and the
    fused shortcut's nodes (torchvision names the shortcut's "0" and "1", which torch.fx cannot)."""
    tv, rf = (float64_copy(m).train(train) for m in model_pair(arch))
    ours, theirs = _node_names(rf, train), _node_names(tv, train)
    only_ours = [n for n in ours if n not in theirs]
    assert all(n == "to" or ".downsample." in n for n in only_ours), only_ours
    shared = [n for n in ours if n in theirs and n != "x"]
    # Every block's ReLU outputs (layer1.0.relu, ...), the stem's and the head's nodes are there.
    block_relus = [n for n in theirs if n.count(".") == 2 and n.rsplit(".", 1)[1].startswith("relu")]
    assert len(block_relus) == {"resnet18": 8 * 2, "resnet50": 16 * 3}[arch]  # blocks x ReLUs per block
    assert set(block_relus) <= set(shared) and {"maxpool", "avgpool", "flatten", "fc"} <= set(shared)
    if arch == "resnet50":
        assert set(DOCUMENTED_NODES) <= set(shared)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    a, b = _extract(rf, shared, x), _extract(tv, shared, x)
    for name in shared:
        assert rel_err(a[name], b[name]) <= TOL64, name


@pytest.mark.parametrize("train", [False, True])
def test_every_node_is_a_tensor_and_backpropagates(train):
    """torchvision's test_forward_backward picks nodes at random: each must hold a tensor."""
    _, rf = model_pair("resnet50", num_classes=4)
    rf.train(train)
    nodes = [n for n in _node_names(rf, train) if n != "x"]
    out = _extract(rf, nodes, torch.randn(2, 3, 64, 64))
    assert all(isinstance(out[n], torch.Tensor) for n in nodes), [n for n in nodes if not torch.is_tensor(out[n])]
    sum(t.float().mean() for t in out.values()).backward()
    assert rf.conv1.weight.grad is not None and rf.layer4[2].bn3.weight.grad is not None


@pytest.mark.parametrize("norm", ["batch", "frozen"])
def test_extractor_matches_intermediate_layer_getter(norm):
    """As torchvision's test_feature_extraction_methods_equivalence: the FX extractor and the module-based
    IntermediateLayerGetter hold the same parameters and buffers in the same order and give identical
    features (FrozenBatchNorm2d: as in torchvision's detection backbones)."""
    _, rf = model_pair("resnet50", **({"norm_layer": FrozenBatchNorm2d} if norm == "frozen" else {}))
    rf.eval()
    layers = {f"layer{i}": f"layer{i}" for i in range(1, 5)}
    getter = IntermediateLayerGetter(rf, layers).eval()
    extractor = create_feature_extractor(rf, layers)
    assert [n for n, _ in getter.named_parameters()] == [n for n, _ in extractor.named_parameters()]
    assert [n for n, _ in getter.named_buffers()] == [n for n, _ in extractor.named_buffers()]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = getter(x), extractor(x)
    assert list(a) == list(b)
    for key in a:
        # The getter calls the stem's modules one by one; FrozenBatchNorm2d's forward rounds otherwise
        # than the fused stem's epilogue (nn.BatchNorm2d's, on CPU, as it does).
        assert torch.equal(a[key], b[key]) if norm == "batch" else rel_err(a[key], b[key]) <= 1e-5
    assert FUSED in str(extractor.graph)


def test_train_extractor_cut_early_leaves_later_stages_alone():
    """A training-mode extractor that stops at layer2 runs nothing after it: torch.fx drops the later
    stages, their running statistics included, as it does torchvision's."""
    _, rf = model_pair("resnet18", num_classes=4)
    rf.train()
    extractor = create_feature_extractor(rf, {"layer2": "features"})
    assert not any(n.name.startswith(("layer3", "layer4")) for n in extractor.graph.nodes)
    before = {k: v.clone() for k, v in rf.state_dict().items()}
    extractor(torch.randn(4, 3, 32, 32))["features"].sum().backward()
    after = rf.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert "layer2.1.bn2.running_mean" in moved and "layer2.1.bn2.num_batches_tracked" in moved
    assert not any(k.startswith(("layer3", "layer4")) for k in moved)


def test_scripted_train_extractor_matches_and_backpropagates():
    """As torchvision's test_jit_forward_backward: the FX extractor of a training-mode model scripts."""
    _, rf = model_pair("resnet18", num_classes=4)
    rf.train()
    nodes = {"layer1.0.relu": "early", "layer3": "mid", "fc": "logits"}
    extractor = create_feature_extractor(rf, nodes)
    scripted = torch.jit.script(extractor)
    x = torch.randn(4, 3, 32, 32)
    expected, out = extractor(x), scripted(x)
    for key in nodes.values():
        assert rel_err(out[key], expected[key]) <= 1e-5, key
    sum(t.mean() for t in out.values()).backward()
    assert rf.conv1.weight.grad is not None


def test_pickled_train_graph_keeps_one_node_per_norm():
    """A GraphModule reloaded from torch.save traces its code again: each training BatchNorm stays one
    norm_act node, and the reloaded graph trains as eager does."""
    _, rf = model_pair("resnet18", num_classes=4)
    rf.train()
    eager = copy.deepcopy(rf)
    buffer = io.BytesIO()
    torch.save(torch.fx.symbolic_trace(rf), buffer)
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=False)
    targets = [n.target for n in reloaded.graph.nodes if n.op == "call_function"]
    assert targets.count(norm_act) == 20 and torch.ops.resnet_fast.batch_stats not in targets
    x = torch.randn(4, 3, 32, 32)
    assert rel_err(reloaded(x), eager(x)) <= 1e-5
    for (name, a), (_, b) in zip(reloaded.named_buffers(), eager.named_buffers()):
        assert rel_err(a.float(), b.float()) <= 1e-5, name


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("train", [False, True])
def test_create_feature_extractor_matches_torchvision(arch, train):
    """Within the parity rule of a float64 torchvision run (train mode's batch statistics over few values
    amplify rounding, so a fixed threshold would measure the draw, not the code)."""
    tv, rf = model_pair(arch)
    tv64 = float64_copy(tv)
    for m in (tv, rf, tv64):
        m.train(train)
    nodes = {"layer2": "mid", "layer4": "last"}
    x = torch.randn(2, 3, 64, 64)
    ours, theirs, ref = (create_feature_extractor(m, nodes) for m in (rf, tv, tv64))
    a, b, r = ours(x), theirs(x), ref(x.double())
    assert set(a) == {"mid", "last"}
    for key in a:
        assert rel_err(a[key], r[key]) <= lowp_tolerance(torch.float32, b[key], r[key])
    assert "conv_bn_act" in str(ours.graph) or train
    train_nodes, eval_nodes = get_graph_node_names(rf)
    assert "layer4" in {n.split(".")[0] for n in eval_nodes}


def test_cifar_stem_feature_extractor():
    net = randomize_batch_norm(resnet_fast.resnet18(stem="cifar", num_classes=10)).eval()
    extractor = create_feature_extractor(net, {"layer3": "features"})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x)))))))
        assert rel_err(extractor(x)["features"], expected) <= 1e-5
        assert rel_err(torch.fx.symbolic_trace(net)(x), net(x)) <= 1e-6
    assert FUSED in str(extractor.graph)
