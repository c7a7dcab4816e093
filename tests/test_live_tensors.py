"""The fused ops read the live parameters and statistics on every call: no edit can leave a stale result.

Every kind of edit a training or serving pipeline makes (``.data`` in place, which bumps no version
counter; ``load_state_dict``; optimizer steps; ``.to()``; edits under ``torch.no_grad``; an EMA loop)
is followed by a forward compared with torchvision's model given the same edit.
"""

import copy

import pytest
import torch
import torchvision
from torch import nn

from resnet_fast.testing import randomize_batch_norm
from conftest import rel_err
from helpers import model_pair

TOL = 1e-5


def _same_output(tv: nn.Module, rf: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        assert rel_err(rf(x), tv(x)) <= TOL


def _edit_both(tv: nn.Module, rf: nn.Module, edit) -> None:
    for m in (tv, rf):
        torch.manual_seed(0)  # the same random replacement for both models
        edit(m)


def _matches_its_own_weights(rf: nn.Module, x: torch.Tensor) -> None:
    """rf's eval output equals torchvision's on rf's current weights: nothing rf computes is stale. (After
    training steps two models drift apart by rounding; this compares with rf's own state, not a twin's.)"""
    tv = torchvision.models.resnet18(num_classes=rf.fc.out_features)
    tv.load_state_dict(rf.state_dict())
    was_training = rf.training
    _same_output(tv.eval(), rf.eval(), x)
    rf.train(was_training)


EDITS = {
    "conv_weight.data": lambda m: m.layer1[0].conv1.weight.data.mul_(0),
    "bn_running_var.data": lambda m: m.layer2[0].bn2.running_var.data.mul_(2),
    "bn_running_mean.data": lambda m: m.layer3[1].bn1.running_mean.data.add_(0.5),
    "bn_weight.data": lambda m: m.bn1.weight.data.mul_(-1),
    "bn_bias.data": lambda m: m.layer4[0].bn2.bias.data.add_(1.0),
    "downsample.data": lambda m: m.layer2[0].downsample[1].running_var.data.mul_(4),
    "data_swap": lambda m: setattr(m.layer1[1].conv2.weight, "data", torch.randn_like(m.layer1[1].conv2.weight)),
    "eps": lambda m: setattr(m.layer1[0].bn1, "eps", 0.5),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_in_place_edits_are_seen(edit):
    """The issue's repro: an in-place edit through .data between two eval forwards."""
    tv, rf = model_pair("resnet18")
    tv.eval(), rf.eval()
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        before = rf(x)
        _edit_both(tv, rf, EDITS[edit])
        after = rf(x)
    assert rel_err(after, before) > 1e-3, "the edit must change the output for this test to mean anything"
    _same_output(tv, rf, x)


def test_edits_under_no_grad_and_load_state_dict():
    tv, rf = model_pair("resnet50")
    tv.eval(), rf.eval()
    x = torch.randn(1, 3, 40, 40)
    _same_output(tv, rf, x)
    with torch.no_grad():
        for m in (tv, rf):
            for p in m.parameters():
                p.mul_(0.9)
    _same_output(tv, rf, x)
    fresh = randomize_batch_norm(torchvision.models.resnet50()).state_dict()
    tv.load_state_dict(fresh), rf.load_state_dict(fresh)
    _same_output(tv, rf, x)


def test_optimizer_steps_between_eval_forwards():
    """Fine-tuning with periodic evaluation: SGD steps (parameters and running statistics change in
    place), then an eval forward, several times."""
    _, rf = model_pair("resnet18", num_classes=5)
    opt = torch.optim.SGD(rf.parameters(), lr=0.05, momentum=0.9)
    x, target = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    for _ in range(3):
        rf.train()
        opt.zero_grad()
        nn.functional.cross_entropy(rf(x), target).backward()
        opt.step()
        _matches_its_own_weights(rf, x)


def test_to_dtype_and_back():
    tv, rf = model_pair("resnet18")
    tv.eval(), rf.eval()
    x = torch.randn(1, 3, 32, 32)
    _same_output(tv, rf, x)
    for m in (tv, rf):
        m.double()
    _same_output(tv, rf, x.double())
    for m in (tv, rf):
        m.float()
    _same_output(tv, rf, x)


def test_ema_loop():
    """Classic EMA: ``ema_p.data.mul_(d).add_(p.data, alpha=1 - d)`` after every step (no version bump);
    the EMA model is evaluated as it goes and must always compute with its current weights."""
    _, rf = model_pair("resnet18", num_classes=3)
    ema = copy.deepcopy(rf).eval()
    opt = torch.optim.SGD(rf.parameters(), lr=0.1)
    x = torch.randn(4, 3, 32, 32)
    for _ in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(rf.train()(x), torch.randint(0, 3, (4,))).backward()
        opt.step()
        for ema_t, t in zip((*ema.parameters(), *ema.buffers()), (*rf.parameters(), *rf.buffers())):
            if ema_t.is_floating_point():
                ema_t.data.mul_(0.5).add_(t.data, alpha=0.5)
        _matches_its_own_weights(ema, x)


def test_frozen_batch_norm_edits_are_seen():
    """FrozenBatchNorm2d keeps its statistics as buffers: edits to them show up too."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    tv, rf = model_pair("resnet18", norm_layer=FrozenBatchNorm2d)
    x = torch.randn(1, 3, 32, 32)
    _same_output(tv, rf, x)
    _edit_both(tv, rf, lambda m: m.layer1[0].bn1.running_var.data.mul_(3))
    _same_output(tv, rf, x)
