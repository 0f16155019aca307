"""Hierarchical attention (H-attention) of H-Transformer-1D in O(n) time and memory.

A query sees the keys of its own and neighbouring blocks at full resolution (level 0) and
farther keys through clusters of 2**l positions (levels l >= 1), each pair at exactly one
level; all levels share one softmax maximum. `dense_h_attention` is the O(n^2) oracle of that
definition, `h_attention` the fast path, which equals it, and `HAttentionCache` continues a
causal sequence one position at a time, equal to both.

    geometry.py        levels, padding, which pairs each level scores, input checks
    oracle.py          dense_h_attention: the definition, O(n^2), for tests
    ops.py             h_attention: custom ops with autograd, the choice of implementation
    eager.py           the levels in batched torch ops (any device; the default off CUDA)
    triton_launch.py   the levels in Triton kernels (CUDA, the default there): launches ...
    triton_kernels.py  ... these kernels (imported only when Triton is wanted)
    cache.py           HAttentionCache: incremental decoding, O(block_size * d) per position
    kv_cache.py        KVCache: incremental decoding of exact attention (the baseline), O(n * d)
"""

from htcli.attention.cache import HAttentionCache
from htcli.attention.geometry import check_block_size, num_levels, pair_levels
from htcli.attention.kv_cache import KVCache
from htcli.attention.ops import (
    IMPLEMENTATION_VARIABLE,
    IMPLEMENTATIONS,
    check_device,
    check_implementation,
    h_attention,
    resolve_implementation,
)
from htcli.attention.oracle import dense_h_attention

__all__ = [
    "IMPLEMENTATION_VARIABLE",
    "IMPLEMENTATIONS",
    "HAttentionCache",
    "KVCache",
    "check_block_size",
    "check_device",
    "check_implementation",
    "resolve_implementation",
    "dense_h_attention",
    "h_attention",
    "num_levels",
    "pair_levels",
]
