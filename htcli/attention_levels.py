"""The level-by-level computation behind `h_attention`: forward and hand-written backward.

Layout. At each level the (cluster) sequence of every batch*head row is cut into blocks of
`r = block_size` and framed by one empty block on each side; the rows are then stacked into
one flat list of blocks. Window w has its query block at flat index w + 1 and its neighbour
key blocks at w + 1 + offset, so a neighbour is a plain slice of the flat list, never a
Python loop over blocks. Windows whose query block is a frame block compute garbage that is
never read (their queries and gradients are zero).

Level l >= 1 works on clusters of 2**l positions: K, V are means over the cluster's real
positions and every key carries the bias log(count); Q is the cluster mean (non-causal) or
the cluster's first position (causal). Each level's softmax statistics are merged into
per-position accumulators under one running maximum.

Backward (per level, all fine positions i of a query cluster c share the level's scores):
with w_i = exp(m_c - lse_i), G_c = sum_i w_i dO_i and E_c = sum_i w_i (dO_i . O_i), and
P = exp(S - m_c), the gradients are dV = P^T G, dS = P * (G V^T - E), dQ = s dS K,
dK = s dS^T Q. m_c = min of lse over the cluster keeps both exponents <= 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from htcli.attention_oracle import num_levels

NEG_INF = float("-inf")
# scores computed at once per chunk of windows: bounds working memory, keeps data in cache
CHUNK_SCORES = 1 << 22


def _pad_dim1(x: torch.Tensor, before: int, after: int, fill: float) -> torch.Tensor:
    return F.pad(x, [0, 0] * (x.ndim - 2) + [before, after], value=fill)


def to_blocks(x: torch.Tensor, r: int, fill: float = 0.0) -> torch.Tensor:
    """(rows, c, ...) -> flat framed blocks (rows * (nb + 2), r, ...)."""
    rows, c = x.shape[:2]
    nb = -(-c // r)
    out = x.new_empty((rows, (nb + 2) * r, *x.shape[2:]))
    out[:, :r] = fill
    out[:, r + c :] = fill
    out[:, r : r + c] = x
    return out.view(rows * (nb + 2), r, *x.shape[2:])


def from_blocks(x: torch.Tensor, rows: int, c: int) -> torch.Tensor:
    """Inverse of to_blocks: (rows * (nb + 2), r, ...) -> (rows, c, ...)."""
    x = x.view(rows, -1, *x.shape[1:])[:, 1:-1]
    return x.reshape(rows, -1, *x.shape[3:])[:, :c]


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
        excluded = (j - r > i) if causal else torch.zeros_like(i * j, dtype=torch.bool)
    else:
        first = i < half
        excluded = first & (j >= half) & (j < r)
        if not causal:
            excluded = excluded | (~first & (j >= r) & (j < r + half))
    zero = torch.zeros((), device=device, dtype=dtype)
    return torch.where(excluded, torch.full_like(zero, NEG_INF), zero).expand(r, -1)


class Level:
    """One level's inputs in flat framed blocks, and how to score a chunk of its windows."""

    def __init__(self, level, q, k, v, bias, *, r: int, causal: bool, scale: float, stat_dtype):
        self.rows, self.c = q.shape[:2]
        self.r, self.scale, self.stat_dtype = r, scale, stat_dtype
        self.offsets = offsets(level, causal)
        self.q, self.k, self.v = (to_blocks(t, r) for t in (q, k, v))
        self.bias = to_blocks(bias.to(stat_dtype), r, NEG_INF)
        self.static = static_bias(level, causal, r, q.device, stat_dtype)
        self.windows = self.q.shape[0] - 2
        per_window = r * r * len(self.offsets)
        self.chunk = max(1, CHUNK_SCORES // per_window)

    def chunks(self):
        for w0 in range(0, self.windows, self.chunk):
            yield w0, min(w0 + self.chunk, self.windows)

    def neighbours(self, x: torch.Tensor, w0: int, w1: int) -> torch.Tensor:
        """The key blocks of windows w0..w1 side by side: (w, len(offsets) * r, ...)."""
        parts = [x[w0 + 1 + o : w1 + 1 + o] for o in self.offsets]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def scores(self, w0: int, w1: int):
        """Scores (w, r, len(offsets) * r) in stat dtype, with keys and values of the windows."""
        q = self.q[w0 + 1 : w1 + 1]
        keys, values = self.neighbours(self.k, w0, w1), self.neighbours(self.v, w0, w1)
        s = self.neighbours(self.bias, w0, w1)[:, None, :] + self.static
        if q.dtype == self.stat_dtype:
            s.baddbmm_(q, keys.transpose(1, 2), alpha=self.scale)
        else:
            s += torch.bmm(q, keys.transpose(1, 2)).to(self.stat_dtype) * self.scale
        return s, keys, values

    def scatter(self, target: torch.Tensor, window_grad: torch.Tensor, w0: int, w1: int) -> None:
        """Add gradients w.r.t. the windows' key blocks back onto the blocks they came from."""
        r = self.r
        for index, o in enumerate(self.offsets):
            target[w0 + 1 + o : w1 + 1 + o] += window_grad[:, index * r : (index + 1) * r]


def _safe(m: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _pair_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum neighbouring pairs along dim 1 (odd length: the last one stands alone)."""
    x = _pad_dim1(x, 0, x.shape[1] % 2, 0.0)
    return x[:, 0::2] + x[:, 1::2]


def _pair_min(x: torch.Tensor) -> torch.Tensor:
    x = _pad_dim1(x, 0, x.shape[1] % 2, float("inf"))
    return torch.minimum(x[:, 0::2], x[:, 1::2])


def levels(q, k, v, real, *, block_size: int, causal: bool):
    """Yield (level, Q, K, V, bias) from fine to coarse; bias = log(count), -inf when empty."""
    yield 0, q, k, v, torch.log(real)
    count = real
    weight = real[..., None].to(q.dtype)
    k_sum, v_sum, q_sum = k * weight, v * weight, q * weight
    for level in range(1, num_levels(q.shape[1], block_size)):
        count, k_sum, v_sum = _pair_sum(count), _pair_sum(k_sum), _pair_sum(v_sum)
        denom = count.clamp_min(1.0)[..., None].to(q.dtype)
        if causal:
            coarse_q = q[:, :: 2**level]
        else:
            q_sum = _pair_sum(q_sum)
            coarse_q = q_sum / denom
        yield level, coarse_q, k_sum / denom, v_sum / denom, torch.log(count)


def _clusters(x: torch.Tensor, size: int, n_pad: int) -> torch.Tensor:
    """View of a fine (rows, n_pad, ...) tensor as (rows, n_pad // size, size, ...)."""
    return x.view(x.shape[0], n_pad // size, size, *x.shape[2:])


def forward(q, k, v, real, *, block_size: int, causal: bool):
    """Returns the output (rows, n, d) and the log-sum-exp per position (rows, n), in stat dtype
    (+inf where a position scores no key at all; its output is 0)."""
    rows, n, d = q.shape
    stat_dtype = real.dtype
    top = 2 ** (num_levels(n, block_size) - 1)
    n_pad = -(-n // top) * top
    acc_m = torch.full((rows, n_pad), NEG_INF, dtype=stat_dtype, device=q.device)
    acc_den = torch.zeros((rows, n_pad), dtype=stat_dtype, device=q.device)
    acc_num = torch.zeros((rows, n_pad, d), dtype=stat_dtype, device=q.device)
    for level, lq, lk, lv, bias in levels(q, k, v, real, block_size=block_size, causal=causal):
        lvl = Level(
            level, lq, lk, lv, bias, r=block_size, causal=causal, scale=d**-0.5, stat_dtype=stat_dtype
        )
        # every window writes its own rows; frame rows are never read
        m = torch.empty(lvl.bias.shape, dtype=stat_dtype, device=q.device)
        den = torch.empty_like(m)
        num = torch.empty((*m.shape, d), dtype=stat_dtype, device=q.device)
        for w0, w1 in lvl.chunks():
            s, _, values = lvl.scores(w0, w1)
            row_max = s.amax(dim=-1)
            p = s.sub_(_safe(row_max)[..., None]).exp_()
            m[w0 + 1 : w1 + 1] = row_max
            den[w0 + 1 : w1 + 1] = p.sum(dim=-1)
            num[w0 + 1 : w1 + 1] = torch.bmm(p.to(values.dtype), values)
        size = 2**level
        m, den, num = (
            _pad_dim1(from_blocks(t, rows, lvl.c), 0, n_pad // size - lvl.c, 0.0) for t in (m, den, num)
        )
        m = torch.where(den > 0, m, torch.full_like(m, NEG_INF))
        _merge_into(
            _clusters(acc_m, size, n_pad), _clusters(acc_den, size, n_pad), _clusters(acc_num, size, n_pad),
            m[..., None], den[..., None], num[:, :, None],
        )  # fmt: skip
    den = acc_den[:, :n]
    out = acc_num[:, :n] / torch.where(den > 0, den, torch.ones_like(den))[..., None]
    lse = torch.where(den > 0, acc_m[:, :n] + torch.log(den), torch.full_like(den, float("inf")))
    return out, lse


def _merge_into(acc_m, acc_den, acc_num, m, den, num) -> None:
    """In place: acc <- acc (+) level, two partial softmaxes under their shared maximum."""
    new_m = torch.maximum(acc_m, m)
    safe = _safe(new_m)
    scale_acc, scale_lvl = torch.exp(acc_m - safe), torch.exp(m - safe)
    acc_den.mul_(scale_acc).add_(den * scale_lvl)
    acc_num.mul_(scale_acc[..., None]).add_(num * scale_lvl[..., None])
    acc_m.copy_(new_m)


def backward(q, k, v, real, out, lse, grad_out, *, block_size: int, causal: bool):
    """Gradients (dq, dk, dv), each (rows, n, d) in stat dtype."""
    rows, n, d = q.shape
    stat_dtype = real.dtype
    top = 2 ** (num_levels(n, block_size) - 1)
    n_pad = -(-n // top) * top
    grad_out = grad_out.to(stat_dtype)
    # E_i per position, and every fine tensor padded to whole coarsest clusters
    delta = _pad_dim1((grad_out * out).sum(-1), 0, n_pad - n, 0.0)
    lse_pad = _pad_dim1(lse, 0, n_pad - n, float("inf"))
    grad_pad = _pad_dim1(grad_out, 0, n_pad - n, 0.0)
    real_pad = _pad_dim1(real, 0, n_pad - n, 0.0)
    grads = [torch.zeros((rows, n_pad, d), dtype=stat_dtype, device=q.device) for _ in range(3)]
    cluster_min = lse_pad
    for level, lq, lk, lv, bias in levels(q, k, v, real, block_size=block_size, causal=causal):
        size = 2**level
        if level:
            cluster_min = _pair_min(cluster_min)
        c = lq.shape[1]
        ref = torch.where(torch.isfinite(cluster_min), cluster_min, torch.zeros_like(cluster_min))
        if level == 0:  # w_i = 1 (0 for rows that score nothing, whose p is 0 anyway)
            g, e = grad_pad[:, :c], delta[:, :c]
        else:
            weight = torch.exp(_clusters(lse_pad, size, n_pad).neg().add_(ref[..., None]))  # rows c' size
            g = torch.einsum("rcs,rcsd->rcd", weight, _clusters(grad_pad, size, n_pad))[:, :c]
            e = (weight * _clusters(delta, size, n_pad)).sum(-1)[:, :c]
        lvl = Level(
            level, lq, lk, lv, bias, r=block_size, causal=causal, scale=d**-0.5, stat_dtype=stat_dtype
        )
        g_b, e_b, ref_b = (
            to_blocks(g, block_size),
            to_blocks(e, block_size),
            to_blocks(ref[:, :c], block_size),
        )
        dq_b, dk_b, dv_b = (
            torch.zeros(t.shape, dtype=stat_dtype, device=q.device) for t in (lvl.q, lvl.k, lvl.v)
        )
        for w0, w1 in lvl.chunks():
            s, keys, values = lvl.scores(w0, w1)
            p = s.sub_(ref_b[w0 + 1 : w1 + 1, :, None]).exp_()
            g_w = g_b[w0 + 1 : w1 + 1]
            lvl.scatter(dv_b, torch.bmm(p.transpose(1, 2), g_w), w0, w1)
            dp = torch.bmm(g_w.to(values.dtype), values.transpose(1, 2)).to(stat_dtype)
            ds = p.mul_(dp.sub_(e_b[w0 + 1 : w1 + 1, :, None]))  # dS without the scale, applied below
            dq_b[w0 + 1 : w1 + 1] = torch.bmm(ds.to(keys.dtype), keys).to(stat_dtype).mul_(lvl.scale)
            q_w = lvl.q[w0 + 1 : w1 + 1]
            dk_w = torch.bmm(ds.transpose(1, 2).to(q_w.dtype), q_w).to(stat_dtype).mul_(lvl.scale)
            lvl.scatter(dk_b, dk_w, w0, w1)
        dq_l, dk_l, dv_l = (from_blocks(t, rows, c) for t in (dq_b, dk_b, dv_b))
        _to_fine(grads, dq_l, dk_l, dv_l, real_pad, size, n_pad, level, causal, c)
    return tuple(t[:, :n] for t in grads)


def _to_fine(grads, dq_l, dk_l, dv_l, real_pad, size, n_pad, level, causal, c) -> None:
    """Add one level's gradients w.r.t. its cluster Q, K, V onto the fine positions."""
    dq, dk, dv = grads
    if level == 0:
        dq.add_(_pad_dim1(dq_l, 0, n_pad - c, 0.0))
        dk.add_(_pad_dim1(dk_l, 0, n_pad - c, 0.0))
        dv.add_(_pad_dim1(dv_l, 0, n_pad - c, 0.0))
        return
    count = _pair_sum_to(real_pad, size)  # rows, n_pad // size
    real = _clusters(real_pad, size, n_pad)[..., None]
    for fine, coarse, mean in ((dk, dk_l, True), (dv, dv_l, True), (dq, dq_l, not causal)):
        coarse = _pad_dim1(coarse, 0, n_pad // size - c, 0.0)
        view = _clusters(fine, size, n_pad)
        if mean:  # mean over the cluster's real positions
            view.addcmul_((coarse / count.clamp_min(1.0)[..., None])[:, :, None], real)
        else:  # causal coarse query: the cluster's first position
            view[:, :, 0].add_(coarse)


def _pair_sum_to(real_pad: torch.Tensor, size: int) -> torch.Tensor:
    return real_pad.view(real_pad.shape[0], -1, size).sum(-1)
