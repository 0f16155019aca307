"""The H-Transformer-1D language model. Pure torch: no files, no printing.

einops legend: b batch, n positions, h heads, d dim_head, e model dim.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from einops import rearrange
from rotary_embedding_torch import RotaryEmbedding
from torch import nn

from htcli.attention import h_attention
from htcli.decode import HAttentionCache

ATTENTION_KINDS = ("h", "exact")


@dataclass
class HTransformerConfig:
    num_tokens: int = 256  # vocabulary size (256 for bytes)
    dim: int = 512  # model width
    depth: int = 6  # number of attention + feed-forward layers
    heads: int = 8  # attention heads
    dim_head: int = 64  # width of one head
    ff_mult: int = 4  # feed-forward hidden width = ff_mult * dim
    block_size: int = 128  # H-attention block size N_r (even)
    max_seq_len: int = 8192  # longest input the model accepts
    causal: bool = True  # autoregressive (language model) or bidirectional
    rotary: bool = True  # rotary position embedding on q and k
    reversible: bool = False  # reversible residual stack: activation memory independent of depth
    shift_tokens: bool = False  # shift part of each token's features from its neighbour(s)
    attention: str = "h"  # "h" (hierarchical) or "exact" (softmax attention via SDPA, a baseline)

    def __post_init__(self) -> None:
        for name in ("num_tokens", "dim", "depth", "heads", "dim_head", "ff_mult", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.block_size < 2 or self.block_size % 2:
            raise ValueError(f"block_size must be an even number >= 2, got {self.block_size}")
        if self.max_seq_len % self.block_size:
            raise ValueError(
                f"max_seq_len ({self.max_seq_len}) must be a multiple of block_size ({self.block_size})"
            )
        if self.rotary and self.dim_head % 2:
            raise ValueError(f"rotary embedding needs an even dim_head, got {self.dim_head}")
        if self.attention not in ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {self.attention!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> HTransformerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**data)


class TokenShift(nn.Module):
    """Mix in neighbours' features: a slice of channels comes from position i-1 (and, when
    not causal, another from i+1). Padded positions contribute zeros."""

    def __init__(self, causal: bool):
        super().__init__()
        self.shifts = (1,) if causal else (1, -1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is not None:
            x = x * mask[..., None].to(x.dtype)
        chunks = list(x.chunk(len(self.shifts) + 1, dim=-1))
        for index, shift in enumerate(self.shifts):
            chunk = chunks[index]
            pad = (0, 0, shift, 0) if shift > 0 else (0, 0, 0, -shift)
            shifted = F.pad(chunk, pad)
            chunks[index] = shifted[:, : x.shape[1]] if shift > 0 else shifted[:, -shift:]
        return torch.cat(chunks, dim=-1)

    def step(self, x: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        """Causal shift of one token x (b, e) given the previous token's features (None at 0)."""
        chunks = list(x.chunk(2, dim=-1))
        chunks[0] = torch.zeros_like(chunks[0]) if previous is None else previous.chunk(2, dim=-1)[0]
        return torch.cat(chunks, dim=-1)


class Attention(nn.Module):
    def __init__(self, config: HTransformerConfig):
        super().__init__()
        self.config = config
        inner = config.heads * config.dim_head
        self.to_qkv = nn.Linear(config.dim, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, config.dim)
        self.rotary = RotaryEmbedding(config.dim_head) if config.rotary else None

    def rotate(self, t: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Rotary embedding on q or k (b h n d); positions computed in fp32 whatever t's dtype."""
        if self.rotary is None:
            return t
        return self.rotary.rotate_queries_or_keys(t.float(), offset=offset).to(t.dtype)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qkv = self.to_qkv(x)
        q, k, v = rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.config.heads)
        return q, k, v

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, state: dict | None = None) -> torch.Tensor:
        cfg = self.config
        q, k, v = self.project(x)
        q, k = self.rotate(q), self.rotate(k)
        if state is not None:  # prefill: the decode cache starts from this pass's q, k, v
            b, h, _, d = q.shape
            cache = HAttentionCache(
                b,
                h,
                d,
                block_size=cfg.block_size,
                max_seq_len=cfg.max_seq_len,
                device=q.device,
                dtype=k.dtype,
            )
            cache.prefill(q, k, v)
            state["cache"] = cache
            state["rotary"] = self.rotary_tables(cache.capacity + 1, q.device) if self.rotary else None
        if cfg.attention == "h":
            out = h_attention(q, k, v, block_size=cfg.block_size, causal=cfg.causal, key_padding_mask=mask)
        else:
            out = exact_attention(q, k, v, causal=cfg.causal, key_padding_mask=mask)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))

    def rotary_tables(self, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin (length, d), fp32, of the rotary embedding at positions
        0..length-1, for `step`: x rotated = x * cos + swap_pairs(x) * sin, as rotate() does."""
        freqs = self.rotary(self.rotary.get_seq_pos(length, device=device, dtype=torch.float32))
        sin = freqs.sin()
        sin[:, 0::2] = -sin[:, 0::2]  # rotate_half maps the pair (x1, x2) to (-x2, x1)
        return freqs.cos(), sin

    def step(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        """One token x (b, e) at the cache's next position."""
        cache: HAttentionCache = state["cache"]
        b, h, d = x.shape[0], self.config.heads, self.config.dim_head
        qkv = self.to_qkv(x).view(b, 3, h, d)  # the (three h d) order of project()
        qk, v = qkv[:, :2], qkv[:, 2]
        if state["rotary"] is not None:  # q and k together, few ops: a decode step is launch-bound on a GPU
            cos, sin = (table[cache.t] for table in state["rotary"])
            qk = qk.float()
            swapped = qk.view(b, 2, h, d // 2, 2).flip(-1).view(b, 2, h, d)
            qk = (qk * cos + swapped * sin).to(qkv.dtype)
        out = cache.step(qk[:, 0], qk[:, 1], v)
        return self.to_out(out.reshape(b, h * d))


def exact_attention(q, k, v, *, causal: bool, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
    """Full softmax attention through PyTorch's SDPA (the baseline H-attention is measured against)."""
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    allowed = key_padding_mask[:, None, None, :]
    if causal:
        n = q.shape[-2]
        allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    # a row that may see nothing would be NaN: let it see everything, then zero it
    seen = allowed.any(-1, keepdim=True)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~seen)
    return out * seen.to(out.dtype)


class FeedForward(nn.Module):
    def __init__(self, config: HTransformerConfig):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(config.dim, config.ff_mult * config.dim),
            nn.GELU(),
            nn.Linear(config.ff_mult * config.dim, config.dim),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, state: dict | None = None) -> torch.Tensor:
        return self.net(x)

    def step(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        return self.net(x)


class PreNorm(nn.Module):
    """LayerNorm, optional token shift, then the wrapped function: one residual branch."""

    def __init__(self, config: HTransformerConfig, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(config.dim)
        self.shift = TokenShift(config.causal) if config.shift_tokens else None
        self.fn = fn

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, state: dict | None = None) -> torch.Tensor:
        """state (decoding only): receives what step() needs to continue after this sequence."""
        x = self.norm(x)
        if self.shift is not None:
            if state is not None:
                state["previous"] = x[:, -1]
            x = self.shift(x, mask)
        return self.fn(x, mask, state)

    def step(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        """One token x (b, e), continuing from state."""
        x = self.norm(x)
        if self.shift is not None:
            x, state["previous"] = self.shift.step(x, state.get("previous")), x
        return self.fn.step(x, state)


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


class Layers(nn.Module):
    """The residual stack: plain (x += f(x); x += g(x)) or reversible (two coupled streams)."""

    def __init__(self, config: HTransformerConfig):
        super().__init__()
        self.reversible = config.reversible
        self.blocks = nn.ModuleList(
            nn.ModuleList([PreNorm(config, Attention(config)), PreNorm(config, FeedForward(config))])
            for _ in range(config.depth)
        )

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        *,
        save_memory: bool = True,
        states: list[tuple[dict, dict]] | None = None,
    ):
        """states (decoding only): one (attention, feed-forward) pair of dicts per layer, filled
        with what step() needs to continue after this sequence."""
        if not self.reversible:
            states = states or [(None, None)] * len(self.blocks)
            for (f, g), (f_state, g_state) in zip(self.blocks, states):
                x = x + f(x, mask, f_state)
                x = x + g(x, mask, g_state)
            return x
        x = torch.cat([x, x], dim=-1)
        blocks = [(f, g) for f, g in self.blocks]
        filling = states is not None  # prefill: the states are filled on the way
        if save_memory and torch.is_grad_enabled() and not filling:
            params = [p for f, g in blocks for p in (*f.parameters(), *g.parameters()) if p.requires_grad]
            x = _ReversibleFunction.apply(x, blocks, mask, *params)
        else:  # the same coupling through ordinary autograd
            states = states or [(None, None)] * len(blocks)
            x1, x2 = x.chunk(2, dim=-1)
            for (f, g), (f_state, g_state) in zip(blocks, states):
                x1 = x1 + f(x2, mask, f_state)
                x2 = x2 + g(x1, mask, g_state)
            x = torch.cat([x1, x2], dim=-1)
        x1, x2 = x.chunk(2, dim=-1)
        return (x1 + x2) / 2

    def step(self, x: torch.Tensor, states: list[tuple[dict, dict]]) -> torch.Tensor:
        """One token x (b, e) through every layer, continuing from states."""
        if not self.reversible:
            for (f, g), (f_state, g_state) in zip(self.blocks, states):
                x = x + f.step(x, f_state)
                x = x + g.step(x, g_state)
            return x
        x1 = x2 = x
        for (f, g), (f_state, g_state) in zip(self.blocks, states):
            x1 = x1 + f.step(x2, f_state)
            x2 = x2 + g.step(x1, g_state)
        return (x1 + x2) / 2


class HTransformer1D(nn.Module):
    def __init__(self, config: HTransformerConfig):
        super().__init__()
        self.config = config
        self.token_emb = nn.Embedding(config.num_tokens, config.dim)
        self.layers = Layers(config)
        self.norm = nn.LayerNorm(config.dim)
        self.to_logits = nn.Linear(config.dim, config.num_tokens, bias=False)
        self.apply(self._init_weights)
        # residual output projections scaled down so the stack starts near identity (GPT-2)
        for name, param in self.named_parameters():
            if name.endswith("to_out.weight") or name.endswith("net.2.weight"):
                nn.init.normal_(param, std=0.02 / math.sqrt(2 * config.depth))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def forward_embeddings(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, *, save_memory: bool = True
    ) -> torch.Tensor:
        """Logits from token embeddings x (b, n, e): lets tests differentiate w.r.t. the input."""
        n = x.shape[1]
        if n > self.config.max_seq_len:
            raise ValueError(f"input length {n} exceeds max_seq_len {self.config.max_seq_len}")
        x = self.layers(x, mask, save_memory=save_memory)
        return self.to_logits(self.norm(x))

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (b, n) int64, mask (b, n) bool True = real token -> logits (b, n, num_tokens)."""
        return self.forward_embeddings(self.token_emb(tokens), mask)

    @property
    def supports_decode_cache(self) -> bool:
        """Exact incremental decoding needs causal H-attention."""
        return self.config.causal and self.config.attention == "h"

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor) -> tuple[torch.Tensor, list]:
        """The parallel forward over a prompt (b, n), also returning the decoding state after it."""
        if not self.supports_decode_cache:
            raise ValueError("incremental decoding needs a causal model with H-attention")
        n = tokens.shape[1]
        if not 1 <= n <= self.config.max_seq_len:
            raise ValueError(f"prefill takes 1 to max_seq_len ({self.config.max_seq_len}) tokens, got {n}")
        states = [({}, {}) for _ in self.layers.blocks]
        x = self.layers(self.token_emb(tokens), None, states=states)
        return self.to_logits(self.norm(x)), states

    @torch.no_grad()
    def decode_step(self, token: torch.Tensor, states: list) -> torch.Tensor:
        """Logits (b, num_tokens) for the next position after feeding token (b,); updates states."""
        x = self.layers.step(self.token_emb(token), states)
        return self.to_logits(self.norm(x))
