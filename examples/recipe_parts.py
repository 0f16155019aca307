"""What each part of the default recipe costs a training step, side by side in one process.

    python examples/recipe_parts.py [--rounds 16] [--seq-len 1024] [--warmup 3]
        [--only default --only "default, GELU" ...]

The recipe benchmark's model (dim 128, depth 4, 4 heads x 32, block 32, 8 windows a step) in each
variant below, with its optimizer, stepped in turn on random bytes (forward, backward, clipping, the
optimizer's step) for --rounds rounds after --warmup (3) untimed steps; prints each variant's median ms
per step. Turns take the machine's drift in common, which separate runs do not. In fp32 (no autocast): the
recipe's parts compared in one precision; "default, bf16" is the default under bf16 autocast, Muon's
products in bf16, as `htcli train` trains on a CPU with AMX or AVX-512 BF16.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from htcli.config import TrainConfig
from htcli.device import keep_freed_memory
from htcli.evaluate import byte_nll
from htcli.model import HTransformer1D, HTransformerConfig
from htcli.optim import make_optimizer

MODEL = dict(dim=128, depth=4, heads=4, dim_head=32, block_size=32)
FIRST = dict(norm="layer", qk_norm=False, activation="gelu", level_decay=0.0, shift_tokens=False)
# name: (model config fields over the default's, optimizer)
VARIANTS = {
    "first": (FIRST, "adamw"),
    "default": ({}, "muon"),
    "default, AdamW": ({}, "adamw"),
    "default, torch's Muon": ({}, "torch-muon"),
    "default, no QK-norm": ({"qk_norm": False}, "muon"),
    "default, no level decay": ({"level_decay": 0.0}, "muon"),
    "default, GELU": ({"activation": "gelu"}, "muon"),
    "first, Muon": (FIRST, "muon"),
    "default, no token shift": ({"shift_tokens": False}, "muon"),
    "default, bf16": ({}, "muon"),
}
BF16 = {"default, bf16"}  # (under bf16 autocast, Muon's products in bf16)


def optimizer_for(model: HTransformer1D, name: str, products: torch.dtype = torch.float32):
    """The optimizer `htcli train --optimizer name` makes; "torch-muon": muon's, with torch.optim.Muon
    itself (every matrix orthogonalised alone, in bf16 always) in place of htcli's Muon (same-shaped ones
    together, in fp32 on a CPU without AMX or AVX-512 BF16)."""
    config = TrainConfig(corpus=["-"], model=model.config, optimizer="muon" if name == "torch-muon" else name)
    optimizer = make_optimizer(model, config, products=products)
    if name == "torch-muon":
        ours, adamw = optimizer.parts
        optimizer.parts = (torch.optim.Muon(ours.param_groups[0]["params"], **ours.defaults), adamw)
    return optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each variant first")
    parser.add_argument(
        "--only", action="append", help="a variant to time (repeatable; first is always timed)"
    )
    args = parser.parse_args()
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be 1 or more, --warmup 0 or more")
    if args.seq_len < 1 or args.seq_len % MODEL["block_size"]:
        parser.error(f"--seq-len must be a positive multiple of the block size ({MODEL['block_size']})")
    chosen = ["first", *args.only] if args.only else list(VARIANTS)
    unknown = [name for name in chosen if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}: choose from {list(VARIANTS)}")
    keep_freed_memory()  # as `htcli train` does on the CPU
    data = torch.randint(0, 256, (8, args.seq_len + 1), generator=torch.Generator().manual_seed(0))
    runs = {}
    for name in dict.fromkeys(chosen):
        fields, optimizer = VARIANTS[name]
        torch.manual_seed(0)
        model = HTransformer1D(HTransformerConfig(**MODEL, max_seq_len=args.seq_len, **fields))
        precision = torch.bfloat16 if name in BF16 else torch.float32
        runs[name] = (model, optimizer_for(model, optimizer, precision), precision)

    def step(model, optimizer, precision) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == torch.bfloat16):
            loss = byte_nll(model(data[:, :-1]), data[:, 1:])
        loss.backward()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for run in runs.values():
        for _ in range(args.warmup):
            step(*run)
    times = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            step(*run)
            times[name].append(time.perf_counter() - started)
    first = statistics.median(times["first"])
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(f"{name:>24}: {median * 1e3:6.1f} ms/step ({median / first:.3f}x first)")


if __name__ == "__main__":
    main()
