"""Load a checkpoint, stream a continuation of a prompt, and measure bits per byte on a file.

python examples/sample_and_eval.py CHECKPOINT PROMPT CORPUS
python examples/sample_and_eval.py runs/tiny "def " README.md
"""

import sys

import torch

from htcli.checkpoint import load_model
from htcli.corpus import ByteCorpus
from htcli.errors import HtcliError
from htcli.evaluate import evaluate
from htcli.sample import SamplingConfig, Utf8Stream, generate


def main(checkpoint: str, prompt: str, corpus: str) -> None:
    with ByteCorpus.open([corpus]) as data:  # (first: a corpus missing or empty is said before any work)
        sample_and_eval(checkpoint, prompt, corpus, data)


def sample_and_eval(checkpoint: str, prompt: str, corpus: str, data: ByteCorpus) -> None:
    model, info = load_model(checkpoint, device="cpu")
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)  # (not rotary's frequencies)
    print(f"step {info.step} model, {trained:,} parameters")

    stream = Utf8Stream()  # bytes in, whole characters out
    print(prompt, end="")
    for token in generate(
        model, prompt.encode(), SamplingConfig(max_new_tokens=200, temperature=0.7, seed=0)
    ):
        print(stream.feed(token), end="", flush=True)
    print(stream.flush())

    result = evaluate(model, data.span(), dtype=torch.float32)
    print(f"{corpus}: {result.bits_per_byte:.3f} bits per byte over {result.bytes_scored:,} bytes")


if __name__ == "__main__":
    if sys.argv[1:2] in (["-h"], ["--help"]):
        sys.exit(print(__doc__))
    if len(sys.argv) != 4:
        sys.exit("usage: python examples/sample_and_eval.py CHECKPOINT PROMPT CORPUS")
    try:
        main(*sys.argv[1:4])
    except HtcliError as error:  # (bad input: its one line, not a traceback)
        sys.exit(f"error: {error}")
