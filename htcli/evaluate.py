"""Bits per byte of a model on a corpus.

`evaluate` scores every byte but the first exactly once. Its windows hold L = max_seq_len input bytes
(fewer if the corpus is shorter). The first window scores all its L predictions, so byte i <= L is
predicted from bytes 0..i-1; each later window moves `stride` bytes on and scores only its last
`stride` predictions, each seeing at least L - stride earlier bytes; the last window ends at the last
byte and scores what is left. The first byte is not scored: a byte model has no beginning-of-text token
to predict it from. (Training's cheaper estimate is `htcli.train_step.validation_bpb`.)
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from htcli.corpus import ByteSpan
from htcli.device import autocast
from htcli.display import byte_count
from htcli.errors import HtcliError
from htcli.model import HTransformer1D, is_integer

NLL_POSITIONS = 4096  # positions of a batch whose log-likelihoods are computed at once


@dataclass
class EvalResult:
    bits_per_byte: float
    nats_per_byte: float
    bytes_scored: int  # the corpus's length minus its first byte
    context: int  # input bytes per window
    stride: int  # bytes scored per window after the first
    seconds: float
    # by position in the window (evaluate's by_position): a bucket per doubling of the position, each
    # {"first": position, "last": position, "bytes": scored there, "bits_per_byte": ...}
    by_position: list[dict] | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def plan_windows(num_bytes: int, context: int, stride: int) -> Iterator[tuple[int, int]]:
    """(end, scored) per window: it predicts bytes end - length + 1 .. end and scores the last `scored`."""
    length = min(context, num_bytes - 1)
    scored_up_to, end = 0, length
    while scored_up_to < num_bytes - 1:
        yield end, end - scored_up_to
        scored_up_to, end = end, min(end + stride, num_bytes - 1)


def window_nats(
    model: HTransformer1D, windows: torch.Tensor, scored: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Summed negative log-likelihood (float64) of the last `scored` predictions of each window (b, n+1)."""
    return position_nats(model, windows, scored, dtype).sum(1)


def position_nats(
    model: HTransformer1D, windows: torch.Tensor, scored: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """(b, n) negative log-likelihood (float64) of each window's predictions, 0 where not scored: the
    prediction at position p of a window (b, n+1) sees its first p + 1 bytes."""
    with autocast(windows.device, dtype):
        logits = model(windows[:, :-1])
    # (b, n), a slice of positions at a time: the log-softmax of all of them at once doubled the memory of
    # a long context's logits (6.8 GB at 262,144 bytes x 8 windows; review)
    pieces = zip(logits.split(NLL_POSITIONS, 1), windows[:, 1:].split(NLL_POSITIONS, 1))
    nll = torch.cat([byte_nll(piece, targets, reduction="none") for piece, targets in pieces], 1)
    n = nll.shape[1]
    kept = torch.arange(n, device=nll.device) >= (n - scored.to(nll.device))[:, None]
    return nll.double() * kept


def position_buckets(length: int, first: int = 64) -> list[tuple[int, int]]:
    """Positions 0..length-1 in doubling buckets: (0, 63), (64, 127), (128, 255), ... (inclusive)."""
    buckets, start, end = [], 0, first
    while start < length:
        buckets.append((start, min(end, length) - 1))
        start, end = end, end * 2
    return buckets


def byte_nll(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy in nats of logits (b, n, vocab) against targets (b, n), computed in fp32."""
    return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction=reduction)


@torch.no_grad()
def evaluate(
    model: HTransformer1D,
    corpus: ByteSpan,
    *,
    stride: int | None = None,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    by_position: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
) -> EvalResult:
    """Bits and nats per byte over every byte of corpus after the first (see the module docstring).

    stride defaults to half the context (by_position: the whole context, so that every position of a
    window is scored as often, but for the last window, which ends at the corpus's end and scores only
    its last positions); by_position also gives bits per byte by position in the window, in
    doubling buckets. on_progress(bytes scored so far, bytes to score) follows along.
    """
    context = model.config.max_seq_len
    check_options(model, stride, batch_size, by_position)
    if stride is None:
        stride = context if by_position else context // 2
    _check_corpus(corpus)
    device = next(model.parameters()).device
    length = min(context, len(corpus) - 1)
    to_score, scored_so_far = len(corpus) - 1, 0
    nats = torch.zeros(length, dtype=torch.float64)  # by position
    counts = torch.zeros(length, dtype=torch.int64)
    started = time.perf_counter()
    plan = plan_windows(len(corpus), context, stride)
    while batch := list(itertools.islice(plan, batch_size)):
        windows = corpus.windows([end - length for end, _ in batch], length + 1).to(device)
        scored = torch.tensor([count for _, count in batch])
        nats += position_nats(model, windows, scored, dtype).sum(0).cpu()
        counts += (torch.arange(length) >= (length - scored)[:, None]).sum(0)
        scored_so_far += int(scored.sum())
        if on_progress is not None:
            on_progress(scored_so_far, to_score)
    nats_per_byte = nats.sum().item() / to_score
    if not math.isfinite(nats_per_byte):
        raise HtcliError(
            f"the model's predictions are not finite ({nats_per_byte}): its weights overflow in this "
            "number format; try dtype fp32",
            fields=("dtype",),
        )
    return EvalResult(
        bits_per_byte=nats_per_byte / math.log(2),
        nats_per_byte=nats_per_byte,
        bytes_scored=to_score,
        context=length,
        stride=length if to_score <= context else stride,  # (one window, where the corpus fills no more)
        seconds=time.perf_counter() - started,
        by_position=_buckets(nats, counts) if by_position else None,
    )


def check_options(
    model: HTransformer1D, stride: int | None, batch_size: int, by_position: bool = False
) -> None:
    """evaluate's checks that need no corpus (a CLI makes them before it opens a long one); stride None:
    evaluate's default."""
    context = model.config.max_seq_len
    if not model.config.causal:
        raise HtcliError(
            "the model is bidirectional (causal false): its predictions see the bytes they predict, so bits "
            "per byte mean nothing; evaluate a causal model"
        )
    if stride is not None and not is_integer(stride):  # (1.5: a TypeError of range(); True taken as 1)
        raise HtcliError(f"stride must be an integer number of bytes, got {stride!r}", fields=("stride",))
    if stride is not None and not 1 <= stride <= context:
        raise HtcliError(
            f"stride must be between 1 and the context ({context}), got {stride}", fields=("stride",)
        )
    if by_position and stride is not None and stride != context:
        raise HtcliError(  # (the curve's first buckets held the first window's bytes alone)
            f"by_position scores every position of each window, and stride {stride} scores only a window's "
            f"last {stride} (the first {context - stride} positions in the first window alone): leave stride "
            "out",
            fields=("by_position", "stride"),
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= 2**53:
        # (config.MAX_COUNT, which this module is below; 1.5 was an error of itertools.islice)
        raise HtcliError(
            f"batch_size must be a positive integer up to 2**53, got {batch_size}", fields=("batch_size",)
        )


def _check_corpus(corpus: ByteSpan) -> None:
    if not isinstance(corpus, ByteSpan):
        raise HtcliError(
            f"the corpus must be a ByteSpan (htcli.corpus.ByteCorpus.open(paths).span()), got "
            f"{type(corpus).__name__}"
        )
    if len(corpus) < 2:
        raise HtcliError(
            f"the corpus is {byte_count(len(corpus))} long: it must be at least 2 bytes long to be scored"
        )


def _buckets(nats: torch.Tensor, counts: torch.Tensor) -> list[dict]:
    rows = []
    for first, last in position_buckets(len(nats)):
        scored = int(counts[first : last + 1].sum())
        bits = nats[first : last + 1].sum().item() / scored / math.log(2) if scored else None
        rows.append({"first": first, "last": last, "bytes": scored, "bits_per_byte": bits})
    return rows
