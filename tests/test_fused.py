"""The fused elementwise pieces: equal to torch's composites, with gradients checked."""

import pytest
import torch

from htcli.fused import (
    RMSNorm,
    _NormRotate,
    _RMSNorm,
    _Rotate,
    norm_rotate,
    norm_rotate_step,
    rms_norm,
    rotate,
)
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


def _rotary(n: int, dim_head: int = 16) -> torch.Tensor:
    config = HTransformerConfig(dim=32, heads=2, dim_head=dim_head, block_size=16, max_seq_len=64)
    return Attention(config).rotary_turns(n, torch.device("cpu"))


def test_rotate_at_one_position_equals_rotate_over_all():
    """The decode step rotates one position with its turn: the parallel forward's rotation there."""
    x = torch.randn(2, 2, 40, 16)
    turns = _rotary(40)
    expected = rotate(x, turns)
    for position in (0, 1, 17, 39):
        got = rotate(x[:, :, position], turns[position])
        assert (got - expected[:, :, position]).abs().max().item() < 1e-6
    half = x.to(torch.bfloat16)
    assert rotate(half[:, :, 3], turns[3]).dtype == torch.bfloat16


def test_rotate_gradient_is_the_rotations_transpose():
    """_Rotate's backward (the conjugate turns) is the forward's derivative (fp64 gradcheck)."""
    x = torch.randn(1, 2, 5, 16, dtype=torch.float64, requires_grad=True)
    turns = _rotary(5).double()
    assert torch.autograd.gradcheck(_Rotate.apply, (x, turns))


def test_norm_rotate_equals_rms_norm_then_rotate():
    """QK-norm and rotary fused: the output and both gradients of rms_norm then rotate, also when the
    input is a strided view (q, k and v are slices of one projection), and without autograd."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 40, 3 * 2 * 16, requires_grad=True)
    q = qkv.view(2, 40, 3, 2, 16)[:, :, 1].transpose(1, 2)  # (b h n d), not contiguous
    w = torch.randn(16, requires_grad=True)
    turns = _rotary(40)
    grad = torch.randn(2, 2, 40, 16)
    expected = rotate(rms_norm(q, w, 1e-6), turns)
    expected_grads = torch.autograd.grad(expected, (qkv, w), grad)
    got = norm_rotate(q, w, turns, 1e-6)
    grads = torch.autograd.grad(got, (qkv, w), grad)
    assert (got - expected).abs().max().item() < 1e-5
    for ours, theirs in zip(grads, expected_grads):
        assert (ours - theirs).abs().max().item() < 1e-4
    with torch.no_grad():
        assert (norm_rotate(q, w, turns, 1e-6) - expected).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_norm_rotate_step_equals_norm_rotate(dtype):
    """A decode step's QK-norm and rotary (one position, q and k stacked with their weights stacked, a
    strided slice of the projection) equals norm_rotate's, in the input's dtype."""
    torch.manual_seed(0)
    qkv = torch.randn(3, 3, 2, 16).to(dtype)  # (b, q k v, h, d) of one position
    qk, w = qkv[:, :2], torch.randn(2, 1, 16, dtype=torch.float64 if dtype == torch.float64 else None)
    turns = _rotary(7)[5].to(w.dtype)  # position 5's (d/2, 2)
    got, expected = norm_rotate_step(qk, w, turns, 1e-6), norm_rotate(qk, w, turns, 1e-6)
    assert got.dtype == expected.dtype == dtype and got.shape == qk.shape
    tolerance = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2}[dtype]
    assert (got.double() - expected.double()).abs().max().item() < tolerance


def test_norm_rotate_gradcheck():
    """_NormRotate's hand-written backward is the forward's derivative, for x and the weight (fp64)."""
    x = torch.randn(2, 2, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    turns = _rotary(5, dim_head=8).double()
    assert torch.autograd.gradcheck(lambda x, w: _NormRotate.apply(x, w, turns, 1e-6), (x, w))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norm_rotate_of_low_precision_input_computes_in_fp32(dtype):
    """A bf16/fp16 q or k is normalised and rotated in fp32 and returned in its dtype, gradient too."""
    x = torch.randn(2, 2, 6, 16).to(dtype).requires_grad_()
    w = torch.randn(16, requires_grad=True)
    turns = _rotary(6)
    got = norm_rotate(x, w, turns, 1e-6)
    assert got.dtype == dtype
    assert torch.equal(got, norm_rotate(x.detach().float(), w.detach(), turns, 1e-6).to(dtype))
    (grad,) = torch.autograd.grad(got.float().sum(), x)
    assert grad.dtype == dtype


def test_norm_rotate_under_autocast_computes_in_fp32():
    """Under bf16 autocast (training on a GPU) the sums of squares and the backward's matrix products
    stay in fp32: the output is the fp32 one rounded, and the gradients are fp32's."""
    torch.manual_seed(0)
    x = (torch.randn(2, 2, 6, 16) * 40).requires_grad_()  # rows whose squares overflow fp16
    w = torch.randn(16, requires_grad=True)
    turns = _rotary(6)
    expected = norm_rotate(x, w, turns, 1e-6)
    expected_grads = torch.autograd.grad(expected.sum(), (x, w))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = norm_rotate(x, w, turns, 1e-6)
        grads = torch.autograd.grad(got.sum(), (x, w))  # (inside autocast, as a reversible backward is)
    assert torch.equal(got, expected)
    for ours, theirs in zip(grads, expected_grads):
        assert ours.dtype == torch.float32 and torch.allclose(ours, theirs, atol=1e-5)
