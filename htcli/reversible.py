"""Reversible residual coupling (RevNet): y1 = x1 + f(x2), y2 = x2 + g(y1), block after block.

Backward rebuilds each block's inputs from its outputs instead of keeping them, so the activation
memory of a reversible stack does not grow with its depth.
"""

from __future__ import annotations

import torch
from torch import nn


def reversible_stack(blocks: list[tuple[nn.Module, nn.Module]], x: torch.Tensor, mask) -> torch.Tensor:
    """The coupled blocks applied to two copies of x (b, n, e); returns the mean of the two streams.
    f(x, mask) and g(x, mask) are each block's two residual branches."""
    params = [p for f, g in blocks for p in (*f.parameters(), *g.parameters()) if p.requires_grad]
    y = _ReversibleFunction.apply(torch.cat([x, x], dim=-1), blocks, mask, *params)
    y1, y2 = y.chunk(2, dim=-1)
    return (y1 + y2) / 2


class _ReversibleFunction(torch.autograd.Function):
    """Runs coupled blocks y1 = x1 + f(x2), y2 = x2 + g(y1) keeping only the final output;
    backward reconstructs each block's input from its output (RevNet), so activation
    memory does not grow with depth."""

    @staticmethod
    def forward(ctx, x, blocks, mask, *params):
        ctx.blocks, ctx.mask = blocks, mask
        # backward recomputes the blocks: under the same autocast as the forward
        device = x.device.type
        ctx.autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        with torch.no_grad():
            x1, x2 = x.chunk(2, dim=-1)
            for f, g in blocks:
                x1 = x1 + f(x2, mask)
                x2 = x2 + g(x1, mask)
            y = torch.cat([x1, x2], dim=-1)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        blocks, mask = ctx.blocks, ctx.mask
        y1, y2 = y.chunk(2, dim=-1)
        dy1, dy2 = dy.chunk(2, dim=-1)
        grads = {}
        device, dtype, enabled = ctx.autocast
        with torch.autocast(device, dtype=dtype, enabled=enabled):
            dx = _reverse_blocks(blocks, mask, y1, y2, dy1, dy2, grads)
        param_list = [p for f, g in blocks for p in (*f.parameters(), *g.parameters()) if p.requires_grad]
        return (dx, None, None, *[grads.get(p) for p in param_list])


def _reverse_blocks(blocks, mask, y1, y2, dy1, dy2, grads: dict) -> torch.Tensor:
    """Walk the coupled blocks backwards, rebuilding inputs and accumulating grads; returns dx."""
    for f, g in reversed(blocks):
        with torch.enable_grad():
            z1 = y1.detach().requires_grad_()
            g_out = g(z1, mask)
            g_params = [p for p in g.parameters() if p.requires_grad]
            dz1, *dg = torch.autograd.grad(g_out, [z1, *g_params], dy2, allow_unused=True)
        with torch.no_grad():
            x2 = y2 - g_out
            dx1 = dy1 + dz1
        with torch.enable_grad():
            z2 = x2.detach().requires_grad_()
            f_out = f(z2, mask)
            f_params = [p for p in f.parameters() if p.requires_grad]
            dz2, *df = torch.autograd.grad(f_out, [z2, *f_params], dx1, allow_unused=True)
        with torch.no_grad():
            x1 = y1 - f_out
            dx2 = dy2 + dz2
        for p, grad in zip([*g_params, *f_params], [*dg, *df]):
            if grad is not None:
                grads[p] = grads[p] + grad if p in grads else grad
        y1, y2, dy1, dy2 = x1, x2, dx1, dx2
    return torch.cat([dy1, dy2], dim=-1)
