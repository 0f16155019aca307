"""The dense O(n^2) oracle of H-attention, written for clarity: tests compare the fast path to it.

It builds the (L, L) score matrix of the definition level by level (each pair scored at exactly
one level, `pair_levels`), masks padding, and takes one row softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from htcli.attention.geometry import (
    NEG_INF,
    check_inputs,
    check_level_decay,
    decay_bias,
    decay_tensor,
    num_levels,
    pair_levels,
)


def _cluster_mean(t: torch.Tensor, weight: torch.Tensor, size: int) -> torch.Tensor:
    """Mean of t over the real positions of each cluster of `size` positions (0 if none)."""
    sums = rearrange(t * weight, "b h (c s) d -> b h c s d", s=size).sum(3)
    count = rearrange(weight, "b h (c s) d -> b h c s d", s=size).sum(3)
    return sums / count.clamp_min(1)


def dense_h_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    level_decay=None,
) -> torch.Tensor:
    """The O(n^2) definition: an (L, L) score matrix filled level by level, one row softmax.
    level_decay: None, or per head the bits per level that each level's scores lose (geometry)."""
    check_inputs(q, k, v, block_size, key_padding_mask)
    b, h, n, d = q.shape
    check_level_decay(level_decay, h)
    decay = None if level_decay is None else decay_tensor(level_decay, q.dtype, q.device)
    levels = num_levels(n, block_size)
    length = block_size * 2**levels
    pad = length - n
    real = torch.ones(b, n, dtype=torch.bool, device=q.device)
    if key_padding_mask is not None:
        real = key_padding_mask.to(q.device)
    real = F.pad(real, (0, pad), value=False)
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    weight = real[:, None, :, None].to(q.dtype)  # b 1 L 1

    level_of_pair = pair_levels(length, block_size, levels, causal).to(q.device)
    scores = torch.full((b, h, length, length), NEG_INF, dtype=q.dtype, device=q.device)
    position = torch.arange(length, device=q.device)
    for lv in range(levels):
        size = 2**lv

        if lv == 0:  # level 0 is the sequence itself, padded queries included
            coarse_q, coarse_k = q, k
        else:
            coarse_q = q[:, :, ::size] if causal else _cluster_mean(q, weight, size)
            coarse_k = _cluster_mean(k, weight, size)
        # every fine position carries its cluster's coarse query and key
        fine_q = coarse_q[:, :, position >> lv]
        fine_k = coarse_k[:, :, position >> lv]
        level_scores = fine_q @ fine_k.transpose(-1, -2) * d**-0.5
        if decay is not None:
            level_scores = level_scores + decay_bias(decay, lv)[:, None, None]
        scores = torch.where(level_of_pair == lv, level_scores, scores)
    scores = scores.masked_fill(~real[:, None, None, :], NEG_INF)
    seen = torch.isfinite(scores).any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~seen, 0.0), dim=-1) * seen
    return (probs @ v)[:, :, :n]
