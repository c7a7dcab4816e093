"""adapt_input_channels, GrayToRGB, freeze/unfreeze, param_groups, and loading pretrained weights."""

import pytest
import torch
import torchvision
from torch import nn

import resnet_fast
from resnet_fast.testing import randomize_batch_norm
from conftest import rel_err
from helpers import model_pair


@pytest.fixture
def rgb_model():
    _, m = model_pair("resnet18")
    return m.eval()


def test_sum_gray_equals_rgb_model_on_repeated_gray(rgb_model):
    gray = torch.randn(2, 1, 48, 48)
    with torch.no_grad():
        expected = rgb_model(gray.repeat(1, 3, 1, 1))
        resnet_fast.adapt_input_channels(rgb_model, 1, "sum")
        assert rgb_model.conv1.in_channels == 1
        assert rel_err(rgb_model(gray), expected) <= 1e-5


@pytest.mark.parametrize("n", [2, 5])
def test_sum_with_n_identical_channels(rgb_model, n):
    gray = torch.randn(1, 1, 40, 40)
    with torch.no_grad():
        expected = rgb_model(gray.repeat(1, 3, 1, 1))
        resnet_fast.adapt_input_channels(rgb_model, n, "sum")
        assert rel_err(rgb_model(gray.repeat(1, n, 1, 1)), expected) <= 1e-5


def test_repeat_keeps_rgb_and_handles_cyclic_inputs(rgb_model):
    x = torch.randn(2, 3, 40, 40)
    w = rgb_model.conv1.weight.detach().clone()
    assert torch.equal(resnet_fast.adapt_conv_weight(w, 3, "repeat"), w)
    with torch.no_grad():
        expected = rgb_model(x)
        resnet_fast.adapt_input_channels(rgb_model, 6, "repeat")
        assert rel_err(rgb_model(x.repeat(1, 2, 1, 1)), expected) <= 1e-5


def test_mean_and_luminance_weights():
    w = torch.randn(8, 3, 7, 7)
    assert torch.allclose(resnet_fast.adapt_conv_weight(w, 1, "mean"), w.mean(1, keepdim=True))
    lum = resnet_fast.adapt_conv_weight(w, 1, "luminance")
    assert torch.allclose(lum[:, 0], 0.299 * w[:, 0] + 0.587 * w[:, 1] + 0.114 * w[:, 2], atol=1e-6)
    assert torch.allclose(resnet_fast.adapt_conv_weight(w, 2, "luminance"), lum.expand(-1, 2, -1, -1) / 2)


def test_adapt_rejects_bad_arguments():
    with pytest.raises(ValueError, match="method must be one of"):
        resnet_fast.adapt_conv_weight(torch.randn(4, 3, 3, 3), 1, "average")
    with pytest.raises(ValueError, match="in_channels must be a positive int"):
        resnet_fast.adapt_conv_weight(torch.randn(4, 3, 3, 3), 0)
    with pytest.raises(ValueError, match=r"an RGB conv\), got shape \(4, 1, 3, 3\)"):
        resnet_fast.adapt_conv_weight(torch.randn(4, 1, 3, 3), 2)


def test_gray_to_rgb_starts_as_repeat_and_learns(rgb_model):
    gray = torch.randn(2, 1, 32, 32)
    g2r = resnet_fast.GrayToRGB()
    assert torch.equal(g2r(gray), gray.repeat(1, 3, 1, 1))
    model = nn.Sequential(g2r, rgb_model)
    model(gray).sum().backward()
    assert g2r.conv.weight.grad is not None and g2r.conv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"expects \[N, 1, H, W\]"):
        g2r(torch.randn(1, 3, 8, 8))


def test_freeze_keeps_batch_norm_in_eval_after_train():
    _, m = model_pair("resnet18", num_classes=4)
    resnet_fast.freeze(m, stages=["stem", "layer1"])
    m.train()
    assert not m.bn1.training and not m.layer1[0].bn1.training and m.layer2[0].bn1.training
    assert not any(p.requires_grad for p in m.layer1.parameters()) and m.conv1.weight.requires_grad is False
    assert all(p.requires_grad for p in m.layer2.parameters())
    frozen_stats = m.layer1[0].bn1.running_mean.clone()
    moving = m.layer2[0].bn1.running_mean.clone()
    m(torch.randn(4, 3, 32, 32)).sum().backward()
    assert torch.equal(m.layer1[0].bn1.running_mean, frozen_stats)
    assert not torch.equal(m.layer2[0].bn1.running_mean, moving)
    assert m.conv1.weight.grad is None and m.layer2[0].conv1.weight.grad is not None
    keys = list(m.state_dict())
    resnet_fast.unfreeze(m, ["stem", "layer1"])
    assert m.bn1.training and type(m.bn1) is nn.BatchNorm2d and all(p.requires_grad for p in m.parameters())
    assert list(m.state_dict()) == keys


def test_freeze_defaults_and_counts():
    m = resnet_fast.resnet18()
    resnet_fast.freeze(m)
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    m = resnet_fast.resnet18()
    resnet_fast.freeze(m, stages=2)
    assert not m.layer1[0].conv1.weight.requires_grad and m.layer2[0].conv1.weight.requires_grad
    with pytest.raises(ValueError, match="unknown stages"):
        resnet_fast.freeze(m, stages=["layer9"])


def test_frozen_model_matches_torchvision_eval_batch_norm_in_training():
    tv, rf = model_pair("resnet18", num_classes=4)
    resnet_fast.freeze(rf)
    tv.train()
    for mod in tv.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.eval()
    rf.train()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel_err(rf(x), tv(x)) <= 1e-5


def test_param_groups_layer_decay_and_no_decay():
    m = resnet_fast.resnet18()
    groups = resnet_fast.param_groups(m, lr=1.0, weight_decay=0.05, layer_decay=0.5)
    by_name = {g["name"]: g for g in groups}
    assert by_name["head.decay"]["lr"] == 1.0 and by_name["layer4.decay"]["lr"] == 0.5
    assert by_name["stem.decay"]["lr"] == 0.5**5 and by_name["stem.no_decay"]["weight_decay"] == 0.0
    assert by_name["layer1.decay"]["weight_decay"] == 0.05
    assert all(p.dim() == 1 for g in groups if g["name"].endswith("no_decay") for p in g["params"])
    n_params = sum(len(g["params"]) for g in groups)
    assert n_params == len(list(m.parameters()))
    torch.optim.AdamW(groups)  # a valid optimizer spec
    resnet_fast.freeze(m, ["stem"])
    groups = resnet_fast.param_groups(m, lr=1.0, weight_decay=0.05)
    assert "stem.decay" not in {g["name"] for g in groups} and all(g["lr"] == 1.0 for g in groups)


# --- pretrained weights -----------------------------------------------------------------------------


def test_weights_from_state_dict_and_file(tmp_path):
    tv = randomize_batch_norm(torchvision.models.resnet18())
    m = resnet_fast.resnet18(weights=tv.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(tv.state_dict().values(), m.state_dict().values()))
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tv.state_dict().items()}}, path)
    m2 = resnet_fast.resnet18(weights=str(path))
    assert all(torch.equal(a, b) for a, b in zip(tv.state_dict().values(), m2.state_dict().values()))


def test_weights_by_torchvision_name_and_enum(monkeypatch):
    tv = randomize_batch_norm(torchvision.models.resnet50())
    asked = []

    def fake_get_state_dict(self, *args, **kwargs):
        asked.append(self.name)
        return tv.state_dict()

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", fake_get_state_dict)
    for w in ("IMAGENET1K_V2", "ResNet50_Weights.IMAGENET1K_V1", torchvision.models.ResNet50_Weights.DEFAULT):
        m = resnet_fast.resnet50(weights=w)
        assert torch.equal(m.fc.weight, tv.fc.weight)
    assert asked == ["IMAGENET1K_V2", "IMAGENET1K_V1", "IMAGENET1K_V2"]
    with pytest.raises(ValueError, match="neither a file nor a weights name of resnet50"):
        resnet_fast.resnet50(weights="IMAGENET9K")


def test_weights_with_new_head_and_gray_input():
    tv = randomize_batch_norm(torchvision.models.resnet18()).eval()
    with pytest.warns(UserWarning, match="head \\(fc\\) is left newly initialised"):
        m = resnet_fast.resnet18(weights=tv.state_dict(), num_classes=5, in_channels=1)
    assert m.fc.out_features == 5 and torch.equal(m.layer4[1].conv2.weight, tv.layer4[1].conv2.weight)
    m.eval()
    gray = torch.randn(2, 1, 40, 40)
    with torch.no_grad():
        rgb = gray.repeat(1, 3, 1, 1)
        feats_tv = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(rgb))))))))
        assert rel_err(m.forward_features(gray), feats_tv) <= 1e-5


def test_weights_type_error():
    with pytest.raises(TypeError, match="weights must be a torchvision weights enum"):
        resnet_fast.resnet18(weights=3)


def test_mismatched_stem_checkpoint_is_refused():
    tv = torchvision.models.resnet18()
    with pytest.raises(ValueError, match="a different stem"):
        resnet_fast.resnet18(weights=tv.state_dict(), stem="cifar")
