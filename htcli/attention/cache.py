"""Exact incremental decoding of causal H-attention: a per-layer cache, O(block_size * d) a token.

Why it works: the causal coarse query of a level-l cluster is q at the cluster's first
position, and the keys it scores (clusters of the previous level-l block) are complete by
then, so a level's contribution to every position of the cluster is computed once, at that
first position, and reused. Level 0 is ordinary attention over the current and previous
block. The levels are combined under one shared maximum, as in the parallel path.

One softmax per step (a decode step is bound by the number of tensor operations, not by
arithmetic, so it does as few as it can): each coarse level l >= 1 is one slot: key 0, value the
level's softmax output for the current cluster, bias its log-sum-exp (plus the head's level decay,
if any); then come level 0's keys and values: r slots of the previous block, r of the current one
(position p in slot p % r of its block's r; when a block begins, the current one is copied to the
previous one's slots). A softmax over the slots is then exactly the merge of level 0 with every
coarse level under one maximum; it reads only the slots up to the current position, a prefix (at 8
sequences a step is bound by reading memory, and the slots past it are a quarter on average).

Cache per layer (fp32 whatever the model's dtype):
  kv: (b, h, 2, levels - 1 + 2r, d) keys, values: the coarse levels' slots, the previous block's,
      the current block's;
  bias: (b, h, 1, levels - 1 + 2r) the slots' score biases (-inf: nothing there yet; 0 on
      the current block's slots, which are read only up to the position);
  cur: (levels - 1, (b h), r, 2, d) per level l >= 1 (index l - 1), cluster keys and values of the
      current level-l block, filled as its clusters complete;
  prev: (levels - 1, (b h), 2, r * d) the same of the previous level-l block (cur, copied when the
      next block begins), the keys as (d, r), so that a query scores them as one row times a
      contiguous matrix (at 8 sequences 6x faster on a CPU than the keys as rows of a strided
      matrix), the values as (r, d);
  mask: (levels - 1, 1, r) per level, 0 or -inf: the previous block's clusters the current
      cluster's query scores (a first-half cluster skips the second half, seen at level l-1);
      first_half, per level, whether it is -inf there: where every level scored at a position is,
      only the first half of their blocks is read (a quarter of the coarse levels' bytes), and
      where none is, nothing is masked;
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
        self.static = False  # set by static_step.step: its steps keep the state their own way
        self.capacity = block_size * 2**self.levels  # positions the levels can serve exactly
        self.dtype = dtype  # of the outputs
        b, h, r, d, levels = batch, heads, block_size, dim_head, self.levels
        zeros = lambda *shape: torch.zeros(shape, device=device, dtype=torch.float32)  # noqa: E731
        current = levels - 1 + r  # the current block's first slot (after the coarse levels' and previous's)
        self.kv = zeros(b, h, 2, current + r, d)
        self.bias = torch.full((b, h, 1, current + r), NEG_INF, device=device)
        self.bias[..., current:] = 0.0  # (the current block's slots past the position are never read)
        # index = level - 1 (level 0 has its slots in kv instead)
        self.prev, self.cur = zeros(levels - 1, b * h, 2, r * d), zeros(levels - 1, b * h, r, 2, d)
        self.mask = zeros(levels - 1, 1, r)
        self.first_half = [False] * (levels - 1)
        self.part = zeros(levels - 1, b * h, 2, d)
        self._make_views()
        # per level l >= 1 (index l - 1): its slot's score bias, log of its cluster size plus the level's
        # decay bias of each (b h) row ((levels - 1, 1) without decay, else (levels - 1, (b h))), and, as
        # 0-dim tensors (an operation with a Python number converts it first), 1 / its size
        sizes = torch.tensor([2.0**level for level in range(1, levels)], device=device)
        self._log_sizes, self._inverse_sizes = sizes.log()[:, None], list(1 / sizes)
        rows = decay_rows(level_decay, b, torch.float32, device)
        self._decayed = rows is not None and levels > 1
        if self._decayed:
            self._log_sizes = self._log_sizes + torch.stack([decay_bias(rows, lv) for lv in range(1, levels)])

    def _make_views(self) -> None:
        """The views of kv and bias that a step writes through or reads (made once)."""
        # per position in a block: its slot's keys and values ((b h), 2, d), key alone, value alone, and
        # the keys, values and biases that its softmax reads (every slot up to its own)
        b, h, r, d = *self.kv.shape[:2], self.r, self.d
        coarse, current = self.levels - 1, self.levels - 1 + r
        kv, keys, values = self.kv, self.kv[:, :, 0], self.kv[:, :, 1]
        self._slots = [
            (kv[:, :, :, s].view(b * h, 2, d), kv[:, :, 0, s], kv[:, :, 1, s])
            + (keys[:, :, : s + 1], values[:, :, : s + 1], self.bias[..., : s + 1])
            for s in range(current, current + r)
        ]
        # the previous and the current block's slots, and the previous block's biases
        self._previous, self._current = kv[:, :, :, coarse:current], kv[:, :, :, current:]
        self._previous_bias = self.bias[..., coarse:current]
        # the coarse levels' slots: values ((b h), levels - 1, d) and biases ((b h), levels - 1)
        self._level_values = kv[:, :, 1].view(b * h, -1, d)[:, :coarse]
        self._level_biases = self.bias.view(b * h, -1)[:, :coarse]
        # per level l >= 1: its running sum, its current block's clusters, and the previous blocks of
        # levels 1..l as _coarse reads them (all of each block, and only its first half)
        self._parts = list(self.part)
        self._clusters = [list(level.unbind(1)) for level in self.cur]
        blocks = [self._blocks(1, last) for last in range(1, self.levels)]
        self._coarse_blocks = [
            (keys, values, keys[..., : r // 2], values[:, : r // 2]) for keys, values in blocks
        ]

    def repeat(self, copies: int) -> None:
        """Hold `copies` sequences, each this one (a cache of one sequence): several samples of one prompt
        decode from one prefill."""
        if self.kv.shape[0] != 1:
            raise ValueError(f"only a cache of one sequence repeats, this one holds {self.kv.shape[0]}")
        self.kv, self.bias = self.kv.repeat(copies, 1, 1, 1, 1), self.bias.repeat(copies, 1, 1, 1)
        # (b h) dims, b outer: with b = 1, repeating the h rows
        self.prev, self.cur = self.prev.repeat(1, copies, 1, 1), self.cur.repeat(1, copies, 1, 1, 1)
        self.part = self.part.repeat(1, copies, 1, 1)
        if self._decayed:  # per (b h) row
            self._log_sizes = self._log_sizes.repeat(1, copies)
        self._make_views()

    # -- one token -----------------------------------------------------------------------

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v: (b, h, d) of position t = self.t (rotary applied). Returns (b, h, d)."""
        with without_autocast(q.device.type):  # the softmax state is fp32
            return self._step(q, k, v)

    def check_room(self) -> None:
        """ValueError if the levels cannot serve the next position exactly (a step there is refused)."""
        if self.t >= self.capacity:
            raise ValueError(
                f"the decode cache holds {self.capacity} positions: re-prefill a shorter context"
            )

    def _step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t, r = self.t, self.r
        if self.static:
            raise ValueError("this cache has taken static steps (a CUDA graph's): go on with static_step")
        self.check_room()
        if t % r == 0 and t > 0:  # a new block: the current one becomes the previous one
            self._previous.copy_(self._current)
            self._previous_bias.fill_(0.0)
        kv, key, value, keys, values, bias = self._slots[t % r]
        key.copy_(k)
        value.copy_(v)
        self.part += kv
        q = q if q.dtype == torch.float32 else q.float()
        scored = 0  # the levels 1..scored begin a cluster here and have a previous block to score
        for level in range(1, self.levels):
            size = 2**level
            cluster, within = t >> level, t % size
            if within == 0:  # a new cluster begins: its query is this one
                self._begin_cluster(level, cluster)
                scored = level if cluster >= r else scored
            if within == size - 1:  # the cluster is complete: its mean key and value
                part = self._parts[level - 1]
                torch.mul(part, self._inverse_sizes[level - 1], out=self._clusters[level - 1][cluster % r])
                part.zero_()
        if scored:
            self._coarse(1, scored, (q * self.d**-0.5).reshape(-1, 1, self.d))
        self.t += 1
        out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, bias)
        return out.squeeze(2) if out.dtype == self.dtype else out.squeeze(2).to(self.dtype)

    def _begin_cluster(self, level: int, cluster: int) -> None:
        """Level l's bookkeeping where a cluster begins: a new block's start makes the current block
        the previous one; the mask follows which half of that block the cluster's query scores."""
        r, index = self.r, level - 1
        within_block = cluster % r
        if within_block == 0:
            if cluster > 0:
                self._set_previous(level, self.cur[index])
            self._set_half(index, True)
        elif within_block == r // 2:
            self._set_half(index, False)

    def _blocks(self, first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of levels first..last of prev: keys ((m b h), d, r) and values ((m b h), r, d)."""
        chosen = self.prev[first - 1 : last].flatten(0, 1)  # ((m b h), 2, r * d)
        return chosen[:, 0].unflatten(1, (self.d, self.r)), chosen[:, 1].unflatten(1, (self.r, self.d))

    def _set_previous(self, level: int, clusters: torch.Tensor) -> None:
        """Level l's previous block := clusters ((b h), r, 2, d), keys transposed."""
        keys, values = self._blocks(level, level)
        keys.copy_(clusters[:, :, 0].transpose(1, 2))
        values.copy_(clusters[:, :, 1])

    def _set_half(self, index: int, first_half: bool) -> None:
        """Level index + 1's query scores only the first half of its previous block (or all of it)."""
        self.first_half[index] = first_half
        self.mask[index, :, self.r // 2 :] = NEG_INF if first_half else 0.0

    def _coarse(self, first: int, last: int, q: torch.Tensor) -> None:
        """The slots of levels first..last, whose clusters begin at the position of query q ((b h), 1,
        d), scaled: each level's query against its previous block's clusters (masked); the slot's
        value is their softmax average, its bias their log-sum-exp."""
        levels = slice(first - 1, last)
        m, bh, r, d = last - first + 1, self.prev.shape[1], self.r, self.d
        halves = self.first_half[levels]
        if first == 1:  # (a step's: views made once)
            keys, values, first_keys, first_values = self._coarse_blocks[last - 1]
        else:
            keys, values = self._blocks(first, last)
            first_keys, first_values = keys[..., : r // 2], values[:, : r // 2]
        queries = q.view(1, bh, d).expand(m, bh, d).reshape(m * bh, 1, d) if m > 1 else q
        if all(halves):  # (the clusters the queries score, without the mask)
            r, keys, values = r // 2, first_keys, first_values
        scores = torch.bmm(queries, keys).view(m, bh, r)
        if any(halves) and not all(halves):
            scores.add_(self.mask[levels])
        log_p = scores.log_softmax(-1)
        # log-sum-exp = score - log p, at any cluster (the first's, never masked), exact to rounding
        lse = torch.sub(scores[..., 0], log_p[..., 0]).add_(self._log_sizes[levels])  # (m, (b h))
        self._level_biases[:, levels].copy_(lse.T)
        averages = torch.bmm(log_p.exp_().view(m * bh, 1, r), values).view(m, bh, d)
        self._level_values[:, levels].copy_(averages.transpose(0, 1))

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
        block = (T - 1) // r  # level 0: the last position's block and the one before it
        self._current[:, :, :, : T - block * r] = kv[:, :, block * r : T].transpose(2, 3)
        if block >= 1:
            self._previous.copy_(kv[:, :, (block - 1) * r : block * r].transpose(2, 3))
            self._previous_bias.fill_(0.0)
        scaled = q * self.d**-0.5
        for level in range(1, self.levels):
            size = 2**level
            cluster = (T - 1) >> level
            block = cluster // r
            complete = T if T % size == 0 else (cluster << level)  # positions in complete clusters
            self._fill_block(self.cur[level - 1], kv, level, block, complete)
            if block >= 1:
                self._set_previous(
                    level,
                    self._fill_block(torch.empty_like(self.cur[level - 1]), kv, level, block - 1, complete),
                )
            self._set_half(level - 1, cluster % r < r // 2)
            start = cluster << level
            # (when the cluster is complete, the next step starts a new one and replaces this)
            self.part[level - 1] = kv[:, :, start:T].sum(2).flatten(0, 1) if T % size else 0.0
            if block >= 1:  # (else nothing to score yet: the slot's bias stays -inf)
                self._coarse(level, level, scaled[:, :, start].reshape(-1, 1, self.d))

    def _fill_block(
        self, target: torch.Tensor, kv: torch.Tensor, level: int, block: int, complete: int
    ) -> torch.Tensor:
        """target ((b h), r, 2, d) := the cluster means of level-l block `block` over the positions <
        complete (0 where none); returns target."""
        r, size = self.r, 2**level
        start, stop = block * r * size, min((block + 1) * r * size, complete)
        target.zero_()
        clusters = max(0, (stop - start) // size)
        if clusters:
            chunk = kv[:, :, start : start + clusters * size].flatten(0, 1)  # ((b h), n, 2, d)
            target[:, :clusters] = chunk.reshape(chunk.shape[0], clusters, size, 2, self.d).mean(2)
        return target
