"""The H-Transformer-1D language model. Pure torch: no files, no printing.

`HTransformer1D(config)` maps bytes (b, n) to next-byte logits (b, n, 256). For sampling,
`prefill(tokens)` runs the parallel forward over a prompt and returns a `DecodingState`, and
`decode_step(token, state)` continues one position at a time, equal to the parallel forward.

einops legend: b batch, n positions, h heads, d dim_head, e model dim.
"""

from __future__ import annotations

import math
import operator
import time
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from einops import rearrange
from rotary_embedding_torch import RotaryEmbedding
from torch import nn

from htcli import environment
from htcli.attention import HAttentionCache, KVCache, check_block_size, h_attention, static_step
from htcli.attention.static_step import StepPlan
from htcli.fused import ReluSquared, RMSNorm, norm_rotate, norm_rotate_step, rms_norm, rotate
from htcli.reversible import reversible_stack

ATTENTION_KINDS = ("h", "exact")
# a new H-attention model's level_decay: the best of those measured on code and on prose at the
# recipe's budgets (README, "Long context" and "Recipe"); beyond the largest, a coarse level's weight
# is below fp32's resolution anyway
DEFAULT_LEVEL_DECAY = 16.0
MAX_LEVEL_DECAY = 64.0
NORMS = ("rms", "layer")  # RMSNorm, or LayerNorm (with bias)
ACTIVATIONS = ("relu2", "gelu")  # of the feed-forward layers: ReLU squared, or GELU
# the recipe fields a config written before them leaves out: such a model was built like this
# (from_dict fills them in, so an old checkpoint loads as the model it is)
FIRST_RECIPE = {
    "norm": "layer",
    "qk_norm": False,
    "activation": "gelu",
    "logit_softcap": 0.0,
    "zero_init": False,
    "level_decay": 0.0,
}
BYTE_TOKENS = 256  # a byte-level model's vocabulary: what htcli trains, samples and scores
# the largest value of each size field: far beyond any model htcli trains, and small enough that a
# config read from a file cannot ask for absurd allocations (dim 10**9) before anything is checked
LIMITS = {
    "num_tokens": 1 << 20,
    "dim": 1 << 16,
    "depth": 1 << 10,
    "heads": 1 << 10,
    "dim_head": 1 << 12,
    "ff_mult": 64,
    "max_seq_len": 1 << 24,
}


def default_level_decay(attention: str) -> float:
    """The level decay a model of this attention takes where none is given (and that a config derives
    again where another attention is given): DEFAULT_LEVEL_DECAY for H-attention, none for exact."""
    return DEFAULT_LEVEL_DECAY if attention == "h" else 0.0


def given_differences(changed: list[str], asked: dict) -> list[str]:
    """The model fields in changed (those where the model asked differs from another) without a level decay
    that the attention asked derived (it was never given, and naming it sent users to drop it)."""
    if "attention" in changed and asked["level_decay"] == default_level_decay(asked["attention"]):
        return [name for name in changed if name != "level_decay"]
    return changed


@dataclass
class HTransformerConfig:
    """The model's shape; the defaults are the `small` preset (4.9M parameters, 8k context)."""

    num_tokens: int = BYTE_TOKENS  # vocabulary size
    dim: int = 256  # model width
    depth: int = 6  # number of attention + feed-forward layers
    heads: int = 4  # attention heads
    dim_head: int = 64  # width of one head
    ff_mult: int = 4  # feed-forward hidden width = ff_mult * dim
    block_size: int = 64  # H-attention block size N_r (even)
    max_seq_len: int = 8192  # longest input the model accepts
    causal: bool = True  # autoregressive (language model) or bidirectional
    rotary: bool = True  # rotary position embedding on q and k
    reversible: bool = False  # reversible residual stack: activation memory independent of depth
    shift_tokens: bool = True  # half of each position's features from the previous one's (README, Recipe)
    attention: str = "h"  # "h" (hierarchical) or "exact" (softmax attention via SDPA, a baseline)
    # the training recipe's model side (README, "Recipe")
    norm: str = "layer"  # NORMS
    qk_norm: bool = True  # RMSNorm of each head's q and k before attention
    activation: str = "relu2"  # ACTIVATIONS
    logit_softcap: float = 0.0  # logits = c * tanh(logits / c); 0: none
    zero_init: bool = False  # residual output projections start at zero (else small, GPT-2 style)
    # H-attention's locality prior (level_decays): at each coarser level a key weighs 2**-level_decay as
    # much for the first head, 2**-1 as much for the last, the heads between spaced geometrically between
    # the two; 0: none. None: DEFAULT_LEVEL_DECAY for attention "h", 0 for "exact"
    level_decay: float | None = None

    def __post_init__(self) -> None:
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
                raise ValueError(f"{name} must be a positive integer up to {limit:,}, got {value!r}")
        for name in ("causal", "rotary", "reversible", "shift_tokens", "qk_norm", "zero_init"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        check_block_size(self.block_size)
        if self.attention == "h" and self.max_seq_len % self.block_size:  # (exact attention has no blocks)
            raise ValueError(
                f"max_seq_len ({self.max_seq_len}) must be a multiple of block_size ({self.block_size})"
            )
        if self.rotary and (self.dim_head % 2 or self.dim_head < 4):  # (2: a ZeroDivisionError in it)
            raise ValueError(
                f"the rotary-position embedding needs an even dim_head of at least 4, got {self.dim_head}"
            )
        for name, kinds in (("attention", ATTENTION_KINDS), ("norm", NORMS), ("activation", ACTIVATIONS)):
            if getattr(self, name) not in kinds:
                raise ValueError(f"{name} must be one of {', '.join(kinds)}, got {getattr(self, name)!r}")
        cap = self.logit_softcap
        if isinstance(cap, bool) or not isinstance(cap, int | float) or not 0 <= cap < math.inf:
            raise ValueError(f"logit_softcap must be a number >= 0 (0: none), got {cap!r}")
        if self.level_decay is None:
            self.level_decay = default_level_decay(self.attention)
        decay = self.level_decay
        if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 <= decay <= MAX_LEVEL_DECAY:
            raise ValueError(
                f"level_decay must be a number from 0 (none) to {MAX_LEVEL_DECAY}, got {decay!r}"
            )
        if decay and self.attention != "h":
            raise ValueError(f"level_decay is H-attention's: with attention {self.attention} set it to 0")
        self.level_decay = float(decay)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> HTransformerConfig:
        return cls(**complete(data))


def level_decays(config: HTransformerConfig) -> tuple[float, ...] | None:
    """Each head's level decay (bits per level): config.level_decay for the first head, 1 for the last,
    geometrically spaced between; None without level decay."""
    first, heads = config.level_decay, config.heads
    if not first:
        return None
    if heads == 1:
        return (first,)
    return tuple(first ** ((heads - 1 - i) / (heads - 1)) for i in range(heads))


def complete(data: dict) -> dict:
    """A model config dict with the recipe fields that a config written before them lacks set as such
    a model was built (FIRST_RECIPE); ValueError for keys that are not fields."""
    known = {f.name for f in fields(HTransformerConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
    return {**FIRST_RECIPE, **data}


def make_norm(config: HTransformerConfig, dim: int) -> nn.Module:
    return RMSNorm(dim) if config.norm == "rms" else nn.LayerNorm(dim)


class StepLinear:
    """A linear layer as a decode step applies it, to a few rows x (b, in), in the faster of two exact
    forms on this machine: F.linear, or W @ x^T with at least two columns (a single row repeated). Which is
    faster depends on the CPU's BLAS: on one machine of this project the small preset's 25 products of a
    step took 0.46 ms as W @ x^T against 0.93-1.0 ms by F.linear at one row (its matrix-vector path); on
    another, 0.92 ms against 0.26 ms. So the first step of each shape and number of rows times both on the
    layer's weights and keeps the faster for the process (W @ x^T only when 1.3x faster); elsewhere than
    on a CPU, F.linear. The two round differently (by ~1e-6), so on a machine where they are about 1.3x
    apart two runs may choose differently and a sample drawn with one seed may then differ; the
    environment variable HTCLI_STEP_PRODUCT (linear or columns) fixes the choice. Holds the layer's
    parameters (the weight, a view of the bias), no copies: as the DecodingState it belongs to, it is made
    for the weights of one prefill."""

    COLUMNS_MARGIN = 1.3  # W @ x^T is chosen when it takes less than 1/1.3 of F.linear's time
    CHOICE_VARIABLE = environment.STEP_PRODUCT  # linear or columns: that form always, not the faster
    _chosen: dict[tuple, bool] = {}  # (device type, dtype, weight shape, rows) -> W @ x^T is faster

    def __init__(self, linear: nn.Linear):
        self.weight = linear.weight  # (out, in)
        self.bias = linear.bias
        self.bias_column = None if linear.bias is None else linear.bias[:, None]
        self._by_rows: dict[int, bool] = {}  # this layer's choice by number of rows (x's dtype is fixed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        columns = self._by_rows.get(rows)  # (one lookup: a step is bound by its operations)
        if columns is None:
            key = (x.device.type, x.dtype, tuple(self.weight.shape), rows)
            if key not in self._chosen:
                self._chosen[key] = self._choose(x)
            columns = self._by_rows[rows] = self._chosen[key]
        return self.as_columns(x) if columns else F.linear(x, self.weight, self.bias)

    def as_columns(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        columns = (x.expand(2, -1) if rows == 1 else x).contiguous().t()  # (in, max(b, 2))
        if self.bias_column is None:
            out = torch.mm(self.weight, columns)
        else:
            out = torch.addmm(self.bias_column, self.weight, columns)
        return out.t()[:rows]  # (b, out), a strided view

    def _choose(self, x: torch.Tensor) -> bool:
        """Whether this layer's steps at x's shape use W @ x^T (else F.linear)."""
        fixed = environment.read(self.CHOICE_VARIABLE)
        if fixed:
            return fixed == "columns"
        return x.device.type == "cpu" and self._columns_faster(x)

    def _columns_faster(self, x: torch.Tensor, rounds: int = 5, calls: int = 4) -> bool:
        """Whether W @ x^T beats F.linear on x by COLUMNS_MARGIN: the best of `rounds` alternating timings
        of `calls` calls each (a few ms, once per shape in a process)."""
        forms = {"linear": lambda: F.linear(x, self.weight, self.bias), "columns": lambda: self.as_columns(x)}
        best = dict.fromkeys(forms, math.inf)
        for counted in [False] + [True] * rounds:  # the first round warms both up
            for name, form in forms.items():
                started = time.perf_counter()
                for _ in range(calls):
                    form()
                if counted:
                    best[name] = min(best[name], time.perf_counter() - started)
        return best["columns"] * self.COLUMNS_MARGIN < best["linear"]


@dataclass
class BranchState:
    """A residual branch's decoding state: what it needs to continue after the positions seen so far."""

    previous: torch.Tensor | None = None  # token shift: the last position's normalised features (b, e)
    linears: list[StepLinear] = field(default_factory=list)  # the branch's linear layers, for steps


@dataclass
class AttentionState(BranchState):
    cache: HAttentionCache | KVCache | None = None  # the keys and values decoding needs (set by prefill)
    rotary: torch.Tensor | None = None  # Attention.rotary_turns for every position (rotary models)
    # tables made by earlier layers of the same prefill, (freqs, table) pairs: a layer whose frequencies
    # equal one's takes its table (the same for every layer unless frequencies were learned: one table of
    # 256 bytes a position at dim_head 64, 32 MB at 128k, instead of one per layer)
    shared_rotary: list = field(default_factory=list)
    qk_weight: torch.Tensor | None = None  # QK-norm's q and k weights stacked (2, 1, d) (qk_norm models)


@dataclass
class LayerState:
    attention: AttentionState = field(default_factory=AttentionState)
    feedforward: BranchState = field(default_factory=BranchState)


@dataclass
class DecodingState:
    """Where a sequence stands after `prefill` and each `decode_step`: one LayerState per layer. Valid
    for the weights it was prefilled with (its caches hold the keys and values they made)."""

    layers: list[LayerState]
    head: StepLinear | None = None  # the output head, for steps

    @property
    def position(self) -> int:
        """Positions seen so far (the next one's index)."""
        return self.layers[0].attention.cache.t

    def count_step(self) -> None:
        """Count a step taken with a StepPlan (which leaves the caches' counts to its caller)."""
        for layer in self.layers:
            layer.attention.cache.t += 1


def _token_ids(
    tokens: torch.Tensor, mask: torch.Tensor | None, num_tokens: int, *, dims: int = 2
) -> torch.Tensor:
    """tokens (b, n), or (b,) with dims 1, as the embedding takes them (int64 or int32; uint8 bytes and
    other integers as int64); ValueError for another shape or dtype, a mask of another shape (torch said
    "Sizes of tensors must match" from deep inside), or, on the CPU, an id outside 0..num_tokens - 1 (the
    embedding's IndexError; on a GPU the check would wait for the device at every call: its assert says
    it)."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != dims:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        wanted = "(batch, n)" if dims == 2 else "(batch,)"
        raise ValueError(f"tokens must be a tensor of shape {wanted}, got {shape}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be integers (token ids), got {tokens.dtype}")
    if mask is not None and tuple(mask.shape) != tuple(tokens.shape):
        raise ValueError(f"mask must have the tokens' shape {tuple(tokens.shape)}, got {tuple(mask.shape)}")
    tokens = tokens if tokens.dtype in (torch.int64, torch.int32) else tokens.long()
    if tokens.device.type == "cpu" and tokens.numel() and not torch.compiler.is_compiling():
        low, high = int(tokens.min()), int(tokens.max())  # (of int64 or int32: uint16 has no min on the CPU)
        if low < 0 or high >= num_tokens:
            raise ValueError(f"token ids must be 0 to {num_tokens - 1}, got {low if low < 0 else high}")
    return tokens


def _check_step(token: torch.Tensor, state: DecodingState, plan: StepPlan | None) -> None:
    """ValueError unless token holds one token per sequence of state (one would be broadcast to all); a
    static step (plan) needs H-attention caches with room for the position (it checks nothing on the
    device: past the capacity it would return wrong logits, where the ordinary step refuses)."""
    cache = state.layers[0].attention.cache
    batch = (cache.kv if isinstance(cache, HAttentionCache) else cache.k).shape[0]
    if token.shape != (batch,):
        raise ValueError(f"token must hold one token per sequence, shape ({batch},): {tuple(token.shape)}")
    if plan is None:
        return
    if not isinstance(cache, HAttentionCache):
        raise ValueError("a StepPlan steps H-attention caches; an exact-attention model takes ordinary steps")
    cache.check_room()


def is_integer(value) -> bool:
    """Whether value is an integer (numpy's and 0-d tensors' too), not a bool."""
    try:
        operator.index(value)
    except TypeError:
        return False
    return not isinstance(value, bool)


def _whole(value, name: str) -> int:
    """value as an int where it is an integer (see is_integer); ValueError else."""
    if not is_integer(value):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return operator.index(value)


class TokenShift(nn.Module):
    """Mix in neighbours' features: a slice of channels comes from position i-1 (and, when
    not causal, another from i+1). Padded positions contribute zeros."""

    def __init__(self, causal: bool):
        super().__init__()
        self.shifts = (1,) if causal else (1, -1)
        self._first_half: torch.Tensor | None = None  # step's: (e,) True on the channels shifted

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
        """Causal shift of one position x (b, e) given the previous position's features (None at 0): one
        operation (a decode step is bound by their number), the channels of forward's first chunk from
        previous, the others from x."""
        shifted = self._first_half
        if shifted is None or shifted.shape[0] != x.shape[-1] or shifted.device != x.device:
            first = x.chunk(2, dim=-1)[0].shape[-1]
            shifted = self._first_half = torch.arange(x.shape[-1], device=x.device) < first
        return torch.where(shifted, 0.0 if previous is None else previous, x)


class Attention(nn.Module):
    def __init__(self, config: HTransformerConfig):
        super().__init__()
        self.config = config
        inner = config.heads * config.dim_head
        self.to_qkv = nn.Linear(config.dim, 3 * inner, bias=False)
        self.to_out = nn.Linear(inner, config.dim)
        self.rotary = RotaryEmbedding(config.dim_head) if config.rotary else None
        self.q_norm = RMSNorm(config.dim_head) if config.qk_norm else None
        self.k_norm = RMSNorm(config.dim_head) if config.qk_norm else None
        decays = level_decays(config)  # a buffer (not saved: the config holds it), on the model's device
        self.register_buffer(
            "level_decays", None if decays is None else torch.tensor(decays), persistent=False
        )

    def prepared(
        self, t: torch.Tensor, weight: torch.Tensor | None, turns: torch.Tensor | None
    ) -> torch.Tensor:
        """q or k (any layout, last dim d) with QK-norm by weight (None: no QK-norm; q and k stacked
        take their weights stacked) and the rotary embedding by turns (None: none)."""
        if weight is not None and turns is not None:
            return norm_rotate(t, weight, turns, self.q_norm.epsilon)
        if weight is not None:
            return rms_norm(t, weight, self.q_norm.epsilon)
        return t if turns is None else rotate(t, turns)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, state: AttentionState | None = None
    ) -> torch.Tensor:
        """state (prefill only): set to continue after these positions."""
        cfg = self.config
        q, k, v = rearrange(self.to_qkv(x), "b n (three h d) -> three b h n d", three=3, h=cfg.heads)
        turns = self.rotary_turns(q.shape[2], q.device) if self.rotary else None
        q_weight, k_weight = (None, None) if self.q_norm is None else (self.q_norm.weight, self.k_norm.weight)
        q, k = self.prepared(q, q_weight, turns), self.prepared(k, k_weight, turns)
        if state is not None:
            self._start_decoding(q, k, v, state)
        if cfg.attention == "h":
            out = h_attention(
                q,
                k,
                v,
                block_size=cfg.block_size,
                causal=cfg.causal,
                key_padding_mask=mask,
                level_decay=self.level_decays,
            )
        else:
            out = exact_attention(q, k, v, causal=cfg.causal, key_padding_mask=mask)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))

    def _start_decoding(self, q, k, v, state: AttentionState) -> None:
        """The decode cache from this pass's q, k, v (rotary applied), and the rotary tables."""
        b, h, _, d = q.shape
        cfg = self.config
        if cfg.attention == "exact":
            state.cache = KVCache(b, h, d, max_seq_len=cfg.max_seq_len, device=q.device, dtype=k.dtype)
        else:
            state.cache = HAttentionCache(
                b,
                h,
                d,
                block_size=cfg.block_size,
                max_seq_len=cfg.max_seq_len,
                device=q.device,
                dtype=k.dtype,
                level_decay=self.level_decays,
            )
        state.cache.prefill(q, k, v)
        state.linears = [StepLinear(self.to_qkv), StepLinear(self.to_out)]
        state.rotary = self._shared_turns(state.cache.capacity + 1, q.device, state.shared_rotary)
        if self.q_norm is not None:
            state.qk_weight = torch.stack([self.q_norm.weight, self.k_norm.weight])[:, None]

    def _shared_turns(self, length: int, device, shared: list) -> torch.Tensor | None:
        """rotary_turns(length), or an equal table an earlier layer made (shared: (freqs, table) pairs)."""
        if self.rotary is None:
            return None
        freqs = self.rotary.freqs.detach()
        for other, table in shared:
            if table.shape[0] == length and table.device == device and torch.equal(other, freqs):
                return table
        table = self.rotary_turns(length, device)
        shared.append((freqs, table))
        return table

    def rotary_turns(self, length: int, device) -> torch.Tensor:
        """The rotary embedding's rotations at positions 0..length-1, (length, d/2, 2): each pair's
        cos and sin, for fused.rotate and norm_rotate: rotary-embedding-torch's angles (position times
        frequency; it repeats each for the pair (x1, x2) that its rotate_half maps to (-x2, x1))."""
        positions = torch.arange(length, device=device, dtype=torch.float32)
        angles = positions[:, None] * self.rotary.freqs.float()  # in fp32 whatever the module's dtype
        return torch.stack((angles.cos(), angles.sin()), -1)

    def step(self, x: torch.Tensor, state: AttentionState, plan: StepPlan | None = None) -> torch.Tensor:
        """One position x (b, e), the cache's next; plan: the step with static operations (for a CUDA
        graph: the position from plan, and the cache's count of positions left to the caller)."""
        cache = state.cache
        b, h, d = x.shape[0], self.config.heads, self.config.dim_head
        to_qkv, to_out = state.linears
        qkv = to_qkv(x).view(b, 3, h, d)  # the (three h d) order of forward()
        qk, v = qkv[:, :2], qkv[:, 2]
        # q and k together, as few operations as can be: a decode step is bound by their number
        turns = None
        if state.rotary is not None:
            turns = state.rotary[cache.t] if plan is None else state.rotary.index_select(0, plan.index)[0]
        if state.qk_weight is not None and turns is not None:
            qk = norm_rotate_step(qk, state.qk_weight, turns, self.q_norm.epsilon)
        else:
            qk = self.prepared(qk, state.qk_weight, turns)
        if plan is None:
            out = cache.step(qk[:, 0], qk[:, 1], v)
        else:
            out = static_step.step(cache, plan, qk[:, 0], qk[:, 1], v)
        return to_out(out.reshape(b, h * d))


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
            ReluSquared() if config.activation == "relu2" else nn.GELU(),
            nn.Linear(config.ff_mult * config.dim, config.dim),
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, state: BranchState | None = None):
        """state (prefill only): set to continue after these positions."""
        if state is not None:
            state.linears = [StepLinear(self.net[0]), StepLinear(self.net[2])]
        return self.net(x)

    def step(self, x: torch.Tensor, state: BranchState, plan: StepPlan | None = None) -> torch.Tensor:
        first, second = state.linears
        # (a module's forward called directly: its __call__ costs more than a small op)
        return second(self.net[1].forward(first(x)))


class PreNorm(nn.Module):
    """The norm (RMSNorm or LayerNorm), optional token shift, then the wrapped function: one residual
    branch."""

    def __init__(self, config: HTransformerConfig, fn: nn.Module):
        super().__init__()
        self.norm = make_norm(config, config.dim)
        self.shift = TokenShift(config.causal) if config.shift_tokens else None
        self.fn = fn

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, state: BranchState | None = None
    ) -> torch.Tensor:
        """state (prefill only): set to continue after these positions."""
        x = self.norm(x)
        if self.shift is not None:
            if state is not None:  # (a copy: a view would keep the whole prefill's activation)
                state.previous = x[:, -1].clone()
            x = self.shift(x, mask)
        return self.fn(x, mask, state)

    def step(self, x: torch.Tensor, state: BranchState, plan: StepPlan | None = None) -> torch.Tensor:
        """One position x (b, e), continuing from state; plan: as Attention.step's."""
        x = self.norm.forward(x)
        if self.shift is not None:
            shifted = self.shift.step(x, state.previous)
            if plan is None:
                state.previous = x
            else:  # (in place: a replayed graph reads and writes the same memory every step)
                state.previous.copy_(x)
            x = shifted
        return self.fn.step(x, state, plan)


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
        states: list[LayerState] | None = None,
    ) -> torch.Tensor:
        """states (prefill only): one LayerState per layer, set to continue after these positions.
        save_memory: a reversible stack keeps no activations for backward (RevNet)."""
        if self.reversible and save_memory and torch.is_grad_enabled() and states is None:
            return reversible_stack([(f, g) for f, g in self.blocks], x, mask)
        x1 = x2 = x
        for (f, g), state in zip(self.blocks, states or [None] * len(self.blocks)):
            f_state, g_state = (state.attention, state.feedforward) if state else (None, None)
            if self.reversible:  # the same coupling as reversible_stack, through ordinary autograd
                x1 = x1 + f(x2, mask, f_state)
                x2 = x2 + g(x1, mask, g_state)
            else:
                x1 = x1 + f(x1, mask, f_state)
                x1 = x1 + g(x1, mask, g_state)
        return (x1 + x2) / 2 if self.reversible else x1

    def step(self, x: torch.Tensor, states: list[LayerState], plan: StepPlan | None = None) -> torch.Tensor:
        """One position x (b, e) through every layer, continuing from states; plan: as Attention.step's."""
        x1 = x2 = x
        for (f, g), state in zip(self.blocks, states):
            if self.reversible:
                x1 = x1 + f.step(x2, state.attention, plan)
                x2 = x2 + g.step(x1, state.feedforward, plan)
            else:
                x1 = x1 + f.step(x1, state.attention, plan)
                x1 = x1 + g.step(x1, state.feedforward, plan)
        return (x1 + x2) / 2 if self.reversible else x1


class HTransformer1D(nn.Module):
    def __init__(self, config: HTransformerConfig):
        super().__init__()
        self.config = config
        self.token_emb = nn.Embedding(config.num_tokens, config.dim)
        self.layers = Layers(config)
        self.norm = make_norm(config, config.dim)
        self.to_logits = nn.Linear(config.dim, config.num_tokens, bias=False)
        self.apply(self._init_weights)
        # residual output projections: zero (each branch starts switched off) or scaled down so the
        # stack starts near identity (GPT-2)
        for name, param in self.named_parameters():
            if name.endswith("to_out.weight") or name.endswith("net.2.weight"):
                if config.zero_init:
                    nn.init.zeros_(param)
                else:
                    nn.init.normal_(param, std=0.02 / math.sqrt(2 * config.depth))

    def logits(self, x: torch.Tensor, head: StepLinear | None = None) -> torch.Tensor:
        """Next-byte logits from the last layer's output (soft-capped where the config says); head:
        the output head as a decode step applies it."""
        logits = (head or self.to_logits)(self.norm(x))
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

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
        return self.logits(x)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (b, n) of an integer dtype (bytes as uint8 too), mask (b, n) bool True = real token ->
        logits (b, n, num_tokens)."""
        return self.forward_embeddings(self.token_emb(_token_ids(tokens, mask, self.config.num_tokens)), mask)

    @property
    def supports_decode_cache(self) -> bool:
        """Exact incremental decoding: a causal model (H-attention's cache, or exact attention's KV cache)."""
        return self.config.causal

    @torch.inference_mode()  # (not just no_grad: each of the many small ops of decoding costs less)
    def prefill(self, tokens: torch.Tensor, copies: int = 1) -> tuple[torch.Tensor, DecodingState]:
        """The parallel forward over a prompt (b, n): its logits, and the state to decode on from.
        copies > 1 (a prompt of one sequence, b = 1): the state of that many sequences, each this one
        (several samples of one prompt; the forward runs once), and the logits of each (copies, n)."""
        if not self.supports_decode_cache:
            raise ValueError("incremental decoding needs a causal model")
        tokens = _token_ids(tokens, None, self.config.num_tokens)
        b, n = tokens.shape
        if not 1 <= n <= self.config.max_seq_len:
            raise ValueError(f"prefill takes 1 to max_seq_len ({self.config.max_seq_len}) tokens, got {n}")
        if b < 1:  # (a reshape's error deep inside)
            raise ValueError("prefill takes at least one sequence, got a batch of 0")
        copies = _whole(copies, "copies")  # (2.5: an error of repeat(); numpy's integers are taken)
        if copies < 1 or copies > 1 and b != 1:
            raise ValueError(
                f"copies of a prompt need a prompt of one sequence and copies >= 1, got {b}, {copies}"
            )
        shared: list = []  # the layers' rotary tables (AttentionState.shared_rotary)
        layers = [LayerState(AttentionState(shared_rotary=shared)) for _ in self.layers.blocks]
        state = DecodingState(layers, StepLinear(self.to_logits))
        x = self.layers(self.token_emb(tokens), None, states=state.layers)
        if copies > 1:
            for layer in state.layers:
                layer.attention.cache.repeat(copies)
                for branch in (layer.attention, layer.feedforward):
                    if branch.previous is not None:
                        branch.previous = branch.previous.repeat(copies, 1)
        logits = self.logits(x)
        return (logits.expand(copies, -1, -1) if copies > 1 else logits), state

    @torch.inference_mode()
    def decode_step(
        self, token: torch.Tensor, state: DecodingState, plan: StepPlan | None = None
    ) -> torch.Tensor:
        """Logits (b, num_tokens) for the position after token (b,), fed at state.position; updates state.
        plan (H-attention models): the step with the same operations at every position, from
        plan.position, which it advances; the caller then counts the step (state.count_step())."""
        if isinstance(token, torch.Tensor):  # (its shape against the state's first: "one token per sequence")
            _check_step(token, state, plan)
        if plan is None and state.position >= self.config.max_seq_len:  # (a cache's room can be more)
            raise ValueError(
                f"the context is full: {state.position} positions of max_seq_len {self.config.max_seq_len};"
                " re-prefill a shorter context to go on (the model reads no more than max_seq_len)"
            )
        token = _token_ids(token, None, self.config.num_tokens, dims=1)
        if plan is not None:
            plan.update()
        x = self.layers.step(self.token_emb(token), state.layers, plan)
        if plan is not None:
            plan.advance()
        return self.logits(x, state.head)
