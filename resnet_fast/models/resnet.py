"""torchvision-compatible ResNets whose blocks call the fused ``torch.library`` ops.

Same constructor arguments, attribute names and state_dict keys as ``torchvision.models.resnet``; the
classes subclass torchvision's, so ``isinstance`` checks written for torchvision still hold. Every
(conv, BatchNorm) pair runs as one :func:`~resnet_fast.ops.functional.conv_norm_act` call: in eval mode
(or with ``FrozenBatchNorm2d``) a single ``conv_bn_act`` with the BatchNorm, residual and ReLU in the
convolution's epilogue; in training the convolution, then ``batch_norm_act``. The same forward runs in
eager mode, ``torch.fx`` (its nodes named as torchvision's graph names the same values, for torchvision's
feature extraction), TorchScript, ``torch.compile`` and ``torch.export``. Where a fused call would not do
what the modules do, or cannot run (hooks, other norms or activations, ``torch.func`` transforms,
``torch.onnx.export``; :mod:`resnet_fast.models.conv_bn`), a block runs torchvision's forward.

On CUDA the conv weights are kept channels_last (the layout ``model.to(memory_format=torch.channels_last)``
gives, applied whenever the model moves to a GPU), so activations are NHWC from the first convolution on
without a conversion pass. On CPU the model keeps torchvision's layouts. In eval mode the ImageNet stem
(conv1, bn1, ReLU, maxpool) is one ``stem`` op that reads the caller's batch as given (a float32 batch
for a float16/bfloat16 model too) and casts it as it loads it.
"""

import os
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torchvision.models.resnet as tv
from torch import Tensor, nn
from torch.nn.modules.utils import _pair
from torchvision.models import get_model_weights

from resnet_fast import ops
from resnet_fast.models.conv_bn import check_scriptable, fusable, hooked
from resnet_fast.ops import library
from resnet_fast.ops.functional import conv_norm_act, traced_conv_norm_act
from resnet_fast.ops.layout import is_channels_last
from resnet_fast.ops.reference import STEM_CONV, STEM_POOL

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "Downsample",
    "ResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
]

STEMS = ("imagenet", "cifar")


def _conv_tensors(conv: nn.Module) -> tuple[Tensor, Optional[Tensor]]:
    """``conv.weight, conv.bias``. For an exact ``nn.Conv2d`` that lookup ends in ``_parameters``, so they are
    read there: ``Module.__getattr__`` costs about 1 µs a tensor, six tensors for each of a resnet50's 53
    convolutions every forward. Other classes (a parametrization's property, say) go through getattr."""
    if type(conv) is nn.Conv2d:
        p = conv._parameters
        return p["weight"], p["bias"]
    return conv.weight, conv.bias


def _norm_tensors(norm: nn.Module, training: bool) -> tuple[Optional[Tensor], ...]:
    """``norm``'s weight, bias, running mean and variance, and, when ``training`` (the only time it is read),
    its ``num_batches_tracked``; read as :func:`_conv_tensors` reads a conv's (FrozenBatchNorm2d keeps them
    all as buffers, through getattr)."""
    if type(norm) is nn.BatchNorm2d:
        p, b = norm._parameters, norm._buffers
        tracked = b["num_batches_tracked"] if training else None
        return p["weight"], p["bias"], b["running_mean"], b["running_var"], tracked
    tracked = getattr(norm, "num_batches_tracked", None) if training else None
    return norm.weight, norm.bias, norm.running_mean, norm.running_var, tracked


def _pair_arguments(conv: nn.Module, norm: nn.Module) -> tuple:
    """The :func:`conv_norm_act` arguments of a (conv, norm) pair after x and before the residual."""
    training = norm.training
    weight, bias = _conv_tensors(conv)
    gamma, beta, mean, var, tracked = _norm_tensors(norm, training)
    return (
        weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups, gamma, beta, mean, var, norm.eps,
        training, getattr(norm, "momentum", None), tracked,
    )


def _conv_norm_act_calls(
    pairs: list[tuple[nn.Module, nn.Module]], x: Tensor, residual: Optional[Tensor], relu: bool
) -> Tensor:
    """The (conv, norm) pairs in order as :func:`conv_norm_act` calls, ReLU after each when ``relu``,
    ``residual`` added by the last."""
    last = len(pairs) - 1
    for i, (conv, norm) in enumerate(pairs):
        x = conv_norm_act(x, *_pair_arguments(conv, norm), residual if i == last else None, relu)
    return x


def _graph_arguments(pairs: list[tuple[nn.Module, nn.Module]], tracer: torch.fx.Tracer) -> list[tuple]:
    """Under ``torch.fx`` tracing, each pair's :func:`_pair_arguments` with its tensors made graph nodes
    now, in the pairs' order: a block reads all its pairs before its shortcut runs, as torchvision's graph
    does, so an extractor built from the graph lists its parameters in torchvision's order."""
    return [
        tuple(torch.fx.Proxy(tracer.create_arg(a), tracer) if isinstance(a, Tensor) else a for a in
              _pair_arguments(conv, norm))
        for conv, norm in pairs
    ]


def _traced_conv_norm_act_calls(
    arguments: list[tuple],
    x: torch.fx.Proxy,
    residual: Optional[torch.fx.Proxy],
    relu: bool,
    names: list[tuple[Optional[str], Optional[str]]],
) -> torch.fx.Proxy:
    """:func:`_conv_norm_act_calls` as graph nodes (:func:`traced_conv_norm_act`), from the pairs'
    :func:`_graph_arguments`, with each pair's (conv node, result node) names."""
    last = len(arguments) - 1
    for i, pair in enumerate(arguments):
        x = traced_conv_norm_act(*names[i], x, *pair, residual if i == last else None, relu)
    return x


class _FusedPairs:
    """What a module with (conv, norm) pairs shares: the pairs, named by ``_PAIRS`` (``(conv, norm)``
    child names in forward order), and the activation module applied after each, named by ``_ACTIVATION``
    (None for none); the Python-mode forwards that run them as :func:`conv_norm_act` calls; and the refusal
    to script modules that TorchScript would fuse but Python would not (see :func:`check_scriptable`)."""

    _PAIRS: tuple[tuple[str, str], ...] = ()
    _ACTIVATION: Optional[str] = "relu"

    def _conv_norm_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        # Read from _modules: a forward runs this for every block, and Module.__getattr__ costs more than
        # the dictionary lookup.
        children = self._modules
        return [(children[conv], children[norm]) for conv, norm in self._PAIRS]

    def _activation(self) -> Optional[nn.Module]:
        return None if self._ACTIVATION is None else self._modules[self._ACTIVATION]

    def _node_names(self) -> list[tuple[Optional[str], Optional[str]]]:
        """Under ``torch.fx`` tracing, each pair's (convolution node, result node) names: the names
        torchvision's graph gives the same values, the conv's and the activation's (or, with none, the
        norm's), as in ``layer1.0.conv1`` and ``layer1.0.relu``. None where a child's name is not an
        identifier (a Sequential's ``"0"``): torch.fx's own name then."""

        def name(child: Optional[str]) -> Optional[str]:
            return child if child is not None and child.isidentifier() else None

        return [(name(conv), name(self._ACTIVATION or norm)) for conv, norm in self._PAIRS]

    @torch.jit.unused
    def _fused_forward(self, x: Tensor, residual: Optional[Tensor]) -> Optional[Tensor]:
        """The pairs as :func:`conv_norm_act` calls (:func:`_conv_norm_act_calls`), or None when the modules
        do not fuse (checked on every forward, so modules swapped and hooks registered after construction
        are honoured)."""
        pairs = self._conv_norm_pairs()
        activation = self._activation()
        if not fusable(pairs, activation):
            return None
        relu = activation is not None
        if isinstance(x, torch.fx.Proxy):
            arguments = _graph_arguments(pairs, x.tracer)
            return _traced_conv_norm_act_calls(arguments, x, residual, relu, self._node_names())
        return _conv_norm_act_calls(pairs, x, residual, relu)

    @torch.jit.unused
    def _block_forward(self, x: Tensor) -> Tensor:
        """A residual block's Python-mode forward: its pairs fused, or torchvision's own forward (every module
        called, in torchvision's order, so hooks see what they would see there) where they do not fuse.
        The shortcut runs where torchvision runs it, just before the last pair, which adds the residual."""
        pairs = self._conv_norm_pairs()
        if not fusable(pairs, self._activation()):
            return super(_FusedPairs, self).forward(x)
        if isinstance(x, torch.fx.Proxy):
            arguments, names = _graph_arguments(pairs, x.tracer), self._node_names()
            out = _traced_conv_norm_act_calls(arguments[:-1], x, None, True, names[:-1])
            identity = x if self.downsample is None else self.downsample(x)
            return _traced_conv_norm_act_calls(arguments[-1:], out, identity, True, names[-1:])
        out = _conv_norm_act_calls(pairs[:-1], x, None, True)
        identity = x if self.downsample is None else self.downsample(x)
        return _conv_norm_act_calls(pairs[-1:], out, identity, True)

    def __prepare_scriptable__(self) -> nn.Module:
        check_scriptable(self, self._conv_norm_pairs(), self._activation())
        return self


# TorchScript cannot look modules up by name, so each forward below also writes its pairs out as
# conv_norm_act calls for the scripted path; _conv_norm_act_calls is the same sequence for Python mode.


class Downsample(_FusedPairs, nn.Sequential):
    """torchvision's shortcut ``Sequential(conv1x1, norm)`` (same children and state_dict keys), run as one
    fused conv + BatchNorm."""

    _PAIRS = (("0", "1"),)
    _ACTIVATION = None

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            out = self._fused_forward(x, None)
            if out is not None:
                return out
        elif hasattr(self[1], "running_var"):
            c = self[0]
            n = self[1]
            return conv_norm_act(
                x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups, n.weight, n.bias, n.running_mean,
                n.running_var, n.eps, n.training, getattr(n, "momentum", None), getattr(n, "num_batches_tracked", None),
                None, False,
            )
        return self[1](self[0](x))


class BasicBlock(_FusedPairs, tv.BasicBlock):
    """Two 3x3 convolutions with a residual connection (torchvision's constructor and attributes)."""

    _PAIRS = (("conv1", "bn1"), ("conv2", "bn2"))

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            return self._block_forward(x)
        identity = x
        if self.downsample is not None:
            identity = self.downsample(x)
        if hasattr(self.bn1, "running_var") and hasattr(self.bn2, "running_var"):
            c = self.conv1
            n = self.bn1
            out = conv_norm_act(
                x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups, n.weight, n.bias, n.running_mean,
                n.running_var, n.eps, n.training, getattr(n, "momentum", None), getattr(n, "num_batches_tracked", None),
                None, True,
            )
            c = self.conv2
            n = self.bn2
            return conv_norm_act(
                out, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups, n.weight, n.bias, n.running_mean,
                n.running_var, n.eps, n.training, getattr(n, "momentum", None), getattr(n, "num_batches_tracked", None),
                identity, True,
            )
        out = self.relu(self.bn1(self.conv1(x)))
        return torch.ops.resnet_fast.add_relu(self.bn2(self.conv2(out)), identity)


class Bottleneck(_FusedPairs, tv.Bottleneck):
    """1x1 reduce, 3x3 (carrying the stride: ResNet v1.5), 1x1 expand, with a residual connection
    (torchvision's constructor and attributes)."""

    _PAIRS = (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"))

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            return self._block_forward(x)
        identity = x
        if self.downsample is not None:
            identity = self.downsample(x)
        if hasattr(self.bn1, "running_var") and hasattr(self.bn2, "running_var") and hasattr(self.bn3, "running_var"):
            c = self.conv1
            n = self.bn1
            out = conv_norm_act(
                x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups, n.weight, n.bias, n.running_mean,
                n.running_var, n.eps, n.training, getattr(n, "momentum", None), getattr(n, "num_batches_tracked", None),
                None, True,
            )
            c = self.conv2
            n = self.bn2
            out = conv_norm_act(
                out, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups, n.weight, n.bias, n.running_mean,
                n.running_var, n.eps, n.training, getattr(n, "momentum", None), getattr(n, "num_batches_tracked", None),
                None, True,
            )
            c = self.conv3
            n = self.bn3
            return conv_norm_act(
                out, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups, n.weight, n.bias, n.running_mean,
                n.running_var, n.eps, n.training, getattr(n, "momentum", None), getattr(n, "num_batches_tracked", None),
                identity, True,
            )
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return torch.ops.resnet_fast.add_relu(self.bn3(self.conv3(out)), identity)


def use_fused_classes(module: nn.Module) -> None:
    """Gives torchvision's blocks and shortcut ``Sequential(conv, norm)``s resnet_fast's classes, in place."""
    classes = {tv.BasicBlock: BasicBlock, tv.Bottleneck: Bottleneck}
    for m in module.modules():
        if type(m) in classes:
            m.__class__ = classes[type(m)]
        if isinstance(m, tv.BasicBlock | tv.Bottleneck) and type(m.downsample) is nn.Sequential:
            if len(m.downsample) == 2 and isinstance(m.downsample[0], nn.Conv2d):
                m.downsample.__class__ = Downsample


class ResNet(_FusedPairs, tv.ResNet):
    """ResNet with torchvision's arguments and state_dict keys, plus input/stem/width options.

    Args (beyond torchvision's):
        in_channels: channels of the input image (1 for grayscale; any N >= 1).
        stem: ``"imagenet"`` (7x7 stride-2 conv, then 3x3 stride-2 max-pool) or ``"cifar"`` (3x3
            stride-1 conv, no pooling: for 32x32-class images). Both keep the names ``conv1``/``bn1``/``maxpool``.
        widths: planes of each stage; ``len(layers)`` stages named ``layer1``... Default
            ``64 * 2**i`` per stage, i.e. ``(64, 128, 256, 512)`` for four.
    Input: ``[N, in_channels, H, W]`` float tensor, NCHW or channels_last, H and W >= 1 (N may be 0).
    Output: ``[N, num_classes]`` logits.
    """

    _PAIRS = (("conv1", "bn1"),)
    __jit_unused_properties__ = ["in_channels"]  # it reads _first_conv, which TorchScript does not compile

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: Sequence[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        replace_stride_with_dilation: Sequence[bool] | None = None,
        norm_layer: Callable[..., nn.Module] | None = None,
        *,
        in_channels: int = 3,
        stem: str = "imagenet",
        widths: Sequence[int] | None = None,
    ) -> None:
        nn.Module.__init__(self)  # torchvision's __init__ hard-codes the stem and four stages
        layers = list(layers)
        if not layers or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be a non-empty list of block counts >= 1, got {layers}")
        widths = [64 * 2**i for i in range(len(layers))] if widths is None else [int(w) for w in widths]
        if len(widths) != len(layers) or min(widths) < 1:
            raise ValueError(f"widths must give one positive width per stage ({len(layers)} stages), got {widths}")
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False] * (len(layers) - 1)
        if len(replace_stride_with_dilation) != len(layers) - 1:
            raise ValueError(
                f"replace_stride_with_dilation should be None or a {len(layers) - 1}-element tuple, "
                f"got {replace_stride_with_dilation}"
            )
        norm_layer = nn.BatchNorm2d if norm_layer is None else norm_layer
        self._norm_layer = norm_layer
        self.inplanes = widths[0]
        self.dilation = 1
        self.groups = groups
        self.base_width = width_per_group
        # Children in torchvision's order: code like nn.Sequential(*list(model.children())[:-1]) runs them so.
        imagenet = stem == "imagenet"
        kernel, stride, padding = (7, 2, 3) if imagenet else (3, 1, 1)
        self.conv1 = nn.Conv2d(in_channels, self.inplanes, kernel, stride=stride, padding=padding, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1) if imagenet else nn.Identity()
        for i, (planes, blocks) in enumerate(zip(widths, layers)):
            dilate = i > 0 and replace_stride_with_dilation[i - 1]
            stage = self._make_layer(block, planes, blocks, stride=1 if i == 0 else 2, dilate=dilate)
            setattr(self, f"layer{i + 1}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1] * block.expansion, num_classes)
        use_fused_classes(self)
        self._init_runtime_state()

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, tv.Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, tv.BasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)
        self._use_kernel_weight_layout()

    def _init_runtime_state(self) -> None:
        """Attributes torchvision's ResNet lacks, read off the modules (``convert`` calls this too)."""
        self.stage_names = [name for name, _ in self.named_children() if name.startswith("layer")]
        last = getattr(self, self.stage_names[-1])[-1]
        self.num_features = getattr(last, "conv3", last.conv2).out_channels

    def _use_kernel_weight_layout(self) -> None:
        """Conv weights on CUDA become channels_last in place (same Parameter objects): the NHWC kernels'
        layout, and what makes cuDNN return NHWC activations in training too."""
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Conv2d) and m.weight.is_cuda and not is_channels_last(m.weight):
                    m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> "ResNet":
        super()._apply(fn, *args, **kwargs)
        self._use_kernel_weight_layout()
        return self

    def __prepare_scriptable__(self) -> nn.Module:
        if self.stage_names != [f"layer{i}" for i in range(1, min(len(self.stage_names), 4) + 1)]:
            raise NotImplementedError(
                f"torch.jit.script supports up to 4 stages named layer1..layer4, got {self.stage_names}"
            )
        return super().__prepare_scriptable__()

    @property
    def in_channels(self) -> int:
        return self._first_conv().in_channels

    @torch.jit.unused
    def _first_conv(self) -> nn.Conv2d:
        """The conv the input meets first: ``conv1``, or the Conv2d inside it where a pipeline wrapped it
        (``torch.ao.quantization.fuse_modules`` makes it ``ConvReLU2d(conv, relu)``)."""
        conv = self.conv1
        if isinstance(conv, nn.Conv2d):
            return conv
        return next(m for m in conv.modules() if isinstance(m, nn.Conv2d))

    @torch.jit.unused
    def _check_input(self, x: torch.Tensor) -> None:
        if isinstance(x, torch.fx.Proxy):  # symbolic tracing: nothing to check yet
            return
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"x must be a 4-D [N, C, H, W] image batch, got shape {tuple(x.shape)}")
        conv = self._first_conv()
        if x.shape[1] != conv.in_channels:
            raise ValueError(
                f"x must have {conv.in_channels} channels (the model's in_channels), got {x.shape[1]} "
                f"(shape {tuple(x.shape)}); see resnet_fast.adapt_input_channels to port a model to other inputs"
            )
        if x.shape[2] < 1 or x.shape[3] < 1:
            raise ValueError(f"x must hold images of at least 1x1, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        weight = conv.weight
        if x.device != weight.device:
            raise ValueError(f"x is on {x.device} but the model's parameters are on {weight.device}")
        # A float32 image batch is fine for a half-precision model: the stem casts it (in its load when fused).
        image_batch = x.dtype == torch.float32 and weight.dtype in (torch.float16, torch.bfloat16)
        if x.dtype != weight.dtype and not image_batch and ops.autocast_dtype(x.device) is None:
            raise TypeError(
                f"x has dtype {x.dtype} but the model's parameters are {weight.dtype}; "
                "cast one to the other (float32 x is fine for a float16/bfloat16 model) or run under torch.autocast"
            )

    @torch.jit.unused
    def _fused_stem(self) -> bool:
        """Whether the stem runs as one ``stem`` op (:func:`resnet_fast.ops.stem`): in eval mode, for the
        ImageNet stem (torchvision's 7x7 stride-2 ``conv1``, a ``bn1`` applying its running statistics, a
        3x3 stride-2 ``maxpool``, all unhooked). Checked on every forward, like :func:`fusable`, so modules
        swapped and hooks registered after construction are honoured; the CIFAR stem and training keep the
        conv + pool path."""
        conv, norm, pool = self.conv1, self.bn1, self.maxpool
        if not fusable(self._conv_norm_pairs(), self._activation()) or hooked(pool):
            return False
        k, s, p = STEM_CONV
        imagenet_conv = (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups) == (
            (k, k), (s, s), (p, p), (1, 1), 1
        )
        imagenet_pool = (
            type(pool) is nn.MaxPool2d
            and not pool.ceil_mode
            and not pool.return_indices
            and [_pair(v) for v in (pool.kernel_size, pool.stride, pool.padding, pool.dilation)]
            == [(v, v) for v in (*STEM_POOL, 1)]
        )
        running_stats = not norm.training and getattr(norm, "running_var", None) is not None
        return not self.training and running_stats and imagenet_conv and imagenet_pool

    def forward_features(self, x: Tensor) -> Tensor:
        """``[N, in_channels, H, W]`` -> the last stage's feature map ``[N, num_features, h, w]``."""
        if torch.jit.is_scripting():
            return self._features(x)
        return self._checked_features(x)

    @torch.jit.unused
    def _checked_features(self, x: Tensor) -> Tensor:
        """Python mode: x checked once here, then the forward with each op's kernel resolved once
        (:func:`resnet_fast.ops.library.resolve_once`) rather than at every convolution."""
        self._check_input(x)
        return library.resolve_once(self._features, x)

    def _features(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting() and self._fused_stem():
            weight, bias = _conv_tensors(self.conv1)
            gamma, beta, mean, var, _ = _norm_tensors(self.bn1, False)
            # x as the caller gave it: the op casts it as it loads it, and returns NHWC on CUDA.
            args = (x, weight, bias, gamma, beta, mean, var, self.bn1.eps)
            if isinstance(x, torch.fx.Proxy):  # named as torchvision's graph names the stem's result
                x = library.traced(torch.ops.resnet_fast.stem, args, "maxpool")
            else:
                x = library.call("stem", *args)
        else:
            out: Optional[Tensor] = None
            if not torch.jit.is_scripting():
                x = x.to(_conv_tensors(self._first_conv())[0].dtype)  # the fused stem's cast, a pass of its own
                out = self._fused_forward(x, None)
            else:
                x = x.to(self.conv1.weight.dtype)
                if hasattr(self.bn1, "running_var"):
                    c = self.conv1
                    n = self.bn1
                    out = conv_norm_act(
                        x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups, n.weight, n.bias,
                        n.running_mean, n.running_var, n.eps, n.training, getattr(n, "momentum", None),
                        getattr(n, "num_batches_tracked", None), None, True,
                    )
            x = self.relu(self.bn1(self.conv1(x))) if out is None else out
            x = self.maxpool(x)
        if torch.jit.is_scripting():  # no getattr by name there; __prepare_scriptable__ checked the names
            x = self.layer1(x)
            if hasattr(self, "layer2"):
                x = self.layer2(x)
            if hasattr(self, "layer3"):
                x = self.layer3(x)
            if hasattr(self, "layer4"):
                x = self.layer4(x)
        else:
            for name in self.stage_names:
                x = getattr(self, name)(x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Feature map -> pooled features ``[N, num_features]`` (``pre_logits``) or logits."""
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    def _forward_impl(self, x: Tensor) -> Tensor:
        return self.forward(x)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        """Replaces the head with a fresh ``Linear(num_features, num_classes)`` (``Identity`` for 0)."""
        old = self.fc.weight if isinstance(self.fc, nn.Linear) else self._first_conv().weight
        if num_classes > 0:
            self.fc = nn.Linear(self.num_features, num_classes, device=old.device, dtype=old.dtype)
        else:
            self.fc = nn.Identity()


def _resnet(arch: str, block: type, layers: list[int], weights: Any, progress: bool, **kwargs: Any) -> ResNet:
    model = ResNet(block, layers, **kwargs)
    if weights is not None:
        from resnet_fast.weights import load_pretrained

        load_pretrained(model, weights, arch=arch, progress=progress)
    return model


def _legacy_pretrained(arch: str, pretrained: bool, weights: Any) -> Any:
    """torchvision's deprecated ``pretrained=`` keyword, mapped as torchvision maps it (``True`` is
    ``IMAGENET1K_V1``), with torchvision's warning: pytorch/examples' ImageNet script still passes it."""
    if weights is not None:
        raise ValueError(f"{arch}: pass weights or the deprecated pretrained, not both")
    warnings.warn(
        "The parameter 'pretrained' is deprecated since 0.13 and may be removed in the future, please use "
        "'weights' instead.",
        UserWarning,
        stacklevel=3,
    )
    return get_model_weights(arch).IMAGENET1K_V1 if pretrained else None


def _factory(arch: str, block: type, layers: list[int], defaults: dict[str, Any], doc: str) -> Callable[..., ResNet]:
    def build(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
        if "pretrained" in kwargs:
            weights = _legacy_pretrained(arch, kwargs.pop("pretrained"), weights)
        for key, value in defaults.items():
            if key in kwargs and kwargs[key] != value:
                raise ValueError(f"{arch} has {key}={value}, got {key}={kwargs[key]}")
            kwargs[key] = value
        return _resnet(arch, block, layers, weights, progress, **kwargs)

    build.__name__ = build.__qualname__ = arch
    # torchvision finds a builder's weights enum in this annotation (get_model_weights(resnet_fast.resnet50)).
    build.__annotations__["weights"] = Optional[Union[get_model_weights(arch), str, Mapping[str, Tensor], os.PathLike]]
    build.__doc__ = (
        f"{doc}\n\n"
        "Args:\n"
        "    weights: None, a torchvision weights enum or its name (``'IMAGENET1K_V2'``, ``'DEFAULT'`` or\n"
        "        ``'ResNet50_Weights.IMAGENET1K_V2'``; fetched by torchvision), a state_dict, or a checkpoint path.\n"
        "        With ``num_classes != 1000`` the head is left new; with ``in_channels != 3`` conv1 is ported\n"
        "        by ``adapt_input_channels`` (method ``'sum'``).\n"
        "    progress: show torchvision's download progress bar.\n"
        "    **kwargs: :class:`ResNet` arguments (``num_classes``, ``in_channels``, ``stem``, ...).\n"
        "    pretrained: torchvision's deprecated keyword, accepted as torchvision does (``True`` means\n"
        "        ``weights='IMAGENET1K_V1'``, with torchvision's deprecation warning)."
    )
    return build


resnet18 = _factory("resnet18", BasicBlock, [2, 2, 2, 2], {}, "ResNet-18.")
resnet34 = _factory("resnet34", BasicBlock, [3, 4, 6, 3], {}, "ResNet-34.")
resnet50 = _factory("resnet50", Bottleneck, [3, 4, 6, 3], {}, "ResNet-50 (v1.5: stride on the 3x3).")
resnet101 = _factory("resnet101", Bottleneck, [3, 4, 23, 3], {}, "ResNet-101.")
resnet152 = _factory("resnet152", Bottleneck, [3, 8, 36, 3], {}, "ResNet-152.")
resnext50_32x4d = _factory(
    "resnext50_32x4d", Bottleneck, [3, 4, 6, 3], {"groups": 32, "width_per_group": 4}, "ResNeXt-50 32x4d."
)
resnext101_32x8d = _factory(
    "resnext101_32x8d", Bottleneck, [3, 4, 23, 3], {"groups": 32, "width_per_group": 8}, "ResNeXt-101 32x8d."
)
resnext101_64x4d = _factory(
    "resnext101_64x4d", Bottleneck, [3, 4, 23, 3], {"groups": 64, "width_per_group": 4}, "ResNeXt-101 64x4d."
)
wide_resnet50_2 = _factory(
    "wide_resnet50_2", Bottleneck, [3, 4, 6, 3], {"width_per_group": 128}, "Wide ResNet-50-2."
)
wide_resnet101_2 = _factory(
    "wide_resnet101_2", Bottleneck, [3, 4, 23, 3], {"width_per_group": 128}, "Wide ResNet-101-2."
)

ARCHS: dict[str, Callable[..., ResNet]] = {
    f.__name__: f
    for f in (
        resnet18, resnet34, resnet50, resnet101, resnet152,
        resnext50_32x4d, resnext101_32x8d, resnext101_64x4d, wide_resnet50_2, wide_resnet101_2,
    )
}
