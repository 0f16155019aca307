"""The decode cache's step with the same operations at every position, so that it can be captured in a
CUDA graph and replayed (a step on a GPU is bound by launching its ~400 small kernels, not by them).

HAttentionCache.step decides in Python what a position does (a new block, the levels whose clusters
begin or end there, which of them to score) and does only that. Here the position is a tensor on the
device and every step does all of it, each update kept or dropped by a flag computed from the
position (torch.where): the softmax reads every slot, those past the position biased -inf; the
previous block's slots are copied from the current block's at every step, kept only where a block
begins; every level's coarse query is scored, kept only where its cluster begins. The outputs are
those of HAttentionCache.step (equal to rounding: the softmax sums over more slots, each past the
position adding an exact 0), from the state prefill made, in the same buffers; but the state is kept
in its own way (the current block's slots past the position at -inf, no mask per level), so a cache
that has taken a static step refuses ordinary ones.

StepPlan holds the position and the flags of a step, computed once per step for all layers (they
depend only on the position); `step` updates one layer's cache. Neither keeps a count in Python: the
caller counts the step (HAttentionCache.t) outside what is replayed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from htcli.attention.cache import HAttentionCache
from htcli.attention.geometry import NEG_INF
from htcli.device import without_autocast


class StepPlan:
    """The position of the next step (a 0-dim int64 tensor on the device) and what it does; the same for
    every layer of a model (one block size and number of levels)."""

    def __init__(self, cache: HAttentionCache):
        """The plan of the steps after the position of cache (any of the model's layers')."""
        device, r, coarse = cache.kv.device, cache.r, cache.levels - 1
        self.r, self.coarse = r, coarse
        self.position = torch.tensor(cache.t, device=device)
        self.index = self.position.view(1)  # (for index_select)
        self._slots = torch.arange(r, device=device)
        self._shifts = torch.arange(1, cache.levels, device=device)  # (coarse,) levels 1..levels - 1
        self._levels = torch.arange(coarse, device=device)  # index = level - 1
        # 1 / cluster size per level, shaped to scale (levels - 1, (b h), 2, d) running sums
        self.inverse_sizes = (0.5 ** self._shifts.double()).float()[:, None, None, None]
        self._second_half = torch.where(self._slots >= r // 2, NEG_INF, 0.0)  # (r,)
        self.zero = torch.zeros((), device=device)

    def update(self) -> None:
        """The flags of the step at self.position (device operations only)."""
        t, r = self.position, self.r
        slot = t % r
        self.slot = slot.view(1)  # level 0: the current block's slot of this position
        self.new_block = (slot == 0) & (t > 0)  # 0-dim: the current block's slots become the previous's
        # level 0's biases: the previous block's slots once there is one, the current's up to the position
        previous = torch.where(t >= r, self.zero, NEG_INF).expand(r)
        self.level0_bias = torch.cat([previous, torch.where(self._slots <= slot, 0.0, NEG_INF)])
        if not self.coarse:
            return
        clusters = t >> self._shifts  # per level: the cluster of the position, and where in its block
        begins = (clusters << self._shifts) == t
        within = clusters % r
        self.cluster_slot = (self._levels, within)  # index of its mean in cache.cur
        self.complete = ((clusters + 1) << self._shifts) - 1 == t  # its last position
        self.block_start = begins & (within == 0) & (clusters > 0)  # the current block becomes previous
        self.scored = begins & (clusters >= r)  # a cluster begins, with a previous block to score
        # a cluster in the first half of its block scores only the previous block's first half
        self.mask = torch.where((within < r // 2)[:, None], self._second_half, 0.0)[:, None]  # (coarse, 1, r)

    def advance(self) -> None:
        self.position += 1


def step(cache: HAttentionCache, plan: StepPlan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """HAttentionCache.step's output (b, h, d) for q, k, v (b, h, d) of position plan.position, with the
    same operations at every position (plan.update() done). Leaves cache.t as it is."""
    cache.static = True  # (HAttentionCache.step refuses from now on)
    with without_autocast(q.device.type):
        new = torch.stack([k, v], 2).float()  # (b, h, 2, d)
        q = q.float()
        torch.where(plan.new_block, cache._current, cache._previous, out=cache._previous)
        cache.bias[..., plan.coarse :].copy_(plan.level0_bias)
        cache._current.index_copy_(3, plan.slot, new.unsqueeze(3))
        if plan.coarse:
            _coarse(cache, plan, q, new)
        out = F.scaled_dot_product_attention(q.unsqueeze(2), cache.kv[:, :, 0], cache.kv[:, :, 1], cache.bias)
    return out.squeeze(2).to(cache.dtype)


def _coarse(cache: HAttentionCache, plan: StepPlan, q: torch.Tensor, new: torch.Tensor) -> None:
    """The coarse levels' part of a step: running sums, cluster means, previous blocks, level slots."""
    levels, bh, r, d = plan.coarse, cache.prev.shape[1], cache.r, cache.d
    # where a level's block begins, its current block's cluster means become the previous block's
    # (before this position's own cluster writes its slot of the current block)
    keys, values = cache.prev[:, :, 0].view(levels, bh, d, r), cache.prev[:, :, 1].view(levels, bh, r, d)
    begins = plan.block_start[:, None, None, None]
    torch.where(begins, cache.cur[:, :, :, 0].transpose(2, 3), keys, out=keys)
    torch.where(begins, cache.cur[:, :, :, 1], values, out=values)
    # running sums; each divided by its cluster's size into the cluster's slot (its mean once the
    # cluster's last position is in), then a sum that ends there starts again
    cache.part.add_(new.view(1, bh, 2, d))
    levels_index, within = plan.cluster_slot
    cache.cur.transpose(1, 2).index_put_((levels_index, within), cache.part * plan.inverse_sizes)
    torch.where(plan.complete[:, None, None, None], plan.zero, cache.part, out=cache.part)
    # every level's query against its previous block's clusters; kept where its cluster begins
    queries = (q.reshape(1, bh, d) * d**-0.5).expand(levels, bh, d).reshape(levels * bh, 1, d)
    scores = torch.bmm(queries, keys.reshape(levels * bh, d, r)).view(levels, bh, r) + plan.mask
    log_p = scores.log_softmax(-1)
    lse = (scores[..., 0] - log_p[..., 0]).add_(cache._log_sizes)  # (levels, (b h))
    averages = torch.bmm(log_p.exp().view(levels * bh, 1, r), values.reshape(levels * bh, r, d))
    scored = plan.scored[None]
    torch.where(scored, lse.T, cache._level_biases, out=cache._level_biases)
    averages = averages.view(levels, bh, d).transpose(0, 1)
    torch.where(scored[..., None], averages, cache._level_values, out=cache._level_values)
