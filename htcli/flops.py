"""How much arithmetic a model does: an analytic count of its matrix-multiply FLOPs, for the achieved
TFLOP/s and model FLOPs utilisation (MFU) that training reports.

The count is the model's, not the implementation's: a forward pass is every dense layer (2 FLOPs per
multiply-add) plus attention's score and value products (H-attention: each level's windows of block
pairs, as htcli.attention computes them; exact: the full n x n product, as SDPA does); a training
step is 3 forward passes (the backward pass costs two), recomputation (reversible layers, H-attention's
backward) not counted, as MFU is defined. Elementwise work (norms, softmax, rotary) is left out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from htcli.attention.geometry import num_levels, offsets, padded_length

if TYPE_CHECKING:
    from htcli.model import HTransformerConfig

# dense bf16 tensor-core peaks (FLOP/s, no sparsity) of GPUs by a part of their name, most specific first
PEAK_BF16 = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("H20", 148e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("A10", 125e12),
    ("RTX 4090", 165e12),
    ("RTX 3090", 71e12),
)


def dense_flops_per_token(config: HTransformerConfig) -> int:
    """Forward FLOPs of the linear layers for one position: q, k, v and output projections, the
    feed-forward layers, the logits."""
    inner = config.heads * config.dim_head
    attention = 2 * config.dim * 3 * inner + 2 * inner * config.dim
    feed_forward = 2 * 2 * config.dim * config.ff_mult * config.dim
    return config.depth * (attention + feed_forward) + 2 * config.dim * config.num_tokens


def attention_flops(config: HTransformerConfig, length: int) -> int:
    """Forward FLOPs of one layer's attention on one sequence of `length` positions, all heads."""
    d, r = config.dim_head, config.block_size
    if config.attention == "exact":
        return config.heads * 4 * length * length * d
    padded, total = padded_length(length, r), 0
    for level in range(num_levels(length, r)):
        blocks = -(-(padded >> level) // r)
        # per window: scores (r x d by d x width*r) and values (r x width*r by width*r x d)
        total += blocks * 4 * r * r * len(offsets(level, config.causal)) * d
    return config.heads * total


def forward_flops(config: HTransformerConfig, batch: int, length: int) -> int:
    """Forward FLOPs of the model on `batch` sequences of `length` positions."""
    per_sequence = length * dense_flops_per_token(config) + config.depth * attention_flops(config, length)
    return batch * per_sequence


def train_flops(config: HTransformerConfig, batch: int, length: int) -> int:
    """Model FLOPs of a training step's forward and backward passes on these sequences."""
    return 3 * forward_flops(config, batch, length)


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name (torch.cuda.get_device_name), None where unknown."""
    for part, peak in PEAK_BF16:
        if part in device_name:
            return peak
    return None
