"""Incremental decoding of causal exact attention (the baseline model): the keys and values of every
position so far, in buffers as long as the model's context, allocated once (gpt-fast's static KV
cache); a position's attention is one softmax over all of them.

Same interface as HAttentionCache: prefill(q, k, v) with a prompt's (b, h, T, d), then step(q, k, v)
with each next position's (b, h, d); t positions seen, capacity positions at most.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class KVCache:
    """Decoding state of one causal exact-attention layer."""

    def __init__(self, batch: int, heads: int, dim_head: int, *, max_seq_len: int, device, dtype):
        self.t = 0
        self.capacity = max_seq_len
        shape = (batch, heads, max_seq_len, dim_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Hold positions 0..T-1 of (b, h, T, d) keys and values (q unused: it needs none later)."""
        length = k.shape[2]
        if not 1 <= length <= self.capacity:
            raise ValueError(f"cannot prefill {length} positions: 1 to {self.capacity}")
        self.k[:, :, :length] = k
        self.v[:, :, :length] = v
        self.t = length

    def repeat(self, copies: int) -> None:
        """Hold `copies` sequences, each this one (a cache of one sequence)."""
        if self.k.shape[0] != 1:
            raise ValueError(f"only a cache of one sequence repeats, this one holds {self.k.shape[0]}")
        self.k, self.v = self.k.repeat(copies, 1, 1, 1), self.v.repeat(copies, 1, 1, 1)

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: (b, h, d) of position t (rotary applied). Returns its attention output (b, h, d)."""
        t = self.t
        if t >= self.capacity:
            raise ValueError(
                f"the decode cache holds {self.capacity} positions: re-prefill a shorter context"
            )
        self.k[:, :, t] = k
        self.v[:, :, t] = v
        self.t = t + 1
        keys, values = self.k[:, :, : t + 1], self.v[:, :, : t + 1]
        return F.scaled_dot_product_attention(q[:, :, None].to(keys.dtype), keys, values)[:, :, 0]
