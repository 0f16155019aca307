"""Tune the Triton H-attention kernels on a CUDA GPU: time tile and warp variants of each kernel and
print a table, SDPA's time beside, and the fastest setting as HTCLI_TRITON_TUNING JSON.

    python examples/triton_sweep.py [--seq-len 8192] [--out tuning.json]

One kernel at a time, the others at their best so far: the forward kernel by forward time, then the
dq and dk/dv kernels by forward+backward time, each summed over non-causal and causal, bf16. Each
variant's output and gradients are checked against the first variant's before it is timed.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from htcli.attention import h_attention
from htcli.attention import triton_launch as launch

# (largest query tile, largest key tile, warps); the first of each list is today's setting
VARIANTS = {
    "forward": [(128, 64, 8), (128, 64, 4), (64, 64, 4), (128, 128, 8), (64, 128, 4)],
    "dq": [(128, 32, 8), (64, 32, 4), (64, 64, 4), (128, 64, 8)],
    "dkdv": [(32, 128, 8), (64, 128, 8), (32, 64, 4), (64, 64, 4)],
}


def _inputs(args):
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (args.batch_size, args.heads, args.seq_len, args.dim_head)
    return [torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(4)]


def _run(q, k, v, grad, block_size, causal, backward, attend=None):
    inputs = [t.detach().requires_grad_(backward) for t in (q, k, v)]
    if attend is None:
        out = h_attention(*inputs, block_size=block_size, causal=causal, impl="triton")
    else:
        out = attend(*inputs, is_causal=causal)
    if not backward:
        return [out]
    return [out, *torch.autograd.grad(out, inputs, grad)]


def _milliseconds(tensors, args, backward, attend=None) -> float:
    """Summed over non-causal and causal."""
    return sum(
        do_bench(lambda c=causal: _run(*tensors, args.block_size, c, backward, attend), warmup=10, rep=60)
        for causal in (False, True)
    )


def _set(kind: str, variant: tuple[int, int, int]) -> None:
    launch.MAX_TILES[kind] = variant[:2]
    launch.NUM_WARPS[kind] = variant[2]


def _max_error(tensors, args, reference) -> float:
    got = [t.float() for causal in (False, True) for t in _run(*tensors, args.block_size, causal, True)]
    return max(((a - b).norm() / b.norm()).item() for a, b in zip(got, reference))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim-head", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--max-seconds", type=float, default=150.0, help="stop trying variants after this")
    parser.add_argument("--out", help="write the fastest setting (JSON) here")
    args = parser.parse_args()
    started = time.monotonic()
    tensors = _inputs(args)
    best = {kind: variants[0] for kind, variants in VARIANTS.items()}
    for kind, variant in best.items():
        _set(kind, variant)
    reference = [t.float() for causal in (False, True) for t in _run(*tensors, args.block_size, causal, True)]
    sdpa_fwd = _milliseconds(tensors, args, False, F.scaled_dot_product_attention)
    sdpa_fb = _milliseconds(tensors, args, True, F.scaled_dot_product_attention)
    print(
        f"{torch.cuda.get_device_name()}, n={args.seq_len}, batch {args.batch_size}, {args.heads} heads, "
        f"dim_head {args.dim_head}, block {args.block_size}, bf16; times summed over non-causal + causal"
    )
    print(f"SDPA: forward {sdpa_fwd:.3f} ms, forward+backward {sdpa_fb:.3f} ms")
    print(f"{'kernel':8} {'tiles':>9} {'warps':>5} {'ms':>9} {'SDPA/H':>7} {'rel err':>8}")
    for kind, variants in VARIANTS.items():
        backward = kind != "forward"
        sdpa = sdpa_fb if backward else sdpa_fwd
        times = {}
        for variant in variants:
            if time.monotonic() - started > args.max_seconds:
                print(f"{kind:8} (time is up: remaining variants not tried)")
                break
            _set(kind, variant)
            error = _max_error(tensors, args, reference)
            if error > 2e-2:
                print(f"{kind:8} {variant[0]:>4}x{variant[1]:<4} {variant[2]:>5} WRONG (rel err {error:.1e})")
                continue
            times[variant] = _milliseconds(tensors, args, backward)
            ms = times[variant]
            print(
                f"{kind:8} {variant[0]:>4}x{variant[1]:<4} {variant[2]:>5} {ms:9.3f} {sdpa / ms:6.2f}x "
                f"{error:8.1e}",
                flush=True,
            )
        best[kind] = min(times, key=times.get) if times else best[kind]
        _set(kind, best[kind])
    setting = {kind: list(variant) for kind, variant in best.items()}
    print(f"fastest: HTCLI_TRITON_TUNING='{json.dumps(setting)}'")
    if args.out:
        with open(args.out, "w") as file:
            json.dump(setting, file)


if __name__ == "__main__":
    main()
