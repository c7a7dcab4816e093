"""The fused ops as ``torch.library`` operators: ``torch.ops.resnet_fast.*``.

Each op is defined once here with its schema, its implementation, a fake (meta) implementation, its
backward and, for the convolution, an autocast rule, so the same call runs in eager mode, under
``torch.fx`` tracing, in TorchScript, under ``torch.compile`` and in ``torch.export`` graphs, where it
stays one opaque node. The implementation picks the kernel at run time through the backend registry
(:mod:`resnet_fast.backends`): strict mode, fallback warnings and ``record_dispatch`` work inside
compiled and exported graphs too. The ops read the live tensors they are given on every call (a
BatchNorm's statistics are applied in the convolution's epilogue, never folded into a cached weight),
so nothing derived from a parameter can go stale.

Ops (schemas below):

* ``conv_bn_act``: ``relu?(bn(conv2d(x, weight) + bias) + residual)`` with an eval-mode BatchNorm
  (running statistics; none when ``running_var`` is None).
* ``add_relu``: ``relu(x + y)``.
* ``batch_stats``: per-channel batch mean and biased variance (float32; float64 for float64 input).
* ``update_running_stats``: ``nn.BatchNorm2d``'s running-statistics update from them.
* ``batch_norm_act``: ``relu?(batch_norm(x; mean, var) + residual)``; with ``training`` its backward is
  that of batch statistics.
* ``batch_norm_act_backward``: its gradients (an op of its own so a compiled backward dispatches at run
  time too).
* ``stem``: the ImageNet stem, ``max_pool2d(relu(bn(conv2d(x, weight) + bias)), 3, 2, 1)`` with the 7x7
  stride-2 convolution, on x cast to the weight's dtype.

The sequences the models and the public functions run (training BatchNorm: statistics, update,
normalisation) are written once, TorchScript-compatibly, in :mod:`resnet_fast.ops.functional`.

Call them through :mod:`resnet_fast.ops`, which validates arguments first; it and the models call them
through :func:`call`: in plain eager mode that is the kernel the op would dispatch to, without the op's
dispatch, recorded for autograd as a ``torch.autograd.Function`` with the op's own backward; under a
``torch.func`` transform or forward-mode AD, the op's definition in torch operations
(:mod:`resnet_fast.ops.transformable`).
"""

from __future__ import annotations

import contextvars
from types import SimpleNamespace
from typing import Callable

import torch
from torch.autograd import forward_ad
from torch.library import custom_op, register_autograd, register_fake

from resnet_fast import backends
from resnet_fast.ops import layout, reference, transformable
from resnet_fast.ops.layout import activation_format, conv_output_size
from resnet_fast.ops.reference import STEM_CONV, STEM_POOL, bn_scale_shift, statistics_dtype, stem_sizes
from resnet_fast.ops.transformable import CHANNEL, REDUCE

__all__ = ["add_relu", "batch_norm_act", "batch_norm_act_backward", "conv_bn_act", "stem"]

# op -> the op's backward as a torch.autograd.Function around a kernel given as its last input (see call).
_EAGER_AUTOGRAD: dict[str, type[torch.autograd.Function]] = {}


def _register_autograd(op: str, backward: Callable, setup_context: Callable) -> None:
    """``torch.library.register_autograd`` for ``resnet_fast::<op>``, and the same two functions as a
    ``torch.autograd.Function`` whose forward is the kernel passed after the op's arguments: eager mode
    records that instead of dispatching the op (:func:`call`), so both run one backward."""

    # The backward dispatches its kernels under the forward's backend selection and dispatch recorder:
    # on CUDA it runs on an autograd device thread, where the caller's contextvars are not set.
    def setup(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        ctx.dispatch_state = backends.dispatch_state()

    def backward_in_forward_state(ctx, *grads):
        with backends.dispatching(ctx.dispatch_state):
            return backward(ctx, *grads)

    # A forward taking ctx (rather than a separate setup_context): Function.apply then skips binding its
    # arguments to the forward's signature, which costs more (inspect.signature) than a small op.
    def forward(ctx, *args):
        inputs, kernel = args[:-1], args[-1]
        output = kernel(*inputs)
        setup(ctx, inputs, output)
        return output

    def run_backward(ctx, *grads):
        grads = backward_in_forward_state(ctx, *grads)
        return (*(grads if isinstance(grads, tuple) else (grads,)), None)

    register_autograd(f"resnet_fast::{op}", backward_in_forward_state, setup_context=setup)
    methods = dict(forward=staticmethod(forward), backward=staticmethod(run_backward))
    _EAGER_AUTOGRAD[op] = type(f"resnet_fast_{op}", (torch.autograd.Function,), methods)


# ---------------------------------------------------------------------------------------------- conv_bn_act
@custom_op(
    "resnet_fast::conv_bn_act",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, Tensor? running_mean, "
    "Tensor? running_var, float eps, int[2] stride, int[2] padding, int[2] dilation, int groups, "
    "Tensor? residual, bool relu) -> Tensor",
)
def conv_bn_act(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, stride, padding, dilation,
                groups, residual, relu):
    return backends.call(
        "conv_bn_act",
        x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps,
        tuple(stride), tuple(padding), tuple(dilation), groups, residual, relu,
        device=x.device,
    )


@register_fake("resnet_fast::conv_bn_act")
def _conv_bn_act_fake(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, stride, padding,
                      dilation, groups, residual, relu):
    h = conv_output_size(x.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
    w = conv_output_size(x.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
    return layout.empty_conv_output(x, weight, h, w)


def _conv_bn_act_setup(ctx, inputs, output):
    x, weight, bias, bn_weight, _, running_mean, running_var, eps, stride, padding, dilation, groups, _, relu = inputs
    ctx.save_for_backward(x, weight, bias, bn_weight, running_mean, running_var, output if relu else None)
    ctx.conv = (list(stride), list(padding), list(dilation), groups)
    ctx.eps, ctx.relu = eps, relu
    ctx.dtypes = [t.dtype if isinstance(t, torch.Tensor) else None for t in inputs]


def _conv_bn_act_backward(ctx, grad):
    """With ``z = conv(x) * scale + shift (+ residual)``: the ReLU mask, then per-channel sums for the
    BatchNorm and bias gradients (in float32, float64 for float64 activations), then torch's own
    convolution backward on ``grad * scale``."""
    x, weight, bias, bn_weight, running_mean, running_var, out = ctx.saved_tensors
    need = ctx.needs_input_grad
    stride, padding, dilation, groups = ctx.conv
    acc = statistics_dtype(x)
    g = torch.ops.aten.threshold_backward(grad, out, 0) if ctx.relu else grad
    grads: list[torch.Tensor | None] = [None] * len(need)
    grads[12] = g if need[12] else None
    sum_g = g.sum(dim=REDUCE, dtype=acc) if any(need[2:7]) else None
    grad_conv = g
    if running_var is None:
        grads[2] = sum_g if need[2] else None
    else:
        scale, _ = bn_scale_shift(None, bn_weight, None, running_mean, running_var, ctx.eps, acc)
        grad_conv = (g * scale.view(CHANNEL)).to(g.dtype)
        grads[2] = sum_g * scale if need[2] else None
        grads[4] = sum_g if need[4] else None
        grads[5] = -sum_g * scale if need[5] else None
        if need[3] or need[6]:
            # The BatchNorm's input, conv(x) + bias - mean, recomputed rather than kept from the forward.
            centred = torch.convolution(x, weight, bias, stride, padding, dilation, False, [0, 0], groups)
            centred = centred.to(acc) - running_mean.to(acc).view(CHANNEL)
            sum_gc = (g.to(acc) * centred).sum(dim=REDUCE)
            invstd = torch.rsqrt(running_var.to(acc) + ctx.eps)
            grads[3] = sum_gc * invstd if need[3] else None
            gamma = bn_weight.to(acc) if bn_weight is not None else 1.0
            grads[6] = sum_gc * gamma * -0.5 * invstd**3 if need[6] else None
    if need[0] or need[1]:
        grads[0], grads[1], _ = torch.ops.aten.convolution_backward(
            grad_conv, x, weight, None, stride, padding, dilation, False, [0, 0], groups, [need[0], need[1], False]
        )
    return tuple(t if t is None else t.to(dtype) for t, dtype in zip(grads, ctx.dtypes))


_register_autograd("conv_bn_act", _conv_bn_act_backward, setup_context=_conv_bn_act_setup)


def autocast_conv_inputs(device_type: str, x, weight, bias, residual) -> tuple:
    """``(x, weight, bias, residual)`` cast as ``torch.autocast`` would cast ``F.conv2d``'s inputs on this
    device type (to its autocast dtype, float64 left alone); the BatchNorm tensors are not cast, the
    epilogue reads them in float32."""
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        eligible = t is not None and t.is_floating_point() and t.device.type == device_type and t.dtype != torch.float64
        return t.to(dtype) if eligible else t

    return cast(x), cast(weight), cast(bias), cast(residual)


_lib = torch.library.Library("resnet_fast", "FRAGMENT")


_AUTOCAST_RULES: dict[str, Callable[[str, tuple], tuple]] = {}
_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")  # where the ops have autocast rules


def _register_autocast(op: str, cast: Callable[[str, tuple], tuple]) -> None:
    """The op's autocast rule on CPU and CUDA: ``cast(device_type, args)`` under autocast, then the op with
    autocast excluded (torch.library's ``register_autocast`` casts to one fixed dtype only)."""
    _AUTOCAST_RULES[op] = cast
    for device_type in _AUTOCAST_DEVICE_TYPES:
        key = getattr(torch._C.DispatchKey, "Autocast" + torch._C._dispatch_key_for_device(device_type))

        def kernel(_keyset, *args, device_type=device_type, key=key):
            args = cast(device_type, args)
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
                return getattr(torch.ops.resnet_fast, op)(*args)

        _lib.impl(op, kernel, key.name, with_keyset=True)


def _cast_conv_args(device_type: str, args: tuple) -> tuple:
    x, weight, bias, *rest = args
    x, weight, bias, residual = autocast_conv_inputs(device_type, x, weight, bias, rest[9])
    return (x, weight, bias, *rest[:9], residual, rest[10])


_register_autocast("conv_bn_act", _cast_conv_args)


def autograd_unsupported() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ``jvp`` ...) or a forward-mode AD level
    (``torch.autograd.forward_ad.dual_level``) is active: the ops' autograd supports neither (torch.library's
    custom-op autograd does not, pytorch/pytorch#168393, and defines no forward-mode derivative)."""
    return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0


def _plain_eager(x: torch.Tensor) -> bool:
    """Nothing traces, compiles, transforms or intercepts this call (no Python dispatch or function mode: a
    flop counter or debug mode sees the op itself; no ``torch.func`` transform or forward-mode AD), and x
    is a plain tensor (no subclass, no fake, not on the meta device, where the op answers with its fake
    implementation)."""
    return (
        type(x) is torch.Tensor
        and not x.is_meta
        and not torch.compiler.is_compiling()
        and torch._C._get_tracing_state() is None
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._is_torch_function_mode_enabled()
        and not autograd_unsupported()
    )


def _bind(op: str, device: torch.device) -> Callable:
    """The kernel ``torch.ops.resnet_fast.<op>`` would dispatch to on ``device`` now: the backend's
    implementation (:func:`resnet_fast.backends.bind`), behind the op's autocast rule when autocast is on."""
    if op in _LIBRARY_KERNELS:
        return _LIBRARY_KERNELS[op]
    kernel = backends.bind(op, device)
    if op in _KERNEL_ARGUMENTS:
        kernel = _KERNEL_ARGUMENTS[op](kernel)
    rule = _autocast_rule(op, device)
    return kernel if rule is None else lambda *args: kernel(*rule(device.type, args))


# op -> a wrapper giving its backends' kernel the op's arguments, for the ops whose kernels take others.
_KERNEL_ARGUMENTS: dict[str, Callable[[Callable], Callable]] = {}
# op -> its implementation, for the ops implemented here rather than by the backends.
_LIBRARY_KERNELS: dict[str, Callable] = {}


def _autocast_rule(op: str, device: torch.device) -> Callable[[str, tuple], tuple] | None:
    """The op's autocast rule when autocast is on for ``device`` (None: no rule, or autocast off)."""
    # The rules exist for these device types only; asking them first also spares the cost of
    # torch.amp.is_autocast_available.
    if op in _AUTOCAST_RULES and device.type in _AUTOCAST_DEVICE_TYPES and torch.is_autocast_enabled(device.type):
        return _AUTOCAST_RULES[op]
    return None


class _ForwardKernels(dict):
    """op -> :func:`_bind`'s kernel on one device, bound at the op's first call within a model's forward."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device

    def __missing__(self, op: str) -> Callable:
        kernel = self[op] = _bind(op, self.device)
        return kernel


_forward_kernels: contextvars.ContextVar[_ForwardKernels | None] = contextvars.ContextVar(
    "resnet_fast_forward_kernels", default=None
)


def call(op: str, *args):
    """``torch.ops.resnet_fast.<op>(*args)``, or in plain eager mode the kernel it would dispatch to,
    directly: the op's dispatch (autograd and autocast keys, the Python custom-op wrapper) costs more than
    a small convolution's arithmetic. Same kernel, same registry (strict mode, ``record_dispatch``), same
    autocast rule; with autograd on, the op's own backward, through :func:`_register_autograd`'s
    ``torch.autograd.Function``. Within :func:`resolve_once`, the kernel is resolved once per op rather
    than per call. Under a ``torch.func`` transform or forward-mode AD, which the ops' autograd does not
    support (:func:`autograd_unsupported`), the op's definition in torch operations
    (:mod:`~resnet_fast.ops.transformable`). For the ops with an autocast rule (``conv_bn_act``,
    ``stem``), x first."""
    x = args[0]
    if not _plain_eager(x):
        if op in transformable.OPS and autograd_unsupported():
            return _transformed(op, args)
        return getattr(torch.ops.resnet_fast, op)(*args)
    kernels = _forward_kernels.get()
    kernel = _bind(op, x.device) if kernels is None else kernels[op]
    if not torch.is_grad_enabled():
        return kernel(*args)
    function = _EAGER_AUTOGRAD.get(op)
    if function is None:  # an op without a backward (the statistics update, batch_norm_act_backward)
        if any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return getattr(torch.ops.resnet_fast, op)(*args)  # autograd's error when it is differentiated
        return kernel(*args)
    rule = _autocast_rule(op, x.device)
    if rule is not None:  # cast where autograd records it, as the op's autocast key does before autograd
        args = rule(x.device.type, args)  # (the kernel's own rule then finds them cast)
    return function.apply(*args, kernel)


def _transformed(op: str, args: tuple):
    """The op's :mod:`~resnet_fast.ops.transformable` definition, behind its autocast rule (autocast off
    within, as for the op's kernel)."""
    device = args[0].device
    rule = _autocast_rule(op, device)
    if rule is None:
        return transformable.OPS[op](*args)
    with torch.autocast(device.type, enabled=False):
        return transformable.OPS[op](*rule(device.type, args))


def traced(target: Callable, args: tuple, name: str | None) -> torch.fx.Proxy:
    """The ``torch.fx`` node ``target(*args)`` (some of ``args`` Proxies), named ``name`` (None: the name
    torch.fx would give it): what calling ``target`` under symbolic tracing records, with a name chosen."""
    tracer = next(a.tracer for a in args if isinstance(a, torch.fx.Proxy))
    return tracer.create_proxy("call_function", target, args, {}, name=name)


def resolve_once(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``forward(x)``, where in plain eager mode every :func:`call` resolves its kernel (backend selection,
    autocast rule) once for x's device, at its first call, instead of at every call: a model's forward
    pays for dispatch once rather than per convolution. Whether each call is plain eager, and whether
    autograd records it, is still checked per call, so a hook that enables autograd or a dispatch mode
    inside the forward is honoured; the backend selection and autocast state are those at the op's first
    call."""
    if not _plain_eager(x):
        return forward(x)
    token = _forward_kernels.set(_ForwardKernels(x.device))
    try:
        return forward(x)
    finally:
        _forward_kernels.reset(token)


# ------------------------------------------------------------------------------------------------- add_relu
@custom_op("resnet_fast::add_relu", mutates_args=(), schema="(Tensor x, Tensor y) -> Tensor")
def add_relu(x, y):
    return backends.call("add_relu", x, y, device=x.device)


@register_fake("resnet_fast::add_relu")
def _add_relu_fake(x, y):
    return torch.empty_like(x)


def _add_relu_setup(ctx, inputs, output):
    ctx.save_for_backward(output)


def _add_relu_backward(ctx, grad):
    (out,) = ctx.saved_tensors
    g = torch.ops.aten.threshold_backward(grad, out, 0)
    return g, g


_register_autograd("add_relu", _add_relu_backward, setup_context=_add_relu_setup)


# --------------------------------------------------------------------------------------- batch statistics
# Training-mode BatchNorm is three ops, in this order, so that a block's output is the last node of its
# scope in a traced graph (torchvision's feature extraction returns that node): the batch statistics,
# the running-statistics update (an op of its own: torch.library ops with a backward must not mutate
# their inputs), then the normalisation.
@custom_op("resnet_fast::batch_stats", mutates_args=(), schema="(Tensor x) -> (Tensor, Tensor)")
def batch_stats(x):
    return backends.call("batch_stats", x, device=x.device)


@register_fake("resnet_fast::batch_stats")
def _batch_stats_fake(x):
    stats = x.new_empty((x.shape[1],), dtype=statistics_dtype(x))
    return stats, stats.clone()


def _batch_stats_setup(ctx, inputs, output):
    # batch_norm_act's backward accounts for the statistics' dependence on x.
    ctx.mark_non_differentiable(*output)


_register_autograd("batch_stats", lambda ctx, *grads: None, setup_context=_batch_stats_setup)


@custom_op(
    "resnet_fast::update_running_stats",
    mutates_args=("running_mean", "running_var", "num_batches_tracked"),
    schema="(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor(c!)? num_batches_tracked, Tensor mean, "
    "Tensor var, float? momentum, int count) -> ()",
)
def update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, momentum, count):
    reference.update_running_stats(running_mean, running_var, num_batches_tracked, mean, var, momentum, count)


# Bookkeeping, not a kernel: no backend's business (an explicit backend lacks it, and strict mode would refuse).
_LIBRARY_KERNELS["update_running_stats"] = reference.update_running_stats


@update_running_stats.register_fake
def _update_running_stats_fake(running_mean, running_var, num_batches_tracked, mean, var, momentum, count):
    return None


# ------------------------------------------------------------------------------------------- batch_norm_act
@custom_op(
    "resnet_fast::batch_norm_act",
    mutates_args=(),
    schema="(Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor var, float eps, bool training, "
    "Tensor? residual, bool relu) -> Tensor",
)
def batch_norm_act(x, weight, bias, mean, var, eps, training, residual, relu):
    """``training``: ``mean``/``var`` are x's own batch statistics (``batch_stats``), which the backward
    differentiates through; otherwise they are constants (running statistics)."""
    return backends.call("batch_norm_act", x, weight, bias, mean, var, eps, residual, relu, device=x.device)


def _kernel_without_training(kernel: Callable) -> Callable:
    """The kernels normalise with the statistics they are given: which ones is the backward's business."""
    return lambda x, weight, bias, mean, var, eps, training, residual, relu: kernel(x, weight, bias, mean, var, eps,
                                                                                   residual, relu)


_KERNEL_ARGUMENTS["batch_norm_act"] = _kernel_without_training


@register_fake("resnet_fast::batch_norm_act")
def _batch_norm_act_fake(x, weight, bias, mean, var, eps, training, residual, relu):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=activation_format(x))


def _batch_norm_act_setup(ctx, inputs, output):
    x, weight, bias, mean, var, eps, training, _, relu = inputs
    ctx.save_for_backward(x, output, weight, mean, var)
    ctx.eps, ctx.training, ctx.relu = eps, training, relu
    ctx.param_dtypes = tuple(t.dtype if t is not None else None for t in (weight, bias))


def _batch_norm_act_backward(ctx, grad):
    x, out, weight, mean, var = ctx.saved_tensors
    need = ctx.needs_input_grad
    args = (grad, x, out, weight, mean, var, ctx.eps, ctx.training, ctx.relu, need[7])
    if torch.is_grad_enabled():
        # create_graph=True (a gradient penalty, double backprop): these gradients are differentiated in
        # turn, which torch's batch-norm backward supports and the op does not.
        grad_x, grad_w, grad_b, grad_res = reference.batch_norm_act_backward(*args)
    else:
        grad_x, grad_w, grad_b, grad_res = call("batch_norm_act_backward", *args)
    weight_dtype, bias_dtype = ctx.param_dtypes
    return (
        grad_x if need[0] else None,
        grad_w.to(weight_dtype) if need[1] else None,
        grad_b.to(bias_dtype) if need[2] else None,
        None, None, None, None,
        grad_res if need[7] else None,
        None,
    )


_register_autograd("batch_norm_act", _batch_norm_act_backward, setup_context=_batch_norm_act_setup)


@custom_op(
    "resnet_fast::batch_norm_act_backward",
    mutates_args=(),
    schema="(Tensor grad_out, Tensor x, Tensor out, Tensor? weight, Tensor mean, Tensor var, float eps, "
    "bool training, bool relu, bool residual_grad) -> (Tensor, Tensor, Tensor, Tensor)",
)
def batch_norm_act_backward(grad_out, x, out, weight, mean, var, eps, training, relu, residual_grad):
    return backends.call(
        "batch_norm_act_backward", grad_out, x, out, weight, mean, var, eps, training, relu, residual_grad,
        device=x.device,
    )


@register_fake("resnet_fast::batch_norm_act_backward")
def _batch_norm_act_backward_fake(grad_out, x, out, weight, mean, var, eps, training, relu, residual_grad):
    channel = x.new_empty((x.shape[1],), dtype=statistics_dtype(x))
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=activation_format(x))
    grad_res = torch.empty_like(grad_out) if residual_grad else x.new_empty((0,))
    return grad_x, channel, channel.clone(), grad_res


# ----------------------------------------------------------------------------------------------------- stem
@custom_op(
    "resnet_fast::stem",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, Tensor? running_mean, "
    "Tensor? running_var, float eps) -> Tensor",
)
def stem(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps):
    return backends.call("stem", x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, device=x.device)


@register_fake("resnet_fast::stem")
def _stem_fake(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps):
    h, w = stem_sizes(x.shape[2])[1], stem_sizes(x.shape[3])[1]
    return layout.empty_conv_output(x, weight, h, w, dtype=weight.dtype)


def _stem_setup(ctx, inputs, output):
    x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps = inputs
    ctx.save_for_backward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var)
    ctx.eps = eps
    ctx.dtypes = [t.dtype if isinstance(t, torch.Tensor) else None for t in inputs[:7]]


def _stem_backward(ctx, grad):
    """The max-pool's gradient, routed by its argmax over the recomputed pre-pool activation (the forward
    never stores it), then ``conv_bn_act``'s backward (:func:`_conv_bn_act_backward`) from there."""
    x, weight, bias, bn_weight, bn_bias, running_mean, running_var = ctx.saved_tensors
    x_cast = x.to(weight.dtype)
    _, stride, padding = STEM_CONV
    conv = ((stride,) * 2, (padding,) * 2, (1, 1), 1)
    act = call("conv_bn_act", x_cast, weight, bias, bn_weight, bn_bias, running_mean, running_var, ctx.eps, *conv,
               None, True)
    pool = [[v] * 2 for v in STEM_POOL]
    _, argmax = torch.ops.aten.max_pool2d_with_indices(act, *pool)
    grad_act = torch.ops.aten.max_pool2d_with_indices_backward(grad, act, *pool, [1, 1], False, argmax)
    # conv_bn_act's inputs are the stem's first seven, then geometry and residual (no gradient).
    conv_ctx = SimpleNamespace(
        saved_tensors=(x_cast, weight, bias, bn_weight, running_mean, running_var, act),
        needs_input_grad=tuple(ctx.needs_input_grad[:7]) + (False,) * 7,
        conv=conv, eps=ctx.eps, relu=True, dtypes=ctx.dtypes + [None] * 7,
    )
    return *_conv_bn_act_backward(conv_ctx, grad_act)[:7], None


_register_autograd("stem", _stem_backward, setup_context=_stem_setup)


def _cast_stem_args(device_type: str, args: tuple) -> tuple:
    """Under ``torch.autocast`` the conv weight and bias are cast, as ``F.conv2d``'s would be, and the op
    computes in their dtype; x is left as given (the op casts it as it loads it, rather than in a pass of
    its own over the image batch), and the BatchNorm tensors are read as they are."""
    x, weight, bias, *batch_norm = args
    _, weight, bias, _ = autocast_conv_inputs(device_type, None, weight, bias, None)
    return (x, weight, bias, *batch_norm)


_register_autocast("stem", _cast_stem_args)
