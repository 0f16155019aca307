"""h_attention: the fast path of H-attention, as two torch custom ops, and the choice of implementation.

The fast path is a custom op with its own backward. Forward walks the levels, folding each level's
softmax statistics into per-position accumulators, and keeps only q, k, v, the output and
the log-sum-exp per position. Backward recomputes each level's scores (as FlashAttention
does), so no level's score matrix outlives its chunk of blocks.

Two implementations compute the levels: "eager" (eager.py: batched torch ops, any device) and
"triton" (triton_launch.py: one fused kernel per level and pass, CUDA). The `impl` argument or
the environment variable HTCLI_ATTENTION picks one. "auto" (the default) takes CUDA_IMPLEMENTATION
for CUDA tensors (Triton's kernels where they can take the inputs, eager where they cannot) and eager
elsewhere (CPU, MPS, CI).
"""

from __future__ import annotations

import os

import torch

from htcli import environment
from htcli.attention import eager, graphed
from htcli.attention.geometry import check_inputs, check_level_decay, decay_rows
from htcli.errors import HtcliError

IMPLEMENTATION_VARIABLE = environment.IMPLEMENTATION
IMPLEMENTATIONS = environment.CHOICES[IMPLEMENTATION_VARIABLE]  # ("auto", "eager", "triton")
# read once: a compiled model must not look it up on every call
DEFAULT_IMPLEMENTATION = os.environ.get(IMPLEMENTATION_VARIABLE) or "auto"
# What "auto" takes on CUDA: the Triton kernels, which pass tests/test_cuda.py on an H200 (fp32 oracle,
# bf16 within 1.5x (+1e-3) of eager bf16's error from fp32, two runs the same bits) since their dK, dV
# kernel runs unpipelined (triton_launch.NUM_STAGES).
CUDA_IMPLEMENTATION = "triton"


def check_implementation(name: str | None) -> str:
    """The implementation `name` names (None or "": the default), checked against IMPLEMENTATIONS."""
    chosen = name or DEFAULT_IMPLEMENTATION
    if chosen not in IMPLEMENTATIONS:
        where = "impl" if name else IMPLEMENTATION_VARIABLE
        raise HtcliError(
            f"{where} must be one of {', '.join(IMPLEMENTATIONS)}, got {chosen!r}", fields=(where,)
        )
    return chosen


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_implementation(name: str | None, device_type: str) -> str:
    """The implementation `name` (None, "" or "auto": the default) runs on a device type: "eager" or
    "triton". Auto takes CUDA_IMPLEMENTATION on CUDA where Triton is installed, else eager."""
    name = check_implementation(name)
    if name != "auto":
        return name
    return CUDA_IMPLEMENTATION if device_type == "cuda" and _has_triton() else "eager"


def check_device(device_type: str) -> None:
    """HtcliError where the default implementation (HTCLI_ATTENTION) cannot run on this device type:
    before any work (the first call failed, after a run had written its config and a sample its prompt)."""
    if (
        DEFAULT_IMPLEMENTATION == "triton"
        and device_type != "cuda"
        and os.environ.get("TRITON_INTERPRET") != "1"
    ):
        raise HtcliError(
            f"{IMPLEMENTATION_VARIABLE}=triton needs a CUDA GPU, not {device_type}: use device cuda, or"
            f" {IMPLEMENTATION_VARIABLE}=auto",
            fields=("device",),
        )


def _module(name: str):
    if name == "triton":
        from htcli.attention import triton_launch

        return triton_launch
    return eager


def _implementation(name: str | None, q: torch.Tensor, block_size: int) -> str:
    """The implementation to use for q, checked: "eager" or "triton"."""
    asked = check_implementation(name)
    name = resolve_implementation(asked, q.device.type)
    if name == "eager":
        return name
    if asked == "auto":  # the kernels where they can take q, quietly eager where they cannot
        from htcli.attention import triton_launch

        return "eager" if triton_launch.unsupported(q, block_size) else name
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise HtcliError(
            f"the triton attention needs CUDA tensors, got {q.device.type}: use device cuda",
            fields=("device",),
        )
    try:
        from htcli.attention import triton_launch
    except ImportError:
        raise HtcliError("the triton attention needs Triton: pip install triton") from None
    reason = triton_launch.unsupported(q, block_size)
    if reason:
        raise HtcliError(
            f"the triton attention cannot take {reason}: use the eager one (impl eager)", fields=("impl",)
        )
    return name


# h_attention's core as two custom ops with autograd: torch.compile sees each as one opaque
# call (no tracing into the level loops or the Triton launches) and autograd pairs them.
# q, k, v: (batch * heads, n, d) in the compute dtype; real: (batch * heads, n) 0/1 in the
# stat dtype; decay: None or (batch * heads,) each row's level decay in the stat dtype. The
# forward output is in the stat dtype (eager) or the compute dtype (triton).
@torch.library.custom_op("htcli::h_attention_forward", mutates_args=())
def _forward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    real: torch.Tensor,
    decay: torch.Tensor | None,
    block_size: int,
    causal: bool,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    module = _module(impl)

    def forward(q, k, v, real, decay):
        return tuple(module.forward(q, k, v, real, block_size=block_size, causal=causal, decay=decay))

    if impl == "triton" and q.is_cuda and graphed.wanted(q):
        return graphed.replay("forward", forward, [q, k, v, real, decay], (block_size, causal))
    return forward(q, k, v, real, decay)


@_forward_op.register_fake
def _(q, k, v, real, decay, block_size, causal, impl):
    out_dtype = q.dtype if impl == "triton" else real.dtype
    return q.new_empty(q.shape, dtype=out_dtype), q.new_empty(q.shape[:2], dtype=real.dtype)


@torch.library.custom_op("htcli::h_attention_backward", mutates_args=())
def _backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    real: torch.Tensor,
    decay: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    block_size: int,
    causal: bool,
    impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    module = _module(impl)

    def backward(q, k, v, real, decay, out, lse, grad_out):
        grads = module.backward(
            q, k, v, real, out, lse, grad_out, block_size=block_size, causal=causal, decay=decay
        )
        return tuple(g.to(q.dtype).contiguous() for g in grads)

    tensors = [q, k, v, real, decay, out, lse, grad_out]
    if impl == "triton" and q.is_cuda and graphed.wanted(q):
        return graphed.replay("backward", backward, tensors, (block_size, causal))
    return backward(*tensors)


@_backward_op.register_fake
def _(q, k, v, real, decay, out, lse, grad_out, block_size, causal, impl):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, real, decay, ctx.block_size, ctx.causal, ctx.impl = inputs
    ctx.save_for_backward(q, k, v, real, decay, *output)  # (decay: a constant, no gradient)


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, real, decay, out, lse = ctx.saved_tensors
    grads = _backward_op(
        q, k, v, real, decay, out, lse, grad_out.contiguous(), ctx.block_size, ctx.causal, ctx.impl
    )
    return *grads, None, None, None, None, None


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def h_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block_size: int,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    level_decay=None,
    impl: str | None = None,
) -> torch.Tensor:
    """Hierarchical attention. q, k, v: (batch, heads, n, dim_head), scaled by dim_head**-0.5
    inside; key_padding_mask: (batch, n) bool, True = real token. Returns (batch, heads, n, dim_head).
    level_decay: None, or per head (a sequence of heads numbers >= 0, or such a tensor, best on q's
    device) the bits per level by which each coarser level's scores are lowered (geometry.decay_bias).

    Under autocast fp32 inputs' matrix products run in the autocast dtype (fp64 ones stay fp64, as torch's
    own matmul does); softmax maxima, exponent sums and the final division stay in fp32. impl: "auto",
    "eager" or "triton" (default: $HTCLI_ATTENTION as it was at import, else auto: CUDA_IMPLEMENTATION
    for CUDA tensors, eager elsewhere).
    """
    check_inputs(q, k, v, block_size, key_padding_mask, causal)
    b, h, n, d = q.shape
    check_level_decay(level_decay, h)
    dtype = q.dtype
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type) and dtype == torch.float32:
        dtype = torch.get_autocast_dtype(device_type)
    stat_dtype = torch.promote_types(dtype, torch.float32)
    # contiguous rows: the ops are compiled (torch.compile) for the strides they were traced with
    q, k, v = (t.to(dtype).reshape(b * h, n, d).contiguous() for t in (q, k, v))
    impl = _implementation(impl, q, block_size)
    if key_padding_mask is None:
        real = torch.ones(b * h, n, dtype=stat_dtype, device=q.device)
    else:
        real = key_padding_mask.to(device=q.device, dtype=stat_dtype).repeat_interleave(h, dim=0)
    decay = decay_rows(level_decay, b, stat_dtype, q.device)
    with torch.autocast(device_type, enabled=False):
        out, _ = _forward_op(q, k, v, real, decay, block_size, causal, impl)
    return out.to(q.dtype).view(b, h, n, d)
