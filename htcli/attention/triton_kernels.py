"""Triton kernels of h_attention: one launch per level and pass (launched by triton_launch.py).

Imported only where Triton is wanted (CUDA, or Triton's CPU interpreter in tests): nothing
else in htcli needs Triton.

Every level l has tensors over its clusters: Q, K, V (rows, c, D) and CNT (rows, c), the number
of real fine positions per cluster (0/1 at level 0), which enters the scores as log(CNT) (at a
coarse level of a model with level decay, plus the row's score bias LVB[row]: geometry.decay_bias). A
query tile of BLOCK_Q rows lies inside one block of R clusters and scores, tile by tile of
BLOCK_K keys, the key blocks at the level's offsets (level 0: -1, 0, +1; coarse: -1, +1;
causal drops +1), with the static masks of `geometry.static_bias`. Levels run from
coarse to fine: a level starts from its parent's (level l+1) softmax state and the finest
writes the output, so the levels share one running maximum without a merge pass. Backward
runs coarse to fine as well, each level adding its parent's cluster gradients (d mean / d
input) before it writes its own.

Q may be a strided view (the causal coarse query is every 2**l-th fine query): it is read
through (stride_qr, stride_qn); every other tensor is contiguous. Each program first moves its
pointers to its row (64-bit), then indexes inside the row in 32 bits: 64-bit offset tiles
would cost twice the registers.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Kernel signatures are long; one parameter per line would hide the code.
# fmt: off


@triton.jit
def _tile(BLOCK: tl.constexpr, R: tl.constexpr):
    """This program's row and tile of BLOCK places: its block, start and places in the block."""
    tile, row = tl.program_id(0), tl.program_id(1).to(tl.int64)
    block = tile * BLOCK // R
    start = tile * BLOCK - block * R
    return row, block, start, start + tl.arange(0, BLOCK)


@triton.jit
def _load_rows(PTR, at, valid, D: tl.constexpr):
    """Places `at` of a contiguous (c, D) row of a tensor, 0 where not valid."""
    return tl.load(PTR + at[:, None] * D + tl.arange(0, D)[None, :], mask=valid[:, None], other=0.0)


@triton.jit
def _store_rows(PTR, at, x, valid, D: tl.constexpr):
    at = at[:, None] * D + tl.arange(0, D)[None, :]
    tl.store(PTR + at, x.to(PTR.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _load_queries(Q, places, valid, stride_qn, D: tl.constexpr):
    at = places[:, None] * stride_qn + tl.arange(0, D)[None, :]
    return tl.load(Q + at, mask=valid[:, None], other=0.0)


@triton.jit
def _load_keys(K, V, CNT, places, valid, D: tl.constexpr):
    """Keys, values and counts of some places of a level (count 0, so never scored, past c)."""
    cnt = tl.load(CNT + places, mask=valid, other=0.0)
    return _load_rows(K, places, valid, D), _load_rows(V, places, valid, D), cnt


@triton.jit
def _load_query_side(Q, G, E, REF, places, valid, stride_qn, D: tl.constexpr):
    """Queries with their backward sums G (in the queries' dtype), E and reference maximum."""
    q = _load_queries(Q, places, valid, stride_qn, D)
    g = _load_rows(G, places, valid, D).to(q.dtype)
    e = tl.load(E + places, mask=valid, other=0.0)
    ref = tl.load(REF + places, mask=valid, other=0.0)
    return q, g, e, tl.where(ref == float("inf"), 0.0, ref)  # inf: the position scores nothing


@triton.jit
def _row_bias(LVB, row, HAS_DECAY: tl.constexpr):
    """This row's score bias at this level (0.0 without level decay)."""
    if HAS_DECAY:
        return tl.load(LVB + row)
    return 0.0


@triton.jit
def _log_count(cnt):
    """log(cnt), -inf for an empty cluster (without taking log(0))."""
    return tl.where(cnt > 0, tl.log(tl.maximum(cnt, 1.0)), float("-inf"))


@triton.jit
def _scores(q, k, cnt, bias, i_loc, j_loc, scale, HALF: tl.constexpr, LEVEL0: tl.constexpr,
            CAUSAL: tl.constexpr, OFFSET: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 scores (queries, keys) of one pair of tiles, biased by log(count) + bias, -inf where the
    pair is not scored at this level (i_loc, j_loc: places in their blocks; OFFSET: key
    block - query block)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale + (_log_count(cnt) + bias)[None, :]
    if LEVEL0:
        if CAUSAL and OFFSET == 0:
            s = tl.where(j_loc[None, :] <= i_loc[:, None], s, float("-inf"))
    else:
        if OFFSET == -1:  # a first-half query met the previous block's second half at l - 1
            s = tl.where((i_loc[:, None] < HALF) & (j_loc[None, :] >= HALF), float("-inf"), s)
        if OFFSET == 1:  # a second-half query met the next block's first half at l - 1
            s = tl.where((i_loc[:, None] >= HALF) & (j_loc[None, :] < HALF), float("-inf"), s)
    return s


@triton.jit
def _key_range(kb, nb, q_start, R: tl.constexpr, BLOCK_Q: tl.constexpr, LEVEL0: tl.constexpr,
               CAUSAL: tl.constexpr, OFFSET: tl.constexpr):
    """Keys of block kb that a query tile starting at q_start (in its block) scores: [0, hi)."""
    hi = R
    if LEVEL0 and CAUSAL and OFFSET == 0:
        hi = q_start + BLOCK_Q  # above the diagonal nothing is scored
    return tl.where((kb >= 0) & (kb < nb), hi, 0)


@triton.jit
def _key_tile(q, i_loc, j0, kb, c, scale, K, V, CNT, bias, R: tl.constexpr, BLOCK_K: tl.constexpr,
              D: tl.constexpr, LEVEL0: tl.constexpr, CAUSAL: tl.constexpr, OFFSET: tl.constexpr,
              PRECISION: tl.constexpr):
    """Keys and values of the key tile at j0 of block kb, and the query tile's scores on them."""
    j_loc = j0 + tl.arange(0, BLOCK_K)
    k, v, cnt = _load_keys(K, V, CNT, kb * R + j_loc, kb * R + j_loc < c, D)
    return k, v, _scores(q, k, cnt, bias, i_loc, j_loc, scale, R // 2, LEVEL0, CAUSAL, OFFSET, PRECISION)


@triton.jit
def _forward_block(acc, m_i, l_i, q, i_loc, kb, nb, c, q_start, scale, K, V, CNT, bias,
                   R: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, D: tl.constexpr,
                   LEVEL0: tl.constexpr, CAUSAL: tl.constexpr, OFFSET: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax of a query tile over the keys of block kb."""
    for j0 in range(0, _key_range(kb, nb, q_start, R, BLOCK_Q, LEVEL0, CAUSAL, OFFSET), BLOCK_K):
        k, v, s = _key_tile(q, i_loc, j0, kb, c, scale, K, V, CNT, bias, R, BLOCK_K, D, LEVEL0, CAUSAL,
                            OFFSET, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["c", "nb", "c_parent"])  # one compiled kernel for every length
def forward_kernel(Q, K, V, CNT, LVB, PM, PL, PACC, OM, OL, OACC, OUT, LSE, c, nb, c_parent, stride_qr,
                   stride_qn, scale, R: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
                   D: tl.constexpr, LEVEL0: tl.constexpr, CAUSAL: tl.constexpr, HAS_PARENT: tl.constexpr,
                   HAS_DECAY: tl.constexpr, PRECISION: tl.constexpr):
    """One level, one query tile: start from the parent's softmax state (max, denominator,
    numerator), add this level's keys, write the state (coarse levels) or the output and
    log-sum-exp (level 0)."""
    row, block, q_start, i_loc = _tile(BLOCK_Q, R)
    Q, K, V, CNT = Q + row * stride_qr, K + row * c * D, V + row * c * D, CNT + row * c
    bias = _row_bias(LVB, row, HAS_DECAY)
    queries = block * R + i_loc
    valid = queries < c
    q = _load_queries(Q, queries, valid, stride_qn, D)
    if HAS_PARENT:
        PM, PL, PACC = PM + row * c_parent, PL + row * c_parent, PACC + row * c_parent * D
        parent = queries // 2
        m_i = tl.load(PM + parent, mask=valid, other=float("-inf"))
        l_i = tl.load(PL + parent, mask=valid, other=0.0)
        acc = _load_rows(PACC, parent, valid, D)
    else:
        m_i = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_Q], tl.float32)
        acc = tl.zeros([BLOCK_Q, D], tl.float32)
    acc, m_i, l_i = _forward_block(acc, m_i, l_i, q, i_loc, block - 1, nb, c, q_start, scale, K, V, CNT,
                                   bias, R, BLOCK_Q, BLOCK_K, D, LEVEL0, CAUSAL, -1, PRECISION)
    if LEVEL0:
        acc, m_i, l_i = _forward_block(acc, m_i, l_i, q, i_loc, block, nb, c, q_start, scale, K, V, CNT,
                                       bias, R, BLOCK_Q, BLOCK_K, D, LEVEL0, CAUSAL, 0, PRECISION)
    if not CAUSAL:
        acc, m_i, l_i = _forward_block(acc, m_i, l_i, q, i_loc, block + 1, nb, c, q_start, scale, K, V,
                                       CNT, bias, R, BLOCK_Q, BLOCK_K, D, LEVEL0, CAUSAL, 1, PRECISION)
    if LEVEL0:
        scored = l_i > 0
        _store_rows(OUT + row * c * D, queries, acc / tl.where(scored, l_i, 1.0)[:, None], valid, D)
        lse = tl.where(scored, m_i + tl.log(tl.where(scored, l_i, 1.0)), float("inf"))
        tl.store(LSE + row * c + queries, lse, mask=valid)
    else:
        tl.store(OM + row * c + queries, m_i, mask=valid)
        tl.store(OL + row * c + queries, l_i, mask=valid)
        _store_rows(OACC + row * c * D, queries, acc, valid, D)


@triton.jit
def _pairs(c_prev, c, BLOCK: tl.constexpr):
    """This program's row and clusters of level l (valid: the cluster exists, has_second: so
    does its second half at level l - 1)."""
    tile, row = tl.program_id(0), tl.program_id(1).to(tl.int64)
    clusters = tile * BLOCK + tl.arange(0, BLOCK)
    valid = clusters < c
    return row, clusters, valid, valid & (2 * clusters + 1 < c_prev)


@triton.jit
def _weighted_pair(SRC, first, valid, has_second, w0, w1, D: tl.constexpr):
    """w0 * row first + w1 * row first + 1 of SRC, in fp32."""
    x = _load_rows(SRC, first, valid, D).to(tl.float32) * w0[:, None]
    return x + _load_rows(SRC, first + 1, has_second, D).to(tl.float32) * w1[:, None]


@triton.jit(do_not_specialize=["c_prev", "c"])  # one compiled kernel for every length
def pool_kernel(QP, KP, VP, CNTP, Q, K, V, CNT, c_prev, c, D: tl.constexpr, BLOCK: tl.constexpr,
                POOL_Q: tl.constexpr):
    """Level l from level l - 1: K, V (and Q, non-causal) are means over a cluster's real
    positions, CNT their number. Means are rounded to the inputs' dtype, as at every level."""
    row, here, valid, has_second = _pairs(c_prev, c, BLOCK)
    QP, KP, VP = QP + row * c_prev * D, KP + row * c_prev * D, VP + row * c_prev * D
    CNTP = CNTP + row * c_prev
    Q, K, V, CNT = Q + row * c * D, K + row * c * D, V + row * c * D, CNT + row * c
    first = 2 * here
    cnt0 = tl.load(CNTP + first, mask=valid, other=0.0)
    cnt1 = tl.load(CNTP + first + 1, mask=has_second, other=0.0)
    total = cnt0 + cnt1
    w0, w1 = cnt0 / tl.maximum(total, 1.0), cnt1 / tl.maximum(total, 1.0)
    _store_rows(K, here, _weighted_pair(KP, first, valid, has_second, w0, w1, D), valid, D)
    _store_rows(V, here, _weighted_pair(VP, first, valid, has_second, w0, w1, D), valid, D)
    if POOL_Q:
        _store_rows(Q, here, _weighted_pair(QP, first, valid, has_second, w0, w1, D), valid, D)
    tl.store(CNT + here, total, mask=valid)


@triton.jit(do_not_specialize=["count"])  # one compiled kernel for every length
def delta_kernel(DOUT, OUT, DELTA, count, D: tl.constexpr, BLOCK: tl.constexpr):
    """DELTA = dO . O per position (fp32), without an fp32 copy of either; count: per row."""
    row = tl.program_id(1).to(tl.int64)
    DOUT, OUT, DELTA = DOUT + row * count * D, OUT + row * count * D, DELTA + row * count
    places = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    valid = places < count
    out = _load_rows(OUT, places, valid, D).to(tl.float32)
    tl.store(DELTA + places, tl.sum(_load_rows(DOUT, places, valid, D).to(tl.float32) * out, 1), mask=valid)


@triton.jit(do_not_specialize=["c_prev", "c"])  # one compiled kernel for every length
def pool_grad_kernel(GP, EP, REFP, G, E, REF, c_prev, c, D: tl.constexpr, BLOCK: tl.constexpr):
    """Level l's backward sums from level l - 1's. Per cluster, REF = min of its positions'
    log-sum-exp (inf where none scores anything), G = sum_i exp(REF - lse_i) dO_i and
    E = sum_i exp(REF - lse_i) dO_i . O_i: each half's sums are rescaled from its own REF."""
    row, here, valid, has_second = _pairs(c_prev, c, BLOCK)
    GP, EP, REFP = GP + row * c_prev * D, EP + row * c_prev, REFP + row * c_prev
    G, E, REF = G + row * c * D, E + row * c, REF + row * c
    first = 2 * here
    ref0 = tl.load(REFP + first, mask=valid, other=float("inf"))
    ref1 = tl.load(REFP + first + 1, mask=has_second, other=float("inf"))
    ref = tl.minimum(ref0, ref1)
    safe = tl.where(ref == float("inf"), 0.0, ref)
    w0, w1 = tl.exp(safe - ref0), tl.exp(safe - ref1)  # <= 1; 0 for a half that scores nothing
    e = tl.load(EP + first, mask=valid, other=0.0) * w0
    e += tl.load(EP + first + 1, mask=has_second, other=0.0) * w1
    _store_rows(G, here, _weighted_pair(GP, first, valid, has_second, w0, w1, D), valid, D)
    tl.store(E + here, e, mask=valid)
    tl.store(REF + here, ref, mask=valid)


@triton.jit
def _from_parent(grad, PARENT, PCNT, CNT, places, valid, D: tl.constexpr, FIRST_ONLY: tl.constexpr):
    """grad plus the parent cluster's gradient w.r.t. its mean (or, FIRST_ONLY, w.r.t. the
    causal coarse query, which is the cluster's first position)."""
    parent = places // 2
    coarse = _load_rows(PARENT, parent, valid, D)
    if FIRST_ONLY:
        share = tl.where(places % 2 == 0, 1.0, 0.0)
    else:
        cnt = tl.load(CNT + places, mask=valid, other=0.0)
        share = cnt / tl.maximum(tl.load(PCNT + parent, mask=valid, other=1.0), 1.0)
    return grad + coarse * share[:, None]


@triton.jit
def _dq_block(dq, q, g, e, ref, i_loc, kb, nb, c, q_start, scale, K, V, CNT, bias,
              R: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, D: tl.constexpr,
              LEVEL0: tl.constexpr, CAUSAL: tl.constexpr, OFFSET: tl.constexpr, PRECISION: tl.constexpr):
    """dS K of a query tile over the keys of block kb (the caller applies the scale)."""
    for j0 in range(0, _key_range(kb, nb, q_start, R, BLOCK_Q, LEVEL0, CAUSAL, OFFSET), BLOCK_K):
        k, v, s = _key_tile(q, i_loc, j0, kb, c, scale, K, V, CNT, bias, R, BLOCK_K, D, LEVEL0, CAUSAL,
                            OFFSET, PRECISION)
        p = tl.exp(s - ref[:, None])
        ds = p * (tl.dot(g, tl.trans(v), input_precision=PRECISION) - e[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit(do_not_specialize=["c", "nb", "c_parent"])  # one compiled kernel for every length
def dq_kernel(Q, K, V, CNT, LVB, G, E, REF, PDQ, PCNT, DQ, c, nb, c_parent, stride_qr, stride_qn, scale,
              R: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, D: tl.constexpr,
              LEVEL0: tl.constexpr, CAUSAL: tl.constexpr, HAS_PARENT: tl.constexpr, HAS_DECAY: tl.constexpr,
              PRECISION: tl.constexpr):
    """Gradient w.r.t. this level's queries of one query tile, plus the parent level's share."""
    row, block, q_start, i_loc = _tile(BLOCK_Q, R)
    Q, K, V, CNT = Q + row * stride_qr, K + row * c * D, V + row * c * D, CNT + row * c
    G, E, REF = G + row * c * D, E + row * c, REF + row * c
    bias = _row_bias(LVB, row, HAS_DECAY)
    queries = block * R + i_loc
    valid = queries < c
    q, g, e, ref = _load_query_side(Q, G, E, REF, queries, valid, stride_qn, D)
    dq = tl.zeros([BLOCK_Q, D], tl.float32)
    dq = _dq_block(dq, q, g, e, ref, i_loc, block - 1, nb, c, q_start, scale, K, V, CNT, bias,
                   R, BLOCK_Q, BLOCK_K, D, LEVEL0, CAUSAL, -1, PRECISION)
    if LEVEL0:
        dq = _dq_block(dq, q, g, e, ref, i_loc, block, nb, c, q_start, scale, K, V, CNT, bias,
                       R, BLOCK_Q, BLOCK_K, D, LEVEL0, CAUSAL, 0, PRECISION)
    if not CAUSAL:
        dq = _dq_block(dq, q, g, e, ref, i_loc, block + 1, nb, c, q_start, scale, K, V, CNT, bias,
                       R, BLOCK_Q, BLOCK_K, D, LEVEL0, CAUSAL, 1, PRECISION)
    dq = dq * scale
    if HAS_PARENT:
        dq = _from_parent(dq, PDQ + row * c_parent * D, PCNT + row * c_parent, CNT, queries, valid, D, CAUSAL)
    _store_rows(DQ + row * c * D, queries, dq, valid, D)


@triton.jit
def _dkdv_block(dk, dv, k, v, cnt, bias, j_loc, qb, nb, c, k_start, scale, Q, G, E, REF, stride_qn,
                R: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, D: tl.constexpr,
                LEVEL0: tl.constexpr, CAUSAL: tl.constexpr, OFFSET: tl.constexpr, PRECISION: tl.constexpr):
    """P^T G and dS^T Q of a key tile over the queries of block qb (its block - OFFSET)."""
    lo = 0
    if LEVEL0 and CAUSAL and OFFSET == 0:
        lo = (k_start // BLOCK_Q) * BLOCK_Q  # earlier queries score none of these keys
    for i0 in range(tl.where((qb >= 0) & (qb < nb), lo, R), R, BLOCK_Q):
        i_loc = i0 + tl.arange(0, BLOCK_Q)
        queries = qb * R + i_loc
        q, g, e, ref = _load_query_side(Q, G, E, REF, queries, queries < c, stride_qn, D)
        s = _scores(q, k, cnt, bias, i_loc, j_loc, scale, R // 2, LEVEL0, CAUSAL, OFFSET, PRECISION)
        p = tl.exp(s - ref[:, None])
        dv += tl.dot(tl.trans(p.to(g.dtype)), g, input_precision=PRECISION)
        ds = p * (tl.dot(g, tl.trans(v), input_precision=PRECISION) - e[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["c", "nb", "c_parent"])  # one compiled kernel for every length
def dkdv_kernel(Q, K, V, CNT, LVB, G, E, REF, PDK, PDV, PCNT, DK, DV, c, nb, c_parent, stride_qr, stride_qn,
                scale, R: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, D: tl.constexpr,
                LEVEL0: tl.constexpr, CAUSAL: tl.constexpr, HAS_PARENT: tl.constexpr, HAS_DECAY: tl.constexpr,
                PRECISION: tl.constexpr):
    """Gradients w.r.t. this level's keys and values of one key tile, plus the parent's share."""
    row, block, k_start, j_loc = _tile(BLOCK_K, R)
    Q, K, V, CNT = Q + row * stride_qr, K + row * c * D, V + row * c * D, CNT + row * c
    G, E, REF = G + row * c * D, E + row * c, REF + row * c
    keys = block * R + j_loc
    valid = keys < c
    k, v, cnt = _load_keys(K, V, CNT, keys, valid, D)
    bias = _row_bias(LVB, row, HAS_DECAY)
    dk = tl.zeros([BLOCK_K, D], tl.float32)
    dv = tl.zeros([BLOCK_K, D], tl.float32)
    # the key block is the query block's previous (OFFSET -1), its own (0) or its next (+1)
    dk, dv = _dkdv_block(dk, dv, k, v, cnt, bias, j_loc, block + 1, nb, c, k_start, scale, Q, G, E, REF,
                         stride_qn, R, BLOCK_Q, BLOCK_K, D, LEVEL0, CAUSAL, -1, PRECISION)
    if LEVEL0:
        dk, dv = _dkdv_block(dk, dv, k, v, cnt, bias, j_loc, block, nb, c, k_start, scale, Q, G, E, REF,
                             stride_qn, R, BLOCK_Q, BLOCK_K, D, LEVEL0, CAUSAL, 0, PRECISION)
    if not CAUSAL:
        dk, dv = _dkdv_block(dk, dv, k, v, cnt, bias, j_loc, block - 1, nb, c, k_start, scale, Q, G, E, REF,
                             stride_qn, R, BLOCK_Q, BLOCK_K, D, LEVEL0, CAUSAL, 1, PRECISION)
    dk = dk * scale
    if HAS_PARENT:
        PCNT = PCNT + row * c_parent
        dk = _from_parent(dk, PDK + row * c_parent * D, PCNT, CNT, keys, valid, D, False)
        dv = _from_parent(dv, PDV + row * c_parent * D, PCNT, CNT, keys, valid, D, False)
    _store_rows(DK + row * c * D, keys, dk, valid, D)
    _store_rows(DV + row * c * D, keys, dv, valid, D)
