"""``torch.func`` transforms on the models: ``vmap``, ``grad``, ``jacrev``, per-sample gradients and model
ensembling, as they run on torchvision's.

torch.library's custom-op autograd does not support these transforms (pytorch/pytorch#168393) and the
ops have no batching rules, so under a transform the blocks run torchvision's forward (see
``resnet_fast.models.conv_bn``); outside one they fuse again. float64 against torchvision, so any
difference is a wrong path, not rounding.
"""

import copy

import pytest
import torch
from torch.func import functional_call, grad, jacrev, stack_module_state, vmap

from resnet_fast import backends
from conftest import rel_err
from helpers import float64_copy, model_pair

TOL64 = 1e-9


def _eval_pair(arch: str = "resnet18"):
    return tuple(float64_copy(m).eval() for m in model_pair(arch, num_classes=5))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_vmap_matches_torchvision_and_runs_no_op(arch):
    tv, rf = _eval_pair(arch)
    x = torch.randn(3, 1, 3, 32, 32, dtype=torch.float64)
    with backends.record_dispatch() as calls:
        out = vmap(rf)(x)
    assert rel_err(out, vmap(tv)(x)) <= TOL64
    assert not calls  # the ops' per-sample fallback loop would have run them
    with backends.record_dispatch() as calls, torch.no_grad():
        rf(x[0])
    assert calls[("conv_bn_act", "torch")] > 0  # fused again outside the transform


def test_grad_and_jacrev_match_torchvision():
    tv, rf = _eval_pair()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    expected = grad(lambda t: tv(t).square().sum())(x)
    assert rel_err(grad(lambda t: rf(t).square().sum())(x), expected) <= TOL64
    assert rel_err(jacrev(rf)(x[:1]), jacrev(tv)(x[:1])) <= TOL64


def test_per_sample_gradients_match_torchvision():
    """The functorch recipe: vmap over the batch of grad of a one-sample loss through functional_call."""
    tv, rf = _eval_pair()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    target = torch.randint(0, 5, (3,))

    def per_sample_grads(model):
        params = {k: v.detach() for k, v in model.named_parameters()}
        buffers = dict(model.named_buffers())

        def loss(p, xi, ti):
            logits = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
            return torch.nn.functional.cross_entropy(logits, ti.unsqueeze(0))

        return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, target)

    ours, theirs = per_sample_grads(rf), per_sample_grads(tv)
    assert set(ours) == set(theirs)
    for name in theirs:
        assert rel_err(ours[name], theirs[name]) <= TOL64, name


def test_ensemble_of_models_through_stack_module_state():
    """Several models' weights stacked and one forward vmapped over them, as in the functorch tutorial."""
    models = [float64_copy(model_pair("resnet18", num_classes=5)[1]).eval() for _ in range(3)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def forward(p, b, x):
        return functional_call(base, (p, b), (x,))

    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out = vmap(forward, in_dims=(0, 0, None))(params, buffers, x)
    with torch.no_grad():
        for i, model in enumerate(models):
            assert rel_err(out[i], model(x)) <= TOL64
