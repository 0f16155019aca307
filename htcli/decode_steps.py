"""Decode steps after a prefill, as `htcli sample` and `htcli bench --decode` take them: on a CUDA GPU,
replayed from a CUDA graph; elsewhere, the model's ordinary decode step.

A decode step of a small model is ~400 small kernels, and on a GPU their launches from Python take
several times the GPU's work (the step is bound by the host). Captured once in a CUDA graph, a step
is one launch. A graph replays the same kernels on the same memory, so the step it captures is the
H-attention cache's static one (htcli.attention.static_step: the same operations at every position,
the position a tensor on the GPU); the first WARMUP_STEPS steps run it without a graph (on a side
stream, as CUDA graph capture asks), the next is captured, then each step copies its token in and
replays. Exact-attention models (their KV cache reads a prefix that grows) and other devices take
ordinary steps. HTCLI_DECODE_GRAPH=0 turns graphs off; if a capture fails, the steps go on without a
graph (the same static steps, so the same results) and `graph_failure` says why.
"""

from __future__ import annotations

import os

import torch

from htcli import environment
from htcli.attention import HAttentionCache, graphed
from htcli.attention.static_step import StepPlan
from htcli.device import autocast
from htcli.model import DecodingState, HTransformer1D

GRAPH_VARIABLE = environment.DECODE_GRAPH  # 0: no CUDA graphs
WARMUP_STEPS = 2


def graphs_wanted(device: torch.device) -> bool:
    """Whether decode steps on device are replayed from CUDA graphs (CUDA, unless switched off)."""
    return device.type == "cuda" and os.environ.get(GRAPH_VARIABLE, "1") != "0"


class DecodeSteps:
    """The decode steps of one prefilled DecodingState: call with the tokens (b,) fed at its position for
    the logits (b, vocab) of the next. Graphed, the logits are one tensor that each step overwrites: read
    them before the next step."""

    def __init__(self, model: HTransformer1D, state: DecodingState, dtype: torch.dtype):
        self.model, self.state, self.dtype = model, state, dtype
        caches = [layer.attention.cache for layer in state.layers]
        self.cache = caches[0]
        device = next(model.parameters()).device
        self.graphed = graphs_wanted(device) and all(isinstance(c, HAttentionCache) for c in caches)
        self.graph, self.graph_failure, self.taken = None, None, 0
        if self.graphed:
            self.plan = StepPlan(self.cache)
            self.token = torch.zeros(self.cache.kv.shape[0], dtype=torch.long, device=device)

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        if not self.graphed:
            with autocast(token.device, self.dtype):
                return self.model.decode_step(token, self.state)
        self.cache.check_room()
        with torch.inference_mode(), self._autocast():  # (the state's tensors are the prefill's)
            self.token.copy_(token)
            if self.graph is None and self.taken >= WARMUP_STEPS and self.graph_failure is None:
                self._capture()
            logits = self._side_stream_step() if self.graph is None else self._replay()
        self.state.count_step()
        self.taken += 1
        return logits

    @property
    def kind(self) -> str:
        """How the steps ran: "ordinary", "CUDA graph", "static, no graph yet" (before the capture), or
        why the capture failed."""
        if not self.graphed:
            return "ordinary"
        if self.graph is not None:
            return "CUDA graph"
        return (
            "static, no graph yet" if self.graph_failure is None else f"no CUDA graph ({self.graph_failure})"
        )

    def _autocast(self):
        """Mixed precision without autocast's cache of cast weights (freed when autocast exits: a graph
        would read freed memory)."""
        if self.dtype not in (torch.bfloat16, torch.float16):
            return torch.autocast("cuda", enabled=False)
        return torch.autocast("cuda", dtype=self.dtype, cache_enabled=False)

    def _side_stream_step(self) -> torch.Tensor:
        return graphed.on_side_stream(self.model.decode_step, self.token, self.state, self.plan)

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.logits = self.model.decode_step(self.token, self.state, self.plan)
        except RuntimeError as error:  # (nothing ran: the state is as it was)
            self.graph_failure = graphed.failure(error)
            return
        self.graph = graph

    def _replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.logits
