"""CUDA-graph capture of an eval forward: one replay per call instead of one launch per op, for batch-1 serving.

``fast = resnet_fast.cuda_graph(model, example)`` warms the model up (Triton compiles and autotunes
there, never inside a capture), captures its forward for the example's shape, dtype, layout and autocast
state, and returns a callable: ``fast(x)`` copies x into the captured input buffer, replays the graph and
returns a copy of the output. An input of another shape, dtype, layout or under another autocast state
is captured too, on first sight (each capture holds its own activation memory).

The replay reads the model's parameters and buffers where they are, and resnet_fast's kernels apply
BatchNorm from the live tensors, so in-place updates (optimizer steps, EMA ``.data.mul_``, ``copy_``,
``load_state_dict``) are seen by the next replay. Replacing a tensor (``p.data = other``, ``model.to()``,
a new submodule) moves it to memory the graph does not read: build a new callable (or call ``reset()``)
after such changes; checking every pointer on every call would cost more than the replay itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["CapturedForward", "cuda_graph"]


@dataclass
class _Capture:
    graph: torch.cuda.CUDAGraph
    static_input: torch.Tensor
    static_output: torch.Tensor


def _autocast_state(device: torch.device) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)


class CapturedForward:
    """The callable :func:`cuda_graph` returns; see the module docstring."""

    def __init__(self, model: nn.Module, device: torch.device, warmup: int) -> None:
        self.model = model
        self.device = device
        self.warmup = warmup
        self._captures: dict[tuple, _Capture] = {}

    def _key(self, x: torch.Tensor) -> tuple:
        return tuple(x.shape), x.stride(), x.dtype, x.device, _autocast_state(x.device)

    def _capture(self, x: torch.Tensor) -> _Capture:
        static_input = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device).copy_(x)
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.no_grad():
            # Warm-up runs (Triton compiles and autotunes here, outside the capture) on a side stream,
            # as torch.cuda.graphs requires.
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.model(static_input)
            torch.cuda.current_stream(x.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_output = self.model(static_input)
        return _Capture(graph, static_input, static_output)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x must be a floating-point torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.device != self.device:
            raise ValueError(f"x is on {x.device} but the model is on {self.device}; expected the same CUDA device")
        key = self._key(x)
        capture = self._captures.get(key)
        if capture is None:
            capture = self._captures[key] = self._capture(x)
        capture.static_input.copy_(x)
        capture.graph.replay()
        return capture.static_output.clone()

    def reset(self) -> None:
        """Drops every capture (and its memory); the next call captures afresh."""
        self._captures.clear()


def _model_device(model: nn.Module) -> torch.device:
    tensors = [*model.parameters(), *model.buffers()]
    if not tensors:
        raise ValueError("model has no parameters or buffers: nothing tells which GPU to capture it on")
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"model's tensors are on several devices {sorted(map(str, devices))}; expected one GPU")
    return devices.pop()


def cuda_graph(model: nn.Module, example_input: torch.Tensor, *, warmup: int = 3) -> CapturedForward:
    """Captures ``model``'s eval forward on ``example_input`` in a CUDA graph; returns the replaying callable.

    Args:
        model: an nn.Module on one CUDA device, with every submodule in eval mode (training would update
            BatchNorm statistics on every replay and is refused).
        example_input: a tensor of the shape, dtype and memory format the calls will use (e.g.
            ``[1, 3, 224, 224]``), on the model's device; captured now, under the current autocast state.
        warmup: eager forwards run before capturing (compilation and autotuning happen there).
    Returns:
        A :class:`CapturedForward`: ``fast(x)`` returns ``model(x)`` (a fresh tensor) by graph replay.
    """
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(
            f"cuda_graph captures inference only, but {training[:3]} {'are' if len(training) > 1 else 'is'} in "
            "training mode: call model.eval() first"
        )
    if not isinstance(example_input, torch.Tensor) or not example_input.is_floating_point():
        got = getattr(example_input, "dtype", type(example_input).__name__)
        raise TypeError(f"example_input must be a floating-point torch.Tensor, got {got}")
    check = getattr(model, "_check_input", None)  # resnet_fast models: rank, channels, size, dtype, device
    if check is not None:
        check(example_input)
    device = _model_device(model)
    if device.type != "cuda":
        raise ValueError(f"the model is on {device}; cuda_graph needs a CUDA model (model.cuda())")
    if not torch.cuda.is_available():
        raise RuntimeError("cuda_graph needs a CUDA GPU; torch.cuda.is_available() is False")
    if int(warmup) < 1:
        raise ValueError(f"warmup must be >= 1 (autotuning must happen before the capture), got {warmup}")
    captured = CapturedForward(model, device, int(warmup))
    captured(example_input)
    return captured
