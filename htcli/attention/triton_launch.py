"""h_attention through Triton kernels: the level loops that launch triton_kernels.

Same contract as eager.forward / backward (q, k, v: (rows, n, d); real: (rows, n)
fp32, 1 = real token), with the output and gradients in the inputs' dtype and the
log-sum-exp in fp32.

Forward: build every level's clusters, fine to coarse (one pooling launch per level), then
attend coarse to fine (one launch per level): each level starts from its parent's softmax
state, and level 0 writes the output. Nothing n x n, nothing per level kept afterwards.

Backward: the clusters again, the per-cluster sums G, E and reference maxima fine to coarse,
then per level, coarse to fine, one launch for dQ and one for dK, dV; each level adds its
parent's gradients, so level 0 ends with the full gradients. Coarse levels' G are kept in the
inputs' dtype (what the kernels compute with), level 1's gradients too (memory), coarser levels'
gradients in fp32 (FP32_FROM_LEVEL); softmax statistics are fp32 throughout.

Memory: a level's buffers go as soon as the next level no longer reads them (a parent's dQ once the
child's dQ kernel has read it), and the backward pools level 1 (as large as all coarser levels
together) again at its turn instead of holding it while they run: at 65,536 tokens (H200, bf16, batch 4,
8 heads, dim_head 64) forward+backward peaks at 0.94x (non-causal) and 0.85x (causal) SDPA's memory,
against 1.51x and 1.43x when each level's buffers were held one level longer (tests/test_attention_triton.py
counts the bytes).

Tiles and warps per kernel: MAX_TILES and NUM_WARPS below; the environment variable
HTCLI_TRITON_TUNING (JSON, e.g. {"forward": [128, 64, 8]}: largest query and key tiles, warps,
and optionally software-pipelining stages) overrides them, for tuning sweeps (examples/triton_sweep.py).
"""

from __future__ import annotations

import json
import os

import torch
import triton

from htcli.attention import triton_kernels as kernels
from htcli.attention.geometry import decay_bias, num_levels
from htcli.errors import HtcliError

POOL_BLOCK = 64
# largest (query, key) tiles per kernel; a level's block size caps them. The fastest good setting of
# examples/triton_sweep.py (H200, bf16, n 8192, batch 4, 8 heads, dim_head 64, block 128, both modes,
# each variant checked for determinism and accuracy first): forward 64x64 0.87 ms against 128x64's 0.99
# (non-causal + causal), dQ 64x32 3.26 against 128x32's 3.31 and dK, dV 64x64 2.93 against 32x128's 3.26
# (forward+backward); all three with 4 warps and unpipelined.
MAX_TILES = {"forward": (64, 64), "dq": (64, 32), "dkdv": (64, 64)}
MIN_TILE = 16  # tl.dot's smallest side
# warps per kernel; absent: 8 where a tile side is 128 (4 spill registers there: ptxas, sm_90), else 4
NUM_WARPS: dict[str, int] = {}
# software-pipelining stages per kernel (1: none); absent: Triton's default (3 on CUDA). The dK, dV
# kernel runs unpipelined: pipelined (Triton 3.6, H200, bf16 and fp16) its dK was 2-5% off and changed
# from run to run (a race: a row alone also differed from the same row in a batch), while dV, fp32 and
# the other kernels were right; with one stage two runs give the same bits (examples/triton_precision.py).
# The dQ and forward kernels are as fast or faster unpipelined too (the sweep above).
NUM_STAGES: dict[str, int] = {"forward": 1, "dq": 1, "dkdv": 1}
TUNING_VARIABLE = "HTCLI_TRITON_TUNING"
# Backward keeps the gradients of levels >= this in fp32: each level adds its parent's, so rounding
# every level to bf16 made dV at 65,536 tokens 1.8x as far from fp32 attention as eager bf16 (which
# accumulates in fp32); from level 2 on: 1.56x (bf16, H200; fp16 in Triton's interpreter 1.76x -> 1.38x).
# Level 1's gradients, held beside level 0's, stay in the inputs' dtype (memory). (All levels in fp32:
# 1.29x, +25% backward memory.)
FP32_FROM_LEVEL = 2


def _read_tuning(text: str) -> None:
    """Apply HTCLI_TRITON_TUNING: {"kind": [block_q, block_k, warps] or [..., stages], ...}; stages 0:
    Triton's own default (pipelined), absent: NUM_STAGES's."""
    example = '{"forward": [128, 64, 8]}'
    try:
        tuning = json.loads(text)
        settings = {kind: tuple(int(x) for x in tuning[kind]) for kind in tuning}
    except (ValueError, TypeError, AttributeError):
        raise HtcliError(f"{TUNING_VARIABLE} must be JSON such as {example}, got {text!r}") from None
    for kind, setting in settings.items():
        if kind not in MAX_TILES:
            raise HtcliError(f"{TUNING_VARIABLE}: unknown kernel {kind!r} (one of {', '.join(MAX_TILES)})")
        if len(setting) not in (3, 4):
            raise HtcliError(
                f"{TUNING_VARIABLE}: {kind} needs [block_q, block_k, warps(, stages)], e.g. {example}"
            )
        MAX_TILES[kind], NUM_WARPS[kind] = setting[:2], setting[2]
        if len(setting) == 4 and setting[3]:
            NUM_STAGES[kind] = setting[3]
        elif len(setting) == 4:  # 0: Triton's own default
            NUM_STAGES.pop(kind, None)


if os.environ.get(TUNING_VARIABLE):
    _read_tuning(os.environ[TUNING_VARIABLE])


def unsupported(q: torch.Tensor, block_size: int) -> str | None:
    """Why these kernels cannot take q (rows, n, d) with this block size, or None if they can."""
    d = q.shape[-1]
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} (float16, bfloat16 or float32 only)"
    if block_size < MIN_TILE or block_size & (block_size - 1):
        return f"block size {block_size} (a power of two >= {MIN_TILE} only)"
    if d < MIN_TILE or d > 256 or d & (d - 1):
        return f"dim_head {d} (a power of two from {MIN_TILE} to 256 only)"
    return None


def _launch_options(kind: str, r: int, q: torch.Tensor) -> dict:
    block_q, block_k = (min(r, tile) for tile in MAX_TILES[kind])
    return dict(
        R=r,
        BLOCK_Q=block_q,
        BLOCK_K=block_k,
        D=q.shape[-1],
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=NUM_WARPS.get(kind, 8 if max(block_q, block_k) >= 128 else 4),
        **({"num_stages": NUM_STAGES[kind]} if kind in NUM_STAGES else {}),
    )


def _pyramid(q, k, v, real, *, block_size: int, causal: bool) -> list[tuple]:
    """Every level's (Q, K, V, CNT), fine to coarse. Causal Q is a strided view of q."""
    levels = [(q, k, v, real)]
    for level in range(1, num_levels(q.shape[1], block_size)):
        levels.append(_pool(levels[-1], level, q, causal))
    return levels


def _pool(finer: tuple, level: int, q, causal: bool) -> tuple:
    """A level's (Q, K, V, CNT) from the level below's (q: level 0's queries)."""
    q_prev, k_prev, v_prev, cnt_prev = finer
    rows, c_prev, d = k_prev.shape
    c = (c_prev + 1) // 2
    k_l, v_l = (torch.empty((rows, c, d), dtype=q.dtype, device=q.device) for _ in range(2))
    q_l = q[:, :: 2**level] if causal else torch.empty_like(k_l)
    cnt = torch.empty((rows, c), dtype=torch.float32, device=q.device)
    kernels.pool_kernel[(triton.cdiv(c, POOL_BLOCK), rows)](
        *finer, q_l, k_l, v_l, cnt, c_prev, c, D=d, BLOCK=POOL_BLOCK, POOL_Q=not causal
    )
    return q_l, k_l, v_l, cnt


def _grid(c: int, r: int, tile: int, rows: int) -> tuple[int, int]:
    """Tiles of every block of a level of length c, for every row."""
    return (triton.cdiv(c, r) * (r // tile), rows)


def _level_bias(decay, level: int, placeholder: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The kernels' LVB pointer at a level and whether they read it (HAS_DECAY): the per-row score bias
    of a coarse level (fp32), or the placeholder (any tensor) without decay and at level 0."""
    if decay is None or level == 0:
        return placeholder, False
    return decay_bias(decay.to(torch.float32), level).contiguous(), True


def forward(q, k, v, real, *, block_size: int, causal: bool, decay=None):
    """Output (rows, n, d) in q's dtype and log-sum-exp (rows, n) fp32 (+inf, output 0, where a
    position scores no key). decay: None or (rows,) each row's level decay."""
    rows, n, d = q.shape
    q, k, v = (t.contiguous() for t in (q, k, v))
    real = real.to(torch.float32).contiguous()
    levels = _pyramid(q, k, v, real, block_size=block_size, causal=causal)
    lse = torch.empty((rows, n), dtype=torch.float32, device=q.device)
    options = _launch_options("forward", block_size, q)
    parent = None
    for level in reversed(range(1, len(levels))):
        # each level's clusters leave the list here, and its parent's state goes when parent is
        # replaced: before the next level allocates
        parent = _forward_level(levels.pop(), parent, level, lse, options, block_size, causal, decay)
    out = torch.empty_like(q)  # allocated last: peak memory
    _forward_level(levels.pop(), parent, 0, lse, options, block_size, causal, decay, out=out)
    return out, lse


def _forward_level(clusters, parent, level, lse, options, block_size, causal, decay, out=None) -> tuple:
    """One level's launch, starting from its parent's softmax state: a coarse level returns its own
    state (max, denominator, numerator, length), level 0 writes out and lse."""
    q_l, k_l, v_l, cnt = clusters
    rows, c, d = k_l.shape
    if level:  # softmax state; no output yet (lse stands in as a placeholder)
        f32 = dict(dtype=torch.float32, device=q_l.device)
        state = tuple(torch.empty(shape, **f32) for shape in ((rows, c), (rows, c), (rows, c, d)))
        out = lse
    else:
        state = (lse, lse, lse)
    p_m, p_den, p_acc, c_parent = parent if parent else (*state, 1)
    bias, has_decay = _level_bias(decay, level, cnt)
    # fmt: off
    kernels.forward_kernel[_grid(c, block_size, options["BLOCK_Q"], rows)](
        q_l, k_l, v_l, cnt, bias, p_m, p_den, p_acc, *state, out, lse, c, triton.cdiv(c, block_size),
        c_parent, q_l.stride(0), q_l.stride(1), d**-0.5, LEVEL0=level == 0, CAUSAL=causal,
        HAS_PARENT=parent is not None, HAS_DECAY=has_decay, **options,
    )
    # fmt: on
    return (*state, c)


def _backward_sums(grad_out, delta, lse, lengths: list[int]) -> list[tuple]:
    """Per level (fine to coarse): G (in dO's dtype, as the kernels use it), E and the reference
    maximum REF of every cluster."""
    sums = [(grad_out, delta, lse)]
    for c in lengths[1:]:
        sums.append(_pool_sums(sums[-1], c))
    return sums


def _pool_sums(finer: tuple, c: int) -> tuple:
    """A level's (G, E, REF), of length c, from the level below's."""
    rows, c_prev, d = finer[0].shape
    g = torch.empty((rows, c, d), dtype=finer[0].dtype, device=finer[0].device)
    e, ref = (torch.empty((rows, c), dtype=torch.float32, device=g.device) for _ in range(2))
    kernels.pool_grad_kernel[(triton.cdiv(c, POOL_BLOCK), rows)](
        *finer, g, e, ref, c_prev, c, D=d, BLOCK=POOL_BLOCK
    )
    return g, e, ref


def backward(q, k, v, real, out, lse, grad_out, *, block_size: int, causal: bool, decay=None):
    """Gradients (dq, dk, dv), each (rows, n, d) in q's dtype (decay: as forward's)."""
    rows, n, d = q.shape
    q, k, v, out, grad_out = (t.contiguous() for t in (q, k, v, out, grad_out.to(q.dtype)))
    real = real.to(torch.float32).contiguous()
    delta = torch.empty((rows, n), dtype=torch.float32, device=q.device)
    kernels.delta_kernel[(triton.cdiv(n, POOL_BLOCK), rows)](grad_out, out, delta, n, D=d, BLOCK=POOL_BLOCK)
    levels = _pyramid(q, k, v, real, block_size=block_size, causal=causal)
    sums = _backward_sums(grad_out, delta, lse, [level[3].shape[1] for level in levels])
    options = (_launch_options("dq", block_size, q), _launch_options("dkdv", block_size, q))
    if len(levels) > 2:  # level 1 holds as much as all coarser levels together: pooled again at its
        levels[1] = sums[1] = None  # turn, not held while they run (the same kernel: the same bits)
    parent = None
    for level in reversed(range(len(levels))):
        # the level's clusters and sums leave the lists here (the last level's go), and the parent's
        # gradients when parent is replaced: each before this level allocates
        clusters, level_sums = levels.pop(), sums.pop()
        if clusters is None:
            clusters = _pool(levels[0], 1, q, causal)
            level_sums = _pool_sums(sums[0], clusters[3].shape[1])
        parent = _backward_level(clusters, level_sums, parent, level, options, block_size, causal, decay)
    return parent[:3]


def _backward_level(clusters, level_sums, parent, level, options, block_size, causal, decay) -> list:
    """One level's dQ and dK, dV launches: [dq, dk, dv, counts] of the level, each gradient with its
    parent's added. parent: the parent level's list, or None; its dq leaves it once read, so that its
    memory can hold this level's dK, dV."""
    q_l, k_l, v_l, cnt = clusters
    rows, c, d = k_l.shape
    kept = torch.float32 if level >= FP32_FROM_LEVEL else q_l.dtype
    dq = torch.empty((rows, c, d), dtype=kept, device=q_l.device)
    p_cnt = parent[3] if parent else cnt
    bias, has_decay = _level_bias(decay, level, cnt)
    common = dict(LEVEL0=level == 0, CAUSAL=causal, HAS_PARENT=parent is not None, HAS_DECAY=has_decay)
    geometry = (c, triton.cdiv(c, block_size), p_cnt.shape[1], q_l.stride(0), q_l.stride(1), d**-0.5)
    level_side = (q_l, k_l, v_l, cnt, bias, *level_sums)  # what both kernels read of the level
    q_options, kv_options = options
    kernels.dq_kernel[_grid(c, block_size, q_options["BLOCK_Q"], rows)](
        *level_side, parent[0] if parent else dq, p_cnt, dq, *geometry, **common, **q_options
    )
    if parent:
        parent[0] = None  # read (the allocator reuses memory in stream order)
    dk, dv = (torch.empty((rows, c, d), dtype=kept, device=q_l.device) for _ in range(2))
    kernels.dkdv_kernel[_grid(c, block_size, kv_options["BLOCK_K"], rows)](
        *level_side, *(parent[1:3] if parent else (dk, dv)), p_cnt, dk, dv, *geometry, **common, **kv_options
    )
    return [dq, dk, dv, cnt]
