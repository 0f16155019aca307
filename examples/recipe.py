"""Which training recipe gives the best model for the same compute? Train variants of the recipe at one
budget and score each on held-out text, side by side in one run.

    python examples/recipe.py CORPUS OUT [VARIANT ...]

CORPUS (a file or a directory: htcli reads it as one byte string) is split 90/10: `htcli train` on
the first 90%, `htcli eval` on the last 10%. Each variant (a name from VARIANTS; default: all) trains
into OUT/NAME (kept: a variant already trained is only scored again). Prints a table of held-out
bits per byte and training time.

Budget: dim 128, depth 4, 4 heads x 32, block 32, context 1024, batch 8, 400 steps, on the CPU; all
else as `htcli train` does by default (evaluations every 100 steps included in the time).
"""

import json
import subprocess
import sys
from pathlib import Path

from htcli.errors import HtcliError

MODEL = ["--dim", "128", "--depth", "4", "--heads", "4", "--dim-head", "32", "--block-size", "32"]
BUDGET = ["--seq-len", "1024", "--batch-size", "8", "--steps", "400", "--device", "cpu"]
# the recipe of htcli 0.1 (GPT-2 of 2019): what `htcli train` did before the recipe options (fp32 on a
# CPU: its `--dtype auto` was bf16 on CUDA only)
FIRST = {
    "--optimizer": "adamw", "--norm": "layer", "--qk-norm": None, "--activation": "gelu",
    "--logit-softcap": "0", "--zero-init": None, "--lr": "6e-4", "--warmup": "100", "--level-decay": "0",
    "--shift-tokens": None, "--dtype": "fp32",
}  # fmt: skip


def first_recipe(**changes) -> list[str]:
    """FIRST's flags with some changed (a switch: "--qk-norm" on, "--no-qk-norm" off)."""
    flags = {**FIRST, **{"--" + k.replace("_", "-"): v for k, v in changes.items()}}
    args = []
    for flag, value in flags.items():
        if flag in ("--qk-norm", "--zero-init", "--shift-tokens"):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, value]
    return args


VARIANTS = {
    "first": first_recipe(),
    # one change at a time
    "first +muon": first_recipe(optimizer="muon"),
    "first +muon, lr 2e-3": first_recipe(optimizer="muon", lr="2e-3"),
    "first +lr 2e-3": first_recipe(lr="2e-3"),
    "first +lr 3e-3": first_recipe(lr="3e-3"),
    # each change on top of the higher learning rate
    "lr 2e-3 +rmsnorm": first_recipe(lr="2e-3", norm="rms"),
    "lr 2e-3 +qk-norm": first_recipe(lr="2e-3", qk_norm=True),
    "lr 2e-3 +relu2": first_recipe(lr="2e-3", activation="relu2"),
    "lr 2e-3 +zero-init": first_recipe(lr="2e-3", zero_init=True),
    "lr 2e-3 +softcap 30": first_recipe(lr="2e-3", logit_softcap="30"),
    "first +muon, lr 6e-3": first_recipe(optimizer="muon", lr="6e-3"),
    # together
    "muon, lr 6e-3, qk-norm, relu2": first_recipe(
        optimizer="muon", lr="6e-3", qk_norm=True, activation="relu2"
    ),
    "lr 3e-3, qk-norm, relu2": first_recipe(lr="3e-3", qk_norm=True, activation="relu2"),
    "muon, lr 6e-3, qk-norm": first_recipe(optimizer="muon", lr="6e-3", qk_norm=True),
    "muon, lr 6e-3, relu2": first_recipe(optimizer="muon", lr="6e-3", activation="relu2"),
    "default": [],  # the recipe `htcli train` uses without recipe options
    "default, no level decay": ["--level-decay", "0"],
    "default, level decay 8": ["--level-decay", "8"],
    "default, level decay 4": ["--level-decay", "4"],
    "default, level decay 32": ["--level-decay", "32"],
    "default, exact attention": ["--attention", "exact"],
    # the default less one of its parts (is each still paying, on this corpus?)
    "default, no qk-norm": ["--no-qk-norm"],
    "default, gelu": ["--activation", "gelu"],
    "default, adamw": ["--optimizer", "adamw"],
    "first, exact attention": [*first_recipe(), "--attention", "exact"],
    # token shift (half of each position's features from the previous byte's): the default since it paid
    # on prose and code; before, the default was without it (the variants above were measured so)
    "default, no shift tokens": ["--no-shift-tokens"],
    # mixed precision on the CPU (bf16 matrix products: AMX on recent Xeons, AVX-512 BF16 on AMD Zen 4)
    "default, bf16": ["--dtype", "bf16"],
    "first, bf16": first_recipe(dtype="bf16"),
    # the default in fp32 (on a CPU with AMX or AVX-512 BF16 the default trains in bf16; the tables before it,
    # in fp32)
    "default, fp32": ["--dtype", "fp32"],
}


def htcli(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "htcli", *args]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stderr}")
    return result


def split(corpus: str, out: Path) -> tuple[Path, Path]:
    """The corpus's first 90% and last 10% as two files in out (made once; out holding another corpus's
    split, and the variants trained on it, is refused: it was used and named as the new corpus's)."""
    from htcli.corpus import ByteCorpus

    with ByteCorpus.open([corpus]) as data:  # (before out is made: a corpus missing left it, empty)
        everything = data.read(0, len(data))
    cut = len(everything) * 9 // 10
    parts = {out / "train.bin": everything[:cut], out / "held_out.bin": everything[cut:]}
    if all(path.exists() for path in parts):
        if any(path.read_bytes() != part for path, part in parts.items()):
            raise HtcliError(f"{out} holds the split of another corpus, and its variants: give another OUT")
    else:
        out.mkdir(parents=True, exist_ok=True)
        for path, part in parts.items():
            path.write_bytes(part)
    return tuple(parts)


def run_variant(name: str, train: Path, held_out: Path, out: Path) -> dict:
    run = out / name.replace(" ", "").replace(",", "-")
    if not (run / "model.safetensors").exists():
        htcli("train", str(train), "--out", str(run), *MODEL, *BUDGET, *VARIANTS[name])
    end = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()][-1]
    scored = json.loads(htcli("eval", str(run), str(held_out), "--json", "--device", "cpu").stdout)
    return {"variant": name, "held_out_bpb": scored["bits_per_byte"], "train_seconds": end["seconds"]}


def main(corpus: str, out: str, *names: str) -> None:
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:  # (before any work: the corpus was split first)
        sys.exit(f"error: unknown variant {'; '.join(unknown)}: choose from {'; '.join(VARIANTS)}")
    out_dir = Path(out)
    train, held_out = split(corpus, out_dir)
    print(f"{corpus}: {train.stat().st_size:,} bytes to train on, {held_out.stat().st_size:,} held out")
    rows = []
    for name in names or VARIANTS:
        rows.append(run_variant(name, train, held_out, out_dir))
        print(
            f"{name:>28}  held-out {rows[-1]['held_out_bpb']:.3f} bpb  {rows[-1]['train_seconds']:.0f} s",
            flush=True,
        )
    (out_dir / "results.json").write_text(json.dumps(rows, indent=1))
    base = rows[0]
    print(f"\n| variant | held-out bpb | vs {base['variant']} | train time (s) |\n|---|---|---|---|")
    for row in rows:
        change = row["held_out_bpb"] - base["held_out_bpb"]
        print(
            f"| {row['variant']} | {row['held_out_bpb']:.3f} | {change:+.3f} | {row['train_seconds']:.0f} |"
        )


if __name__ == "__main__":
    if sys.argv[1:2] in (["-h"], ["--help"]):
        sys.exit(print(__doc__))
    if len(sys.argv) < 3:
        sys.exit(f"usage: python {__doc__.split('python ')[1].splitlines()[0]}")
    try:
        main(*sys.argv[1:])
    except HtcliError as error:  # (bad input: its one line, not a traceback)
        sys.exit(f"error: {error}")
