"""A training step's parts: each rank's window sampler, one optimizer step over micro-batches, and the
validation bits per byte training checks itself with."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch

from htcli import distributed
from htcli.config import TrainConfig
from htcli.corpus import ByteSpan
from htcli.data import WindowSampler, evenly_spaced
from htcli.device import autocast
from htcli.evaluate import byte_nll, window_nats
from htcli.model import HTransformer1D

RANK_SEED_STRIDE = 1_000_003  # rank r draws data with seed + r * this


def rank_sampler(
    num_bytes: int, window: int, config: TrainConfig, rank: int, world_size: int
) -> WindowSampler:
    """Rank r's windows: its own stream (seed + r * RANK_SEED_STRIDE) or its slice of one global batch."""
    if config.split_global_batch:
        return WindowSampler(num_bytes, window, config.batch_size, config.seed, shard=(rank, world_size))
    return WindowSampler(num_bytes, window, config.batch_size, config.seed + RANK_SEED_STRIDE * rank)


def optimizer_step(
    forward: Callable,
    optimizer,
    scaler,
    batches: list[torch.Tensor],
    clip: float,
    device,
    dtype,
    no_sync: Callable = contextlib.nullcontext,
) -> tuple[float, float]:
    """Forward and backward over the micro-batches, clip, update: (mean loss, gradient norm).

    Every predicted byte weighs alike, however the windows are split (micro-batches of other sizes
    weighed by their bytes). Gradients are averaged over ranks once, in the last micro-batch's
    backward (no_sync before it).
    """
    total = torch.zeros((), device=device)
    scored = sum(batch[:, 1:].numel() for batch in batches)
    for index, batch in enumerate(batches):
        batch = batch.to(device, non_blocking=True)
        with no_sync() if index < len(batches) - 1 else contextlib.nullcontext():
            with autocast(device, dtype):
                logits = forward(batch[:, :-1])
            # (its share: / n exactly where all are alike, as scored / bytes is then n)
            loss = byte_nll(logits, batch[:, 1:]) / (scored / batch[:, 1:].numel())
            scaler.scale(loss).backward()
        total += loss.detach()
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total.item(), grad_norm.item()


@torch.no_grad()
def validation_bpb(
    model: HTransformer1D,
    corpus: ByteSpan,
    *,
    windows: int,
    batch_size: int,
    dtype: torch.dtype,
    stopped: Callable[[], bool] | None = None,
) -> tuple[float, float] | None:
    """(nats, bits) per byte of up to `windows` full windows spread over corpus: the check in training;
    None where stopped() said yes between two batches (on any rank).

    Under a process group each rank scores its share of the windows, and all get the result over all.
    """
    length = model.config.max_seq_len + 1
    starts = evenly_spaced(len(corpus), length, windows)[distributed.rank() :: distributed.world_size()]
    device = next(model.parameters()).device
    nats, cut = 0.0, False
    for first in range(0, len(starts), batch_size):
        if cut := stopped is not None and stopped():
            break
        batch = corpus.windows(starts[first : first + batch_size], length).to(device)
        nats += window_nats(model, batch, torch.full((len(batch),), length - 1), dtype).sum().item()
    nats, scored, cuts = distributed.all_sum([nats, len(starts) * (length - 1), cut], device)
    if cuts:
        return None
    nats_per_byte = nats / scored
    return nats_per_byte, nats_per_byte / math.log(2)
