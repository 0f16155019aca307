"""What a resume changes of its run, said before it goes on: the options that differ from the run's
config.json, and what they make of the learning rate and the window length at the step it resumes at.

A resume may change the steps and the optimization's options (README, "htcli train"); the schedules are
functions of them over the whole run, so a raised steps stretches the learning rate's warm-up and decay
and the context warm-up over the new total: a finished run's learning rate goes back up, and a run past
its context warm-up trains on short windows again. Both are what the new options mean; neither was said.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

from htcli.config import TrainConfig, saved_config
from htcli.display import on_off
from htcli.errors import HtcliError
from htcli.optim import context_length, learning_rate, short_steps

# (refused where they differ, said by a resume's own lines, or paths that a moved run changes)
UNSAID = ("model", "corpus", "val", "out", "loggers", "optimizer", "seed", "val_fraction", "init_from")
SCHEDULE = ("steps", "lr", "min_lr", "warmup", "context_warmup", "context_warmup_start")


def resume_changes(config: TrainConfig, step: int) -> list[tuple[str, tuple[str, ...]]]:
    """Lines that say what resuming the run in config.out at step (its checkpoint's) with config changes
    of it, each with the config fields it names: the options that differ from the run's config.json (read
    before the resume writes its own), then (a warning) what they make of the step it resumes at, where
    its learning rate or window length differs from the run's schedule."""
    try:
        saved = TrainConfig.from_dict({**saved_config(Path(config.out)), "out": config.out})
    except HtcliError:  # (a config.json the resume did without: resume auto)
        return []
    changed = [
        field.name
        for field in dataclasses.fields(TrainConfig)
        if field.name not in UNSAID and getattr(saved, field.name) != getattr(config, field.name)
    ]
    if not changed:
        return []
    listed = ", ".join(f"{name} {on_off(getattr(config, name))} (the run's: {on_off(getattr(saved, name))})"
                       for name in changed)  # fmt: skip
    lines = [(f"resuming with {listed}", tuple(changed))]
    effect = _schedule_effect(saved, config, step)
    if effect:
        lines.append((f"warning: {effect}", SCHEDULE))
    return lines


def _schedule_effect(saved: TrainConfig, config: TrainConfig, step: int) -> str | None:
    """What config's schedules make of step (0-based: the next step trained) and after that the run's
    did not: its learning rate, and its windows' length up to the switch to full windows."""
    effects = []
    then, now = learning_rate(step, saved), learning_rate(step, config)
    if not math.isclose(then, now, rel_tol=1e-9):
        effects.append(f"at learning rate {now:.3g} (the run's schedule: {then:.3g})")
    windows = _windows(saved, config, step)
    if windows:
        effects.append(windows)
    if not effects:
        return None
    moved = [name for name in SCHEDULE if getattr(saved, name) != getattr(config, name)]
    cause = ""
    if moved == ["steps"]:  # (the schedules span the whole run)
        how = "stretches" if config.steps > saved.steps else "shrinks"
        cause = f"steps {config.steps} {how} the run's schedules: "
    elif moved:  # (not steps' alone: a new lr moved the rate too, where steps was said to stretch it)
        named = [f"{name} {getattr(config, name)}" for name in moved]
        listed = (
            f"{', '.join(named[:-1])} and {named[-1]} change" if len(named) > 1 else f"{named[0]} changes"
        )
        cause = f"{listed} the run's schedules: "
    return f"{cause}step {step + 1} trains " + ", and ".join(effects)


def _short(config: TrainConfig) -> tuple[int, int]:
    """The short windows' length and the first step (0-based) on full windows (0: none short)."""
    full = config.model.max_seq_len
    if not config.context_warmup:
        return full, 0
    return min(config.context_warmup_start, full), short_steps(config)


def _windows(saved: TrainConfig, config: TrainConfig, step: int) -> str | None:
    """config's windows from step on, where they differ from the run's schedule's over the steps to come."""
    full, last = config.model.max_seq_len, config.steps
    (short_then, switch_then), (short_now, switch_now) = _short(saved), _short(config)
    ends = [
        min(max(switch, step), last) for switch in (switch_now, switch_then)
    ]  # (of the short ones to come)
    if ends[0] == ends[1] and (ends[0] == step or short_now == short_then):
        return None  # (every step to come on the windows it had)
    if switch_then >= saved.steps:  # (the run never reached full windows)
        before = f"{short_then} bytes to its last step"
    else:
        before = f"{short_then} bytes up to step {switch_then}" if step < switch_then else f"the full {full}"
    if step < switch_now:
        kept = (
            0 < switch_then <= step
            and switch_then < saved.steps
            and config.context_warmup == saved.context_warmup
        )
        keep = _keeping(saved, config) if kept else ""
        return f"on windows of {short_now} bytes up to step {switch_now} (the run's schedule: {before}{keep})"
    return f"on windows of the full {full} bytes (the run's schedule: {before})"


def _keeping(saved: TrainConfig, config: TrainConfig) -> str:
    """The context_warmup that keeps the run's switch to full windows where it was, where one does."""
    switch = short_steps(saved)  # (the first step on full windows, 0-based)
    full, exact = config.model.max_seq_len, switch / config.steps
    for digits in range(3, 18):  # (the shortest fraction that does: rounded, or rounded down)
        for fraction in (float(f"{exact:.{digits}g}"), math.floor(exact * 10**digits) / 10**digits):
            try:
                kept = dataclasses.replace(config, context_warmup=fraction)
            except HtcliError:
                continue
            if context_length(switch, kept) == full and not (
                switch and context_length(switch - 1, kept) == full
            ):
                return f"; context_warmup {fraction} keeps its switch to {full} at step {switch + 1}"
    return ""
