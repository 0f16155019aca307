"""Check and tune the Triton H-attention kernels (tiles, warps, pipelining) on a CUDA GPU.

For each kernel's variants: whether it is deterministic and as accurate as eager attention, and its
time; a table, SDPA's time beside, and the fastest good setting as HTCLI_TRITON_TUNING JSON. Exits 1
where a kernel has no good variant (nothing written).

    python examples/triton_sweep.py [--seq-len 8192] [--out tuning.json]

(`TRITON_INTERPRET=1 python examples/triton_sweep.py --device cpu --dtype fp16 --seq-len 128 --batch-size 1
--heads 1 --dim-head 16 --block-size 16 --variants 1` runs it through Triton's interpreter, as a smoke test:
the interpreter's bf16 is not bf16, so every variant would be inaccurate; without the variable set,
`--device cpu` is refused.)

One kernel at a time, the others at their best so far: the forward kernel by forward time, then the
dq and dk/dv kernels by forward+backward time, each summed over non-causal and causal (`--mode` one
of them), bf16. A variant is good when two runs give the same bits (with the allocator's free memory
filled with NaN between them) and its output and gradients are within 1.5x (+1e-3) of eager bf16's
relative error against eager fp32 attention.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from htcli.attention import graphed, h_attention
from htcli.attention import triton_launch as launch

# (largest query tile, largest key tile, warps, pipelining stages; 0: Triton's default); the first
# of each list is today's setting
VARIANTS = {  # (the earlier defaults, which the H200 found slower: forward 128x64 8 warps pipelined, dQ
    # 128x32 8 warps, dK/dV 32x128 8 warps, both unpipelined)
    "forward": [(64, 64, 4, 1), (64, 64, 4, 0), (128, 64, 8, 0), (64, 32, 4, 1), (32, 64, 4, 1)],
    "dq": [(64, 32, 4, 1), (128, 32, 8, 1), (64, 64, 4, 1), (32, 32, 4, 1), (64, 16, 4, 1)],
    "dkdv": [(64, 64, 4, 1), (32, 128, 8, 1), (32, 64, 4, 1), (64, 32, 4, 1), (128, 64, 8, 1)],
}
MODES = (False, True)  # non-causal, causal
TENSORS = ("out", "dq", "dk", "dv")  # what each mode's run gives
DTYPE = torch.bfloat16  # of the kernels (--dtype)


def _inputs(args):
    gen = torch.Generator(device=args.device).manual_seed(0)
    shape = (args.batch_size, args.heads, args.seq_len, args.dim_head)
    return [torch.randn(shape, device=args.device, generator=gen) for _ in range(4)]


def _run(tensors, block_size, causal, backward, *, impl="triton", dtype=None, attend=None):
    q, k, v, grad = (t.detach().to(dtype or DTYPE) for t in tensors)
    inputs = [t.requires_grad_(backward) for t in (q, k, v)]
    if attend is None:
        out = h_attention(*inputs, block_size=block_size, causal=causal, impl=impl)
    else:
        out = attend(*inputs, is_causal=causal)
    if not backward:
        return [out]
    return [out, *torch.autograd.grad(out, inputs, grad)]


def _all_modes(tensors, args, **options) -> list[torch.Tensor]:
    return [t.float() for causal in MODES for t in _run(tensors, args.block_size, causal, True, **options)]


def _errors(got, reference) -> list[float]:
    return [((a - b).norm() / b.norm()).item() for a, b in zip(got, reference)]


def _milliseconds(tensors, args, backward, attend=None) -> float:
    """Summed over the modes; inputs cast once, outside the timed calls."""
    cast = [t.to(DTYPE) for t in tensors]
    total = 0.0
    for causal in MODES:
        call = lambda c=causal: _run(cast, args.block_size, c, backward, attend=attend)  # noqa: E731
        if args.device == "cuda":
            total += do_bench(call, warmup=10, rep=60)
        else:  # the interpreter: one call
            started = time.perf_counter()
            call()
            total += (time.perf_counter() - started) * 1e3
    return total


def _set(kind: str, variant: tuple[int, int, int, int]) -> None:
    """Launch the kernel of this kind with this variant from now on (graphs captured with the variant
    before are dropped: a replay would run their kernels, and every variant would time as the first)."""
    graphed.clear()
    launch.MAX_TILES[kind] = variant[:2]
    launch.NUM_WARPS[kind] = variant[2]
    if variant[3]:
        launch.NUM_STAGES[kind] = variant[3]
    else:
        launch.NUM_STAGES.pop(kind, None)


def _check(tensors, args, reference, bars) -> str:
    """'' if the current setting is good, else what is wrong with it."""
    first = _all_modes(tensors, args)
    if args.device == "cuda":
        torch.cuda.empty_cache()
        junk = torch.full((1 << 28,), float("nan"), device="cuda")  # freed blocks now hold NaN
        del junk
    second = _all_modes(tensors, args)
    names = [f"{name} {'causal' if causal else 'non-c.'}" for causal in MODES for name in TENSORS]
    differ = [
        f"{name} by {(a - b).abs().max().item():.1e}"
        for name, a, b in zip(names, first, second)
        if not torch.equal(a, b)
    ]
    if differ:
        return f"NOT DETERMINISTIC ({'; '.join(differ)})"
    errors = _errors(first, reference)
    bad = [f"{name} {e:.1e} > {bar:.1e}" for name, e, bar in zip(names, errors, bars) if not e <= bar]
    return f"INACCURATE ({'; '.join(bad)})" if bad else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim-head", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--max-seconds", type=float, default=150.0, help="stop trying variants after this")
    parser.add_argument("--variants", type=int, help="try only the first N variants of each kernel")
    parser.add_argument("--out", help="write the fastest good setting (JSON) here")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16"), help="fp16 in the interpreter")
    parser.add_argument("--mode", default="both", choices=("both", "causal", "non-causal"))
    args = parser.parse_args()
    sizes = (args.seq_len, args.batch_size, args.heads, args.dim_head, args.block_size, args.variants or 1)
    if min(sizes) < 1 or not args.max_seconds > 0:
        parser.error(
            "--seq-len, --batch-size, --heads, --dim-head, --block-size, --variants and --max-seconds must be"
            " positive"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: run it on one, or with TRITON_INTERPRET=1 and --device cpu")
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--device cpu runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
    global DTYPE, MODES
    DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    MODES = {"both": (False, True), "causal": (True,), "non-causal": (False,)}[args.mode]
    started = time.monotonic()
    tensors = _inputs(args)
    reference = _all_modes(tensors, args, impl="eager", dtype=torch.float32)
    eager_errors = _errors(_all_modes(tensors, args, impl="eager"), reference)  # in DTYPE
    bars = [1.5 * e + 1e-3 for e in eager_errors]
    sdpa = {b: _milliseconds(tensors, args, b, F.scaled_dot_product_attention) for b in (False, True)}
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (Triton's interpreter)"
    print(
        f"{name}, n={args.seq_len}, batch {args.batch_size}, {args.heads} heads, "
        f"dim_head {args.dim_head}, block {args.block_size}, {args.dtype}; "
        f"times summed over modes: {args.mode}"
    )
    print(f"SDPA: forward {sdpa[False]:.3f} ms, forward+backward {sdpa[True]:.3f} ms")
    print(f"eager {args.dtype}'s relative errors (out, dq, dk, dv per mode, non-causal first): "
          + " ".join(f"{e:.1e}" for e in eager_errors))  # fmt: skip
    print(f"{'kernel':8} {'tiles':>9} {'warps':>5} {'stages':>6} {'ms':>9} {'SDPA/H':>7}")
    best = {kind: variants[0] for kind, variants in VARIANTS.items()}
    for kind, variant in best.items():
        _set(kind, variant)
    for kind, variants in VARIANTS.items():
        backward = kind != "forward"
        times = {}
        for variant in variants[: args.variants]:
            if time.monotonic() - started > args.max_seconds:
                print(f"{kind:8} (time is up: remaining variants not tried)")
                break
            _set(kind, variant)
            label = f"{kind:8} {variant[0]:>4}x{variant[1]:<4} {variant[2]:>5} {variant[3] or 'auto':>6}"
            wrong = _check(tensors, args, reference, bars)
            if wrong:
                print(f"{label} {wrong}", flush=True)
                continue
            times[variant] = ms = _milliseconds(tensors, args, backward)
            print(f"{label} {ms:9.3f} {sdpa[backward] / ms:6.2f}x", flush=True)
        if not times:
            sys.exit(f"error: no good setting for the {kind} kernel: nothing written")
        best[kind] = min(times, key=times.get)
        _set(kind, best[kind])
    setting = {kind: list(v) for kind, v in best.items()}  # stages 0: Triton's default
    print(f"fastest good setting: HTCLI_TRITON_TUNING='{json.dumps(setting)}'")
    if args.out:
        with open(args.out, "w") as file:
            json.dump(setting, file)


if __name__ == "__main__":
    main()
