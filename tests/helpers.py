"""Model builders shared by the tests."""
import copy

import torch
import torchvision

import resnet_fast
from resnet_fast.testing import randomize_batch_norm


def model_pair(arch: str, **kwargs):
    """(torchvision model, resnet_fast model) with identical random weights and randomised BN stats."""
    tv = randomize_batch_norm(getattr(torchvision.models, arch)(**kwargs))
    rf = getattr(resnet_fast, arch)(**kwargs)
    rf.load_state_dict(tv.state_dict(), strict=True)
    return tv, rf


def float64_copy(model):
    return copy.deepcopy(model).double()
