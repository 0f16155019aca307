"""The Triton path's forward and backward replayed from CUDA graphs where they are bound by launching.

Each pass launches ~20-30 kernels (per level: pooling, forward or dQ and dK/dV) and allocates their
buffers from Python; at 8,192 tokens (batch 4, 8 heads, dim_head 64) the host took ~3 ms per forward
and backward against ~1.2 ms of GPU work (an H200, examples/attention_profile.py). A CUDA graph of a
pass launches all of it at once. A graph replays on the memory it was captured with, so a call
copies its inputs into the graph's own, replays, and returns copies of its outputs (they must
outlive the next call: autograd keeps them): a few memory-bound copies, against milliseconds of
launches. Above MAX_ELEMENTS per input the kernels' own time hides the launches and the copies
would cost more than they save, so larger inputs launch as before.

One graph per pass and shape (dtype, block size, causal, level decay or none), shared by every layer
of a model, captured the second time its key is seen (a shape seen once, as while sampling without
the cache, launches as before; a capture costs a few passes); at most MAX_GRAPHS kept (each holds its
inputs, outputs and intermediates; `clear` frees them). Not in inference mode (a prefill's shape is
the prompt's: seldom the same twice), nor inside another capture (torch.compile's
mode="reduce-overhead" captures the whole step itself). A capture that fails (out of memory, say)
leaves its key to launch as before. HTCLI_ATTENTION_GRAPHS=0 turns graphs off.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable

import torch

from htcli import environment

GRAPHS_VARIABLE = environment.ATTENTION_GRAPHS
ENABLED = os.environ.get(GRAPHS_VARIABLE, "1") != "0"  # read once, as ops.DEFAULT_IMPLEMENTATION
MAX_ELEMENTS = 2**25  # per input (batch * heads * n * dim_head): 8,192 tokens x 64 rows of 64
MAX_GRAPHS = 4
_graphs: OrderedDict[tuple, _Captured] = OrderedDict()
_seen: set[tuple] = set()  # keys seen once (captured at the second sight)
_failed: dict[tuple, str] = {}  # keys whose capture failed, and why: they launch


def wanted(q: torch.Tensor) -> bool:
    """Whether a pass over q (a CUDA tensor) may replay from a graph."""
    return (
        ENABLED
        and q.numel() <= MAX_ELEMENTS
        and not torch.is_inference_mode_enabled()
        and not torch.cuda.is_current_stream_capturing()
    )


def clear() -> None:
    """Free every graph (and its memory); the next calls of a shape capture it again."""
    _graphs.clear()
    _seen.clear()


def on_side_stream(fn: Callable, *args):
    """fn(*args) on a stream of its own, after the current stream's work and before its next: how work
    runs before a CUDA graph captures it (lazy set-up, such as cuBLAS's or a kernel's compilation, must
    not land in the capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        result = fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    return result


def failure(error: BaseException) -> str:
    """A failed capture's error in one line."""
    return f"{type(error).__name__}: {error}".splitlines()[0]


class _Captured:
    """fn on static copies of its first inputs, captured after one warm-up call on a side stream."""

    def __init__(self, fn: Callable[..., tuple], tensors: list[torch.Tensor | None]):
        self.inputs = [None if t is None else t.clone() for t in tensors]
        on_side_stream(fn, *self.inputs)  # (compiles the kernels, sets up cuBLAS and the allocator)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = fn(*self.inputs)

    def __call__(self, tensors: list[torch.Tensor | None]) -> tuple[torch.Tensor, ...]:
        for static, tensor in zip(self.inputs, tensors):
            if tensor is not None:
                static.copy_(tensor)
        self.graph.replay()
        return tuple(output.clone() for output in self.outputs)


def replay(name: str, fn: Callable[..., tuple], tensors: list[torch.Tensor | None], options: tuple) -> tuple:
    """fn(*tensors) (a tuple of tensors): launched the first time its shape comes, then computed by replaying
    its graph for this shape (captured the second time). options: the other arguments fn was made with
    (part of the graph's key)."""
    shapes = tuple(None if t is None else (t.shape, t.dtype, t.device) for t in tensors)
    key = (name, options, shapes)
    captured = _graphs.get(key)
    if captured is None:
        if key not in _seen or key in _failed:
            _seen.add(key)
            return fn(*tensors)
        while len(_graphs) >= MAX_GRAPHS:
            _graphs.popitem(last=False)
        try:
            captured = _Captured(fn, tensors)
        except RuntimeError as error:  # (torch.OutOfMemoryError is one)
            _failed[key] = failure(error)
            return fn(*tensors)
        _graphs[key] = captured
    _graphs.move_to_end(key)
    return captured(tensors)
