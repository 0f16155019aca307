"""Incremental decoding with the hierarchical cache equals the parallel forward."""

import pytest
import torch

from htcli.attention import static_step
from htcli.attention.cache import HAttentionCache
from htcli.attention.oracle import dense_h_attention
from htcli.model import FIRST_RECIPE, HTransformer1D, HTransformerConfig


def _model(**overrides) -> HTransformer1D:
    base = dict(dim=32, depth=2, heads=2, dim_head=16, block_size=4, max_seq_len=256)
    torch.manual_seed(0)
    return HTransformer1D(HTransformerConfig(**{**base, **overrides})).eval()


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"reversible": True},
        {"shift_tokens": False},
        {"reversible": True, "shift_tokens": True, "block_size": 8},
        {"block_size": 6, "max_seq_len": 192},
        FIRST_RECIPE,  # htcli 0.1's model: LayerNorm, GELU
        {"norm": "rms", "qk_norm": True, "activation": "relu2", "logit_softcap": 3.0},
        {"norm": "rms", "qk_norm": True, "logit_softcap": 3.0, "reversible": True, "shift_tokens": True},
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


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("overrides", [{}, {"reversible": True, "shift_tokens": True, "block_size": 8}])
def test_steps_read_the_first_byte_as_the_forward_does(overrides, static):
    """With no level decay and weights scaled up (the tests above start from weights that barely read far
    bytes, at a decay that weighs coarse levels 2^-16), the last position's logits depend on the first byte
    (by far more than the tolerance), and the cached steps, ordinary and static, still equal the forward."""
    model = _model(level_decay=0.0, max_seq_len=128, **overrides)
    tokens = torch.randint(0, 256, (2, 128), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(3)
        expected = model(tokens)
        changed = torch.cat([(tokens[:, :1] + 1) % 256, tokens[:, 1:]], dim=1)
        assert (model(changed)[:, -1] - expected[:, -1]).abs().max().item() > 1e-2
        _, state = model.prefill(tokens[:, :5])
        plan = static_step.StepPlan(state.layers[0].attention.cache) if static else None
        for t in range(5, 128):
            step_logits = model.decode_step(tokens[:, t], state, plan)
            assert (step_logits - expected[:, t]).abs().max().item() < 2e-4, f"position {t}"
            if static:
                state.count_step()


def test_decode_under_bf16_autocast():
    """Under bf16 autocast the cached steps stay within bf16 rounding of the parallel forward."""
    model = _model(block_size=8, max_seq_len=128)
    tokens = torch.randint(0, 256, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(tokens).float()
        logits, states = model.prefill(tokens[:, :40])
        worst = (logits.float() - expected[:, :40]).abs().max().item()
        for t in range(40, 100):
            step_logits = model.decode_step(tokens[:, t], states).float()
            worst = max(worst, (step_logits - expected[:, t]).abs().max().item())
    assert worst < 0.02 * expected.abs().max().item()


@pytest.mark.parametrize("static", [False, True])
def test_cache_refuses_past_capacity(static):
    """Stepping past what the levels serve raises instead of silently degrading: the static step too (it
    returned wrong logits at the capacity, then an IndexError from the rotary table)."""
    model = _model(max_seq_len=16)
    tokens = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        _, states = model.prefill(tokens)
        plan = static_step.StepPlan(states.layers[0].attention.cache) if static else None
        with pytest.raises(ValueError, match="re-prefill"):
            model.decode_step(tokens[:, 0], states, plan)


def test_a_step_past_max_seq_len_is_refused_where_the_cache_has_room():
    """A context of 48 at block 4: the cache's levels serve 64 positions, and steps 49 to 64 were taken
    without a word (the model's context is 48; forward refuses 49 tokens; review)."""
    model = _model(max_seq_len=48, block_size=4)
    tokens = torch.randint(0, 256, (1, 48))
    _, state = model.prefill(tokens)
    with pytest.raises(ValueError, match="the context is full: 48 positions of max_seq_len 48; re-prefill a"):
        model.decode_step(tokens[:, 0], state)
    _, state = model.prefill(tokens[:, :47])
    assert model.decode_step(tokens[:, 0], state).shape == (1, 256)  # (the 48th: still in the context)


def test_prefill_checks_its_batch_and_copies():
    """An empty batch was a reshape's error, copies=2.5 one of repeat(), copies=True one copy (review)."""
    model = _model()
    tokens = torch.randint(0, 256, (1, 8))
    with pytest.raises(ValueError, match="prefill takes at least one sequence, got a batch of 0"):
        model.prefill(tokens[:0])
    for copies in (2.5, "2", True):
        with pytest.raises(ValueError, match="copies must be an integer, got"):
            model.prefill(tokens, copies=copies)
    import numpy

    for copies in (numpy.int64(2), torch.tensor(2)):  # (integers of numpy and torch are integers)
        assert model.prefill(tokens, copies=copies)[0].shape == (2, 8, 256)


@pytest.mark.parametrize("attention", ["h", "exact"])
def test_a_step_takes_one_token_per_sequence(attention):
    """A token for one sequence given to a state of two is refused, not broadcast to both."""
    model = _model(attention=attention)
    with torch.no_grad():
        _, state = model.prefill(torch.randint(0, 256, (2, 8)))
        for token in (torch.tensor([1]), torch.tensor([[1, 2]]), torch.tensor([1, 2, 3])):
            with pytest.raises(ValueError, match=r"one token per sequence, shape \(2,\)"):
                model.decode_step(token, state)
        assert model.decode_step(torch.tensor([1, 2]), state).shape == (2, 256)


def test_a_static_step_of_an_exact_attention_model_is_refused():
    """A StepPlan steps H-attention caches only: an exact model's KV cache is refused in words."""
    h_model, model = _model(), _model(attention="exact")
    tokens = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        _, h_state = h_model.prefill(tokens)
        _, state = model.prefill(tokens)
        with pytest.raises(ValueError, match="exact-attention model takes ordinary steps"):
            model.decode_step(tokens[:, 0], state, static_step.StepPlan(h_state.layers[0].attention.cache))


def test_non_causal_model_cannot_decode():
    """Incremental decoding is refused for a bidirectional model."""
    model = _model(causal=False)
    with pytest.raises(ValueError, match="causal"):
        model.prefill(torch.zeros(1, 4, dtype=torch.long))


def test_layers_share_one_rotary_table_unless_their_frequencies_differ():
    """A rotary model's decode state holds one table of rotations for every layer (one per layer was
    256 bytes a position each, 32 MB a layer at 128k); a layer whose frequencies differ (learned ones)
    gets its own, and decoding still equals the parallel forward."""
    model = _model(depth=3)
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        _, state = model.prefill(tokens[:, :10])
        tables = [layer.attention.rotary for layer in state.layers]
        assert tables[0] is not None and all(table is tables[0] for table in tables)
        model.layers.blocks[1][0].fn.rotary.freqs.mul_(1.5)
        expected = model(tokens)
        logits, state = model.prefill(tokens[:, :10])
        tables = [layer.attention.rotary for layer in state.layers]
        assert tables[0] is tables[2] and tables[1] is not tables[0]
        for i in range(10, 40):
            logits = model.decode_step(tokens[:, i - 1], state) if i > 10 else logits[:, -1]
            assert (logits - expected[:, i - 1]).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    "overrides", [{}, {"reversible": True}, {"reversible": True, "shift_tokens": False}, {"causal": True}]
)
def test_prefill_with_gradients_enabled(overrides):
    """prefill and decode_step work outside torch.no_grad() (reversible models too) and equal the forward."""
    model = _model(**overrides)
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(tokens)
    logits, states = model.prefill(tokens[:, :30])
    assert (logits - expected[:, :30]).abs().max().item() < 1e-4
    for t in range(30, 40):
        step_logits = model.decode_step(tokens[:, t], states)
        assert (step_logits - expected[:, t]).abs().max().item() < 1e-4, f"position {t}"


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("decay", [None, torch.tensor([3.0, 1.0])])
@pytest.mark.parametrize("prompt", [1, 6, 16, 37])
def test_cache_steps_equal_the_dense_oracle(decay, prompt, static):
    """The cache alone, on random unit-scale q, k, v (2 sequences x 2 heads, 64 positions, block 4:
    three coarse levels): every step's output equals the dense oracle's causal output within 1e-5
    (the cache computes in fp32), with and without the level decay, after prompts that end inside,
    at the end of and past the first blocks and clusters; the ordinary step and the static one (a
    CUDA graph's: static_step with a StepPlan)."""
    b, h, n, d, r = 2, 2, 64, 8, 4
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=generator, dtype=torch.float64) for _ in range(3))
    expected = dense_h_attention(q, k, v, block_size=r, causal=True, level_decay=decay)
    cache = HAttentionCache(
        b, h, d, block_size=r, max_seq_len=n, device="cpu", dtype=torch.float64, level_decay=decay
    )
    cache.prefill(q[:, :, :prompt], k[:, :, :prompt], v[:, :, :prompt])
    plan = static_step.StepPlan(cache)
    for t in range(prompt, n):
        if static:
            plan.update()
            out = static_step.step(cache, plan, q[:, :, t], k[:, :, t], v[:, :, t])
            plan.advance()
        else:
            out = cache.step(q[:, :, t], k[:, :, t], v[:, :, t])
        assert out.dtype == torch.float64
        assert (out - expected[:, :, t]).abs().max().item() < 1e-5, f"position {t}"


@pytest.mark.parametrize(
    "overrides,static",
    [
        ({"shift_tokens": False}, False),
        ({"attention": "exact"}, False),
        ({"reversible": True, "shift_tokens": True, "level_decay": 4.0}, False),
        ({"shift_tokens": True}, True),
        ({"reversible": True, "shift_tokens": True, "level_decay": 4.0}, True),
    ],
)
def test_one_prefill_for_copies_of_a_prompt(overrides, static):
    """prefill(prompt, copies=3): each copy then decodes on its own, as that sequence's parallel forward
    says (the H-cache with and without decay, the token shift's state, the exact model's KV cache), by
    ordinary steps and by static ones (a CUDA graph's); a prompt of several sequences cannot be copied."""
    model = _model(**overrides)
    generator = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, 256, (1, 37), generator=generator)
    rest = torch.randint(0, 256, (3, 40), generator=generator)
    with torch.no_grad():
        expected = model(torch.cat([prompt.expand(3, -1), rest], 1))
        logits, state = model.prefill(prompt, copies=3)
        assert logits.shape[0] == 3 and (logits - expected[:, :37]).abs().max().item() < 1e-4
        plan = static_step.StepPlan(state.layers[0].attention.cache) if static else None
        for t in range(40):
            step_logits = model.decode_step(rest[:, t], state, plan)
            if static:
                state.count_step()
            assert (step_logits - expected[:, 37 + t]).abs().max().item() < 1e-4, f"position {37 + t}"
        with pytest.raises(ValueError, match="copies of a prompt need a prompt of one sequence"):
            model.prefill(rest, copies=2)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"reversible": True, "shift_tokens": True},
        {"block_size": 6, "max_seq_len": 192},
        {"max_seq_len": 8},
    ],
)
@pytest.mark.parametrize("prompt", [1, 7, 64])
def test_static_steps_match_parallel_forward(overrides, prompt):
    """The steps a CUDA graph replays (static_step: the same operations at every position, the position
    a tensor) give the parallel forward's logits at every position, as the ordinary steps do; the model
    leaves the caches' counts to its caller."""
    model = _model(**overrides)
    n = model.config.max_seq_len
    prompt = min(prompt, n - 1)
    tokens = torch.randint(0, 256, (3, n), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens)
        _, state = model.prefill(tokens[:, :prompt])
        plan = static_step.StepPlan(state.layers[0].attention.cache)
        for t in range(prompt, n):
            step_logits = model.decode_step(tokens[:, t], state, plan)
            assert (step_logits - expected[:, t]).abs().max().item() < 1e-4, f"position {t}"
            assert state.position == t
            state.count_step()
        assert plan.position.item() == n
        if n > prompt + 1:  # a cache that took static steps refuses ordinary ones (it keeps its own state)
            _, state = model.prefill(tokens[:, :prompt])
            model.decode_step(tokens[:, prompt], state, static_step.StepPlan(state.layers[0].attention.cache))
            state.count_step()
            with pytest.raises(ValueError, match="static steps"):
                model.decode_step(tokens[:, prompt + 1], state)


def test_decode_graphs_only_on_cuda_unless_switched_off(monkeypatch):
    """CUDA graphs for decode steps on CUDA devices only, and not with HTCLI_DECODE_GRAPH=0; elsewhere
    DecodeSteps takes the model's ordinary steps (equal to the parallel forward)."""
    from htcli.decode_steps import DecodeSteps, graphs_wanted

    assert graphs_wanted(torch.device("cuda")) and not graphs_wanted(torch.device("cpu"))
    monkeypatch.setenv("HTCLI_DECODE_GRAPH", "0")
    assert not graphs_wanted(torch.device("cuda"))
    model = _model()
    tokens = torch.randint(0, 256, (2, 60), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(tokens)
        _, state = model.prefill(tokens[:, :20])
    steps = DecodeSteps(model, state, torch.float32)
    assert not steps.graphed
    for t in range(20, 60):
        assert (steps(tokens[:, t]) - expected[:, t]).abs().max().item() < 1e-4
