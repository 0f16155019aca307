"""Train a tiny byte-level model through the library API (what `htcli train` does, minus the display).

    python examples/train_tiny.py runs/tiny 'htcli/**/*.py' --steps 300

trains on htcli's own source (its .py files: the directory holds __pycache__ bytecode too) and prints each
evaluation as it happens.
"""

import argparse
import sys

from htcli.config import TrainConfig
from htcli.errors import HtcliError
from htcli.presets import model_config
from htcli.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="run directory to create")
    parser.add_argument("corpus", nargs="+", help="files, directories, glob patterns or .gz files")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()

    config = TrainConfig(
        corpus=args.corpus,
        out=args.out,
        model=model_config("tiny", max_seq_len=128),  # the tiny preset with a 128-byte context
        steps=args.steps,
        batch_size=16,
        lr=3e-3,
        warmup=min(50, args.steps // 10),
        eval_every=max(1, args.steps // 3),
        save_every=0,  # only at the end
        sample_every=0,
        device="cpu",
    )

    def show(event: dict) -> None:
        if event["event"] == "eval":
            print(f"step {event['step']:>5}: validation {event['val_bpb']:.3f} bits per byte")

    result = train(config, on_event=show)
    speed = result.tokens / result.seconds
    print(f"{result.step} steps in {result.seconds:.1f} s, {speed:,.0f} bytes/s -> {result.out}")


if __name__ == "__main__":
    try:
        main()
    except HtcliError as error:  # (bad input: its one line, not a traceback)
        sys.exit(f"error: {error}")
