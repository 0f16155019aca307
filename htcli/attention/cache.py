"""Exact incremental decoding of causal H-attention: a per-layer cache, O(block_size * d) a token.

Why it works: the causal coarse query of a level-l cluster is q at the cluster's first
position, and the keys it scores (clusters of the previous level-l block) are complete by
then, so a level's contribution to every position of the cluster is computed once, at that
first position, and reused. Level 0 is ordinary attention over the current and previous
block. The levels are combined under one shared maximum, as in the parallel path.

One softmax per step (a decode step is bound by the number of tensor operations, not by
arithmetic, so it does as few as it can): level 0's keys and values sit in a ring of 2r slots
(position p in slot p % 2r; a bias of -inf hides the slots of no current position), and each
coarse level l >= 1 is one more slot: key 0, value the level's softmax output for the current
cluster, bias its log-sum-exp (plus the head's level decay, if any). A softmax over all the slots
is then exactly the merge of level 0 with every coarse level under one maximum.

Cache per layer (fp32 whatever the model's dtype):
  kv: (b, h, 2, 2r + levels - 1, d) keys, values: the ring, then one slot per coarse level;
  bias: (b, h, 1, 2r + levels - 1) the slots' score biases;
  prev, cur: (levels - 1, (b h), r, 2, d) per level l >= 1 (index l - 1), cluster keys and values
      of the previous and the current level-l block (the current one filled as its clusters
      complete; copied to prev when the next block begins);
  mask: (levels - 1, 1, r) per level, 0 or -inf: the previous block's clusters the current
      cluster's query scores (a first-half cluster skips the second half, seen at level l-1);
  part: (levels - 1, (b h), 2, d) running sums of each level's current, incomplete cluster.
Views of every slot are made once (a step writes through them: one operation each), and batch and
heads are one dim where a step multiplies (torch.bmm, no broadcasting to set up). The levels
whose clusters begin at the same position (1 to m at a position divisible by 2^m) share its
query and are computed together: one batch of tensor operations, not m.

einops legend: b batch, h heads, r block positions, d dim_head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from htcli.attention.geometry import NEG_INF, check_level_decay, decay_bias, decay_rows, num_levels
from htcli.device import without_autocast


class HAttentionCache:
    """Decoding state of one causal H-attention layer."""

    def __init__(
        self,
        batch: int,
        heads: int,
        dim_head: int,
        *,
        block_size: int,
        max_seq_len: int,
        device,
        dtype,
        level_decay=None,
    ):
        """level_decay: None, or per head the bits per level of h_attention's level_decay."""
        check_level_decay(level_decay, heads)
        self.r, self.d = block_size, dim_head
        self.levels = num_levels(max_seq_len, block_size)
        self.t = 0  # tokens seen
        self.capacity = block_size * 2**self.levels  # positions the levels can serve exactly
        self.dtype = dtype  # of the outputs
        b, h, r, d, levels = batch, heads, block_size, dim_head, self.levels
        zeros = lambda *shape: torch.zeros(shape, device=device, dtype=torch.float32)  # noqa: E731
        self.kv = zeros(b, h, 2, 2 * r + levels - 1, d)
        self.bias = torch.full((b, h, 1, 2 * r + levels - 1), NEG_INF, device=device)
        # index = level - 1 (level 0 has the ring instead)
        self.prev, self.cur = zeros(levels - 1, b * h, r, 2, d), zeros(levels - 1, b * h, r, 2, d)
        self.mask = zeros(levels - 1, 1, r)
        self.part = zeros(levels - 1, b * h, 2, d)
        # per ring slot: its keys and values ((b h), 2, d), its key alone, its value alone, its bias
        kv = self.kv
        self._slots = [
            (kv[:, :, :, s].view(b * h, 2, d), kv[:, :, 0, s], kv[:, :, 1, s], self.bias[..., s])
            for s in range(2 * r)
        ]
        self._keys, self._values = self.kv[:, :, 0], self.kv[:, :, 1]
        # the coarse levels' slots: values ((b h), levels - 1, d) and biases ((b h), levels - 1)
        coarse = slice(2 * r, 2 * r + levels - 1)
        self._level_values = kv[:, :, 1].view(b * h, -1, d)[:, coarse]
        self._level_biases = self.bias.view(b * h, -1)[:, coarse]
        # per level l >= 1 (index l - 1): its slot's score bias, log of its cluster size plus the level's
        # decay bias of each (b h) row ((levels - 1, 1) without decay, else (levels - 1, (b h))), and, as
        # 0-dim tensors (an operation with a Python number converts it first), 1 / its size
        sizes = torch.tensor([2.0**level for level in range(1, levels)], device=device)
        self._log_sizes, self._inverse_sizes = sizes.log()[:, None], list(1 / sizes)
        rows = decay_rows(level_decay, b, torch.float32, device)
        if rows is not None and levels > 1:
            self._log_sizes = self._log_sizes + torch.stack([decay_bias(rows, lv) for lv in range(1, levels)])

    # -- one token -----------------------------------------------------------------------

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: (b, h, d) of position t = self.t (rotary applied). Returns (b, h, d)."""
        with without_autocast(q.device.type):  # the softmax state is fp32
            return self._step(q, k, v)

    def _step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t, r = self.t, self.r
        if t >= self.capacity:
            raise ValueError(
                f"the decode cache holds {self.capacity} positions: re-prefill a shorter context"
            )
        slot = t % (2 * r)
        if t % r == 0 and t > 0:  # a new block: its half of the ring holds the block before last
            self.bias[..., slot : slot + r] = NEG_INF
        kv, key, value, bias = self._slots[slot]
        key.copy_(k)
        value.copy_(v)
        bias.fill_(0.0)
        self.part += kv
        q = q.float()
        scored = 0  # the levels 1..scored begin a cluster here and have a previous block to score
        for level in range(1, self.levels):
            size = 2**level
            cluster, within = t >> level, t % size
            if within == 0:  # a new cluster begins: its query is this one
                self._begin_cluster(level, cluster)
                scored = level if cluster >= r else scored
            if within == size - 1:  # the cluster is complete
                part = self.part[level - 1]
                torch.mul(part, self._inverse_sizes[level - 1], out=self.cur[level - 1, :, cluster % r])
                part.zero_()
        if scored:
            self._coarse(1, scored, (q * self.d**-0.5).reshape(-1, self.d, 1))
        self.t += 1
        out = F.scaled_dot_product_attention(q.unsqueeze(2), self._keys, self._values, self.bias)
        return out.squeeze(2) if out.dtype == self.dtype else out.squeeze(2).to(self.dtype)

    def _begin_cluster(self, level: int, cluster: int) -> None:
        """Level l's bookkeeping where a cluster begins: a new block's start makes the current block
        the previous one; the mask follows which half of that block the cluster's query scores."""
        r, index = self.r, level - 1
        within_block = cluster % r
        if within_block == 0:
            if cluster > 0:
                self.prev[index].copy_(self.cur[index])
            self.mask[index, :, r // 2 :] = NEG_INF
        elif within_block == r // 2:
            self.mask[index, :, r // 2 :] = 0.0

    def _coarse(self, first: int, last: int, q: torch.Tensor) -> None:
        """The slots of levels first..last, whose clusters begin at the position of query q ((b h), d,
        1), scaled: each level's query against its previous block's clusters (masked); the slot's
        value is their softmax average, its bias their log-sum-exp."""
        levels = slice(first - 1, last)
        m, bh, r, d = last - first + 1, *self.prev.shape[1:3], self.d
        blocks = self.prev[levels].flatten(0, 1)  # ((m b h), r, 2, d)
        queries = q.view(1, bh, d).expand(m, bh, d).reshape(m * bh, d, 1) if m > 1 else q
        scores = torch.bmm(blocks[:, :, 0], queries).view(m, bh, r).add_(self.mask[levels])
        log_p = scores.log_softmax(-1)
        # log-sum-exp = score - log p, at any cluster (the first's, never masked), exact to rounding
        lse = torch.sub(scores[..., 0], log_p[..., 0]).add_(self._log_sizes[levels])  # (m, (b h))
        self._level_biases[:, levels].copy_(lse.T)
        values = torch.bmm(log_p.exp_().view(m * bh, 1, r), blocks[:, :, 1]).view(m, bh, d)
        self._level_values[:, levels].copy_(values.transpose(0, 1))

    # -- a whole prompt ------------------------------------------------------------------

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Set the state after positions 0..T-1; q, k, v: (b, h, T, d) as the parallel forward
        computed them (rotary applied)."""
        with without_autocast(q.device.type):
            self._prefill(q.float(), torch.stack([k, v], 3).float())

    def _prefill(self, q: torch.Tensor, kv: torch.Tensor) -> None:
        T, r = q.shape[2], self.r
        if not 1 <= T <= self.capacity:
            raise ValueError(f"cannot prefill {T} positions: 1 to {self.capacity}")
        self.t = T
        first = max(0, ((T - 1) // r - 1) * r)  # level 0 sees the previous and the current block
        slots = torch.arange(first, T, device=q.device) % (2 * r)
        self.kv[:, :, :, slots] = kv[:, :, first:T].transpose(2, 3)
        self.bias[..., slots] = 0.0
        scaled = q * self.d**-0.5
        for level in range(1, self.levels):
            size = 2**level
            cluster = (T - 1) >> level
            block = cluster // r
            complete = T if T % size == 0 else (cluster << level)  # positions in complete clusters
            self._fill_block(self.cur[level - 1], kv, level, block, complete)
            if block >= 1:
                self._fill_block(self.prev[level - 1], kv, level, block - 1, complete)
            self.mask[level - 1, :, r // 2 :] = NEG_INF if cluster % r < r // 2 else 0.0
            start = cluster << level
            # (when the cluster is complete, the next step starts a new one and replaces this)
            self.part[level - 1] = kv[:, :, start:T].sum(2).flatten(0, 1) if T % size else 0.0
            if block >= 1:  # (else nothing to score yet: the slot's bias stays -inf)
                self._coarse(level, level, scaled[:, :, start].reshape(-1, self.d, 1))

    def _fill_block(
        self, target: torch.Tensor, kv: torch.Tensor, level: int, block: int, complete: int
    ) -> None:
        """Cluster means of level-l block `block` over the positions < complete."""
        r, size = self.r, 2**level
        start, stop = block * r * size, min((block + 1) * r * size, complete)
        target.zero_()
        clusters = max(0, (stop - start) // size)
        if clusters:
            chunk = kv[:, :, start : start + clusters * size].flatten(0, 1)  # ((b h), n, 2, d)
            target[:, :clusters] = chunk.reshape(chunk.shape[0], clusters, size, 2, self.d).mean(2)
