"""Exact incremental decoding of causal H-attention: a per-layer cache, O(block_size * d) a token.

Why it works: the causal coarse query of a level-l cluster is q at the cluster's first
position, and the keys it scores (clusters of the previous level-l block) are complete by
then, so a level's contribution to every position of the cluster is computed once, at that
first position, and reused. Level 0 is ordinary attention over the current and previous
block. The levels are combined under one shared maximum, as in the parallel path.

Cache per layer (as few tensors as possible: on a GPU a decode step costs one launch per op):
  fine_k/fine_v: (b, h, 2r, d) level 0's previous block, then its current block;
  prev_k/prev_v, cur_k/cur_v: per level l >= 1, (b, h, r, d) cluster keys/values of the
      previous and the current level-l block (the current one filled as its clusters complete);
  part_k/part_v: (levels - 1, b, h, d) running sums of each level's current, incomplete cluster;
  m, den, num: (levels, b, h[, d]) softmax state (max, denominator, numerator) per level: the
      current cluster's at l >= 1 (-inf max where the level scores nothing yet), the current
      position's at level 0. The output combines all levels at once.

einops legend: b batch, h heads, r block positions, d dim_head.
"""

from __future__ import annotations

import math

import torch

from htcli.attention.geometry import NEG_INF, num_levels


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: float, m, den, num) -> None:
    """One query per (b, h), fp32 and already scaled, against keys (b, h, j, d), every score
    plus bias: writes the softmax's max (b, h), denominator (b, h) and numerator (b, h, d)."""
    scores = torch.matmul(keys.float(), q[..., None])[..., 0]
    torch.amax(scores, -1, out=m)
    p = torch.exp(scores - m[..., None])
    torch.sum(p, -1, out=den)
    torch.matmul(p[..., None, :], values.float(), out=num[..., None, :])
    if bias:  # a constant on every score moves the max only
        m.add_(bias)


class HAttentionCache:
    """Decoding state of one causal H-attention layer."""

    def __init__(
        self, batch: int, heads: int, dim_head: int, *, block_size: int, max_seq_len: int, device, dtype
    ):
        self.r = block_size
        self.levels = num_levels(max_seq_len, block_size)
        self.t = 0  # tokens seen
        self.capacity = block_size * 2**self.levels  # positions the levels can serve exactly
        b, h, r, d, levels = batch, heads, block_size, dim_head, self.levels
        zeros = lambda *shape, dtype=dtype: torch.zeros(shape, device=device, dtype=dtype)  # noqa: E731
        self.fine_k, self.fine_v = zeros(b, h, 2 * r, d), zeros(b, h, 2 * r, d)
        # index = level; level 0 has fine_k, fine_v instead
        self.prev_k, self.prev_v, self.cur_k, self.cur_v = (
            [None] + [zeros(b, h, r, d) for _ in range(1, levels)] for _ in range(4)
        )
        self.part_k, self.part_v = (zeros(levels - 1, b, h, d, dtype=torch.float32) for _ in range(2))
        self.m = torch.full((levels, b, h), NEG_INF, device=device)
        self.den, self.num = (
            zeros(levels, b, h, dtype=torch.float32),
            zeros(levels, b, h, d, dtype=torch.float32),
        )

    # -- one token -----------------------------------------------------------------------

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: (b, h, d) of position t = self.t (rotary applied). Returns (b, h, d)."""
        with torch.autocast(q.device.type, enabled=False):  # the softmax state is fp32
            return self._step(q, k, v)

    def _step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t, r = self.t, self.r
        if t >= self.capacity:
            raise ValueError(
                f"the decode cache holds {self.capacity} positions: re-prefill a shorter context"
            )
        if t % r == 0 and t > 0:  # level 0's current block becomes the previous one
            self.fine_k[:, :, :r] = self.fine_k[:, :, r:]
            self.fine_v[:, :, :r] = self.fine_v[:, :, r:]
        self.fine_k[:, :, r + t % r] = k
        self.fine_v[:, :, r + t % r] = v
        first = r if t < r else 0
        q = q.float() * q.shape[-1] ** -0.5
        keys, values = self.fine_k[:, :, first : r + t % r + 1], self.fine_v[:, :, first : r + t % r + 1]
        _attend(q, keys, values, 0.0, self.m[0], self.den[0], self.num[0])
        self.part_k += k.float()
        self.part_v += v.float()
        for level in range(1, self.levels):
            size = 2**level
            cluster, within = t >> level, t % size
            if within == 0:  # a new cluster begins
                if cluster % r == 0 and cluster > 0:
                    self._roll(level)
                self._coarse_stats(level, q, cluster)
            if within == size - 1:  # the cluster is complete
                self.cur_k[level][:, :, cluster % r] = (self.part_k[level - 1] / size).to(k.dtype)
                self.cur_v[level][:, :, cluster % r] = (self.part_v[level - 1] / size).to(v.dtype)
                self.part_k[level - 1].zero_()
                self.part_v[level - 1].zero_()
        self.t += 1
        # all levels under one shared maximum (the current position is always scored: finite)
        weight = torch.exp(self.m - self.m.amax(0))
        num = (self.num * weight[..., None]).sum(0)
        return (num / (self.den * weight).sum(0)[..., None]).to(k.dtype)

    def _roll(self, level: int) -> None:
        self.prev_k[level], self.cur_k[level] = self.cur_k[level], self.prev_k[level]
        self.prev_v[level], self.cur_v[level] = self.cur_v[level], self.prev_v[level]

    def _coarse_stats(self, level: int, q: torch.Tensor, cluster: int) -> None:
        """Level l: the cluster's first query (scaled) against the previous level-l block's
        clusters (a first-half cluster skips that block's second half, seen at level l-1)."""
        r = self.r
        if cluster < r:  # nothing to score at this level yet
            self.m[level].fill_(NEG_INF)
            self.den[level].zero_()
            self.num[level].zero_()
            return
        width = r // 2 if cluster % r < r // 2 else r
        keys, values = self.prev_k[level][:, :, :width], self.prev_v[level][:, :, :width]
        _attend(q, keys, values, math.log(2**level), self.m[level], self.den[level], self.num[level])

    # -- a whole prompt ------------------------------------------------------------------

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Set the state after positions 0..T-1; q, k, v: (b, h, T, d) as the parallel forward
        computed them (rotary applied)."""
        with torch.autocast(q.device.type, enabled=False):
            self._prefill(q, k, v)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        T, r = q.shape[2], self.r
        if not 1 <= T <= self.capacity:
            raise ValueError(f"cannot prefill {T} positions: 1 to {self.capacity}")
        last = T - 1
        self.t = T
        block = last // r
        for half, source in ((1, block), (0, block - 1)):  # level 0: current, previous block
            if source >= 0:
                start, stop = source * r, min((source + 1) * r, T)
                self.fine_k[:, :, half * r : half * r + stop - start] = k[:, :, start:stop]
                self.fine_v[:, :, half * r : half * r + stop - start] = v[:, :, start:stop]
        for level in range(1, self.levels):
            size = 2**level
            cluster = last >> level
            block = cluster // r
            complete = T if T % size == 0 else (cluster << level)  # positions in complete clusters
            self._fill_block(level, self.cur_k, self.cur_v, k, v, block, complete)
            if block >= 1:
                self._fill_block(level, self.prev_k, self.prev_v, k, v, block - 1, complete)
            start = cluster << level
            # (when the cluster is complete, the next step starts a new one and replaces these)
            self.part_k[level - 1] = k[:, :, start:T].float().sum(2) if T % size else 0.0
            self.part_v[level - 1] = v[:, :, start:T].float().sum(2) if T % size else 0.0
            self._coarse_stats(level, q[:, :, start].float() * q.shape[-1] ** -0.5, cluster)

    def _fill_block(self, level: int, targets_k, targets_v, k, v, block: int, complete: int) -> None:
        """Cluster means of level-l block `block` over the positions < complete."""
        r, size = self.r, 2**level
        start, stop = block * r * size, min((block + 1) * r * size, complete)
        targets_k[level].zero_()
        targets_v[level].zero_()
        clusters = max(0, (stop - start) // size)
        if clusters == 0:
            return
        stop = start + clusters * size
        for source, target in ((k, targets_k[level]), (v, targets_v[level])):
            chunk = source[:, :, start:stop].float()
            means = chunk.reshape(*chunk.shape[:2], clusters, size, chunk.shape[-1]).mean(3)
            target[:, :, :clusters] = means.to(target.dtype)
