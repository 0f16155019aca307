"""How close the Triton H-attention kernels are to fp32 attention, and whether they repeat their bits.

    python examples/triton_precision.py [--device cuda] [--lengths 256,2048,65536] [--dtypes fp32,fp16,bf16]

Part 1, closeness: for each length, dtype and mode, the relative error (norm of the difference over the
reference's norm) of the output and each gradient against eager fp32 attention, for eager attention
in that dtype and for the kernels in that dtype, side by side; then both against fp32 attention on the
inputs as rounded to the dtype ("arithmetic": the error of the computation alone).

Part 2, repetition (`--repeat-shape`, batch 4 x 8 heads x 8192 by default): forward and backward
called twice on the same inputs, with the allocator's free memory filled with NaN in between; which
of out, lse, dq, dk, dv differ, with the pipelining htcli ships (triton_launch.NUM_STAGES), with
Triton's default software pipelining everywhere and with none (num_stages 1 for every kernel); also
each row computed alone against the same row inside the batch. A diagnostic: it prints, and exits 0
whatever it finds.

(`TRITON_INTERPRET=1 python examples/triton_precision.py --device cpu` runs it through Triton's interpreter;
without the variable set, `--device cpu` is refused; bf16 there is not meaningful.)
"""

from __future__ import annotations

import argparse
import os

import torch

from htcli.attention import h_attention
from htcli.attention import triton_launch as launch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
NAMES = ("out", "dq", "dk", "dv")


def _attend(tensors, impl, dtype, causal, block_size, *, round_to=None):
    q, k, v, grad = tensors
    if round_to is not None:  # the same values the dtype holds, computed in `dtype`
        q, k, v, grad = (t.to(round_to).to(dtype) for t in (q, k, v, grad))
    inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out = h_attention(*inputs, block_size=block_size, causal=causal, impl=impl)
    return [out.float(), *(g.float() for g in torch.autograd.grad(out, inputs, grad.to(dtype)))]


def _errors(got, reference) -> str:
    return " ".join(f"{((a - b).norm() / b.norm()).item():.1e}" for a, b in zip(got, reference))


def closeness(args) -> None:
    print("relative errors against eager fp32 (out dq dk dv)")
    for n in args.lengths:
        gen = torch.Generator(device=args.device).manual_seed(0)
        tensors = [torch.randn(1, 2, n, args.dim_head, device=args.device, generator=gen) for _ in range(4)]
        for causal in (False, True):
            reference = _attend(tensors, "eager", torch.float32, causal, args.block_size)
            for name in args.dtypes:
                dtype = DTYPES[name]
                eager = _attend(tensors, "eager", dtype, causal, args.block_size)
                fused = _attend(tensors, "triton", dtype, causal, args.block_size)
                line = (
                    f"n={n:>6} {'causal' if causal else 'non-c.':6} {name}: "
                    f"eager {_errors(eager, reference)} | kernels {_errors(fused, reference)}"
                )
                if dtype != torch.float32:  # arithmetic alone: against fp32 on the inputs as rounded
                    same = _attend(tensors, "eager", torch.float32, causal, args.block_size, round_to=dtype)
                    line += f" || arithmetic: eager {_errors(eager, same)} | kernels {_errors(fused, same)}"
                print(line, flush=True)


def _fill_free_memory(device) -> None:
    if device == "cuda":
        torch.cuda.empty_cache()
        junk = torch.full((1 << 28,), float("nan"), device="cuda")
        del junk


def _once(q, k, v, grad, real, causal, block_size):
    out, lse = launch.forward(q, k, v, real, block_size=block_size, causal=causal)
    grads = launch.backward(q, k, v, real, out, lse, grad, block_size=block_size, causal=causal)
    return [out, lse, *grads]


def repetition(args) -> None:
    b, h, n = args.repeat_shape
    gen = torch.Generator(device=args.device).manual_seed(0)
    dtype = DTYPES[args.dtypes[-1]]
    q, k, v, grad = (
        torch.randn(b * h, n, args.dim_head, device=args.device, generator=gen).to(dtype) for _ in range(4)
    )
    real = torch.ones(b * h, n, device=args.device)
    names = ("out", "lse", "dq", "dk", "dv")
    shipped = dict(launch.NUM_STAGES)
    variants = {  # pipelining stages per kernel
        "as shipped": shipped,
        "all pipelined (Triton's default)": {},
        "all unpipelined": {kind: 1 for kind in launch.MAX_TILES},
    }
    try:
        for pipelining, stages in variants.items():
            launch.NUM_STAGES.clear()
            launch.NUM_STAGES.update(stages)
            for causal in (False, True):
                first = _once(q, k, v, grad, real, causal, args.block_size)
                _fill_free_memory(args.device)
                second = _once(q, k, v, grad, real, causal, args.block_size)
                differ = [
                    f"{name} (max {(x.float() - y.float()).abs().max().item():.1e}, "
                    f"{(x != y).float().mean().item():.1e} of entries)"
                    for name, x, y in zip(names, first, second)
                    if not torch.equal(x, y)
                ]
                alone = _once(*(t[-1:] for t in (q, k, v, grad, real)), causal, args.block_size)
                apart = [name for name, x, y in zip(names, first, alone) if not torch.equal(x[-1:], y)]
                label = f"{dtype} {b}x{h}x{n} {'causal' if causal else 'non-c.'} {pipelining}"
                print(
                    f"{label}: two runs {'differ in ' + ', '.join(differ) if differ else 'equal'}; "
                    f"last row alone {'differs in ' + ', '.join(apart) if apart else 'equal'}",
                    flush=True,
                )
    finally:
        launch.NUM_STAGES.clear()
        launch.NUM_STAGES.update(shipped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--lengths", default="256,2048,65536")
    parser.add_argument("--dtypes", default="fp32,fp16,bf16")
    parser.add_argument("--dim-head", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--repeat-shape", default="4,8,8192", help="batch,heads,length ('' to skip)")
    args = parser.parse_args()
    try:  # (bad values were tracebacks, a bad --repeat-shape only after the first part had run)
        args.lengths = [int(x) for x in args.lengths.split(",") if x]
        args.repeat_shape = [int(x) for x in args.repeat_shape.split(",") if x]
    except ValueError:
        parser.error("--lengths and --repeat-shape take whole numbers, e.g. 2048,65536 and 4,8,8192")
    args.dtypes = [x for x in args.dtypes.split(",") if x]
    if min([*args.lengths, *args.repeat_shape, args.dim_head, args.block_size], default=1) < 1:
        parser.error("--lengths, --repeat-shape, --dim-head and --block-size must be positive")
    if len(args.repeat_shape) not in (0, 3) or set(args.dtypes) - {"fp32", "fp16", "bf16"}:
        parser.error("--repeat-shape is batch,heads,length (or ''); --dtypes a list of fp32, fp16, bf16")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU here: run it on one, or with TRITON_INTERPRET=1 and --device cpu")
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        parser.error("--device cpu runs the kernels in Triton's interpreter: set TRITON_INTERPRET=1")
    if args.device == "cuda":
        print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    closeness(args)
    if args.repeat_shape:
        repetition(args)


if __name__ == "__main__":
    main()
