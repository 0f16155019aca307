"""The fused elementwise pieces: equal to torch's composites, with gradients checked."""

import pytest
import torch

from htcli.fused import RMSNorm, _RMSNorm, rms_norm, rotate, rotate_one
from htcli.model import Attention, HTransformerConfig


def test_rms_norm_equals_torch_rmsnorm_forward_and_backward():
    """RMSNorm gives nn.RMSNorm's output and the same gradients for x and the weight."""
    torch.manual_seed(0)
    ours, theirs = RMSNorm(24), torch.nn.RMSNorm(24)
    with torch.no_grad():
        theirs.weight.normal_()
        ours.load_state_dict(theirs.state_dict())  # the same parameter name: checkpoints load either way
    x = torch.randn(3, 7, 24, requires_grad=True)
    grad = torch.randn(3, 7, 24)
    expected = theirs(x)
    (expected_dx, expected_dw) = torch.autograd.grad(expected, (x, theirs.weight), grad)
    got = ours(x)
    (dx, dw) = torch.autograd.grad(got, (x, ours.weight), grad)
    assert (got - expected).abs().max().item() < 1e-6
    assert (dx - expected_dx).abs().max().item() < 1e-5
    assert (dw - expected_dw).abs().max().item() < 1e-5
    with torch.no_grad():  # the shortcut without autograd
        assert (ours(x) - expected).abs().max().item() < 1e-6


def test_rms_norm_gradcheck():
    """The hand-written backward is the forward's derivative (fp64 gradcheck)."""
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: _RMSNorm.apply(x, w, 1e-6), (x, w))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_of_low_precision_input_computes_in_fp32(dtype):
    """A bf16/fp16 input is normalised in fp32 and returned in its dtype, as torch's RMSNorm does."""
    x = torch.randn(4, 32).to(dtype)
    w = torch.randn(32)
    got = rms_norm(x, w, 1e-6)
    expected = rms_norm(x.float(), w, 1e-6)
    assert got.dtype == dtype
    assert torch.equal(got, expected.to(dtype))


def test_rms_norm_broadcasts_a_stacked_weight():
    """The decode step normalises q and k in one call, their weights stacked (2, 1, d)."""
    q, k = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    wq, wk = torch.randn(8), torch.randn(8)
    both = rms_norm(torch.stack([q, k], 1), torch.stack([wq, wk])[:, None], 1e-6)
    assert torch.equal(both[:, 0], rms_norm(q, wq, 1e-6))
    assert torch.equal(both[:, 1], rms_norm(k, wk, 1e-6))
    x = torch.randn(2, 2, 3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 1, 8, dtype=torch.float64, requires_grad=True)  # and its gradient has its shape
    assert torch.autograd.gradcheck(lambda x, w: _RMSNorm.apply(x, w, 1e-6), (x, w))


def test_rotate_one_equals_rotate_at_each_position():
    """The decode step's complex-number rotation equals the parallel forward's, position by position."""
    attention = Attention(HTransformerConfig(dim=32, heads=2, dim_head=16, block_size=16, max_seq_len=64))
    x = torch.randn(2, 2, 40, 16)
    cos, sin = attention.rotary_tables(40, x.device)
    turns = attention.rotary_turns(40, x.device)
    expected = rotate(x, cos, sin)
    for position in (0, 1, 17, 39):
        got = rotate_one(x[:, :, position], turns[position])
        assert (got - expected[:, :, position]).abs().max().item() < 1e-6
    half = x.to(torch.bfloat16)
    assert rotate_one(half[:, :, 3], turns[3]).dtype == torch.bfloat16
