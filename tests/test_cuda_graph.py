"""resnet_fast.cuda_graph: argument checks (CPU, in CI) and replay parity (GPU)."""

import pytest
import torch

import resnet_fast
from resnet_fast.testing import randomize_batch_norm
from conftest import rel_err, requires_cuda


@pytest.mark.parametrize(
    "make_model,example,error,match",
    [
        (lambda: resnet_fast.resnet18(), torch.randn(1, 3, 32, 32), ValueError, "training mode: call model.eval"),
        (lambda: resnet_fast.resnet18().eval(), torch.ones(1, 3, 32, 32, dtype=torch.int64), TypeError,
         "floating-point"),
        (lambda: resnet_fast.resnet18().eval(), [1, 2, 3], TypeError, "torch.Tensor"),
        (lambda: resnet_fast.resnet18().eval(), torch.randn(1, 4, 32, 32), ValueError, "must have 3 channels"),
        (lambda: resnet_fast.resnet18().eval(), torch.randn(3, 32, 32), ValueError, "4-D"),
        (lambda: resnet_fast.resnet18().eval(), torch.randn(1, 3, 32, 32).double(), TypeError, "dtype"),
        (lambda: resnet_fast.resnet18().eval(), torch.randn(1, 3, 32, 32), ValueError, "needs a CUDA model"),
    ],
    ids=["train-mode", "int-input", "not-a-tensor", "channels", "rank", "dtype", "cpu-model"],
)
def test_argument_checks(make_model, example, error, match):
    with pytest.raises(error, match=match):
        resnet_fast.cuda_graph(make_model(), example)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_replay_equals_eager_and_follows_in_place_updates(dtype):
    model = randomize_batch_norm(resnet_fast.resnet50()).eval().cuda().to(dtype)
    x = torch.randn(1, 3, 224, 224, device="cuda", dtype=dtype)
    with torch.no_grad(), resnet_fast.backend("triton", strict=True):
        fast = resnet_fast.cuda_graph(model, x)
        for _ in range(2):
            y = torch.randn_like(x)
            assert rel_err(fast(y), model(y)) <= 1e-3  # the same kernels: a stale weight would be off by percents
        # In-place updates the replay must see: an EMA-style .data edit, a BN statistic, load_state_dict.
        model.layer2[0].conv2.weight.data.mul_(0.5)
        model.layer3[1].bn1.running_var.data.mul_(3.0)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["fc.bias"].add_(1.0)
        model.load_state_dict(state)
        y = torch.randn_like(x)
        assert rel_err(fast(y), model(y)) <= 1e-3  # the same kernels: a stale weight would be off by percents


@requires_cuda
def test_another_shape_is_captured_too():
    model = randomize_batch_norm(resnet_fast.resnet18()).eval().cuda()
    with torch.no_grad():
        fast = resnet_fast.cuda_graph(model, torch.randn(1, 3, 64, 64, device="cuda"))
        for shape in [(2, 3, 64, 64), (1, 3, 96, 80), (1, 3, 64, 64)]:
            x = torch.randn(shape, device="cuda")
            assert rel_err(fast(x), model(x)) <= 1e-5
    assert len(fast._captures) == 3


@requires_cuda
def test_compile_reduce_overhead_keeps_the_fused_ops():
    model = randomize_batch_norm(resnet_fast.resnet50()).eval().cuda().half()
    x = torch.randn(1, 3, 224, 224, device="cuda", dtype=torch.half)
    graphs = []

    def keep(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(model, mode="reduce-overhead")
        for _ in range(3):  # warm-up, recording, replay
            out = compiled(x)
        assert rel_err(out, model(x)) <= 2.0**-9
        torch._dynamo.reset()
        torch.compile(model, backend=keep)(x)  # what dynamo hands Inductor: the fused ops, not the modules
    assert "resnet_fast.conv_bn_act" in "\n".join(graphs)
