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
