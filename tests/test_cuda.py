"""CUDA paths: H-attention against the oracle and its gradients on the GPU (skipped without one)."""

import pytest
import torch

from htcli.attention import dense_h_attention, h_attention

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


IMPLS = ["eager", pytest.param("triton", marks=pytest.mark.skipif(not _has_triton(), reason="needs triton"))]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_cuda_matches_oracle(causal, dtype, tol, impl):
    """On the GPU: outputs and gradients equal the fp64 CPU oracle (fp32 tight, bf16 loose)."""
    gen = torch.Generator().manual_seed(0)
    n, block = 1000, 64
    q, k, v = (torch.randn(2, 3, n, 32, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(2, n, generator=gen) > 0.2
    grad = torch.randn(2, 3, n, 32, generator=gen, dtype=torch.float64)
    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = dense_h_attention(*ref_inputs, block_size=block, causal=causal, key_padding_mask=mask)
    expected.backward(grad)
    gpu = [t.to("cuda", dtype).requires_grad_() for t in (q, k, v)]
    out = h_attention(*gpu, block_size=block, causal=causal, key_padding_mask=mask.cuda(), impl=impl)
    out.backward(grad.to("cuda", dtype))
    assert (out.double().cpu() - expected).abs().max().item() < tol
    for got, ref in zip(gpu, ref_inputs):
        rel = (got.grad.double().cpu() - ref.grad).norm() / ref.grad.norm()
        assert rel.item() < tol


@pytest.mark.parametrize("impl", IMPLS)
def test_cuda_autocast_bf16(impl):
    """Under bf16 autocast on the GPU the result stays within bf16 tolerance of fp32."""
    q, k, v = (torch.randn(2, 4, 4096, 64, device="cuda") for _ in range(3))
    reference = h_attention(q, k, v, block_size=128, causal=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = h_attention(q, k, v, block_size=128, causal=True, impl=impl)
    assert torch.isfinite(out).all()
    assert (out.float() - reference).abs().max().item() < 0.05


def _attend(q, k, v, grad, impl, dtype, causal, block_size=128):
    """Output and gradients (fp32) of h_attention in `dtype`."""
    inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = h_attention(*inputs, block_size=block_size, causal=causal, impl=impl)
    return [out.float(), *(g.float() for g in torch.autograd.grad(out, inputs, grad.to(dtype)))]


def _relative_errors(got, reference):
    return [((a - b).norm() / b.norm()).item() for a, b in zip(got, reference)]


@pytest.mark.skipif(not _has_triton(), reason="needs triton")
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_triton_long_bf16_as_close_as_eager_bf16(causal):
    """At 65536 tokens (9 levels with block 128) the bf16 kernels are as close to fp32 attention as
    eager attention in bf16 is (within 1.5x), output and each gradient: bf16 rounding, nothing more."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, grad = (torch.randn(1, 2, 65536, 64, device="cuda", generator=gen) for _ in range(4))
    reference = _attend(q, k, v, grad, "eager", torch.float32, causal)
    eager = _relative_errors(_attend(q, k, v, grad, "eager", torch.bfloat16, causal), reference)
    fused = _relative_errors(_attend(q, k, v, grad, "triton", torch.bfloat16, causal), reference)
    for name, e, f in zip(("out", "dq", "dk", "dv"), eager, fused):
        assert f < 1.5 * e + 1e-3, f"{name}: triton bf16 {f:.2e} vs eager bf16 {e:.2e} (from fp32)"


@pytest.mark.skipif(not _has_triton(), reason="needs triton")
@pytest.mark.parametrize("block_size", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_triton_is_deterministic(causal, block_size):
    """Two runs of the kernels on the same inputs give the same bits (no races between programs),
    at the bench's shape (batch 4, 8 heads, 8192 tokens), whatever memory the allocator hands out."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, grad = (torch.randn(4, 8, 8192, 64, device="cuda", generator=gen) for _ in range(4))
    first = _attend(q, k, v, grad, "triton", torch.bfloat16, causal, block_size)
    torch.cuda.empty_cache()
    junk = torch.full((1 << 28,), float("nan"), device="cuda")  # freed blocks now hold NaN
    del junk
    second = _attend(q, k, v, grad, "triton", torch.bfloat16, causal, block_size)
    for name, a, b in zip(("out", "dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"{name}: differs between runs by {(a - b).abs().max().item():.2e}"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_level_decay_matches_oracle(causal, impl):
    """The level decay (a per-head bias per coarse level) on the GPU: output and gradients equal the
    fp64 CPU oracle's in fp32, eager and Triton."""
    gen = torch.Generator().manual_seed(1)
    n, block, heads = 1024, 32, 3
    decay = torch.tensor([16.0, 4.0, 1.0])
    q, k, v, grad = (torch.randn(2, heads, n, 32, generator=gen, dtype=torch.float64) for _ in range(4))
    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    expected = dense_h_attention(*ref_inputs, block_size=block, causal=causal, level_decay=decay)
    expected.backward(grad)
    gpu = [t.to("cuda", torch.float32).requires_grad_() for t in (q, k, v)]
    out = h_attention(*gpu, block_size=block, causal=causal, level_decay=decay.cuda(), impl=impl)
    out.backward(grad.to("cuda", torch.float32))
    assert (out.double().cpu() - expected).abs().max().item() < 1e-4
    for got, ref in zip(gpu, ref_inputs):
        assert ((got.grad.double().cpu() - ref.grad).norm() / ref.grad.norm()).item() < 1e-4


@pytest.mark.parametrize("overrides", [{}, {"shift_tokens": False}, {"reversible": True, "level_decay": 0.0}])
def test_cuda_decode_steps_match_parallel_forward(overrides):
    """A model of the default recipe on the GPU (Triton attention where it runs, QK-norm, level decay):
    prefill and each decode step's logits equal the parallel forward's (fp32, 2 sequences)."""
    from htcli.model import HTransformer1D, HTransformerConfig

    torch.manual_seed(0)
    base = dict(dim=64, depth=2, heads=2, dim_head=32, block_size=16, max_seq_len=512)
    model = HTransformer1D(HTransformerConfig(**{**base, **overrides})).cuda().eval()
    tokens = torch.randint(0, 256, (2, 512), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.no_grad():
        expected = model(tokens)
        logits, state = model.prefill(tokens[:, :100])
        assert (logits - expected[:, :100]).abs().max().item() < 1e-3
        for t in range(100, 512):
            step = model.decode_step(tokens[:, t], state)
            assert (step - expected[:, t]).abs().max().item() < 1e-3, f"position {t}"


def _recipe_model(**overrides):
    from htcli.model import HTransformer1D, HTransformerConfig

    torch.manual_seed(0)
    base = dict(dim=64, depth=2, heads=2, dim_head=32, block_size=16, max_seq_len=512)
    return HTransformer1D(HTransformerConfig(**{**base, **overrides})).cuda().eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("copies", [1, 3])
def test_cuda_graph_decode_steps_equal_ordinary_steps(dtype, copies):
    """DecodeSteps on the GPU (a CUDA graph captured after the warm-up steps, then replayed): at every
    step the logits of the ordinary decode step (fp32: 1e-4; bf16 autocast: 2% of the largest), across
    blocks, clusters and levels; the graph was captured."""
    from htcli.decode_steps import WARMUP_STEPS, DecodeSteps

    model = _recipe_model()  # (token shift on, as by default)
    generator = torch.Generator("cuda").manual_seed(1)
    prompt = torch.randint(0, 256, (1, 100), device="cuda", generator=generator)
    rest = torch.randint(0, 256, (copies, 400), device="cuda", generator=generator)
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        _, ordinary_state = model.prefill(prompt, copies)
        _, graphed_state = model.prefill(prompt, copies)
    steps = DecodeSteps(model, graphed_state, dtype)
    for t in range(400):
        with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            expected = model.decode_step(rest[:, t], ordinary_state).float()
        got = steps(rest[:, t]).float()
        tolerance = 1e-4 if dtype == torch.float32 else 0.02 * expected.abs().max().item()
        assert (got - expected).abs().max().item() < tolerance, f"step {t}"
        assert graphed_state.position == ordinary_state.position
        assert (steps.graph is not None) == (t >= WARMUP_STEPS), steps.graph_failure


def test_cuda_sampling_past_the_context_with_graphs(monkeypatch):
    """generate on the GPU past the model's context (a re-prefill, a new graph): as many bytes as asked,
    and greedy bytes equal to those of ordinary steps (HTCLI_DECODE_GRAPH=0) in fp32."""
    from htcli.sample import SamplingConfig, generate

    model = _recipe_model()
    config = SamplingConfig(max_new_tokens=700, temperature=0.0)
    graphed = bytes(generate(model, b"def main():\n", config))
    monkeypatch.setenv("HTCLI_DECODE_GRAPH", "0")
    ordinary = bytes(generate(model, b"def main():\n", config))
    assert len(graphed) == 700 and graphed == ordinary


@pytest.mark.skipif(not _has_triton(), reason="needs triton")
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_graphed_triton_passes_equal_launched_ones(causal, monkeypatch):
    """The Triton passes replayed from CUDA graphs (attention.graphed) give the bits of the launched
    ones, over four consecutive calls with different inputs, padding masks and level decays (the first
    launches, the second captures, the others replay: each call's inputs copied in, its outputs copied
    out, so that earlier results survive later calls); inference mode launches."""
    from htcli.attention import graphed

    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (2, 4, 2048, 64)
    calls = [
        [torch.randn(shape, device="cuda", generator=gen) for _ in range(4)]
        + [torch.rand(2, 2048, device="cuda", generator=gen) > 0.1, torch.rand(4, device="cuda") * 8]
        for _ in range(4)
    ]
    for name, value in (("_graphs", type(graphed._graphs)()), ("_seen", set()), ("_failed", {})):
        monkeypatch.setattr(graphed, name, value)

    def results(enabled: bool):
        monkeypatch.setattr(graphed, "ENABLED", enabled)
        kept = []
        for q, k, v, grad, mask, decay in calls:
            inputs = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
            out = h_attention(
                *inputs, block_size=64, causal=causal, key_padding_mask=mask, level_decay=decay, impl="triton"
            )
            kept.append([out, *torch.autograd.grad(out, inputs, grad.to(torch.bfloat16))])
            with torch.inference_mode():
                kept[-1].append(h_attention(*inputs, block_size=64, causal=causal, impl="triton"))
        return kept

    launched = results(False)
    assert not graphed._graphs
    replayed = results(True)
    assert len(graphed._graphs) == 2 and not graphed._failed  # forward and backward
    for call, (a, b) in enumerate(zip(launched, replayed)):
        for name, x, y in zip(("out", "dq", "dk", "dv", "inference out"), a, b):
            assert torch.equal(x, y), f"call {call}, {name}: differs by {(x - y).abs().max().item():.2e}"


def test_cuda_decode_steps_go_on_when_the_capture_fails(monkeypatch):
    """A CUDA graph capture that fails leaves the steps static and ungraphed, equal to the ordinary
    steps; kind says so (and, before the capture, that there is no graph yet)."""
    from htcli.decode_steps import DecodeSteps

    def refuse(*args, **kwargs):
        raise RuntimeError("capture refused (test)")

    model = _recipe_model()
    tokens = torch.randint(0, 256, (1, 300), device="cuda", generator=torch.Generator("cuda").manual_seed(2))
    with torch.no_grad():
        expected = model(tokens)
        _, state = model.prefill(tokens[:, :100])
    steps = DecodeSteps(model, state, torch.float32)
    monkeypatch.setattr(torch.cuda, "graph", refuse)
    for t in range(100, 300):
        assert (steps(tokens[:, t]) - expected[:, t]).abs().max().item() < 1e-3, f"position {t}"
        if t == 100:
            assert steps.kind == "static, no graph yet"
    assert steps.graph is None and steps.kind == "no CUDA graph (RuntimeError: capture refused (test))"
