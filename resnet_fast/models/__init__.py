"""Model definitions."""
from resnet_fast.models.resnet import *  # noqa: F401,F403
from resnet_fast.models.resnet import ARCHS, __all__  # noqa: F401
