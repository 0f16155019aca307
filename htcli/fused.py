"""The model's elementwise pieces as few tensor operations as their math needs.

Autograd through torch's composites costs many passes and tensors on a CPU (torch's RMSNorm is ~20
operations there), and a decode step is bound by the number of operations it launches, not by its
arithmetic. Each function here is one autograd Function with a hand-written backward (checked by
gradcheck in the tests), and takes a shortcut without autograd when no gradient is wanted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from htcli.device import without_autocast


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


def _turn(x: torch.Tensor, turns: torch.Tensor, *, back: bool = False) -> torch.Tensor:
    """x (..., n, d), contiguous, with each pair (x0, x1) rotated by its position's and pair's angle,
    given as turns (n, d/2, 2): (cos, sin) (back: by minus the angle, the inverse rotation). One
    complex product, (x0 + i x1)(cos + i sin), a new tensor; under torch.compile in real arithmetic
    (the compiler neither traces complex views nor generates code for complex numbers)."""
    if not torch.compiler.is_compiling():
        turn = torch.view_as_complex(turns)
        pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))  # x0 + i x1, x2 + i x3, ...
        return torch.view_as_real(pairs * (turn.conj() if back else turn)).flatten(-2)
    cos, sin = turns.unbind(-1)
    sin = -sin if back else sin
    x0, x1 = x.unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), -1).flatten(-2)


def _rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    """1 / sqrt(mean(x^2) + eps) over the last dim, keepdim. The sum of squares as a batched matrix
    product: on a CPU, 4x faster than a reduction over a short last dim (a head's 32 or 64)."""
    with without_autocast(x.device.type):
        squares = (x.unsqueeze(-2) @ x.unsqueeze(-1)).squeeze(-1)
    return squares.div_(x.shape[-1]).add_(eps).rsqrt_()


def _promoted(x: torch.Tensor) -> torch.Tensor:
    return _as(x, torch.promote_types(x.dtype, torch.float32))  # bf16/fp16 in fp32 (fp64 stays)


def _dense(x: torch.Tensor) -> torch.Tensor:
    """x promoted and contiguous: q and k are slices of one projection, and a pass over such a
    strided slice takes ~10x longer on a CPU than the copy that makes it contiguous."""
    return _promoted(x).contiguous()


class _Rotate(torch.autograd.Function):
    """The rotary embedding as complex products: y = R x, one pass forward, and the rotation's
    transpose (the conjugate turns) one pass backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(turns)
        ctx.dtype = x.dtype
        return _as(_turn(_dense(x), turns), x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (turns,) = ctx.saved_tensors
        return _as(_turn(_dense(grad), turns, back=True), ctx.dtype), None


class _NormRotate(torch.autograd.Function):
    """RMSNorm then the rotary embedding, y = rstd * R(weight * x) (the rotation R commutes with the
    row's scalar rstd): a reduction and three passes forward, two reductions and five passes backward,
    where the two apart made seven and ten. weight: (d,)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, turns: torch.Tensor, eps: float) -> torch.Tensor:
        xf = _dense(x)
        rstd = _rstd(xf, eps)
        ctx.save_for_backward(xf, weight, turns, rstd)
        ctx.dtype = x.dtype
        return _as(_turn(xf * weight, turns).mul_(rstd), x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xf, weight, turns, rstd = ctx.saved_tensors
        d = xf.shape[-1]
        rotated_back = _turn(_dense(grad), turns, back=True)  # R^T grad
        # with h = weight * R^T grad: dL/dx = rstd * (h - x * rstd^2 * <h, x> / d)
        product = xf * rotated_back
        with without_autocast(xf.device.type):  # (a reversible stack's backward runs under autocast)
            coef = (product @ weight.to(xf.dtype))[..., None].mul_(rstd.square()).div_(-d)
            grad_weight = (rstd.reshape(1, -1) @ product.reshape(-1, d)).reshape(weight.shape)
        grad_x = rotated_back.mul_(weight).addcmul_(xf, coef).mul_(rstd)
        return _as(grad_x, ctx.dtype), grad_weight.to(weight.dtype), None, None


def rotate(x: torch.Tensor, turns: torch.Tensor) -> torch.Tensor:
    """x (..., n, d) with the rotary embedding whose rotations at positions 0..n-1 are turns (n, d/2, 2),
    each pair's cos and sin (model.Attention.rotary_turns): each pair (x0, x1) becomes the complex
    product (x0 + i x1)(cos + i sin). fp32 inside whatever x's dtype, returned in x's. Also one
    position at a time: x (..., d) with turns (d/2, 2)."""
    if _needs_grad(x):
        return _Rotate.apply(x, turns)
    return _as(_turn(_dense(x), turns), x.dtype)


def norm_rotate(x: torch.Tensor, weight: torch.Tensor, turns: torch.Tensor, eps: float) -> torch.Tensor:
    """rotate(rms_norm(x, weight, eps), turns) in fewer passes (QK-norm then rotary, as attention needs
    them). Without autograd, weight may be any shape that broadcasts against x (q and k stacked)."""
    if _needs_grad(x, weight):
        return _NormRotate.apply(x, weight, turns, eps)
    xf = _dense(x)
    return _as(_turn(xf * weight, turns).mul_(_rstd(xf, eps)), x.dtype)


def norm_rotate_step(x: torch.Tensor, weight: torch.Tensor, turns: torch.Tensor, eps: float | None):
    """norm_rotate for a decode step's q and k (one position, no autograd) in as few operations as can
    be, a step being bound by their number: torch's RMSNorm (one call from here, though on a CPU torch
    2.13 runs it as ~15 operations; the forms with fewer tried were not measurably faster on a noisy
    machine), the weight, one complex product. The same result to rounding."""
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    normed = F.rms_norm(xf, (xf.shape[-1],), eps=eps) * weight
    rotated = torch.view_as_complex(normed.unflatten(-1, (-1, 2))) * torch.view_as_complex(turns)
    return _as(torch.view_as_real(rotated).flatten(-2), x.dtype)


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
    x = _promoted(x)
    rstd = _rstd(x, eps)
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
