"""FrozenBatchNorm2d (torchvision's detection backbones) runs fused, in inference and in fine-tuning."""

import pytest
import torch
import torchvision
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.ops.misc import FrozenBatchNorm2d

import resnet_fast
from resnet_fast import backends
from resnet_fast.testing import randomize_batch_norm
from conftest import lowp_tolerance, rel_err
from helpers import float64_copy, model_pair


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_frozen_batch_norm_models_are_fused(arch):
    """Every conv of a FrozenBatchNorm2d ResNet runs fused, in eval and in train mode (frozen statistics
    do not train), and matches torchvision: one conv_bn_act each, the stem's conv as the stem op in eval
    mode (training keeps the stem's conv + pool path)."""
    tv, rf = model_pair(arch, norm_layer=FrozenBatchNorm2d)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in rf.modules())
    x = torch.randn(2, 3, 48, 48)
    for train in (False, True):
        tv.train(train), rf.train(train)
        with torch.no_grad(), backends.record_dispatch() as calls:
            out = rf(x)
        expected = {("conv_bn_act", "torch"): convs} if train else {("conv_bn_act", "torch"): convs - 1,
                                                                      ("stem", "torch"): 1}
        assert calls == expected
        with torch.no_grad():
            assert rel_err(out, tv(x)) <= 1e-5


def _fpn_backbone(builder):
    """torchvision's resnet_fpn_backbone, building its ResNet with ``builder`` (as detection code does)."""
    import torchvision.models.detection.backbone_utils as bu

    original = bu.resnet.__dict__["resnet50"]
    bu.resnet.__dict__["resnet50"] = builder
    try:
        return resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=3)
    finally:
        bu.resnet.__dict__["resnet50"] = original


def test_fasterrcnn_fpn_backbone_matches_torchvision():
    theirs = randomize_batch_norm(_fpn_backbone(torchvision.models.resnet50)).eval()
    ours = _fpn_backbone(resnet_fast.resnet50).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert isinstance(ours.body.layer1[0].bn1, FrozenBatchNorm2d)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad(), backends.record_dispatch() as calls:
        a = ours(x)
    with torch.no_grad():
        b = theirs(x)
    # Every conv of every block, fused. The stem's conv1/bn1/relu run as separate modules: torchvision's
    # IntermediateLayerGetter calls the ResNet's children one by one, never ResNet.forward.
    assert calls == {("conv_bn_act", "torch"): 52}
    assert list(a) == list(b)
    for key in a:
        assert rel_err(a[key], b[key]) <= 1e-5, key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_frozen_batch_norm_fine_tuning_gradients(dtype):
    """Frozen-BN fine-tuning runs the fused op with a backward: the gradient of the input and of every
    parameter, together, within 2x torchvision's own same-dtype error against float64 (dtypes the
    reference backend serves on CPU). Judged on the whole gradient: in low precision a ReLU mask flipped
    by rounding moves single entries of small tensors, in torchvision's run as in ours.

    A second draw is allowed when the first fails. In float32 the errors are ~1.3e-6, but a ReLU input
    within rounding of zero at layer4 (16 positions per channel) can flip in our run and not in
    torchvision's, which moves the whole gradient by ~5e-4 (seen in 1 of 25 draws, in both runs; one
    xdist run failed on it). A wrong formula or index fails every draw."""
    failures = []
    for _ in range(2):
        tv, rf = model_pair("resnet18", norm_layer=FrozenBatchNorm2d, num_classes=7)
        tv64 = float64_copy(tv)
        tv, rf = tv.train().to(dtype), rf.train().to(dtype)
        x = torch.randn(4, 3, 64, 64)
        grads = []
        for model, cast in ((rf, dtype), (tv, dtype), (tv64, torch.float64)):
            xi = x.detach().clone().to(cast).requires_grad_()
            out = model(xi)
            (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            assert all(p.grad is not None for p in model.parameters())
            grads.append(torch.cat([xi.grad.flatten().double()] + [p.grad.flatten().double() for p in model.parameters()]))
        mine, same, ref = grads
        if rel_err(mine, ref) <= lowp_tolerance(dtype, same, ref):
            return
        failures.append((rel_err(mine, ref), lowp_tolerance(dtype, same, ref)))
    pytest.fail(f"(error, tolerance) of both draws: {failures}")
