"""Where H-attention's forward+backward time goes on a GPU: its kernels, by total device time.

    python examples/attention_profile.py [--seq-len 8192] [--batch 4] [--heads 8] [--dim-head 64]
        [--block-size 128] [--impl triton] [--causal | --no-causal] [--rows 25]

bf16 inputs, as `htcli bench --device cuda --dtype bf16` times them; prints the time per
forward+backward (ten calls each timed alone, and ten queued back to back), SDPA's beside it, and the
profiler's table of kernels (and the torch operations that launched them) sorted by device time, so
that a missed speed target can be traced to what takes it. HTCLI_ATTENTION_GRAPHS=0 times the passes
launched kernel by kernel instead of replayed from CUDA graphs.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from htcli.attention import h_attention
from htcli.bench import timed


def _timed(fn, repeats: int = 10) -> tuple[float, float]:
    """Milliseconds per call of fn after two warm-up calls, both ways htcli's bench times calls (bench.timed):
    the median of calls timed alone, each with a synchronisation after it, and the mean of calls queued
    back to back (after one alone)."""
    device, deadline = torch.device("cuda"), time.perf_counter() + 3600
    alone = timed(fn, device, 2, repeats, deadline, back_to_back=False)
    queued = timed(fn, device, 0, repeats + 1, deadline, back_to_back=True)
    return alone.seconds * 1e3, queued.seconds * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim-head", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--impl", default="triton")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--rows", type=int, default=25, help="kernels in the table (0: no profile)")
    args = parser.parse_args()
    if min(args.seq_len, args.batch, args.heads, args.dim_head, args.block_size) < 1 or args.rows < 0:
        parser.error("--seq-len, --batch, --heads, --dim-head and --block-size must be positive, --rows >= 0")
    if not torch.cuda.is_available():
        raise SystemExit("error: this profile needs a CUDA GPU")
    shape = (args.batch, args.heads, args.seq_len, args.dim_head)
    q, k, v, grad = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    inputs = [t.requires_grad_() for t in (q, k, v)]

    def h_pass():
        out = h_attention(*inputs, block_size=args.block_size, causal=args.causal, impl=args.impl)
        torch.autograd.grad(out, inputs, grad)

    def sdpa_pass():
        out = F.scaled_dot_product_attention(*inputs, is_causal=args.causal)
        torch.autograd.grad(out, inputs, grad)

    mode = "causal" if args.causal else "non-causal"
    print(f"{mode}, {args.impl}, (b, h, n, d) = {shape}, block {args.block_size}, bf16")
    (h_alone, h_queued), (sdpa_alone, sdpa_queued) = _timed(h_pass), _timed(sdpa_pass)
    print(f"forward+backward, timed alone: H-attention {h_alone:.3f} ms, SDPA {sdpa_alone:.3f} ms")
    print(f"forward+backward, back to back: H-attention {h_queued:.3f} ms, SDPA {sdpa_queued:.3f} ms")
    if args.rows <= 0:
        return
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            h_pass()
        torch.cuda.synchronize()
    print("per forward+backward x 5:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
