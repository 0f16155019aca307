"""Where a training step's time goes: the H-attention model's against the exact-attention model's.

    python examples/step_profile.py [--preset small] [--seq-len 8192] [--batch-size 4] [--device cuda]
        [--repeats 10] [--rows 20] [--compile default|reduce-overhead|...]

Each model (the preset's causal language model) is built and stepped as `htcli bench --model` does it
(forward, backward, AdamW), with bf16 autocast on CUDA (as `bench --dtype bf16`) and fp32 on a CPU, and
the attention implementation of $HTCLI_ATTENTION, else auto (Triton on CUDA). Prints each model's step
time, timed alone (a synchronisation after each) and back to back, the host's time to issue a step,
and the profiler's table of operations by their own device time (CUDA) or CPU time, so that a missed
training-step target can be traced to the operations that take the difference. --compile MODE steps both
models through torch.compile with that mode ("default" is what `htcli train --compile` and `htcli bench
--model --compile` run; "reduce-overhead" also replays each compiled graph from a CUDA graph, which
removes the host's launch time where a step is bound by it).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from htcli.bench import model_step, timed
from htcli.device import resolve_device
from htcli.errors import HtcliError
from htcli.presets import model_config


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timings(step, device, repeats: int) -> tuple[float, float, float]:
    """Milliseconds: (the median of steps timed alone, the mean of steps queued back to back: both ways
    htcli's bench times calls, bench.timed; the median of the host's time to issue one step)."""
    deadline = time.perf_counter() + 3600
    alone = timed(step, device, 0, repeats, deadline, back_to_back=False)
    queued = timed(step, device, 0, repeats + 1, deadline, back_to_back=True)
    host = []
    for _ in range(repeats):
        _sync(device)
        started = time.perf_counter()
        step()
        host.append(time.perf_counter() - started)
    _sync(device)
    return alone.seconds * 1e3, queued.seconds * 1e3, statistics.median(host) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rows", type=int, default=20, help="operations in each table (0: no profile)")
    parser.add_argument(
        "--compile",
        default="",
        choices=("", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        help="torch.compile's mode for both models (default: not compiled)",
    )
    args = parser.parse_args()
    if min(args.seq_len, args.batch_size, args.repeats) < 1 or args.rows < 0:
        parser.error("--seq-len, --batch-size and --repeats must be 1 or more, --rows 0 or more")
    try:
        model_config(args.preset, max_seq_len=args.seq_len)  # (a preset or length it cannot take: said first)
        device = resolve_device(args.device)
    except HtcliError as error:
        parser.error(str(error))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shape = f"batch {args.batch_size} x {args.seq_len}, {device.type}, {dtype}"
    print(f"{args.preset} preset, causal, {shape}" + (f", compiled ({args.compile})" if args.compile else ""))
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for method, label in (("h", "H-attention model"), ("sdpa", "exact-attention model")):
        spec = dict(method=method, preset=args.preset, n=args.seq_len, batch_size=args.batch_size)
        spec["compile"] = args.compile
        step = model_step({**spec, "causal": True}, device, dtype)[1]
        for _ in range(3):  # (the second call captures the attention's CUDA graphs; the first compiles)
            step()
        _sync(device)
        alone, queued, host = _timings(step, device, args.repeats)
        print(f"{label}: step {alone:.2f} ms timed alone, {queued:.2f} ms back to back; host {host:.2f} ms")
        if args.rows > 0:
            with profile(activities=activities) as prof:
                for _ in range(3):
                    step()
                _sync(device)
            print(f"{label}, 3 steps, by {sort}:")
            print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=50))


if __name__ == "__main__":
    main()
