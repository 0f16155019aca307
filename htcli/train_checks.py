"""What training refuses before it starts: a corpus's held-out files that are trained on too, and (for a
config printed, not run) everything train would refuse on this machine."""

from __future__ import annotations

import filecmp
import os
from collections.abc import Sequence
from pathlib import Path

from htcli.attention import check_device
from htcli.checkpoint import check_start_model, start_info
from htcli.config import TrainConfig
from htcli.corpus import file_identity, resolve_corpus
from htcli.device import resolve_device, resolve_dtype
from htcli.errors import HtcliError, unreadable
from htcli.loggers import check_loggers
from htcli.rundir import check_new_out


def start_refusal(config: TrainConfig, resume: bool) -> HtcliError | OSError | None:
    """What train would refuse before training on this machine, for a config printed and not run (which may
    be meant for another): the device and precision, the loggers, the checkpoint a new run starts from, the
    corpus's files (where given) and a new run's out (an OSError, a name too long, as train would meet it);
    None where none is refused."""
    try:
        if not resume:  # (first, as train: an out in a loop of links was a traceback in the corpus's check)
            check_new_out(Path(config.out))
        device = resolve_device(config.device)
        resolve_dtype(config.dtype, device, training=True)
        if config.model.attention == "h":
            check_device(device.type)
        check_loggers(config.loggers)
        if config.init_from and not resume:
            check_start_model(start_info(config.init_from), config.model)
        found = dict(include_hidden=config.include_hidden, exclude=[config.out])
        files = resolve_corpus(config.corpus, **found) if config.corpus else []
        if config.val:
            check_held_out(files, resolve_corpus(config.val, **found, role="held-out corpus (val)"))
    except (HtcliError, OSError) as error:
        return error
    return None


def check_held_out(corpus: Sequence[str | Path], val: Sequence[str | Path]) -> None:
    """HtcliError if a file of val is also one of the corpus's files, or a copy of one (its val bpb would be
    on trained bytes)."""
    trained = set(map(file_identity, corpus))
    shared = sorted(str(file) for file in val if file_identity(file) in trained)  # (by a name or a link)
    copies = None if shared else _copies(val, corpus)  # (a copy: cp data/a.txt held_out.txt)
    if shared or copies:
        what = (
            f"{shared[0]} is both in the corpus and in val"
            if shared
            else f"{copies[0]} (in val) holds the same bytes as {copies[1]} (in the corpus)"
        )
        raise HtcliError(
            f"{what}: held-out bytes must not be trained on; give val other files (or leave it out:"
            " val_fraction holds out the corpus's end)",
            fields=("val", "val_fraction"),
        )


def _copies(held_out: Sequence[str | Path], trained: Sequence[str | Path]) -> tuple[str | Path, ...] | None:
    """A file of held_out and one of trained with the same bytes (compared where their sizes are equal:
    a copy is found, a file that merely has a copy's size is read once), or None."""
    by_size: dict[int, list[str | Path]] = {}
    for file in trained:
        by_size.setdefault(os.stat(file).st_size, []).append(file)
    by_size.pop(0, None)  # (empty files hold no bytes to train on)
    for held in held_out:
        for twin in by_size.get(os.stat(held).st_size, []):
            try:
                if filecmp.cmp(held, twin, shallow=False):
                    return held, twin
            except OSError as error:  # (said as a run's error, "any checkpoint saved before is intact")
                raise unreadable(error.filename or f"{held} or {twin}", error) from None
    return None
