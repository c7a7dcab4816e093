"""Pipelines edit a model's modules, not only its tensors: hooks, pruning, weight norm, swapped activations,
quantization's module fusion. A fused call stands in for a block's conv, norm and ReLU modules, so where
an edit makes those calls do something else the block must call the modules, as torchvision's does: same
outputs, same gradients, the same hook calls. Blocks no edit touches stay fused.
"""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, prune

import resnet_fast
from resnet_fast import backends
from conftest import rel_err
from helpers import model_pair

TOL = 1e-5
TOL64 = 1e-9  # float64: BatchNorm makes a weight's scale gradient ~0, so its error is all rounding


def _forward_hook(m: nn.Module):
    """A hook that changes the module's output (as a feature-editing or quantization-observer hook may)."""
    return m.register_forward_hook(lambda module, inputs, out: out * 1.5)


def _pre_hook(m: nn.Module):
    return m.register_forward_pre_hook(lambda module, inputs: (inputs[0] + 0.25,))


def _swap_activation(m: nn.Module):
    for module in m.modules():
        if isinstance(getattr(module, "relu", None), nn.ReLU):
            module.relu = nn.SiLU()


def _fuse_modules(m: nn.Module):
    """torch.ao.quantization's conv + bn + relu fusion: folded into conv1 in eval mode, kept for QAT in train."""
    fuse = torch.ao.quantization.fuse_modules_qat if m.training else torch.ao.quantization.fuse_modules
    fuse(m, [["conv1", "bn1", "relu"], ["layer1.0.conv1", "layer1.0.bn1", "layer1.0.relu"]], inplace=True)


# name -> (edit of a resnet18, how many of its 20 (conv, norm) pairs stay fused: the edits below touch the
# stem's pair or one of layer1[0]'s, which unfuses that module's pairs and no others)
EDITS = {
    "conv forward hook": (lambda m: _forward_hook(m.layer1[0].conv1), 18),
    "norm forward pre-hook": (lambda m: _pre_hook(m.layer1[0].bn2), 18),
    "relu forward hook": (lambda m: _forward_hook(m.layer1[0].relu), 18),
    "stem relu hook": (lambda m: _forward_hook(m.relu), 19),
    "stem maxpool hook": (lambda m: _forward_hook(m.maxpool), 20),  # the pool is only in the eval stem op
    "conv full backward hook": (lambda m: m.layer1[0].conv2.register_full_backward_hook(
        lambda module, grad_in, grad_out: (grad_in[0] * 2,)), 18),
    "prune": (lambda m: prune.l1_unstructured(m.layer1[0].conv1, "weight", amount=0.5), 18),
    "weight_norm (forward pre-hook)": (lambda m: torch.nn.utils.weight_norm(m.layer1[0].conv2), 18),
    # A parametrization computes conv.weight on each read, which the fused call makes: it stays fused.
    "parametrizations.weight_norm": (lambda m: parametrizations.weight_norm(m.layer1[0].conv2), 20),
    "activation swapped for SiLU": (_swap_activation, 3),  # the shortcuts have no activation
    "fuse_modules": (_fuse_modules, 17),  # the stem's and layer1[0]'s relu become Identity
}


def _fused_pairs(calls) -> int:
    """How many (conv, norm) pairs ran as fused ops: conv_bn_act or the stem op in eval mode (FrozenBatchNorm2d
    too), the convolution then batch_norm_act in training."""
    return sum(calls.get((op, "torch"), 0) for op in ("conv_bn_act", "stem", "batch_norm_act"))


@pytest.mark.parametrize("edit", sorted(EDITS))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_edited_modules_give_torchvisions_outputs_and_gradients(edit, train):
    """In float64, so that any difference is a different computation, not rounding."""
    make_edit, fused = EDITS[edit]
    tv, rf = model_pair("resnet18", num_classes=10)
    for m in (tv, rf):
        m.double().train(train)  # train first: fuse_modules folds BatchNorm in eval mode, keeps it for QAT
        make_edit(m)
    x = torch.randn(2, 3, 40, 40, dtype=torch.float64)
    x_tv, x_rf = x.clone().requires_grad_(), x.clone().requires_grad_()
    with backends.record_dispatch() as calls:
        out = rf(x_rf)
    expected = tv(x_tv)
    assert rel_err(out, expected) <= TOL64
    assert _fused_pairs(calls) == fused
    out.square().sum().backward()
    expected.square().sum().backward()
    assert rel_err(x_rf.grad, x_tv.grad) <= TOL64
    for (name, p_rf), p_tv in zip(rf.named_parameters(), tv.parameters()):
        # (fuse_modules' folded conv bias does not require grad, in either model)
        assert (p_rf.grad is None) == (p_tv.grad is None), name
        assert p_rf.grad is None or rel_err(p_rf.grad, p_tv.grad) <= TOL64, name


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_hooks_see_torchvisions_calls(train):
    """Hooks on every conv, norm, ReLU and pool, as activation-statistics and Grad-CAM code register them:
    the same modules are called in the same order with the same inputs."""
    tv, rf = model_pair("resnet18", num_classes=10)
    seen = {"tv": [], "rf": []}
    for key, model in (("tv", tv), ("rf", rf)):
        for name, module in model.named_modules():
            if isinstance(module, (nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d)):
                module.register_forward_hook(
                    lambda module, inputs, out, log=seen[key], name=name: log.append((name, inputs[0].clone())))
        model.train(train)
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        assert rel_err(rf(x), tv(x)) <= TOL
    assert [name for name, _ in seen["rf"]] == [name for name, _ in seen["tv"]]
    for (name, a), (_, b) in zip(seen["rf"], seen["tv"]):
        assert rel_err(a, b) <= TOL, name


def test_pruning_follows_the_weights_it_prunes():
    """prune keeps ``weight_orig`` and recomputes ``weight = weight_orig * mask`` in a forward pre-hook: a
    training step that updates ``weight_orig`` must reach the next forward (nothing stale)."""
    tv, rf = model_pair("resnet18", num_classes=10)
    for m in (tv, rf):
        prune.random_unstructured(m.layer2[0].conv1, "weight", amount=0.5)
        m.layer2[0].conv1.weight_mask.copy_(tv.layer2[0].conv1.weight_mask)
        m.eval()
        with torch.no_grad():
            m.layer2[0].conv1.weight_orig.mul_(-3.0)
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        assert rel_err(rf(x), tv(x)) <= TOL


def test_global_module_hooks_see_every_call():
    """``register_module_forward_hook`` hooks every module: with one registered, nothing is fused away."""
    tv, rf = model_pair("resnet50", num_classes=10)
    tv.eval(), rf.eval()
    log = []
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: log.append(type(m).__name__))
    x = torch.randn(1, 3, 40, 40)
    try:
        with torch.no_grad():
            expected = tv(x)
            seen_tv, log[:] = list(log), []
            out = rf(x)
    finally:
        handle.remove()
    assert rel_err(out, expected) <= TOL
    # resnet_fast's shortcut Sequential is a Downsample (a Sequential subclass), otherwise the same calls.
    assert [n.replace("Downsample", "Sequential") for n in log] == seen_tv
    with torch.no_grad(), backends.record_dispatch() as calls:
        rf(x)
    assert ("conv_bn_act", "torch") in calls, "the hook's removal must restore the fused path"


@pytest.mark.parametrize("edit", ["activation", "hook"])
def test_script_refuses_modules_it_would_run_differently(edit):
    rf = resnet_fast.resnet18()
    if edit == "activation":
        rf.layer2[1].relu = nn.GELU()
        match = "activation GELU"
    else:
        _forward_hook(rf.layer3[0].bn1)
        match = "hook on its BatchNorm2d"
    with pytest.raises(NotImplementedError, match=match):
        torch.jit.script(rf)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_functional_call_swaps_in_the_given_tensors(train):
    """``torch.func.functional_call`` (MAML, EMA and ensembling code) puts its tensors in the modules'
    ``_parameters`` and ``_buffers`` for one call: the fused calls read those, and stay fused."""
    tv, rf = model_pair("resnet18", num_classes=10)
    tv.train(train), rf.train(train)
    state = {name: t * 1.5 if t.is_floating_point() else t.clone() for name, t in tv.state_dict().items()}
    x = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        expected = torch.func.functional_call(tv, {k: v.clone() for k, v in state.items()}, (x,))
        with backends.record_dispatch() as calls:
            out = torch.func.functional_call(rf, {k: v.clone() for k, v in state.items()}, (x,))
        assert rel_err(out, expected) <= TOL
        assert rel_err(rf(x), tv(x)) <= TOL  # the model's own tensors are back
    assert _fused_pairs(calls) == 20
