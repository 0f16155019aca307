"""The H-Transformer-1D model: config, causality, reversible stack, masks, learning."""

import pytest
import torch

from htcli.model import FIRST_RECIPE, HTransformer1D, HTransformerConfig


def tiny(**overrides) -> HTransformerConfig:
    base = dict(dim=32, depth=2, heads=2, dim_head=16, block_size=4, max_seq_len=128)
    return HTransformerConfig(**{**base, **overrides})


def test_config_round_trip():
    """The config survives to_dict / from_dict unchanged."""
    config = tiny(reversible=True, shift_tokens=True, causal=False)
    assert HTransformerConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(block_size=5), "even"),
        (dict(max_seq_len=130), "multiple of block_size"),
        (dict(depth=0), "depth must be a positive integer"),
        (dict(attention="flash"), "attention must be one of"),
        (dict(dim_head=15), "even dim_head"),
        (dict(dim_head=2), "even dim_head of at least 4, got 2"),  # (a ZeroDivisionError in the rotary's)
    ],
)
def test_config_validation(overrides, message):
    """Bad configs raise ValueError naming the problem."""
    with pytest.raises(ValueError, match=message):
        tiny(**overrides)


def test_from_dict_rejects_unknown_keys():
    """A foreign config dict is refused, not silently half-read."""
    with pytest.raises(ValueError, match="unknown model config keys: colour"):
        HTransformerConfig.from_dict({**tiny().to_dict(), "colour": "red"})


@pytest.mark.parametrize("reversible", [False, True])
@pytest.mark.parametrize("shift_tokens", [False, True])
def test_causal_model_receptive_field(reversible, shift_tokens):
    """Whole causal model: logits[i] depend on every input embedding <= i and none after."""
    torch.manual_seed(0)
    model = HTransformer1D(tiny(depth=3, reversible=reversible, shift_tokens=shift_tokens)).double()
    n = 70
    x = torch.randn(1, n, 32, dtype=torch.float64, requires_grad=True)
    logits = model.forward_embeddings(x)
    for i in (0, 5, 31, 47, 69):
        (grad,) = torch.autograd.grad(logits[0, i].sum(), x, retain_graph=True)
        per_position = grad[0].abs().sum(-1)
        assert (per_position[i + 1 :] == 0).all(), f"logits[{i}] see the future"
        assert (per_position[: i + 1] > 0).all(), f"logits[{i}] miss an earlier token"


@pytest.mark.parametrize("recipe", [FIRST_RECIPE, {"norm": "rms", "qk_norm": True, "logit_softcap": 5.0}])
def test_reversible_matches_plain_autograd(recipe):
    """The memory-saving reversible backward gives the plain-autograd outputs and gradients (fp64)."""
    torch.manual_seed(0)
    model = HTransformer1D(tiny(depth=3, reversible=True, shift_tokens=True, **recipe)).double()
    x = torch.randn(2, 50, 32, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, 50, dtype=torch.bool)
    mask[1, 40:] = False
    results = []
    for save_memory in (True, False):
        model.zero_grad()
        x.grad = None
        out = model.forward_embeddings(x, mask, save_memory=save_memory)
        (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()
        results.append(
            (out.detach(), x.grad.clone(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
        )
    (out_a, gx_a, gp_a), (out_b, gx_b, gp_b) = results
    assert torch.allclose(out_a, out_b, atol=1e-12)
    assert torch.allclose(gx_a, gx_b, atol=1e-10)
    for a, b in zip(gp_a, gp_b):
        assert torch.allclose(a, b, atol=1e-10)


def _saved_activation_bytes(model, x) -> int:
    total = 0

    def pack(t):
        nonlocal total
        if not isinstance(t, torch.nn.Parameter):
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.forward_embeddings(x).sum()
    return total


def test_reversible_memory_does_not_grow_with_depth():
    """Saved activations: constant in depth for the reversible stack, linear for the plain one."""
    x = torch.randn(1, 64, 32)
    saved = {}
    for reversible in (True, False):
        for depth in (2, 8):
            model = HTransformer1D(tiny(depth=depth, reversible=reversible))
            saved[reversible, depth] = _saved_activation_bytes(model, x.clone().requires_grad_())
    assert saved[True, 8] == saved[True, 2]
    assert saved[False, 8] > 3 * saved[False, 2]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shift_tokens", [False, True])
def test_mask_ignores_padded_tokens(causal, shift_tokens):
    """Changing tokens at padded positions leaves every real position's logits unchanged."""
    torch.manual_seed(0)
    model = HTransformer1D(tiny(causal=causal, shift_tokens=shift_tokens)).eval()
    tokens = torch.randint(0, 256, (2, 60))
    mask = torch.ones(2, 60, dtype=torch.bool)
    mask[0, 45:] = False
    mask[1, 10:20] = False
    other = tokens.clone()
    other[~mask] = torch.randint(0, 256, (int((~mask).sum()),))
    with torch.no_grad():
        a = model(tokens, mask)
        b = model(other, mask)
    assert torch.allclose(a[mask], b[mask], atol=1e-6)
    assert not torch.allclose(model(tokens)[mask], model(other)[mask], atol=1e-6)


@pytest.mark.parametrize("n", [1, 3, 17, 128])
def test_any_length_up_to_max(n):
    """Any input length from 1 to max_seq_len gives logits of the right shape; longer is refused."""
    model = HTransformer1D(tiny())
    assert model(torch.randint(0, 256, (2, n))).shape == (2, n, 256)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(torch.randint(0, 256, (1, 129)))


def test_tokens_of_another_shape_or_dtype():
    """Tokens that are not (batch, n) integers, or a mask of another shape, are one clear ValueError (torch
    said "Sizes of tensors must match" from inside the token shift); bytes as uint8 are token ids, as
    int64 ones."""
    model = HTransformer1D(tiny()).eval()
    tokens = torch.randint(0, 256, (2, 16))
    for bad, said in (
        (tokens[0], r"tokens must be a tensor of shape \(batch, n\), got \(16,\)"),
        (tokens[None], r"shape \(batch, n\), got \(1, 2, 16\)"),
        (tokens.float(), "tokens must be integers \\(token ids\\), got torch.float32"),
        (tokens.bool(), "tokens must be integers"),
    ):
        with pytest.raises(ValueError, match=said):
            model(bad)
    with pytest.raises(ValueError, match=r"mask must have the tokens' shape \(2, 16\), got \(2, 8\)"):
        model(tokens, torch.ones(2, 8, dtype=torch.bool))
    with torch.no_grad():
        assert torch.equal(model(tokens.to(torch.uint8)), model(tokens))
        assert torch.equal(model.prefill(tokens[:1].to(torch.uint8))[0], model.prefill(tokens[:1])[0])
    for dtype in (torch.uint16, torch.uint32, torch.int16):  # (uint16 has no min on the CPU)
        assert torch.equal(model(tokens.to(dtype)), model(tokens))
    # ids the embedding has no row for (its IndexError from inside torch), in each way in
    for bad in (256, -1):
        with pytest.raises(ValueError, match=f"token ids must be 0 to 255, got {bad}"):
            model(torch.tensor([[1, bad]]))
        with pytest.raises(ValueError, match=f"token ids must be 0 to 255, got {bad}"):
            model.prefill(torch.tensor([[bad]]))
    # decode_step checks its token as forward does (an int was an AttributeError, uint8 a RuntimeError)
    _, state = model.prefill(tokens[:1])
    for bad, said in (
        (5, r"tokens must be a tensor of shape \(batch,\), got int"),
        (torch.tensor([1.0]), "tokens must be integers"),
        (torch.tensor([300]), "token ids must be 0 to 255, got 300"),
    ):
        with pytest.raises(ValueError, match=said):
            model.decode_step(bad, state)
    step = model.decode_step(torch.tensor([7], dtype=torch.uint8), state)
    assert step.shape == (1, 256)


@pytest.mark.parametrize("reversible", [False, True])
def test_learns_a_repeated_pattern(reversible):
    """A few AdamW steps on a repeated byte pattern drive the loss well down."""
    torch.manual_seed(0)
    model = HTransformer1D(tiny(reversible=reversible, shift_tokens=True))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    pattern = torch.tensor(list(b"hello world, "), dtype=torch.long)
    data = pattern.repeat(10)[:65][None]
    losses = []
    for _ in range(40):
        logits = model(data[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), data[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_exact_attention_baseline_runs():
    """attention="exact" builds the same model with SDPA; with n <= block it equals H-attention."""
    torch.manual_seed(0)
    h_model = HTransformer1D(tiny(block_size=8, max_seq_len=64))
    exact = HTransformer1D(tiny(block_size=8, max_seq_len=64, attention="exact"))
    exact.load_state_dict(h_model.state_dict())
    tokens = torch.randint(0, 256, (2, 16))
    assert torch.allclose(h_model(tokens), exact(tokens), atol=1e-5)


def test_compiled_model_equals_eager_model():
    """torch.compile of a model (its attention one opaque op) gives the same outputs and gradients."""
    torch.manual_seed(0)
    config = HTransformerConfig(
        dim=32, depth=2, heads=2, dim_head=16, block_size=16, max_seq_len=128, causal=True
    )
    model = HTransformer1D(config)
    tokens = torch.randint(0, 256, (2, 128))
    params = [p for p in model.parameters() if p.requires_grad]
    results = []
    for run in (model, torch.compile(model)):
        logits = run(tokens)
        results.append([logits, *torch.autograd.grad(logits.square().mean(), params)])
    for eager, compiled in zip(*results):
        assert ((compiled - eager).norm() / eager.norm()).item() < 1e-4


def test_rotary_equals_rotary_embedding_torch():
    """Our rotation (complex products with Attention.rotary_turns) gives rotary-embedding-torch's
    rotate_queries_or_keys (its gradient: tests/test_fused.py)."""
    from htcli.fused import rotate
    from htcli.model import Attention

    attention = Attention(HTransformerConfig(dim=32, heads=2, dim_head=16, block_size=16, max_seq_len=64))
    t = torch.randn(2, 2, 40, 16)
    expected = attention.rotary.rotate_queries_or_keys(t)
    assert (rotate(t, attention.rotary_turns(40, t.device)) - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("form", ["linear", "columns", "nonsense"])
def test_step_linear_form_fixed_by_the_environment(monkeypatch, form):
    """HTCLI_STEP_PRODUCT fixes a decode step's product (reproducible samples on any machine); another
    value is an error naming the variable."""
    from htcli.errors import HtcliError
    from htcli.model import StepLinear

    monkeypatch.setattr(StepLinear, "_chosen", {})  # (no choice made earlier in this process)
    monkeypatch.setenv("HTCLI_STEP_PRODUCT", form)
    layer, x = torch.nn.Linear(24, 40), torch.randn(1, 24)
    step = StepLinear(layer)
    if form == "nonsense":
        with pytest.raises(HtcliError, match="HTCLI_STEP_PRODUCT must be linear or columns"):
            step(x)
        return
    expected = (
        step.as_columns(x) if form == "columns" else torch.nn.functional.linear(x, layer.weight, layer.bias)
    )
    assert torch.equal(step(x), expected)
    assert step._by_rows == {1: form == "columns"}


@pytest.mark.parametrize("rows", [1, 2, 8])
@pytest.mark.parametrize("bias", [True, False])
def test_step_linear_equals_the_layer(rows, bias):
    """A decode step's linear layer gives the layer's output in both of its forms (F.linear, and W @ x^T
    with a single row repeated), whichever it chose on this machine."""
    from htcli.model import StepLinear

    layer = torch.nn.Linear(24, 40, bias=bias)
    x = torch.randn(rows, 24)
    step = StepLinear(layer)
    for got in (step(x), step.as_columns(x), step(x)):  # the first call chooses, the second uses the choice
        assert got.shape == (rows, 40)
        assert (got - layer(x)).abs().max().item() < 1e-5


def test_default_model_trains_under_bf16_autocast():
    """A training step of the default model (QK-norm, rotary) under bf16 autocast, as on a GPU, gives
    finite fp32 gradients close to fp32's."""
    torch.manual_seed(0)
    model = HTransformer1D(HTransformerConfig(dim=32, heads=2, dim_head=16, block_size=16, max_seq_len=64))
    tokens = torch.randint(0, 256, (2, 64))
    params = [p for p in model.parameters() if p.requires_grad]
    expected = torch.autograd.grad(model(tokens).logsumexp(-1).mean(), params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(tokens).float().logsumexp(-1).mean()
    grads = torch.autograd.grad(loss, params)
    for ours, theirs in zip(grads, expected):
        assert ours.dtype == torch.float32 and torch.isfinite(ours).all()
        assert (ours - theirs).norm() <= 0.1 * theirs.norm() + 1e-6


def test_keep_freed_memory_is_harmless():
    """Telling malloc to keep freed memory (training on the CPU) can be done twice and leaves tensors
    working."""
    from htcli.device import keep_freed_memory

    keep_freed_memory()
    keep_freed_memory()
    big = torch.ones(3 << 20)
    assert big.sum().item() == 3 << 20
