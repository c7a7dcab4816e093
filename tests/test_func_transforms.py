"""``torch.func`` transforms on the models: ``vmap``, ``grad``, ``jacrev``, per-sample gradients and model
ensembling, and forward-mode AD (``torch.autograd.forward_ad``), as they run on torchvision's.

torch.library's custom-op autograd does not support these transforms (pytorch/pytorch#168393) and the
ops have no batching rules, so under a transform the blocks run torchvision's forward (see
``resnet_fast.models.conv_bn``); outside one they fuse again. The same for forward-mode AD (dual
tensors), for which the ops define no derivative. The public ``resnet_fast.ops`` functions
run their definitions in torch operations there (``resnet_fast.ops.transformable``). float64 against
torchvision and torch, so any difference is a wrong path, not rounding.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import forward_ad
from torch.func import functional_call, grad, jacrev, jvp, stack_module_state, vmap

from resnet_fast import backends, ops
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


def _forward_derivative(f, x, tangent):
    """(f(x), its directional derivative along tangent) by forward-mode AD through dual tensors."""
    with forward_ad.dual_level():
        primal, derivative = forward_ad.unpack_dual(f(forward_ad.make_dual(x, tangent)))
        return primal.detach().clone(), derivative.clone()


def _assert_forward_derivatives_match(ours, theirs, x):
    """ours and theirs give the same value and forward derivative at x (float64), and ours runs no backend
    kernel (the ops' autograd.Function has no forward-mode derivative: it raised)."""
    tangent = torch.randn_like(x)
    with backends.record_dispatch() as calls:
        out, derivative = _forward_derivative(ours, x, tangent)
    expected_out, expected = _forward_derivative(theirs, x, tangent)
    assert rel_err(out, expected_out) <= TOL64 and rel_err(derivative, expected) <= TOL64
    assert not calls


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_forward_mode_ad_matches_torchvision(mode):
    tv, rf = (getattr(m, mode)() for m in _eval_pair("resnet50"))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    _assert_forward_derivatives_match(rf, tv, x)
    if mode == "train":
        for a, b in zip(rf.buffers(), tv.buffers()):  # both took the same running-statistics step
            assert rel_err(a, b) <= TOL64
    with backends.record_dispatch() as calls, torch.no_grad():
        rf(x)
    assert calls[("batch_stats" if mode == "train" else "conv_bn_act", "torch")] > 0  # fused again


def _public_op_cases():
    """(name, ours, torch's): functions of a [N, 4, 9, 9] float64 x, through each public op and through
    the torch operations it stands for, with fresh tensors of their own."""
    f64 = dict(dtype=torch.float64)
    w, b = torch.randn(5, 4, 3, 3, **f64), torch.randn(5, **f64)
    gamma, beta = torch.rand(5, **f64) + 0.5, torch.randn(5, **f64)
    mean, var = torch.randn(5, **f64), torch.rand(5, **f64) + 0.5
    w_stem = torch.randn(5, 4, 7, 7, **f64)
    g4, b4, m4, v4 = gamma[:4], beta[:4], mean[:4], var[:4]
    return [
        ("conv_bias_act", lambda x: ops.conv_bias_act(x, w, b, stride=2, padding=1),
         lambda x: F.relu(F.conv2d(x, w, b, 2, 1))),
        ("conv_bn_act", lambda x: ops.conv_bn_act(x, w, b, gamma, beta, mean, var, padding=1, relu=False),
         lambda x: F.batch_norm(F.conv2d(x, w, b, 1, 1), mean, var, gamma, beta, False)),
        ("add_relu", lambda x: ops.add_relu(x, x.flip(-1)), lambda x: F.relu(x + x.flip(-1))),
        ("batch_norm_act eval", lambda x: ops.batch_norm_act(x, g4, b4, m4, v4, training=False, residual=x),
         lambda x: F.relu(F.batch_norm(x, m4, v4, g4, b4, False) + x)),
        ("batch_norm_act training", lambda x: ops.batch_norm_act(x, g4, b4, None, None, training=True),
         lambda x: F.relu(F.batch_norm(x, None, None, g4, b4, True))),
        ("stem", lambda x: ops.stem(x, w_stem, None, gamma, beta, mean, var),
         lambda x: F.max_pool2d(F.relu(F.batch_norm(F.conv2d(x, w_stem, None, 2, 3), mean, var, gamma, beta, False)),
                                3, 2, 1)),
    ]


@pytest.mark.parametrize("case", range(len(_public_op_cases())), ids=[c[0] for c in _public_op_cases()])
def test_public_ops_under_grad_vmap_and_jvp_match_torch(case):
    """The public ops under grad, vmap (over a batch of batches: a training BatchNorm's statistics are per
    sample then), jvp and a second-order grad, against the same transforms of torch's operations; no
    backend kernel runs (vmap's per-sample fallback would run one per sample; grad used to raise)."""
    _, ours, theirs = _public_op_cases()[case]
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    batches = torch.randn(3, 2, 4, 9, 9, dtype=torch.float64)
    tangent = torch.randn_like(x)

    def loss(f):
        return lambda t: f(t).square().sum()

    def grad_norm(f):  # a function of x whose gradient is second order
        return lambda t: grad(loss(f))(t).square().sum()

    with backends.record_dispatch() as calls:
        results = [grad(loss(ours))(x), vmap(ours)(batches), jvp(ours, (x,), (tangent,))[1], grad(grad_norm(ours))(x)]
    expected = [grad(loss(theirs))(x), vmap(theirs)(batches), jvp(theirs, (x,), (tangent,))[1],
                grad(grad_norm(theirs))(x)]
    for got, want, what in zip(results, expected, ["grad", "vmap", "jvp", "second-order grad"]):
        assert got.shape == want.shape, what
        assert rel_err(got, want) <= TOL64, what
    assert not calls


@pytest.mark.parametrize("case", range(len(_public_op_cases())), ids=[c[0] for c in _public_op_cases()])
def test_public_ops_under_forward_mode_ad_match_torch(case):
    _, ours, theirs = _public_op_cases()[case]
    _assert_forward_derivatives_match(ours, theirs, torch.randn(2, 4, 9, 9, dtype=torch.float64))


def test_public_batch_norm_act_under_vmap_says_how_to_train_without_running_statistics():
    x = torch.randn(3, 2, 4, 5, 5)
    running_mean, running_var = torch.zeros(4), torch.ones(4)
    with pytest.raises(RuntimeError, match="running_mean=None and running_var=None"):
        vmap(lambda t: ops.batch_norm_act(t, None, None, running_mean, running_var, training=True))(x)
    assert torch.equal(running_mean, torch.zeros(4)) and torch.equal(running_var, torch.ones(4))


def test_public_ops_under_autocast_and_vjp_follow_the_ops_autocast_rule():
    """Under autocast (bfloat16 on CPU) the conv op casts x, the weight, the bias and the residual, reads the
    BatchNorm tensors in float32 and returns bfloat16 (a float32 residual would promote the sum), under a
    transform as outside one; the gradients agree."""
    x, residual = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 8, 8)
    w, gamma, beta = torch.randn(5, 4, 3, 3), torch.rand(5) + 0.5, torch.randn(5)
    mean, var = torch.randn(5), torch.rand(5) + 0.5

    def f(t):
        return ops.conv_bn_act(t, w, None, gamma, beta, mean, var, padding=1, residual=residual)

    eager_x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        eager = f(eager_x)
        out, vjp_fn = torch.func.vjp(f, x)
    assert out.dtype == eager.dtype == torch.bfloat16
    assert rel_err(out.float(), eager.float()) <= 1e-2
    eager.backward(torch.ones_like(eager))
    (g,) = vjp_fn(torch.ones_like(out))
    assert g.dtype == torch.float32
    assert rel_err(g, eager_x.grad) <= 1e-2
