"""Exact incremental decoding of causal H-attention: a per-layer cache, O(block_size * d) a token.

Why it works: the causal coarse query of a level-l cluster is q at the cluster's first
position, and the keys it scores (clusters of the previous level-l block) are complete by
then, so a level's contribution to every position of the cluster is computed once, at that
first position, and reused. Level 0 is ordinary attention over the current and previous
block. The levels are combined under one shared maximum, as in the parallel path.

Cache per layer and level l (level 0: clusters are single positions):
  prev_k/prev_v, cur_k/cur_v: (b, h, r, d) cluster keys/values of the previous and the
      current level-l block (the current one filled as its clusters complete);
  part_k/part_v: (b, h, d) running sums of the current, incomplete cluster (l >= 1);
  stats[l]: the current cluster's (max, denominator, numerator) at level l (l >= 1).

einops legend: b batch, h heads, r block positions, d dim_head.
"""

from __future__ import annotations

import math

import torch

from htcli.attention_oracle import num_levels

NEG_INF = float("-inf")


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: float):
    """One query per (b, h) against keys (b, h, j, d): (max, denominator, numerator), fp32."""
    scores = torch.einsum("bhd,bhjd->bhj", q.float(), keys.float()) * q.shape[-1] ** -0.5 + bias
    m = scores.amax(-1)
    p = torch.exp(scores - m[..., None])
    return m, p.sum(-1), torch.einsum("bhj,bhjd->bhd", p, values.float())


def _combine(parts) -> torch.Tensor:
    """Softmax over the union of the parts' keys: one shared maximum."""
    m = torch.stack([p[0] for p in parts]).amax(0)
    den = sum(p[1] * torch.exp(p[0] - m) for p in parts)
    num = sum(p[2] * torch.exp(p[0] - m)[..., None] for p in parts)
    return num / den[..., None]


class HAttentionCache:
    """Decoding state of one causal H-attention layer."""

    def __init__(
        self, batch: int, heads: int, dim_head: int, *, block_size: int, max_seq_len: int, device, dtype
    ):
        self.r = block_size
        self.levels = num_levels(max_seq_len, block_size)
        self.t = 0  # tokens seen
        self.capacity = block_size * 2**self.levels  # positions the levels can serve exactly
        shape = (batch, heads, block_size, dim_head)
        buffers = lambda: [torch.zeros(shape, device=device, dtype=dtype) for _ in range(self.levels)]  # noqa: E731
        self.prev_k, self.prev_v, self.cur_k, self.cur_v = buffers(), buffers(), buffers(), buffers()
        self.part_k = [
            torch.zeros(shape[:2] + shape[3:], device=device, dtype=torch.float32) for _ in range(self.levels)
        ]
        self.part_v = [t.clone() for t in self.part_k]
        self.stats: list[tuple | None] = [None] * self.levels

    # -- one token -----------------------------------------------------------------------

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: (b, h, d) of position t = self.t (rotary applied). Returns (b, h, d)."""
        t, r = self.t, self.r
        if t >= self.capacity:
            raise ValueError(
                f"the decode cache holds {self.capacity} positions: re-prefill a shorter context"
            )
        for level in range(self.levels):
            size = 2**level
            cluster = t >> level
            if t % size == 0:  # a new cluster begins
                if cluster % r == 0 and cluster > 0:
                    self._roll(level)
                if level > 0:
                    self.stats[level] = self._coarse_stats(level, q, cluster)
            if level == 0:
                self.cur_k[0][:, :, t % r] = k
                self.cur_v[0][:, :, t % r] = v
            else:
                self.part_k[level] += k.float()
                self.part_v[level] += v.float()
                if t % size == size - 1:  # the cluster is complete
                    self.cur_k[level][:, :, cluster % r] = (self.part_k[level] / size).to(k.dtype)
                    self.cur_v[level][:, :, cluster % r] = (self.part_v[level] / size).to(v.dtype)
                    self.part_k[level].zero_()
                    self.part_v[level].zero_()
        parts = [self._fine_stats(q)] + [s for s in self.stats[1:] if s is not None]
        self.t += 1
        return _combine(parts).to(q.dtype)

    def _roll(self, level: int) -> None:
        self.prev_k[level], self.cur_k[level] = self.cur_k[level], self.prev_k[level]
        self.prev_v[level], self.cur_v[level] = self.cur_v[level], self.prev_v[level]

    def _fine_stats(self, q: torch.Tensor):
        """Level 0: the current block up to t, and the whole previous block."""
        t, r = self.t, self.r
        keys, values = self.cur_k[0][:, :, : t % r + 1], self.cur_v[0][:, :, : t % r + 1]
        if t >= r:
            keys = torch.cat([self.prev_k[0], keys], dim=2)
            values = torch.cat([self.prev_v[0], values], dim=2)
        return _attend(q, keys, values, 0.0)

    def _coarse_stats(self, level: int, q: torch.Tensor, cluster: int):
        """Level l: the cluster's first query against the previous level-l block's clusters
        (a first-half cluster skips that block's second half, already seen at level l-1)."""
        r = self.r
        if cluster < r:
            return None
        width = r // 2 if cluster % r < r // 2 else r
        keys, values = self.prev_k[level][:, :, :width], self.prev_v[level][:, :, :width]
        return _attend(q, keys, values, math.log(2**level))

    # -- a whole prompt ------------------------------------------------------------------

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Set the state after positions 0..T-1; q, k, v: (b, h, T, d) as the parallel forward
        computed them (rotary applied)."""
        T, r = q.shape[2], self.r
        if not 1 <= T <= self.capacity:
            raise ValueError(f"cannot prefill {T} positions: 1 to {self.capacity}")
        last = T - 1
        self.t = T
        for level in range(self.levels):
            size = 2**level
            cluster = last >> level
            block = cluster // r
            complete = T if T % size == 0 else (cluster << level)  # positions in complete clusters
            self._fill_block(level, "cur", k, v, block, complete)
            if block >= 1:
                self._fill_block(level, "prev", k, v, block - 1, complete)
            if level > 0:
                start = cluster << level
                if T % size:
                    self.part_k[level] = k[:, :, start:T].float().sum(2)
                    self.part_v[level] = v[:, :, start:T].float().sum(2)
                else:
                    self.part_k[level].zero_()
                    self.part_v[level].zero_()
                # (when the cluster is complete, the next step starts a new one and replaces this)
                self.stats[level] = self._coarse_stats(level, q[:, :, start], cluster)

    def _fill_block(self, level: int, which: str, k, v, block: int, complete: int) -> None:
        """Cluster means of level-l block `block` over the positions < complete."""
        r, size = self.r, 2**level
        start, stop = block * r * size, min((block + 1) * r * size, complete)
        target_k = self.cur_k if which == "cur" else self.prev_k
        target_v = self.cur_v if which == "cur" else self.prev_v
        target_k[level].zero_()
        target_v[level].zero_()
        clusters = max(0, (stop - start) // size)
        if clusters == 0:
            return
        stop = start + clusters * size
        for source, target in ((k, target_k[level]), (v, target_v[level])):
            chunk = source[:, :, start:stop].float()
            means = chunk.reshape(*chunk.shape[:2], clusters, size, chunk.shape[-1]).mean(3)
            target[:, :, :clusters] = means.to(target.dtype)
