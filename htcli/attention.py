"""Hierarchical attention (H-attention) of H-Transformer-1D, in O(n) time and memory.

The exact definition, with its dense oracle, is in docs of the project
(`dense_h_attention` below is that oracle). In short: a query sees the keys of its own
and neighbouring blocks at full resolution (level 0), and farther keys through
coarsened clusters of 2**l positions (levels l >= 1), each pair at exactly one level.
All levels are normalised together with one shared maximum (log-sum-exp).

einops legend: b batch, h heads, n positions (clusters at coarse levels), d dim_head,
k blocks, i query positions in a block, j key positions in a block's neighbourhood.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

NEG_INF = float("-inf")


def num_levels(n: int, block_size: int) -> int:
    """M = max(1, ceil(log2(ceil(n / block_size)))): levels 0 .. M-1."""
    blocks = -(-n // block_size)
    return max(1, (blocks - 1).bit_length())


def _check_inputs(q, k, v, block_size, key_padding_mask) -> None:
    if q.ndim != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            "q, k, v must have the same shape (batch, heads, n, dim_head), got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[2] < 1:
        raise ValueError("sequence length must be at least 1")
    if block_size < 2 or block_size % 2:
        raise ValueError(f"block_size must be an even number >= 2, got {block_size}")
    if key_padding_mask is not None:
        b, _, n, _ = q.shape
        if key_padding_mask.shape != (b, n) or key_padding_mask.dtype != torch.bool:
            raise ValueError(
                f"key_padding_mask must be a bool tensor of shape (batch, n) = ({b}, {n}), "
                f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
            )


# ---------------------------------------------------------------------------
# The fast path
# ---------------------------------------------------------------------------


def _shift_blocks(x: torch.Tensor, offset: int, fill: float) -> torch.Tensor:
    """Along dim 1 (blocks), block t of the result is block t + offset of x (fill outside)."""
    if offset == 0:
        return x
    nb = x.shape[1]
    pad = [0, 0] * (x.ndim - 2) + ([0, offset] if offset > 0 else [-offset, 0])
    padded = F.pad(x, pad, value=fill)
    return padded[:, offset : offset + nb] if offset > 0 else padded[:, :nb]


def _neighbourhood(level: int, causal: bool) -> tuple[int, ...]:
    """Block offsets whose keys a query block scores at this level."""
    if level == 0:
        return (-1, 0) if causal else (-1, 0, 1)
    return (-1,) if causal else (-1, 1)


def _static_mask(level: int, causal: bool, r: int, device) -> torch.Tensor | None:
    """(r, width * r) bool, True = the pair is NOT scored at this level.

    Level 0 causal: within the block, only keys at or before the query.
    Coarse levels: pairs that were already neighbours at level - 1 (the "correction").
    Each half of a level-l block is one block of level l-1; a query in the first half
    already saw the previous block's second half, one in the second half the next
    block's first half.
    """
    half = r // 2
    i = torch.arange(r, device=device)[:, None]
    if level == 0:
        if not causal:
            return None
        j = torch.arange(2 * r, device=device)[None, :]
        return j - r > i
    j = torch.arange((1 if causal else 2) * r, device=device)[None, :]
    first_half = i < half
    excluded = first_half & (j >= half) & (j < r)
    if not causal:
        excluded = excluded | (~first_half & (j >= r) & (j < r + half))
    return excluded


def _level_stats(q, k, v, bias, *, level: int, block_size: int, causal: bool, scale: float):
    """Per-query softmax statistics of one level.

    q, k, v: (b, n, d) cluster queries, keys, values; bias: (b, n) log count (-inf = empty).
    Returns row max m (b, n), denominator (b, n) and numerator (b, n, d), all relative to m,
    with m = -inf and zeros where a row scores nothing.
    """
    r = block_size
    n = q.shape[1]
    nb = -(-n // r)
    pad = nb * r - n
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        bias = F.pad(bias, (0, pad), value=NEG_INF)
    qb, kb, vb = (rearrange(t, "b (k i) d -> b k i d", i=r) for t in (q, k, v))
    bb = rearrange(bias, "b (k i) -> b k i", i=r)
    offsets = _neighbourhood(level, causal)
    keys = torch.cat([_shift_blocks(kb, o, 0.0) for o in offsets], dim=2)  # b k (w r) d
    values = torch.cat([_shift_blocks(vb, o, 0.0) for o in offsets], dim=2)
    key_bias = torch.cat([_shift_blocks(bb, o, NEG_INF) for o in offsets], dim=2)  # b k (w r)

    stat_dtype = torch.promote_types(values.dtype, torch.float32)
    scores = torch.einsum("bkid,bkjd->bkij", qb, keys).to(stat_dtype) * scale
    scores = scores + key_bias[:, :, None, :].to(stat_dtype)
    mask = _static_mask(level, causal, r, q.device)
    if mask is not None:
        scores = scores.masked_fill(mask, NEG_INF)
    m = scores.amax(dim=-1)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(scores - m_safe[..., None])
    den = p.sum(dim=-1)
    num = torch.einsum("bkij,bkjd->bkid", p.to(values.dtype), values).to(stat_dtype)
    m, den = (rearrange(t, "b k i -> b (k i)")[:, :n] for t in (m, den))
    num = rearrange(num, "b k i d -> b (k i) d")[:, :n]
    return m, den, num


def _merge(a, b):
    """Combine two partial softmaxes (m, den, num) under their shared maximum."""
    m = torch.maximum(a[0], b[0])
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa, wb = torch.exp(a[0] - m_safe), torch.exp(b[0] - m_safe)
    return m, a[1] * wa + b[1] * wb, a[2] * wa[..., None] + b[2] * wb[..., None]


def _upsample(stats, n: int):
    """Coarse cluster statistics to the next finer level (each cluster holds two), length n."""
    return tuple(t.repeat_interleave(2, dim=1)[:, :n] for t in stats)


def _pair_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum neighbouring pairs along dim 1 (odd length: the last one stands alone)."""
    if x.shape[1] % 2:
        x = F.pad(x, [0, 0] * (x.ndim - 2) + [0, 1])
    return x[:, 0::2] + x[:, 1::2]


def _coarse_levels(q, k, v, real, *, block_size: int, causal: bool):
    """Yield (level, Q, K, V, bias) for every level; inputs (b, n, d), real: (b, n) float."""
    n = q.shape[1]
    levels = num_levels(n, block_size)
    yield 0, q, k, v, torch.log(real)
    count = real
    k_sum, v_sum = k * real[..., None], v * real[..., None]
    q_sum = q * real[..., None]
    for level in range(1, levels):
        count, k_sum, v_sum = _pair_sum(count), _pair_sum(k_sum), _pair_sum(v_sum)
        denom = count.clamp_min(1.0)[..., None]
        if causal:
            coarse_q = q[:, :: 2**level]
        else:
            q_sum = _pair_sum(q_sum)
            coarse_q = q_sum / denom
        yield level, coarse_q, k_sum / denom, v_sum / denom, torch.log(count)


def h_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hierarchical attention; q, k, v: (batch, heads, n, dim_head). Same result as the oracle."""
    _check_inputs(q, k, v, block_size, key_padding_mask)
    b, h, n, d = q.shape
    scale = d**-0.5
    stat_dtype = torch.promote_types(q.dtype, torch.float32)
    flat = [rearrange(t, "b h n d -> (b h) n d") for t in (q, k, v)]
    if key_padding_mask is None:
        real = q.new_ones((b * h, n), dtype=stat_dtype)
    else:
        real = key_padding_mask.to(stat_dtype).repeat_interleave(h, dim=0)

    stats = []
    for level, lq, lk, lv, bias in _coarse_levels(*flat, real, block_size=block_size, causal=causal):
        stats.append(
            _level_stats(lq, lk, lv, bias, level=level, block_size=block_size, causal=causal, scale=scale)
        )
    acc = stats[-1]
    for fine in reversed(stats[:-1]):
        acc = _merge(_upsample(acc, fine[0].shape[1]), fine)
    _, den, num = acc
    out = num / torch.where(den > 0, den, torch.ones_like(den))[..., None]
    return rearrange(out.to(q.dtype), "(b h) n d -> b h n d", b=b)


# ---------------------------------------------------------------------------
# The dense O(n^2) oracle, written for clarity
# ---------------------------------------------------------------------------


def pair_levels(n_padded: int, block_size: int, levels: int, causal: bool) -> torch.Tensor:
    """(L, L) int: the level at which query i scores key j, -1 where it never does."""
    i = torch.arange(n_padded)[:, None]
    j = torch.arange(n_padded)[None, :]
    b_i, b_j = i // block_size, j // block_size
    if causal:
        level0 = ((b_i == b_j) & (j <= i)) | (b_j == b_i - 1)
    else:
        level0 = (b_i - b_j).abs() <= 1
    level = torch.where(level0, 0, -1)
    for lv in range(1, levels):
        b_i, b_j = i // (block_size << lv), j // (block_size << lv)
        hit = (b_j == b_i - 1) if causal else (b_i - b_j).abs() == 1
        level = torch.where((level == -1) & hit, lv, level)
    return level


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
) -> torch.Tensor:
    """The O(n^2) definition: an (L, L) score matrix filled level by level, one row softmax."""
    _check_inputs(q, k, v, block_size, key_padding_mask)
    b, h, n, d = q.shape
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
        scores = torch.where(level_of_pair == lv, level_scores, scores)
    scores = scores.masked_fill(~real[:, None, None, :], NEG_INF)
    seen = torch.isfinite(scores).any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~seen, 0.0), dim=-1) * seen
    return (probs @ v)[:, :, :n]
