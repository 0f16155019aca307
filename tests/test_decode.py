"""Incremental decoding with the hierarchical cache equals the parallel forward."""

import pytest
import torch

from htcli.model import HTransformer1D, HTransformerConfig


def _model(**overrides) -> HTransformer1D:
    base = dict(dim=32, depth=2, heads=2, dim_head=16, block_size=4, max_seq_len=256)
    torch.manual_seed(0)
    return HTransformer1D(HTransformerConfig(**{**base, **overrides})).eval()


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"reversible": True},
        {"shift_tokens": True},
        {"reversible": True, "shift_tokens": True, "block_size": 8},
        {"block_size": 6, "max_seq_len": 192},
    ],
)
@pytest.mark.parametrize("prompt", [1, 7, 64])
def test_prefill_then_steps_match_parallel_forward(overrides, prompt):
    """Logits of prefill + one-token steps equal the parallel forward at every position (1e-4)."""
    model = _model(**overrides)
    n = model.config.max_seq_len
    tokens = torch.randint(0, 256, (3, n), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens)
        logits, states = model.prefill(tokens[:, :prompt])
        assert (logits - expected[:, :prompt]).abs().max().item() < 1e-4
        for t in range(prompt, n):
            step_logits = model.decode_step(tokens[:, t], states)
            assert (step_logits - expected[:, t]).abs().max().item() < 1e-4, f"position {t}"


def test_cache_refuses_past_capacity():
    """Stepping past what the levels serve raises instead of silently degrading."""
    model = _model(max_seq_len=16)
    tokens = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        _, states = model.prefill(tokens)
        with pytest.raises(ValueError, match="re-prefill"):
            model.decode_step(tokens[:, 0], states)


def test_non_causal_model_cannot_decode():
    """Incremental decoding is refused for a bidirectional model."""
    model = _model(causal=False)
    with pytest.raises(ValueError, match="causal"):
        model.prefill(torch.zeros(1, 4, dtype=torch.long))
