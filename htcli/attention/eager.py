"""The eager implementation of `h_attention`: batched torch ops level by level, forward and backward.

Runs on any device; the Triton kernels (triton_launch) compute the same on CUDA.

Shapes: q, k, v are (rows, n, d) with rows = batch * heads; stat tensors are fp32 (fp64 for
fp64 inputs) whatever the compute dtype.

Length. Positions are padded (as masked keys) to n0, a multiple of both the block size and
the coarsest cluster, so that every level's clusters tile the sequence exactly and a level's
per-cluster results can be broadcast onto fine positions through a view.

Layout. A level's (cluster) sequence of every row is cut into blocks of r = block_size, and
the rows' blocks form one flat list (rows * nb, r, d): a view, no copy, at level 0. Window w
has query block w and key blocks w + offset; a key block outside the list or in another row
gets bias -inf. Neighbours are therefore slices of the flat list, never a loop over blocks,
and each level is worked through in chunks of windows so no score matrix outlives its chunk.

Level l >= 1 works on clusters of 2**l positions: K, V are means over the cluster's real
positions and every key carries the bias log(count) (plus the row's level decay, if any); Q is
the cluster mean (non-causal) or the cluster's first position (causal). Each level's softmax
statistics are merged into per-position accumulators under one running maximum.

Backward (per level, all fine positions i of a query cluster c share the level's scores):
with w_i = exp(m_c - lse_i), G_c = sum_i w_i dO_i and E_c = sum_i w_i (dO_i . O_i), and
P = exp(S - m_c), the gradients are dV = P^T G, dS = P * (G V^T - E), dQ = s dS K,
dK = s dS^T Q. m_c = min of lse over the cluster keeps both exponents <= 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from htcli.attention.geometry import NEG_INF, decay_bias, num_levels, offsets, padded_length, static_bias

# Scores computed at once per chunk of windows: bounds working memory. On a CPU small chunks
# stay in cache; on a GPU large ones keep kernel launches few.
CHUNK_SCORES = {"cpu": 1 << 19, "cuda": 1 << 26}
# fine elements (rows * n * d) processed together, see _row_groups
ROW_GROUP_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 27}


def _budget(table: dict[str, int], device: torch.device) -> int:
    return table.get(device.type, table["cpu"])


def _pad_dim1(x: torch.Tensor, after: int, fill: float) -> torch.Tensor:
    """x padded at the end of dim 1 (x itself when there is nothing to add)."""
    if after == 0:
        return x
    return F.pad(x, [0, 0] * (x.ndim - 2) + [0, after], value=fill)


class Level:
    """One level's blocks (rows * nb, r, ...) and how to score a chunk of its windows."""

    def __init__(self, level: int, q, k, v, bias, *, r: int, causal: bool, scale: float):
        rows, c, d = q.shape
        nb = -(-c // r)
        self.rows, self.c, self.nb, self.r, self.scale = rows, c, nb, r, scale
        self.stat_dtype = bias.dtype
        self.offsets = offsets(level, causal)
        self.q, self.k, self.v = (self.blocks(t) for t in (q, k, v))
        self.bias = self.blocks(bias, NEG_INF)
        self.static = static_bias(level, causal, r, q.device, bias.dtype)
        # key blocks that fall outside their window's row
        position = torch.arange(rows * nb, device=q.device)[:, None] % nb
        shifted = position + torch.tensor(self.offsets, device=q.device)
        zero = torch.zeros((), device=q.device, dtype=bias.dtype)
        self.outside = torch.where((shifted < 0) | (shifted >= nb), zero + NEG_INF, zero)
        self.windows = rows * nb
        self.chunk = max(1, _budget(CHUNK_SCORES, q.device) // (r * r * len(self.offsets)))

    def blocks(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """(rows, c, ...) -> (rows * nb, r, ...), padded with fill."""
        x = _pad_dim1(x, self.nb * self.r - self.c, fill)
        return x.reshape(self.rows * self.nb, self.r, *x.shape[2:])

    def unblocks(self, x: torch.Tensor) -> torch.Tensor:
        """(rows * nb, r, ...) -> (rows, c, ...)."""
        return x.view(self.rows, self.nb * self.r, *x.shape[2:])[:, : self.c]

    def chunks(self):
        for w0 in range(0, self.windows, self.chunk):
            yield w0, min(w0 + self.chunk, self.windows)

    @staticmethod
    def _slice(x: torch.Tensor, lo: int, hi: int, fill: float) -> torch.Tensor:
        """Blocks lo..hi of x, with fill for blocks before 0 or past the end."""
        part = x[max(lo, 0) : min(hi, x.shape[0])]
        before, after = max(0, -lo), max(0, hi - x.shape[0])
        if before or after:
            part = F.pad(part, [0, 0] * (x.ndim - 1) + [before, after], value=fill)
        return part

    def neighbours(self, x: torch.Tensor, w0: int, w1: int, fill: float = 0.0) -> torch.Tensor:
        """The key blocks of windows w0..w1 side by side: (w, len(offsets) * r, ...)."""
        parts = [self._slice(x, w0 + o, w1 + o, fill) for o in self.offsets]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def scores(self, w0: int, w1: int):
        """Scores (w, r, len(offsets) * r) in stat dtype, with the windows' keys and values."""
        w, width = w1 - w0, len(self.offsets)
        q = self.q[w0:w1]
        keys, values = self.neighbours(self.k, w0, w1), self.neighbours(self.v, w0, w1)
        bias = self.neighbours(self.bias, w0, w1, NEG_INF).view(w, width, self.r)
        bias = (bias + self.outside[w0:w1, :, None]).view(w, 1, width * self.r)
        s = bias + self.static
        # (half inputs: the product in the stat dtype, as flash attention keeps its scores; a half product
        # rounded every score to 8 bits, 13x the error of SDPA's at unit-scale inputs times 3, and fp16's
        # overflowed to inf past 65504 before the scale, then NaN)
        s.baddbmm_(q.to(self.stat_dtype), keys.transpose(1, 2).to(self.stat_dtype), alpha=self.scale)
        return s, keys, values

    def scatter(self, target: torch.Tensor, window_grad: torch.Tensor, w0: int, w1: int) -> None:
        """Add gradients w.r.t. the windows' key blocks onto the blocks they came from."""
        r = self.r
        for index, o in enumerate(self.offsets):
            lo, hi = max(w0 + o, 0), min(w1 + o, target.shape[0])
            target[lo:hi] += window_grad[lo - w0 - o : hi - w0 - o, index * r : (index + 1) * r]


def _safe(m: torch.Tensor) -> torch.Tensor:
    """m with non-finite entries (rows that score nothing) replaced by 0."""
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _pair_weighted_sum(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum over neighbouring pairs along dim 1 of x * weight (weight: one per position)."""
    out = x[:, 0::2] * weight[:, 0::2, None]
    return out.addcmul_(x[:, 1::2], weight[:, 1::2, None])


def levels(q, k, v, real, *, block_size: int, causal: bool, count: int, decay=None):
    """Yield (level, Q, K, V, bias) from fine to coarse; bias = log(count), -inf when empty, plus
    the level's decay bias of each row (decay: (rows,) bits per level, or None). Each level is built
    from the previous one (means re-weighted by counts), so only one level is held at a time."""
    yield 0, q, k, v, torch.log(real)
    clusters_q, clusters_k, clusters_v, weight = q, k, v, real
    for level in range(1, count):
        total = weight[:, 0::2] + weight[:, 1::2]
        denom = total.clamp_min(1.0)[..., None]
        clusters_k = (_pair_weighted_sum(clusters_k, weight) / denom).to(q.dtype)
        clusters_v = (_pair_weighted_sum(clusters_v, weight) / denom).to(q.dtype)
        if causal:
            clusters_q = q[:, :: 2**level]
        else:
            clusters_q = (_pair_weighted_sum(clusters_q, weight) / denom).to(q.dtype)
        weight = total
        bias = torch.log(total)
        if decay is not None:
            bias.add_(decay_bias(decay, level)[:, None])
        yield level, clusters_q, clusters_k, clusters_v, bias


def _clusters(x: torch.Tensor, size: int) -> torch.Tensor:
    """View of a fine (rows, n0, ...) tensor as (rows, n0 // size, size, ...)."""
    return x.view(x.shape[0], x.shape[1] // size, size, *x.shape[2:])


def _row_groups(rows: int, n: int, d: int, device: torch.device):
    """Rows are independent: take them a few at a time so that each level's working tensors
    stay small next to the inputs and outputs."""
    step = max(1, _budget(ROW_GROUP_ELEMENTS, device) // (n * d))
    for r0 in range(0, rows, step):
        yield slice(r0, min(r0 + step, rows))


def forward(q, k, v, real, *, block_size: int, causal: bool, decay=None):
    """Output (rows, n, d) and log-sum-exp (rows, n) in stat dtype (lse = +inf, output 0,
    where a position scores no key at all). decay: (rows,) level decay in stat dtype, or None."""
    rows, n, d = q.shape
    count, n0 = num_levels(n, block_size), padded_length(n, block_size)
    out = torch.empty((rows, n, d), dtype=real.dtype, device=q.device)
    lse = torch.empty((rows, n), dtype=real.dtype, device=q.device)
    for group in _row_groups(rows, n0, d, q.device):
        padded = [_pad_dim1(t[group], n0 - n, 0.0) for t in (q, k, v, real)]
        rows_decay = None if decay is None else decay[group]
        m, den, num = _forward_rows(
            *padded, block_size=block_size, causal=causal, count=count, decay=rows_decay
        )
        den = den[:, :n]
        out[group] = num[:, :n] / torch.where(den > 0, den, torch.ones_like(den))[..., None]
        lse[group] = torch.where(den > 0, m[:, :n] + torch.log(den), torch.full_like(den, float("inf")))
    return out, lse


def _forward_rows(q, k, v, real, *, block_size: int, causal: bool, count: int, decay):
    """Row max, denominator and numerator per position, all levels merged."""
    rows, n0, d = q.shape
    acc = None
    pyramid = levels(q, k, v, real, block_size=block_size, causal=causal, count=count, decay=decay)
    for level, lq, lk, lv, bias in pyramid:
        lvl = Level(level, lq, lk, lv, bias, r=block_size, causal=causal, scale=d**-0.5)
        m = torch.empty(lvl.bias.shape, dtype=real.dtype, device=q.device)
        den = torch.empty_like(m)
        num = torch.empty((*m.shape, d), dtype=real.dtype, device=q.device)
        for w0, w1 in lvl.chunks():
            s, _, values = lvl.scores(w0, w1)
            row_max = s.amax(dim=-1)
            p = s.sub_(_safe(row_max)[..., None]).exp_()
            m[w0:w1] = row_max
            den[w0:w1] = p.sum(dim=-1)
            num[w0:w1] = torch.bmm(p.to(values.dtype), values)
        m, den, num = (lvl.unblocks(t) for t in (m, den, num))
        if acc is None:
            acc = (m, den, num)
            continue
        size = 2**level
        _merge_into(*(_clusters(t, size) for t in acc), m[..., None], den[..., None], num[:, :, None])
    return acc


def _merge_into(acc_m, acc_den, acc_num, m, den, num) -> None:
    """In place: acc <- acc (+) level, two partial softmaxes under their shared maximum."""
    new_m = torch.maximum(acc_m, m)
    safe = _safe(new_m)
    scale_acc, scale_lvl = torch.exp(acc_m - safe), torch.exp(m - safe)
    acc_den.mul_(scale_acc).addcmul_(den, scale_lvl)
    acc_num.mul_(scale_acc[..., None]).addcmul_(num, scale_lvl[..., None])
    acc_m.copy_(new_m)


def backward(q, k, v, real, out, lse, grad_out, *, block_size: int, causal: bool, decay=None):
    """Gradients (dq, dk, dv), each (rows, n, d) in stat dtype (decay: as forward's)."""
    rows, n, d = q.shape
    count, n0 = num_levels(n, block_size), padded_length(n, block_size)
    grads = [torch.zeros((rows, n, d), dtype=real.dtype, device=q.device) for _ in range(3)]
    for group in _row_groups(rows, n0, d, q.device):
        inputs = [_pad_dim1(t[group], n0 - n, 0.0) for t in (q, k, v, real, out, grad_out)]
        group_lse = _pad_dim1(lse[group], n0 - n, float("inf"))
        # level 0 writes straight into the gradients when no padding is needed
        targets = [g[group] for g in grads] if n0 == n else [_pad_dim1(g[group], n0 - n, 0.0) for g in grads]
        rows_decay = None if decay is None else decay[group]
        _backward_rows(
            *inputs, group_lse, targets, block_size=block_size, causal=causal, count=count, decay=rows_decay
        )
        if n0 != n:
            for grad, target in zip(grads, targets):
                grad[group] = target[:, :n]
    return grads


def _backward_rows(q, k, v, real, out, grad_out, lse, targets, *, block_size, causal, count, decay) -> None:
    """Add the gradients of rows (padded to n0) into targets (dq, dk, dv), zero on entry."""
    rows, n0, d = q.shape
    stat = real.dtype
    grad_out = grad_out.to(stat).contiguous()
    delta = torch.linalg.vecdot(grad_out, out.to(stat))
    cluster_min = lse
    pyramid = levels(q, k, v, real, block_size=block_size, causal=causal, count=count, decay=decay)
    for level, lq, lk, lv, bias in pyramid:
        size = 2**level
        if level == 0:  # w_i = 1 (0 where nothing is scored, and there P is 0 anyway)
            g, e = grad_out, delta
        else:
            cluster_min = torch.minimum(cluster_min[:, 0::2], cluster_min[:, 1::2])
            weight = torch.exp(_safe(cluster_min)[..., None] - _clusters(lse, size))  # rows c size
            g = torch.einsum("rcs,rcsd->rcd", weight, _clusters(grad_out, size))
            e = (weight * _clusters(delta, size)).sum(-1)
        lvl = Level(level, lq, lk, lv, bias, r=block_size, causal=causal, scale=d**-0.5)
        g_b, e_b, ref_b = lvl.blocks(g), lvl.blocks(e), lvl.blocks(_safe(cluster_min))
        if level == 0:
            dq_b, dk_b, dv_b = (lvl.blocks(t) for t in targets)
        else:
            dq_b = torch.empty(lvl.q.shape, dtype=stat, device=q.device)  # each window writes its rows
            dk_b, dv_b = (torch.zeros(t.shape, dtype=stat, device=q.device) for t in (lvl.k, lvl.v))
        for w0, w1 in lvl.chunks():
            s, keys, values = lvl.scores(w0, w1)
            p = s.sub_(ref_b[w0:w1, :, None]).exp_()
            g_w = g_b[w0:w1].to(values.dtype)
            lvl.scatter(dv_b, torch.bmm(p.transpose(1, 2).to(values.dtype), g_w).to(stat), w0, w1)
            dp = torch.bmm(g_b[w0:w1], values.transpose(1, 2).to(stat))  # (in stat: dp - e cancels)
            ds = p.mul_(dp.sub_(e_b[w0:w1, :, None])).to(keys.dtype)  # scale applied below
            dq_b[w0:w1] = torch.bmm(ds, keys).to(stat).mul_(lvl.scale)
            dk_w = torch.bmm(ds.transpose(1, 2), lvl.q[w0:w1]).to(stat).mul_(lvl.scale)
            lvl.scatter(dk_b, dk_w, w0, w1)
        if level:
            _to_fine(targets, real, *(lvl.unblocks(t) for t in (dq_b, dk_b, dv_b)), size=size, causal=causal)


def _to_fine(targets, real, dq_l, dk_l, dv_l, *, size: int, causal: bool) -> None:
    """Add one coarse level's gradients w.r.t. its cluster Q, K, V onto the fine positions."""
    dq, dk, dv = targets
    weight = _clusters(real, size)  # rows c size
    share = (weight / weight.sum(-1, keepdim=True).clamp_min(1.0))[..., None]  # d mean / d input
    for fine, coarse, mean in ((dk, dk_l, True), (dv, dv_l, True), (dq, dq_l, not causal)):
        view = _clusters(fine, size)
        if mean:
            view.addcmul_(coarse[:, :, None], share)
        else:  # causal coarse query: the cluster's first position
            view[:, :, 0].add_(coarse)
