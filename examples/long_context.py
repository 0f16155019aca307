"""Does a long context pay? Train several variants at equal bytes per step and steps, then score each on
held-out files (bits per byte, every byte seeing at least half a window) and by position in the window.

    python examples/long_context.py TRAIN_CORPUS HELD_OUT OUT [VARIANT ...]

Each variant is a name from VARIANTS (default: all), or such a name prefixed with "new-" to train it with
htcli's default recipe (Muon, QK-norm, ReLU^2, H-attention's level decay and its default learning rate)
instead of the first one, or with "new0-" for the default recipe without the level decay; it is
trained with `htcli train` into OUT/NAME (kept: a variant already trained is only scored again), scored
with `htcli eval`. A name may end in "@SEED" (e.g. new-h-256@1) to train it with that --seed instead of 0
(OUT/NAME@SEED). Prints a table of held-out
bits per byte and training time, and draws every by-position curve into OUT/by_position.png.
Budget: dim 128, depth 4, 4 heads x 32, block 32, AdamW lr 1e-3 (the first recipe), 300 steps of 16 KiB
(1,200 for the variants whose name ends in -x4), on the CPU.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

from htcli.errors import HtcliError

BYTES_PER_STEP = 16 * 1024
MODEL = ["--dim", "128", "--depth", "4", "--heads", "4", "--dim-head", "32", "--block-size", "32"]
# the recipe these runs were measured with (htcli 0.1's: AdamW, LayerNorm, GELU, no QK-norm), pinned so
# that the table stays reproducible now that `htcli train`'s default recipe is another (README, "Recipe")
FIRST_RECIPE = ["--optimizer", "adamw", "--norm", "layer", "--no-qk-norm", "--activation", "gelu"]
FIRST_RECIPE += ["--level-decay", "0"]
BUDGET = ["--steps", "300", "--eval-every", "0", "--sample-every", "0", "--save-every", "0"]
# "new": what `htcli train` does by default; "new0": the same without H-attention's level decay (the
# default recipe before the decay, as the README's earlier "new-" rows were measured)
RECIPES = {"first": [*FIRST_RECIPE, "--lr", "1e-3"], "new": [], "new0": ["--level-decay", "0"]}


def variant(context: int, *flags: str) -> list[str]:
    """The flags of a run at this context (token shift off unless flags turn it on, fp32 unless they name
    a dtype: these runs were measured before token shift and bf16 training on AMX CPUs were defaults)."""
    batch = BYTES_PER_STEP // context
    shift = [] if "--shift-tokens" in flags else ["--no-shift-tokens"]
    dtype = [] if "--dtype" in flags else ["--dtype", "fp32"]
    return ["--seq-len", str(context), "--batch-size", str(batch), *shift, *dtype, *flags]


# a diagnostic: 256-byte windows, 64 per step as "h-256", but drawn as 8 runs of 8 adjacent windows, so
# that a step sees as few independent places of the corpus as a step of 8 windows of 2048 bytes
GROUPED = """
import sys
from htcli import data
from htcli.cli import app
draw = data.WindowSampler.starts
def grouped(self, window=None, batch_size=None):
    window, batch_size = window or self.window, batch_size or self.batch_size
    runs = draw(self, (window - 1) * 8 + 1, batch_size // 8)
    return [start + (window - 1) * k for start in runs for k in range(8)]
data.WindowSampler.starts = grouped
app(sys.argv[1:], prog_name="htcli")
"""

# a trial: during the context warm-up, the learning rate scaled by sqrt(windows per step / the first
# stage's), as Adam's square-root rule scales it with the batch size
SQRT_LR = """
import sys
from htcli import optim, train
from htcli.cli import app
rate = optim.learning_rate
def scaled(step, config):
    return rate(step, config) * (config.context_warmup_start / optim.context_length(step, config)) ** 0.5
train.learning_rate = scaled
app(sys.argv[1:], prog_name="htcli")
"""

# a trial: after the context warm-up, each step keeps most of its bytes in short windows (many places of
# the corpus, as in the warm-up) and puts LONG_WINDOWS whole-context windows beside them, the loss
# weighted by bytes, instead of switching every window to the whole context. For these CPU runs only:
# one process, no grad accumulation, no gradient scaler, no divergence check; the logged FLOP/s count
# the step as whole-context windows
MIXED = """
import sys, time
import torch
from htcli import train
from htcli.cli import app
from htcli.device import autocast
from htcli.evaluate import byte_nll
LONG_WINDOWS = %d
plain = train.Run.train_step
def mixed(self, log):
    config, started = self.config, time.perf_counter()
    full, short = config.model.max_seq_len, config.context_warmup_start
    if train.context_length(self.step, config) != full:
        return plain(self, log)
    for group in self.optimizer.param_groups:
        group["lr"] = train.learning_rate(self.step, config)
    shorts = (config.batch_size - LONG_WINDOWS) * full // short
    parts = [(short, shorts), (full, LONG_WINDOWS)]
    total = shorts * short + LONG_WINDOWS * full
    loss_sum = 0.0
    for length, count in parts:
        batch = self.train_data.windows(self.sampler.starts(length + 1, count), length + 1).to(self.device)
        with autocast(self.device, self.dtype):
            logits = self.forward(batch[:, :-1])
        loss = byte_nll(logits, batch[:, 1:]) * (count * length / total)
        loss.backward()
        loss_sum += loss.item()
    params = [p for group in self.optimizer.param_groups for p in group["params"]]
    clip = config.clip if config.clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
    self.optimizer.step()
    self.optimizer.zero_grad(set_to_none=True)
    self.step += 1
    speed = self._speed(time.perf_counter() - started, total // full, full)
    lr = self.optimizer.param_groups[0]["lr"]
    log("step", step=self.step, loss=loss_sum, lr=lr, grad_norm=grad_norm.item(), context=full, **speed)
    return loss_sum
train.Run.train_step = mixed
app(sys.argv[1:], prog_name="htcli")
"""

VARIANTS = {
    "h-256": variant(256),
    "h-2048": variant(2048),
    "exact-2048": variant(2048, "--attention", "exact"),
    "h-4096": variant(4096),
    "h-256-grouped": variant(256),  # a diagnostic (GROUPED)
    "h-2048-cw80-sqrtlr": variant(2048, "--context-warmup", "0.8"),  # a trial (SQRT_LR)
    "h-2048-cw50": variant(2048, "--context-warmup", "0.5"),
    "h-2048-cw90": variant(2048, "--context-warmup", "0.9"),
    "exact-2048-cw90": variant(2048, "--attention", "exact", "--context-warmup", "0.9"),
    "h-4096-cw90": variant(4096, "--context-warmup", "0.9"),
    # the last 3% of the steps (9) at the full length: as long-context language models are trained
    "h-2048-cw97": variant(2048, "--context-warmup", "0.97"),
    "h-4096-cw97": variant(4096, "--context-warmup", "0.97"),
    # a trial (MIXED): the last 10% of the steps with 1 or 2 whole windows beside many short ones
    "h-2048-cw90-mixed1": variant(2048, "--context-warmup", "0.9"),
    "h-2048-cw90-mixed2": variant(2048, "--context-warmup", "0.9"),
    "h-2048-cw50-mixed1": variant(2048, "--context-warmup", "0.5"),
    "h-2048-cw50-mixed2": variant(2048, "--context-warmup", "0.5"),
    "h-2048-mixed1": variant(2048),
    # H-attention's level decay (the default recipe's is 16; these rows of README were measured at 4, 8, 16
    # and 32), and more steps at the full length
    "h-256-ld4": variant(256, "--level-decay", "4"),
    "h-2048-cw90-ld4": variant(2048, "--context-warmup", "0.9", "--level-decay", "4"),
    "h-4096-cw90-ld4": variant(4096, "--context-warmup", "0.9", "--level-decay", "4"),
    "h-2048-cw80-ld4": variant(2048, "--context-warmup", "0.8", "--level-decay", "4"),
    "h-2048-cw95": variant(2048, "--context-warmup", "0.95"),
    # token shift (half of each position's features from the previous byte's): a bias toward the
    # previous-token features that copying far context (induction) needs
    "h-256-shift": variant(256, "--shift-tokens"),
    "h-2048-cw95-shift": variant(2048, "--context-warmup", "0.95", "--shift-tokens"),
    "h-4096-cw95-shift": variant(4096, "--context-warmup", "0.95", "--shift-tokens"),
    "h-4096-cw95": variant(4096, "--context-warmup", "0.95"),
    # four times the budget (1,200 steps of 16 KiB): does far context pay once local statistics are
    # better learned? (the same bytes per step; the warm-up is the same fraction of the steps)
    "h-256-shift-x4": variant(256, "--shift-tokens", "--steps", "1200"),
    "h-2048-cw95-shift-x4": variant(2048, "--context-warmup", "0.95", "--shift-tokens", "--steps", "1200"),
    "h-4096-cw95-shift-x4": variant(4096, "--context-warmup", "0.95", "--shift-tokens", "--steps", "1200"),
    "h-256-ld8": variant(256, "--level-decay", "8"),
    "h-2048-cw90-ld8": variant(2048, "--context-warmup", "0.9", "--level-decay", "8"),
    "h-256-ld16": variant(256, "--level-decay", "16"),
    "h-2048-cw90-ld16": variant(2048, "--context-warmup", "0.9", "--level-decay", "16"),
    "h-4096-cw90-ld16": variant(4096, "--context-warmup", "0.9", "--level-decay", "16"),
    "h-256-ld32": variant(256, "--level-decay", "32"),
    "h-2048-cw90-ld32": variant(2048, "--context-warmup", "0.9", "--level-decay", "32"),
}


def htcli(*args: str, program: tuple[str, ...] = ("-m", "htcli")) -> subprocess.CompletedProcess:
    command = [sys.executable, *program, *args]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stderr}")
    return result


def recipe_of(name: str) -> tuple[str, list[str]]:
    """The VARIANTS entry a name stands for and the recipe's flags (a seed, "@SEED", is left to seed_of)."""
    name = name.partition("@")[0]
    prefix, _, base = name.partition("-")
    if prefix in ("new", "new0"):
        return base, RECIPES[prefix]
    return name, RECIPES["first"]


def seed_of(name: str) -> list[str]:
    """The --seed flag a name ending in "@SEED" asks for (none: htcli's default, 0)."""
    seed = name.partition("@")[2]
    return ["--seed", seed] if seed else []


def run_variant(name: str, train_corpus: str, held_out: str, out: Path) -> dict:
    base, recipe = recipe_of(name)
    run = out / name
    if not (run / "model.safetensors").exists():
        trials = {"grouped": GROUPED, "sqrtlr": SQRT_LR, "mixed1": MIXED % 1, "mixed2": MIXED % 2}
        trial = trials.get(base.split("-")[-1])
        program = ("-c", trial) if trial else ("-m", "htcli")
        args = ["train", train_corpus, "--out", str(run), *MODEL, *recipe, *BUDGET, *VARIANTS[base]]
        args += [*seed_of(name), "--device", "cpu"]
        htcli(*args, program=program)
    end = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()][-1]
    scored = json.loads(htcli("eval", str(run), held_out, "--json", "--device", "cpu").stdout)
    curve = json.loads(htcli("eval", str(run), held_out, "--by-position", "--json", "--device", "cpu").stdout)
    return {
        "variant": name,
        "recipe": next(key for key, flags in RECIPES.items() if flags is recipe),
        "flags": " ".join([*VARIANTS[base], *seed_of(name)]),
        "train_seconds": end["seconds"],
        "held_out_bpb": scored["bits_per_byte"],
        "by_position": curve["by_position"],
    }


def main(train_corpus: str, held_out: str, out: str, *names: str) -> None:
    unknown = [
        name
        for name in names
        if recipe_of(name)[0] not in VARIANTS
        or "@" in name
        and not re.fullmatch(r"[0-9]{1,18}", name.partition("@")[2])
    ]
    if unknown:
        sys.exit(
            f"error: unknown variant {', '.join(unknown)}: choose from {', '.join(VARIANTS)} (or new-NAME or"
            " new0-NAME, each with @SEED to train another seed)"
        )
    from htcli.corpus import ByteCorpus

    for corpus in (train_corpus, held_out):  # (before any training: a held-out corpus missing was said after)
        ByteCorpus.open([corpus]).close()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names or VARIANTS:
        results.append(run_variant(name, train_corpus, held_out, out_dir))
        (out_dir / f"{name}.json").write_text(json.dumps(results[-1], indent=1))
        row = results[-1]
        print(f"{name:>22}  held-out {row['held_out_bpb']:.3f} bpb  {row['train_seconds']:.0f} s", flush=True)
    print("\n| variant | flags | held-out bpb | train time (s) |\n|---|---|---|---|")
    for row in results:
        bpb, seconds = row["held_out_bpb"], row["train_seconds"]
        print(f"| {row['variant']} | `{row['flags']}` | {bpb:.3f} | {seconds:.0f} |")
    print("\nbits per byte by position (bucket start: bpb)")
    for row in results:
        print(
            f"{row['variant']:>22}  "
            + "  ".join(f"{b['first']}:{b['bits_per_byte']:.2f}" for b in row["by_position"])
        )
    from htcli.plots import by_position_plot

    by_position_plot({row["variant"]: row["by_position"] for row in results}, out_dir / "by_position.png")


if __name__ == "__main__":
    if sys.argv[1:2] in (["-h"], ["--help"]):
        sys.exit(print(__doc__))
    if len(sys.argv) < 4:
        sys.exit(f"usage: python {__doc__.split('python ')[1].splitlines()[0]}")
    try:
        main(*sys.argv[1:])
    except HtcliError as error:  # (bad input: its one line, not a traceback)
        sys.exit(f"error: {error}")
