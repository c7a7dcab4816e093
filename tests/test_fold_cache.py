"""The eval-mode fold cache: reused while nothing changes, rebuilt whenever anything it depends on does."""
import pytest
import torch
from torch import nn

import resnet_fast
from resnet_fast.testing import randomize_batch_norm
from conftest import rel_err
from helpers import model_pair


def _reference_eval(model, x):
    """The same model run module by module (unfused), as torchvision would run it."""
    import torchvision

    tv = torchvision.models.resnet18(num_classes=model.fc.out_features)
    tv.load_state_dict(model.state_dict())
    for ours, theirs in zip(model.modules(), tv.modules()):
        if isinstance(ours, nn.BatchNorm2d):
            theirs.eps = ours.eps  # not in the state_dict
    tv.eval()
    with torch.no_grad():
        return tv(x)


@pytest.fixture
def model_and_input():
    _, m = model_pair("resnet18", num_classes=10)
    m.eval()
    return m, torch.randn(2, 3, 32, 32)


def _check(m, x):
    with torch.no_grad():
        assert rel_err(m(x), _reference_eval(m, x)) <= 1e-5


def _entries(m):
    return {id(t) for mod in m.modules() if hasattr(mod, "_fold_cache") for e in mod._fold_cache._entries.values()
            for t in e[1:]}


def test_cache_is_reused_when_nothing_changes(model_and_input):
    m, x = model_and_input
    _check(m, x)
    first = _entries(m)
    assert len(first) == 2 * 20  # 17 conv/BN pairs + 3 downsample pairs, weight and bias each
    _check(m, x)
    assert _entries(m) == first


def test_load_state_dict_invalidates(model_and_input):
    m, x = model_and_input
    _check(m, x)
    other = randomize_batch_norm(resnet_fast.resnet18(num_classes=10))
    m.load_state_dict(other.state_dict())
    _check(m, x)


def test_optimizer_step_invalidates(model_and_input):
    m, x = model_and_input
    _check(m, x)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    m.train()
    m(torch.randn(4, 3, 32, 32)).square().mean().backward()
    opt.step()
    m.eval()
    _check(m, x)


@pytest.mark.parametrize("target", ["conv_weight", "bn_weight", "bn_bias", "running_mean", "running_var", "eps"])
def test_in_place_edits_invalidate(model_and_input, target):
    m, x = model_and_input
    _check(m, x)
    block = m.layer2[0]
    with torch.no_grad():
        if target == "conv_weight":
            block.conv2.weight.mul_(-1.5)
        elif target == "bn_weight":
            block.bn1.weight.add_(1.0)
        elif target == "bn_bias":
            m.bn1.bias.sub_(2.0)
        elif target == "running_mean":
            block.downsample[1].running_mean.add_(3.0)
        elif target == "running_var":
            block.bn2.running_var.mul_(9.0)
    if target == "eps":
        block.bn2.eps = 0.5
    _check(m, x)


def test_to_dtype_and_back_invalidates(model_and_input):
    m, x = model_and_input
    _check(m, x)
    m.double()
    with torch.no_grad():
        out64 = m(x.double())
    assert out64.dtype == torch.float64
    m.float()
    _check(m, x)
    with torch.no_grad():
        assert rel_err(m(x), out64) <= 1e-5


def test_train_forward_then_eval_uses_new_running_stats(model_and_input):
    m, x = model_and_input
    _check(m, x)
    m.train()
    with torch.no_grad():
        m(torch.randn(4, 3, 32, 32) * 3 + 1)  # moves every running statistic
    m.eval()
    _check(m, x)


def test_parameter_data_swap_invalidates(model_and_input):
    m, x = model_and_input
    _check(m, x)
    m.layer1[0].conv1.weight.data = torch.randn_like(m.layer1[0].conv1.weight)
    _check(m, x)


def test_eval_mode_with_trainable_parameters_gets_gradients():
    """Eval-mode BN with grad enabled (fine-tuning with frozen statistics): the fold is differentiable."""
    tv, rf = model_pair("resnet18", num_classes=3)
    tv.eval(), rf.eval()
    x = torch.randn(2, 3, 32, 32)
    tv(x).sum().backward()
    rf(x).sum().backward()
    for (name, a), (_, b) in zip(tv.named_parameters(), rf.named_parameters()):
        assert rel_err(b.grad, a.grad) <= 1e-4, name
    assert all(len(mod._fold_cache) == 0 for mod in rf.modules() if hasattr(mod, "_fold_cache"))


def test_custom_downsample_is_called_as_is():
    calls = []

    class Shortcut(nn.Module):
        def forward(self, x):
            calls.append(1)
            return x

    block = resnet_fast.BasicBlock(8, 8, downsample=Shortcut()).eval()
    with torch.no_grad():
        block(torch.randn(1, 8, 6, 6))
    assert calls == [1]


def test_cache_filled_under_inference_mode_serves_autograd_later():
    _, m = model_pair("resnet18", num_classes=3)
    resnet_fast.freeze(m)  # frozen BN stays in eval: its folds are cached, then reused with grad enabled
    m.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        expected = m(x)
    m.train()
    x.requires_grad_(True)
    out = m(x)
    out.sum().backward()
    assert rel_err(out, expected) <= 1e-5 and x.grad is not None and x.grad.abs().sum() > 0
