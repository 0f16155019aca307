"""Shared helpers: a tiny model and training setup, a small corpus, and a CLI runner."""

import contextlib
import fcntl
import json
import os
import pty
import random
import struct
import subprocess
import termios
import time

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter (decided before triton is imported)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from typer.testing import CliRunner

from htcli.cli import app
from htcli.config import TrainConfig
from htcli.presets import model_config

# tiny tensors gain nothing from a second thread, and on a busy 2-core machine the threads' spin-waits
# make each op 50x slower
torch.set_num_threads(1)

TINY_MODEL = dict(dim=32, depth=1, heads=2, dim_head=16, block_size=8, max_seq_len=64)
TINY_FLAGS = ["--dim", "32", "--depth", "1", "--heads", "2", "--dim-head", "16", "--block-size", "8"]
TINY_FLAGS += ["--seq-len", "64", "--batch-size", "2", "--eval-batches", "1", "--warmup", "0"]
TINY_FLAGS += ["--sample-every", "0", "--device", "cpu", "--preset", "tiny"]
WORDS = (
    "the of and to a in that is was he for it with as his on be at by had not are but from or have".split()
)


def make_text(size: int, seed: int = 0) -> bytes:
    """Deterministic pseudo-English of exactly `size` bytes."""
    rng = random.Random(seed)
    words, length = [], 0
    while length < size:
        word = rng.choice(WORDS) + ("\n" if rng.random() < 0.1 else " ")
        words.append(word)
        length += len(word)
    return "".join(words).encode()[:size]


@pytest.fixture
def corpus(tmp_path):
    """A 20 kB text file."""
    path = tmp_path / "corpus.txt"
    path.write_bytes(make_text(20_000))
    return path


def events(run, kind: str) -> list[dict]:
    """The events of one kind ("start", "step", "eval", ...) in a run directory's log.jsonl, in order."""
    lines = (run / "log.jsonl").read_text().splitlines()
    return [event for event in map(json.loads, lines) if event["event"] == kind]


def tiny_config(corpus, out, **overrides) -> TrainConfig:
    """A training config that runs in well under a second per few steps on a CPU."""
    base = dict(
        corpus=[str(corpus)],
        out=str(out),
        model=model_config("tiny", **TINY_MODEL),
        steps=6,
        batch_size=2,
        warmup=2,
        eval_every=3,
        eval_batches=1,
        save_every=3,
        sample_every=0,
        device="cpu",
    )
    return TrainConfig(**{**base, **overrides})


def nan_loss_at_step(monkeypatch, step: int) -> None:
    """The training loss of optimizer step `step` (counted from 1 in this process) reads NaN: a divergence."""
    from htcli import train as train_module

    real_step, calls = train_module.optimizer_step, []

    def nan_at_that_step(*args, **kwargs):
        calls.append(1)
        loss, norm = real_step(*args, **kwargs)
        return (float("nan") if len(calls) == step else loss), norm

    monkeypatch.setattr(train_module, "optimizer_step", nan_at_that_step)


def invoke(*args):
    """Run the CLI in-process; stdout and stderr stay apart."""
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_user_error(result, message: str) -> None:
    """A handled error: non-zero exit, one line on stderr holding message, no traceback."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.output


def wait_for_a_step(out, process) -> None:
    """Until the training process writing into out has logged a step (it fails the test if the
    process ends first or nothing comes within a minute)."""
    log, deadline = out / "log.jsonl", time.monotonic() + 60
    while not (log.exists() and '"event": "step"' in log.read_text()):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"training did not start: {process.communicate()[1]}")
        time.sleep(0.05)


def on_a_terminal(
    command, *, rows: int = 24, columns: int = 100, stdout=None, stderr=None, env=None
) -> tuple[int, bytes]:
    """Run command with stdout and stderr (each unless given) on a terminal of its own, rows x columns: its
    exit code and what the terminal was sent."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    env = {key: value for key, value in (env or os.environ).items() if key not in ("COLUMNS", "LINES")}
    process = subprocess.Popen(
        list(map(str, command)),
        stdout=follower if stdout is None else stdout,
        stderr=follower if stderr is None else stderr,
        env={**env, "TERM": "xterm"},
    )  # fmt: skip
    os.close(follower)
    shown = b""
    with contextlib.suppress(OSError):  # (the process closed the terminal)
        while chunk := os.read(leader, 65536):
            shown += chunk
    os.close(leader)
    return process.wait(timeout=120), shown
