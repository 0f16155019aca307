"""Hierarchical attention (H-attention) of H-Transformer-1D in O(n) time and memory.

A query sees the keys of its own and neighbouring blocks at full resolution (level 0) and
farther keys through clusters of 2**l positions (levels l >= 1), each pair at exactly one
level; all levels share one softmax maximum. `dense_h_attention` is the O(n^2) oracle of that
definition, `h_attention` the fast path, which equals it.

The fast path is one autograd Function. Forward walks the levels, folding each level's
softmax statistics into per-position accumulators, and keeps only q, k, v, the output and
the log-sum-exp per position. Backward recomputes each level's scores (as FlashAttention
does), so no level's score matrix outlives its chunk of blocks.

Two implementations compute the levels: "eager" (attention_levels: batched torch ops, any
device) and "triton" (attention_triton: one fused kernel per level and pass, CUDA). The
environment variable HTCLI_ATTENTION or the `impl` argument picks one; eager is the default
until the Triton kernels have been checked and timed on a GPU.
"""

from __future__ import annotations

import os

import torch

from htcli import attention_levels
from htcli.attention_oracle import check_inputs, dense_h_attention, num_levels, pair_levels
from htcli.errors import HtcliError

__all__ = ["h_attention", "dense_h_attention", "num_levels", "pair_levels", "IMPLEMENTATIONS"]

IMPLEMENTATIONS = ("eager", "triton")
# read once: a compiled model must not look it up on every call
DEFAULT_IMPLEMENTATION = os.environ.get("HTCLI_ATTENTION") or "eager"


def _module(name: str):
    if name == "triton":
        from htcli import attention_triton

        return attention_triton
    return attention_levels


def _implementation(name: str | None, q: torch.Tensor, block_size: int) -> str:
    """The implementation to use, checked: "eager" or "triton"."""
    name = name or DEFAULT_IMPLEMENTATION
    if name not in IMPLEMENTATIONS:
        raise HtcliError(f"HTCLI_ATTENTION must be one of {', '.join(IMPLEMENTATIONS)}, got {name!r}")
    if name == "eager":
        return name
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise HtcliError(f"the triton attention needs CUDA tensors, got {q.device.type}: use --device cuda")
    try:
        from htcli import attention_triton
    except ImportError:
        raise HtcliError("the triton attention needs Triton: pip install triton") from None
    reason = attention_triton.unsupported(q, block_size)
    if reason:
        raise HtcliError(f"the triton attention cannot take {reason}: unset HTCLI_ATTENTION")
    return name


class _HAttention(torch.autograd.Function):
    """q, k, v: (batch * heads, n, d) in the compute dtype; real: (batch * heads, n) 0/1."""

    @staticmethod
    def forward(ctx, q, k, v, real, block_size: int, causal: bool, impl: str):
        out, lse = _module(impl).forward(q, k, v, real, block_size=block_size, causal=causal)
        ctx.save_for_backward(q, k, v, real, out, lse)
        ctx.block_size, ctx.causal, ctx.impl = block_size, causal, impl
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, real, out, lse = ctx.saved_tensors
        dq, dk, dv = _module(ctx.impl).backward(
            q, k, v, real, out, lse, grad_out, block_size=ctx.block_size, causal=ctx.causal
        )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def h_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    impl: str | None = None,
) -> torch.Tensor:
    """Hierarchical attention. q, k, v: (batch, heads, n, dim_head), scaled by dim_head**-0.5
    inside; key_padding_mask: (batch, n) bool, True = real token. Returns (batch, heads, n, dim_head).

    Under autocast the matrix products run in the autocast dtype; softmax maxima, exponent sums
    and the final division stay in fp32. impl: "eager" or "triton" (default: $HTCLI_ATTENTION
    as it was at import, else eager).
    """
    check_inputs(q, k, v, block_size, key_padding_mask)
    b, h, n, d = q.shape
    dtype = q.dtype
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type) and dtype in (torch.float32, torch.float64):
        dtype = torch.get_autocast_dtype(device_type)
    stat_dtype = torch.promote_types(dtype, torch.float32)
    q, k, v = (t.to(dtype).reshape(b * h, n, d) for t in (q, k, v))
    impl = _implementation(impl, q, block_size)
    if key_padding_mask is None:
        real = torch.ones(b * h, n, dtype=stat_dtype, device=q.device)
    else:
        real = key_padding_mask.to(device=q.device, dtype=stat_dtype).repeat_interleave(h, dim=0)
    with torch.autocast(device_type, enabled=False):
        out = _HAttention.apply(q, k, v, real, block_size, causal, impl)
    return out.view(b, h, n, d)
