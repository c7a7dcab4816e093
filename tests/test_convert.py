"""convert(): torchvision ResNets inside any module become resnet_fast's, in place."""
import pytest
import torch
import torchvision
from torch import nn

import resnet_fast
from resnet_fast.testing import randomize_batch_norm
from conftest import lowp_tolerance, rel_err
from helpers import float64_copy


class Pipeline(nn.Module):
    """A user's model that embeds a torchvision backbone and a bare block."""

    def __init__(self):
        super().__init__()
        self.backbone = randomize_batch_norm(torchvision.models.resnet50(num_classes=7))
        self.extra = torchvision.models.resnet.BasicBlock(7, 7)  # a block outside any ResNet

    def forward(self, x):
        logits = self.backbone(x)
        return self.extra(logits[:, :, None, None].expand(-1, -1, 3, 3).contiguous())


@pytest.mark.parametrize("training", [False, True])
def test_convert_keeps_tensors_mode_and_outputs(training):
    model = Pipeline().train(training)
    randomize_batch_norm(model.extra)
    params = {n: p for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # Training normalises by batch statistics: at 8x64x64 layer4 has 32 values per channel (at 3x48x48 it had
    # 12, and torchvision's own fp32 error against float64 reached 1.2e-4).
    x = torch.randn(8, 3, 64, 64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    expected64 = float64_copy(model)(x.double())
    expected = model(x)
    model.load_state_dict(state)  # undo the running-stat update of that forward
    out = resnet_fast.convert(model)
    assert out is model and type(model.backbone) is resnet_fast.ResNet
    assert all(type(b) is resnet_fast.Bottleneck for b in model.backbone.layer3)
    assert type(model.extra) is resnet_fast.BasicBlock
    assert all(p is params[n] for n, p in model.named_parameters())  # the optimizer still holds them
    assert model.training == training and model.backbone.layer1[0].bn1.training == training
    assert model.backbone.stage_names == ["layer1", "layer2", "layer3", "layer4"]
    out = model(x)
    if training:
        assert rel_err(out, expected64) <= lowp_tolerance(torch.float32, expected, expected64)
    else:
        assert rel_err(out, expected) <= 1e-5
    model(x).sum().backward()
    opt.step()
    assert model.backbone.fc.weight.grad is not None


def test_convert_keeps_device_dtype_and_state_dict():
    tv = randomize_batch_norm(torchvision.models.resnet18()).double().eval()
    keys = list(tv.state_dict())
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = tv(x)
        resnet_fast.convert(tv)
        assert tv.conv1.weight.dtype == torch.float64 and list(tv.state_dict()) == keys
        assert rel_err(tv(x), expected) <= 1e-12


def test_convert_leaves_subclasses_and_other_modules_alone():
    class MyBlock(torchvision.models.resnet.BasicBlock):
        pass

    seq = nn.Sequential(MyBlock(4, 4), nn.Conv2d(4, 4, 1))
    resnet_fast.convert(seq)
    assert type(seq[0]) is MyBlock and type(seq[1]) is nn.Conv2d
    fast = resnet_fast.resnet18()
    assert resnet_fast.convert(fast) is fast and type(fast) is resnet_fast.ResNet


def test_convert_a_backbone_whose_head_was_replaced():
    tv = randomize_batch_norm(torchvision.models.resnet50()).eval()
    tv.fc = nn.Identity()  # a common feature-extractor setup
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = tv(x)
        resnet_fast.convert(tv)
        assert tv.num_features == 2048 and rel_err(tv(x), expected) <= 1e-5
