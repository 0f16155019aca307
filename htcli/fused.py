"""The model's elementwise pieces as few tensor operations as their math needs.

Autograd through torch's composites costs many passes and tensors on a CPU (torch's RMSNorm is ~20
operations there), and a decode step is bound by the number of operations it launches, not by its
arithmetic. Each function here is one autograd Function with a hand-written backward (checked by
gradcheck in the tests), and takes a shortcut without autograd when no gradient is wanted.
"""

from __future__ import annotations

import torch
from torch import nn


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in dtype, without an operation when it already is (a decode step counts its operations)."""
    return x if x.dtype == dtype else x.to(dtype)


class _ReluSquared(torch.autograd.Function):
    """relu(x)**2 in one allocation forward and one backward (autograd's relu then square makes four
    passes and three tensors, 2x GELU's time on a CPU); saves x, which the layer computed anyway."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.relu(x).square_()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return torch.relu(x).mul_(grad).mul_(2)


class ReluSquared(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ReluSquared.apply(x) if _needs_grad(x) else torch.relu(x).square_()


def swap_pairs(t: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (x1, x0, x3, x2, ...) over the last dim (a copy)."""
    return t.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)


class _Rotate(torch.autograd.Function):
    """Rotary embedding as x * cos + swap_pairs(x) * sin (sin sign-folded: model.Attention.rotary_tables):
    three passes forward and four backward (the rotation's transpose), half the time of
    rotary-embedding-torch's rotate_queries_or_keys (autograd through rotate_half) on a CPU."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return torch.addcmul(x * cos, swap_pairs(x), sin)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return torch.add(grad * cos, swap_pairs(grad * sin)), None, None


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., n, d) rotated by the tables' rows (n, d), in fp32 whatever x's dtype, returned in x's."""
    return _Rotate.apply(x.float(), cos, sin).to(x.dtype)


def rotate_one(x: torch.Tensor, turn: torch.Tensor) -> torch.Tensor:
    """x (..., d) rotated as rotate() does at one position, whose table row is given as d/2 complex
    numbers cos + i sin (model.Attention.rotary_turns): the rotation of each pair (x0, x1) is the
    product (x0 + i x1) * turn, one operation. fp32, returned in x's dtype; no autograd (decoding)."""
    pairs = _as(x, torch.float32).unflatten(-1, (-1, 2))
    if not pairs.is_contiguous():  # view_as_complex needs each pair's two numbers side by side
        pairs = pairs.contiguous()
    return _as(torch.view_as_real(torch.view_as_complex(pairs) * turn).flatten(-2), x.dtype)


class _RMSNorm(torch.autograd.Function):
    """x / rms(x) * weight over the last dim, in fp32: four passes forward, six backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        normed, rstd = _normalise(x, eps)
        ctx.save_for_backward(normed, rstd, weight)
        ctx.dtype = x.dtype
        return (normed * weight).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        normed, rstd, weight = ctx.saved_tensors
        grad = grad.to(normed.dtype)
        grad_weight = (grad * normed).sum_to_size(weight.shape).to(weight.dtype)
        grad_normed = grad * weight
        # d normed_j / d x_i = rstd (delta_ij - normed_i normed_j / d)
        inner = (grad_normed * normed).mean(-1, keepdim=True)
        grad_x = grad_normed.sub_(normed * inner).mul_(rstd)
        return grad_x.to(ctx.dtype), grad_weight, None


def _normalise(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    x = _as(x, torch.promote_types(x.dtype, torch.float32))  # bf16/fp16 in fp32 (fp64 stays)
    rstd = x.square().mean(-1, keepdim=True).add_(eps).rsqrt_()
    return x * rstd, rstd


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm of x over its last dim (weight broadcast against x), fp32 inside, in x's dtype."""
    if _needs_grad(x, weight):
        return _RMSNorm.apply(x, weight, eps)
    normed, _ = _normalise(x, eps)
    return _as(normed.mul_(weight), x.dtype)


class RMSNorm(nn.RMSNorm):
    """torch's nn.RMSNorm over the last dim (same parameter, same default eps: fp32's machine epsilon,
    the dtype it computes in), computed by rms_norm."""

    def __init__(self, dim: int):
        super().__init__(dim)

    @property
    def epsilon(self) -> float:
        return torch.finfo(torch.float32).eps if self.eps is None else self.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.epsilon)
