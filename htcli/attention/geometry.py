"""The level geometry of H-attention, shared by the oracle, both implementations and the decode cache.

A sequence of n positions is cut into blocks of `block_size` (N_r) positions. Level 0 scores a
query against the keys of its own and neighbouring blocks; level l >= 1 against clusters of 2**l
positions in the neighbouring level-l blocks (blocks of N_r clusters) that no finer level scored.
Causal: only the previous block at every level, and at level 0 the own block up to the query.

Level decay (optional, per head): a head with decay s (bits per level) scores every key of level l
s * l * ln 2 lower, so each coarser level's keys weigh 2**-s times the previous level's per key: a
locality prior that is the same for every length (ALiBi's idea, by level instead of by distance).
"""

from __future__ import annotations

import math

import torch
from einops import repeat

NEG_INF = float("-inf")


def decay_bias(decay: torch.Tensor, level: int) -> torch.Tensor:
    """The score bias of level `level` for heads (or rows) with these decays (bits per level)."""
    return decay * (-level * math.log(2))


def check_level_decay(level_decay, heads: int) -> None:
    """ValueError unless level_decay is None, one finite number >= 0 per head, or a tensor of one
    value per head (a tensor's values are its maker's to check: reading them would wait for its
    device; the model's come from its checked config)."""
    if level_decay is None:
        return
    if isinstance(level_decay, torch.Tensor):
        if level_decay.shape != (heads,):
            raise ValueError(
                f"level_decay must hold one value per head ({heads}), got {tuple(level_decay.shape)}"
            )
        return
    values = list(level_decay) if isinstance(level_decay, list | tuple) else None
    if (
        values is None
        or len(values) != heads
        or not all(
            isinstance(x, int | float) and not isinstance(x, bool) and 0 <= x < math.inf for x in values
        )
    ):
        got = level_decay if values is None else values
        raise ValueError(f"level_decay must be one number >= 0 per head ({heads}), got {got!r}")


def decay_tensor(level_decay, dtype: torch.dtype, device) -> torch.Tensor:
    """The per-head decay as a tensor of dtype on device; Python numbers go through float64 on the host
    (float32, as_tensor's choice, put 0.7 7e-9 off in float64; MPS has no float64)."""
    if not isinstance(level_decay, torch.Tensor):
        level_decay = torch.tensor(level_decay, dtype=torch.float64)
    return level_decay.to(device=device, dtype=dtype)


def decay_rows(level_decay, batch: int, dtype: torch.dtype, device) -> torch.Tensor | None:
    """Each row's level decay, (batch * heads,) in dtype, rows ordered as h_attention's (batch, heads)
    with heads inner; None without decay. A tensor already on device is not copied from the host."""
    if level_decay is None:
        return None
    per_head = decay_tensor(level_decay, dtype, device)
    return repeat(per_head, "h -> (b h)", b=batch)


def check_block_size(block_size: int) -> None:
    """ValueError unless block_size is an even number >= 2 (a level's block splits into two halves)."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2 or block_size % 2:
        raise ValueError(f"block_size must be an even number >= 2, got {block_size!r}")


def num_levels(n: int, block_size: int) -> int:
    """M = max(1, ceil(log2(ceil(n / block_size)))): levels 0 .. M-1."""
    blocks = -(-n // block_size)
    return max(1, (blocks - 1).bit_length())


def padded_length(n: int, block_size: int) -> int:
    """n rounded up to a multiple of both the block size and the coarsest cluster (2**(M-1)), so that
    every level's clusters tile the sequence exactly."""
    step = math.lcm(block_size, 2 ** (num_levels(n, block_size) - 1))
    return -(-n // step) * step


def check_inputs(q, k, v, block_size, key_padding_mask, causal: bool = False) -> None:
    """Raise ValueError with a clear message for inputs h_attention cannot take."""
    if not all(isinstance(t, torch.Tensor) and t.ndim == 4 for t in (q, k, v)):
        raise ValueError(
            "q, k, v must be tensors of 4 dimensions (batch, heads, n, dim_head), got "
            + ", ".join(
                str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__ for t in (q, k, v)
            )
        )
    if q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            "q, k, v must have the same shape (batch, heads, n, dim_head), got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if not (q.is_floating_point() and q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"q, k, v must be floating-point tensors of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if q.shape[2] < 1:
        raise ValueError("sequence length must be at least 1")
    if q.shape[3] < 1:
        raise ValueError("dim_head must be at least 1")
    check_block_size(block_size)
    if not isinstance(causal, bool):  # (the custom op said "Expected a value of type 'bool'" with its schema)
        raise ValueError(f"causal must be True or False, got {causal!r}")
    if key_padding_mask is not None:
        b, _, n, _ = q.shape
        if key_padding_mask.shape != (b, n) or key_padding_mask.dtype != torch.bool:
            raise ValueError(
                f"key_padding_mask must be a bool tensor of shape (batch, n) = ({b}, {n}), "
                f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
            )


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


def offsets(level: int, causal: bool) -> tuple[int, ...]:
    """Block offsets of the key blocks a query block scores at this level."""
    if level == 0:
        return (-1, 0) if causal else (-1, 0, 1)
    return (-1,) if causal else (-1, 1)


def static_bias(level: int, causal: bool, r: int, device, dtype) -> torch.Tensor:
    """(r, len(offsets) * r): -inf where a pair inside the window is not scored at this level.

    Level 0 causal: within its own block a query sees keys up to itself. Coarse levels: each
    half of a level-l block is one block of level l-1, so pairs that were neighbours there
    were already scored: a first-half query skips the previous block's second half, a
    second-half query (non-causal) the next block's first half.
    """
    half = r // 2
    i = torch.arange(r, device=device)[:, None]
    j = torch.arange(len(offsets(level, causal)) * r, device=device)[None, :]
    if level == 0:
        excluded = (j - r > i) if causal else (i < 0) & (j < 0)
    else:
        first = i < half
        excluded = first & (j >= half) & (j < r)
        if not causal:
            excluded = excluded | (~first & (j >= r) & (j < r + half))
    zero = torch.zeros((), device=device, dtype=dtype)
    return torch.where(excluded, torch.full_like(zero, NEG_INF), zero)
