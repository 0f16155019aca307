"""Training data: a corpus split into training and validation spans, and random windows of it.

(Corpora themselves, any number of files of several kinds read as one byte string, are htcli.corpus.)
"""

from __future__ import annotations

import math

import torch

from htcli.corpus import ByteCorpus, ByteSpan
from htcli.display import byte_count
from htcli.errors import HtcliError


def split(
    corpus: ByteCorpus, val: ByteCorpus | None, val_fraction: float, window: int
) -> tuple[ByteSpan, ByteSpan]:
    """Training and validation spans, each at least one window long; without `val`, the corpus's tail."""
    seq_len = window - 1
    if val is not None:
        for name, part in (("training corpus", corpus), ("validation corpus (val)", val)):
            if len(part) < window:
                raise HtcliError(
                    f"the {name} is {byte_count(len(part))}, shorter than one window: with max_seq_len "
                    f"{seq_len} it must be at least {window:,} bytes; add data or lower max_seq_len",
                    fields=("max_seq_len", "val"),
                )
        return corpus.span(), val.span()
    total = len(corpus)
    held_out = max(math.ceil(total * val_fraction), window)
    if total - held_out < window <= total - window:  # (a smaller fraction would leave a training window)
        raise HtcliError(
            f"val_fraction {val_fraction:g} holds out {held_out:,} of the corpus's {total:,} bytes, which "
            f"leaves less than one training window ({window:,} bytes): lower val_fraction (at most "
            f"{math.floor((total - window) / total * 1000) / 1000:g} here) or pass val",
            fields=("val_fraction", "val"),
        )
    if total - held_out < window:
        need = 2 * window
        while need - max(math.ceil(need * val_fraction), window) < window:
            need += 1
        raise HtcliError(
            f"the corpus is {byte_count(total)}, shorter than a training window plus a validation window: "
            f"with max_seq_len {seq_len} it must be at least {need:,} bytes; add data, pass val or lower "
            "max_seq_len",
            fields=("max_seq_len", "val"),
        )
    return corpus.span(0, total - held_out), corpus.span(total - held_out)


class WindowSampler:
    """Uniformly random window starts. Its whole state is one torch.Generator, saved with checkpoints.

    With shard=(i, n) it draws n batches at once and keeps the i-th: n samplers with the same seed split
    one batch of n * batch_size windows between them, the windows one sampler would draw alone.
    """

    def __init__(
        self, num_bytes: int, window: int, batch_size: int, seed: int, shard: tuple[int, int] = (0, 1)
    ):
        self.num_bytes, self.window, self.batch_size = num_bytes, window, batch_size
        self.shard = shard
        self.generator = torch.Generator().manual_seed(seed)

    def starts(self, window: int | None = None, batch_size: int | None = None) -> list[int]:
        """Starts of the next batch of windows (by default of the sampler's window and batch size)."""
        window, batch_size = window or self.window, batch_size or self.batch_size
        index, count = self.shard
        drawn = torch.randint(self.num_bytes - window + 1, (batch_size * count,), generator=self.generator)
        return drawn[index * batch_size : (index + 1) * batch_size].tolist()

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def evenly_spaced(num_bytes: int, window: int, count: int) -> list[int]:
    """Up to `count` distinct window starts spread from the first byte to the last window."""
    last = num_bytes - window
    if count <= 1 or last == 0:
        return [0]
    if count > last:  # every start (asked for more than there are)
        return list(range(last + 1))
    return sorted({round(i * last / (count - 1)) for i in range(count)})
