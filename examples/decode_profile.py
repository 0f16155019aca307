"""Where a decode step's time goes: host (Python and dispatch) against device, and operations per step.

    python examples/decode_profile.py [--preset small] [--prompt-len 7680] [--steps 64] [--batch 1]
        [--device auto]

Random weights, greedy, `--batch` sequences at once, the hierarchical decode cache; prints per step
(one byte of each sequence) the milliseconds of wall time (and the bytes/s they make), the host time of
launching the step's work (without waiting for the device), the device's busy time, and the number
of device kernels (CUDA) or torch operations.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from htcli.device import autocast, resolve_device, resolve_dtype
from htcli.errors import HtcliError
from htcli.model import HTransformer1D
from htcli.presets import PRESETS, model_config


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--prompt-len", type=int, default=7680)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    if args.preset not in PRESETS:
        parser.error(f"--preset: one of {', '.join(PRESETS)}")
    context = model_config(args.preset).max_seq_len
    if not 1 <= args.prompt_len < context:
        parser.error(
            f"--prompt-len must be 1 to {context - 1} (the {args.preset} preset's context: {context})"
        )
    if args.batch < 1 or args.steps < 1 or args.prompt_len + 8 + 3 * args.steps > context:
        # (8 warm-up steps, then --steps timed, --steps for the host's time, --steps profiled)
        parser.error(
            f"--batch and --steps must be 1 or more, --prompt-len + 8 + 3 * --steps at most {context}"
        )
    device = resolve_device(args.device)
    dtype = resolve_dtype("auto", device)
    torch.manual_seed(0)
    model = HTransformer1D(model_config(args.preset)).to(device).eval()
    prompt = torch.randint(0, 256, (args.batch, args.prompt_len), device=device)
    with torch.no_grad(), autocast(device, dtype):
        logits, state = model.prefill(prompt)
        token = logits[:, -1].argmax(-1)
        for _ in range(8):  # warm-up
            token = model.decode_step(token, state).argmax(-1)
        _sync(device)
        started = time.perf_counter()
        for _ in range(args.steps):
            token = model.decode_step(token, state).argmax(-1)
        _sync(device)
        wall = (time.perf_counter() - started) / args.steps
        # host time alone: the steps queued without reading a token back (argmax stays on the device)
        started = time.perf_counter()
        for _ in range(args.steps):
            token = model.decode_step(token, state).argmax(-1)
        host = (time.perf_counter() - started) / args.steps
        _sync(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                token = model.decode_step(token, state).argmax(-1)
            _sync(device)
    events = prof.key_averages()
    if device.type == "cuda":
        on_device = [e for e in events if getattr(e.device_type, "name", "") == "CUDA"]
        kernels = sum(e.count for e in on_device)
        busy = sum(getattr(e, "self_device_time_total", 0.0) for e in on_device) / 1e3
    else:
        kernels = sum(e.count for e in events if e.key.startswith("aten::"))
        busy = None  # (the host's own time is the device's)
    per_step = f"{'kernels' if device.type == 'cuda' else 'aten ops'}/step"
    device_busy = "" if busy is None else f"device busy {busy / args.steps:.3f} ms/step; "
    print(f"{args.preset} preset, {device}, {dtype}, batch {args.batch}, prompt {args.prompt_len}")
    print(
        f"wall {wall * 1e3:.3f} ms/step ({args.batch / wall:.0f} bytes/s); host launching "
        f"{host * 1e3:.3f} ms/step; {device_busy}"
        f"{kernels / args.steps:.0f} {per_step}"
    )
    print(events.table(sort_by="self_cpu_time_total", row_limit=30))


if __name__ == "__main__":
    try:
        main()
    except HtcliError as error:  # (bad input: its one line, not a traceback)
        sys.exit(f"error: {error}")
