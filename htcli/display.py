"""What the terminal shows: a training run's live view (fed by train()'s events) and summary, and the
result tables of eval and bench --decode. Formatting only: nothing here computes or reads files."""

from __future__ import annotations

import collections
import contextlib
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from htcli.train import TrainResult

RATE_STEPS = 20  # the live tokens/s: the last this many steps' tokens over their time (it does not flicker)


CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # all but tab and newline: a terminal acts on them
ALL_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f]")
# all but tab, newline and carriage return: the characters that change a terminal's state (escape
# sequences, the shift to line drawing, the bell) where a carriage return only moves to the line's start
STATE_CONTROLS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def visible(text: str) -> str:
    """Text with its control characters shown as \\x1b, not sent to the terminal (a corpus's or a young
    model's escape sequences changed the title, cleared the screen, left colours on)."""
    return _escaped(text.replace("\r\n", "\n"), CONTROLS)


def for_terminal(text: str) -> str:
    """Text streamed to a terminal with the control characters that would change its state shown as
    \\x1b (a model of binary data sent ESC and SO: colours, line-drawing characters until a reset);
    tabs, newlines and carriage returns as they are, as a stream cannot see \\r\\n whole."""
    return _escaped(text, STATE_CONTROLS)


def one_line(text: str) -> str:
    """Text with every control character shown as \\x1b, newline and tab too: a line of its own (an error
    naming a file whose name holds a newline broke in two)."""
    return _escaped(text, ALL_CONTROLS)


def _escaped(text: str, controls: re.Pattern) -> str:
    return controls.sub(lambda found: f"\\x{ord(found.group()):02x}", text)


def human(count: float) -> str:
    """1234567 -> '1.23M', 999700 -> '1M' (not '1e+03k')."""
    count = float(f"{count:.3g}")  # (rounded first: a count that rounds up to the next unit takes it)
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.3g}{unit}"
    return f"{count:.3g}"


def counted(count: int, noun: str) -> str:
    """1, "byte" -> '1 byte'; 1234 -> '1,234 bytes'."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def on_off(value: object) -> object:
    """A config value as a message shows it: a switch as on or off (--shift-tokens on, not True)."""
    return ("on" if value else "off") if isinstance(value, bool) else value


def byte_count(count: int) -> str:
    """1 -> '1 byte', 1234 -> '1,234 bytes'."""
    return counted(count, "byte")


SLOW_SECONDS = 2.0  # work said_if_slow says it does when it takes longer


@contextlib.contextmanager
def said_if_slow(console: Console, line: str) -> Iterator[None]:
    """line printed (from a timer's thread) once the block has taken SLOW_SECONDS (at once where that is 0
    or less), none for quicker work (an error in it is then its one line), and never after the block (a
    timer that fired as it ended printed after its error line: review)."""
    done, lock = [False], threading.Lock()

    def say() -> None:
        # (stderr gone, an OSError or rich's SystemExit for a closed pipe: the block's own output says so)
        with lock, contextlib.suppress(OSError, SystemExit):
            if not done[0]:
                console.print(escape(line), soft_wrap=True, highlight=False)

    timer = threading.Timer(SLOW_SECONDS, say)
    timer.daemon = True
    if SLOW_SECONDS > 0:
        timer.start()
    else:
        say()
    try:
        yield
    finally:
        timer.cancel()
        with lock:  # (a line being printed is printed whole, before what follows)
            done[0] = True


def unpacking_line(file: str) -> str:
    """What is said before a compressed or record file is unpacked into the corpus cache (a line of its own,
    whatever the file's name: a printable one, files.printable)."""
    said = f"unpacking {file} into the corpus cache (its first use: later runs read it from there)"
    return one_line(said + " ...")


def records_left_out(count: int) -> str:
    """What --skip-bad-records left out of a corpus: 1 -> 'left out 1 bad record of the corpus'."""
    return f"left out {counted(count, 'bad record')} of the corpus"


def corpus_changed(start: dict) -> str:
    """What a resume's start event says of a corpus that changed since the checkpoint (its corpus_was),
    and, where its held-out bytes are the corpus's end, of bytes it trained on that the end now holds."""
    train, val = start["corpus_was"]
    now = start["train_bytes"]
    if [train, val] == [now, start["val_bytes"]]:
        what = "its files are others, or in another order, of the same bytes in all"
    else:
        what = (
            f"{train:,} bytes to train on and {val:,} held out then, {now:,} and {start['val_bytes']:,} now"
        )
    said = (
        f"the corpus or its split changed since the checkpoint ({what}): the run goes on, not exactly as an "
        "uninterrupted run would"
    )
    # (of the held-out bytes, those it trained on, if the files kept their order)
    trained = min(train, now + start["val_bytes"]) - now
    if start.get("val_from_corpus") and trained > 0:
        said += (
            f"; its held-out bytes, the end of the shorter corpus, hold {trained:,} bytes it trained on: its"
            " val bpb is no longer held out (give --val files of your own to hold out others)"
        )
    elif start.get("val_from_corpus") and "order" in what:
        said += (
            "; its held-out bytes, the end of the corpus, may be bytes it trained on (--val holds out files)"
        )
    return said


def warmup_warning(warmup: int, steps: int) -> str | None:
    """What a start event's warm-up makes of the learning rate's decay, where it leaves none."""
    if 0 < steps <= warmup:
        return (
            f"--warmup ({warmup}) is not below --steps ({steps}): the learning rate rises for the whole run, "
            "without its decay to --min-lr; give a --warmup below --steps"
        )
    if 0 < warmup == steps - 1:  # (the one step after the warm-up is the decay's first: at the peak)
        lower = "--warmup 0" if warmup == 1 else f"a --warmup below {warmup}"
        return (
            f"--warmup ({warmup}) leaves one step of --steps ({steps}) after it, which runs at the peak "
            f"learning rate: no decay to --min-lr; give {lower}"
        )
    return None


def context_warning(start: dict) -> str | None:
    """What a start event's context warm-up leaves of training at the whole context, where it leaves none."""
    last, full = start.get("last_context"), start.get("seq_len")
    fraction, steps, short = start.get("context_warmup") or 0, start["steps"], start.get("short_steps", 0)
    before = start.get("step", 0) < short  # (a resumed run past its short steps: done, not to be warned of)
    if last == full and fraction and before and short >= 2 * fraction * steps:  # (0.01 of 4: one, a quarter)
        return (
            f"--context-warmup ({fraction:g}) of --steps ({steps}) rounds up to {short} step(s) on short"
            f" windows, {short / steps:.0%} of the run (the warm-up counts whole steps)"
        )
    if last is None or last == full:
        return None
    return (
        f"--context-warmup ({start['context_warmup']:g}) leaves no step of --steps ({start['steps']}) at"
        f" --seq-len ({full}): every step trains on {last}-byte windows; give a smaller --context-warmup"
    )


def start_line(start: dict) -> str:
    """The first line of a run's view, from its start event: what trains, where, in what precision (Muon's
    products named where they are not the dtype: --dtype fp32 on a CPU with AMX), on how many bytes."""
    verb = f"resuming at step {start['step']}" if start["resumed"] else "training"
    if start.get("init_from"):  # (a new run that starts from another checkpoint's weights)
        verb = f"training from {start['init_from']} (its step {start['init_step']})"
    products = start.get("muon_products")
    precision = start["dtype"] + (
        f"; Muon's products {products}" if products not in (None, start["dtype"]) else ""
    )
    return (
        f"{verb}: {human(start['params'])} parameters on {start['device']} ({precision}), "
        f"{human(start['train_bytes'])}B to train on, {human(start['val_bytes'])}B held out, "
        f"{human(start['tokens_per_step'])} bytes per step"
    )


SLOW_RUN_SECONDS = 3600  # a session whose first step says it takes longer than this is told so at once


def slow_run_note(start: dict, step: dict) -> str | None:
    """What a session's first step says of its length where the steps left would take more than an hour at
    its pace (the small preset on 2 CPU cores: ~40 s a step, 11 h; nothing said it, and its first eval
    came after an hour), with advice on a CPU; None otherwise. The first step may be slower than the rest
    (compiling, caches): about."""
    seconds, left = step.get("step_seconds"), start.get("steps", 0) - step["step"]
    if not seconds or seconds * left < SLOW_RUN_SECONDS:
        return None
    hours = seconds * left / 3600
    advice = (
        ": a smaller --preset, a shorter --seq-len or fewer --steps train sooner"
        if start.get("device") == "cpu"
        else ""
    )
    took = f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.2g} s"  # (0.4 s read "0 s")
    return (
        f"the first step took {took}: at that pace (a first step is often the slowest) the {left:,} steps "
        f"left take about {hours:.{0 if hours >= 10 else 1}f} h{advice}"
    )


def stopping_notice(signal_name: str, again_quits: bool) -> str:
    """What a stop that waits for the step in progress says at once (again_quits: whether another of the
    same signal ends the run unsaved; a Ctrl-C ignored before the run stays ignored)."""
    said = "saving and stopping once the step in progress ends"
    if signal_name == "SIGINT":
        return f"Ctrl-C: {said}" + (" (Ctrl-C again quits without saving)" if again_quits else "")
    return f"{signal_name}: {said}"


class TrainDisplay:
    """Progress bar with ETA, step, loss, validation bits per byte, learning rate, tokens/s, latest sample.

    Call it with each event of `htcli.train.train`; use it as a context manager around the run. It
    shows nothing before the run's "start" event, so errors in the inputs print alone.
    """

    def __init__(self, console: Console, spell: Callable[[str, list[str]], str] | None = None):
        """spell: a library line that names config fields (a resume's changes), as the user calls them."""
        self.console, self.spell = console, spell or (lambda line, fields: line)
        self.progress = Progress(
            TextColumn("[bold]step"),
            MofNCompleteColumn(),
            BarColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            speed_estimate_period=3600,  # (rich's 30 s held no two steps of a slow run: no eta, ever)
        )
        self.task = self.progress.add_task("train", total=None)
        self.stats = Text()
        self.sample: Panel | None = None
        self.loss = self.val_bpb = self.lr = self.tokens_per_s = None
        self.recent: collections.deque = collections.deque(maxlen=RATE_STEPS)  # (tokens, seconds) a step
        self.start: dict = {}  # (the start event: its steps and device, for the first step's note)
        self.live = Live(self._view(), console=console, refresh_per_second=4)
        self.failed = False  # (its console took no more: the caller may send that output away)

    def _started(self, event: dict) -> None:
        """The start event: the live view begins, after the start line, changes, notes and warnings."""
        self.live.start()
        self.start = event
        self.progress.reset(self.task, total=event["steps"], completed=event["step"])
        self.console.print(escape(one_line(start_line(event))), soft_wrap=True)  # (paths: init_from)
        for line, fields in event.get("changes", []):
            shown = escape(self.spell(line, fields))
            self.console.print(shown.replace("warning:", "[yellow]warning:[/]", 1), soft_wrap=True)
        if event.get("corpus_was"):
            self.console.print(f"[yellow]{corpus_changed(event)}")
        if event.get("skipped_records"):
            self.console.print(f"[yellow]{records_left_out(event['skipped_records'])}")
        for warning in (warmup_warning(event.get("warmup", 0), event["steps"]), context_warning(event)):
            if warning:
                self.console.print(f"[yellow]warning: {warning}", soft_wrap=True)
        if event.get("world_size", 1) > 1:
            ranks, batch, accum = event["world_size"], event["batch_size"], event["grad_accum"]
            self.console.print(
                f"global batch: {ranks} ranks x {batch} x {accum} accum = "
                f"{ranks * batch * accum} windows of {event['seq_len']} bytes"
            )

    def _unpacking(self, event: dict) -> None:
        """A corpus file unpacked into the cache: said once that has taken SLOW_SECONDS."""
        if event["done"]:
            self.unpacking.__exit__(None, None, None)
        else:
            self.unpacking = said_if_slow(self.console, unpacking_line(event["file"]))
            self.unpacking.__enter__()

    def _view(self) -> Group:
        return Group(self.progress, self.stats, *([self.sample] if self.sample else []))

    def __enter__(self) -> TrainDisplay:
        return self

    def __exit__(self, *exc) -> None:
        """The view's last frame drawn; `failed` where its console takes no more (the run is over: not an
        error of the run's, which would lose a stopped run's exit code)."""
        try:
            if self.live.is_started:
                self.live.stop()
                if not self.console.is_terminal:  # Live ends its last line only on terminals
                    self.console.line()
        except OSError:
            self.failed = True

    def __call__(self, event: dict) -> None:
        kind = event["event"]
        if kind == "start":
            self._started(event)
        elif kind == "step":
            self.progress.update(self.task, completed=event["step"])
            self.loss, self.lr = event["loss"], event["lr"]
            # (an average of rates, smoothed 0.9, was still mostly the slow first step's after 6: a run's
            # live 11.6k beside its summary's 12.6k; now tokens over time, as the summary's, of recent steps)
            seconds = event.get("step_seconds") or 1.0
            self.recent.append((event["tokens_per_s"] * seconds, seconds))
            self.tokens_per_s = sum(t for t, _ in self.recent) / sum(s for _, s in self.recent)
            if len(self.recent) == 1 and (note := slow_run_note(self.start, event)):
                self.console.print(f"[yellow]note:[/] {note}", soft_wrap=True)
        elif kind == "eval":
            self.val_bpb, best = event["val_bpb"], "  [dim](best so far)" if event.get("best") else ""
            said = f"step {event['step']:>6}  loss {self.loss:.4f}  val bpb {self.val_bpb:.4f}{best}"
            self.console.print(said, soft_wrap=True)
        elif kind == "sample":  # (the prompt dim, the model's bytes not: Text + Text made both dim)
            text = Text.assemble((visible(event["prompt"]), "dim"), visible(event["text"]))
            title = f"sample at step {event['step']}"
            if event.get("cut_short"):
                title += " (cut short by the stop)"
            self.sample = Panel(text, title=title, title_align="left")
            self.live.update(self._view())
        elif kind == "unpacking":  # (before the start: the live view is not drawn yet)
            self._unpacking(event)
        elif kind == "stopping":  # (from another thread, while a slow step goes on)
            said = stopping_notice(event["signal"], event.get("again_quits", False))
            self.console.print(f"[yellow]{said}", soft_wrap=True)
        elif kind == "interrupt":
            self.console.print(
                f"[yellow]interrupted at step {event['step']}: saving and stopping", soft_wrap=True
            )
        elif kind == "early_stop":
            self.console.print(f"[yellow]{early_stop_line(event)}", soft_wrap=True)
        elif kind == "moved":
            moved = f"[yellow]the run directory was moved to {escape(event['path'])}: saving there"
            self.console.print(moved, soft_wrap=True)
        elif kind == "checkpoint":
            saved = f"[dim]saved checkpoint of step {event['step']} in {escape(event['path'])}"
            self.console.print(saved, soft_wrap=True)  # (a path cut over lines defeats grep and copying)
        self.stats.plain = self._stats_line()

    def _stats_line(self) -> str:
        parts = []
        if self.loss is not None:
            parts += [f"loss {self.loss:.4f}", f"lr {self.lr:.2e}", f"{human(self.tokens_per_s)} tok/s"]
        if self.val_bpb is not None:
            parts.append(f"val bpb {self.val_bpb:.4f}")
        return "  ".join(parts)


def early_stop_line(event: dict) -> str:
    """What an early_stop event says: how many evals did not beat which best, and that the run stops."""
    evals = event["evals_since_best"]
    best = (
        f"the best, {event['best_val_bpb']:.4f} at step {event['best_step']} (best.safetensors)"
        if event.get("best_step") is not None
        else "the best"
    )
    return f"{evals} evals in a row have not beaten {best}: stopping early at step {event['step']} (patience)"


def train_summary(result: TrainResult) -> Table:
    """The end-of-run table; its tokens/s is the training steps' own, this session's tokens over their time
    (validation, samples and saves left out: they are in its time; the live view's is the last RATE_STEPS
    steps')."""
    in_steps = human(result.tokens / result.step_seconds) if result.step_seconds else "-"
    # (resumed: the steps are the run's, the time and bytes this session's; said so, they read as the run's)
    resumed = result.resumed_at is not None
    session = (
        f" ({result.step - result.resumed_at} this session, from step {result.resumed_at})" if resumed else ""
    )
    this = " this session" if resumed else ""
    return _two_columns(
        "interrupted run (saved)"
        if result.interrupted
        else "training run, stopped early (patience)"
        if result.stopped_early
        else "training run",
        [
            ("run directory", str(result.out)),
            ("steps", f"{result.step} of {result.steps}{session}"),
            ("parameters", human(result.params)),
            (f"time{this}", f"{result.seconds:.1f} s ({result.step_seconds:.1f} s in training steps)"),
            (f"bytes trained on{this}", human(result.tokens)),
            ("tokens/s in training steps", in_steps),
            ("train loss (nats/byte)", "-" if result.train_loss is None else f"{result.train_loss:.4f}"),
            ("val bits per byte", "-" if result.val_bpb is None else f"{result.val_bpb:.4f}"),
            *_best_row(result),
        ],
    )


def _best_row(result: TrainResult) -> list[tuple[str, str]]:
    """Where the run's lowest val bits per byte is not its last: what and where best.safetensors is."""
    if result.best is None or result.best[0] == result.step:
        return []
    step, bpb = result.best
    return [("best val bits per byte", f"{bpb:.4f} (step {step}: best.safetensors)")]


PLAIN_PROGRESS_SECONDS = 60.0  # off a terminal: a progress line this often, the first after as long


@contextlib.contextmanager
def progress_bar(console: Console, label: str, total: int) -> Iterator[Callable[[int, int], None]]:
    """A transient progress bar with ETA on a terminal; elsewhere (a log file, a pipe) a plain line every
    PLAIN_PROGRESS_SECONDS, none for shorter work (rich's bar there left an empty line, so that an error
    after it was two lines; and with nothing, an eval of 2 GB said nothing for hours: review); yields the
    callback (done, total) that moves it."""
    if not console.is_terminal:
        yield _plain_progress(console, label, total)
        return
    columns = (TextColumn(label), BarColumn(), TaskProgressColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(label, total=max(1, total))
        yield lambda done, _total: progress.update(task, completed=done)


def _plain_progress(console: Console, label: str, total: int) -> Callable[[int, int], None]:
    """progress_bar's callback off a terminal: "scoring: 12% (1,234 of 10,000), about 3 h 10 min left"."""
    started = time.monotonic()
    due = [started + PLAIN_PROGRESS_SECONDS]

    def advance(done: int, _total: int) -> None:
        now = time.monotonic()
        if now < due[0] or done <= 0:
            return
        due[0] = now + PLAIN_PROGRESS_SECONDS
        left = (now - started) * max(0, total - done) / done
        share = f"{done / max(1, total):.0%} ({done:,} of {total:,})"
        said = f"{label}: {share}" + (f", about {_duration(left)} left" if done < total else "")
        console.print(said, soft_wrap=True, highlight=False)

    return advance


def _duration(seconds: float) -> str:
    """45 s, 12 min, 3 h 10 min."""
    if seconds < 59.5:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def _two_columns(title: str, rows: list[tuple[str, str]]) -> Table:
    table = Table(show_header=False, title=escape(title))
    table.add_column(style="bold")
    table.add_column()
    for name, value in rows:
        table.add_row(name, escape(value))
    return table


def eval_table(report: dict) -> Table:
    """The result of `htcli eval` (its --json report)."""
    files = len(report["corpus"])
    return _two_columns(
        f"{report['checkpoint']} (step {report['step']})",
        [
            ("bits per byte", f"{report['bits_per_byte']:.4f}"),
            ("nats per byte", f"{report['nats_per_byte']:.4f}"),
            ("bytes scored", f"{report['bytes_scored']:,} in {files} file{'' if files == 1 else 's'}"),
            ("context / stride", f"{report['context']} / {report['stride']}"),
            ("time", f"{report['seconds']:.1f} s ({report['bytes_per_s'] or 0:,.0f} bytes/s)"),
        ],
    )


def by_position_table(report: dict) -> Table:
    """Bits per byte by position in the window, from an `htcli eval --by-position` report."""
    table = Table(title="bits per byte by position in the window", title_justify="left")
    for name in ("positions", "bytes scored", "bits per byte"):
        table.add_column(name, justify="right")
    for bucket in report["by_position"]:
        bits = bucket["bits_per_byte"]
        table.add_row(
            f"{bucket['first']:,}-{bucket['last']:,}",
            f"{bucket['bytes']:,}",
            "-" if bits is None else f"{bits:.4f}",
        )
    return table


def decode_table(result: dict, dtype: str) -> Table:
    """The result of `htcli bench --decode` (htcli.bench.decode_bench)."""
    table = Table(
        title=f"sampling, {result['preset']} preset, {result['device']}, {dtype}", title_justify="left"
    )
    table.add_column("measure")
    table.add_column("value", justify="right")
    rows = [
        (
            f"tokens/s, {result['new_tokens']} new after a {result['prompt_len']}-byte prompt: cache",
            f"{result['cached_tokens_per_s']:.1f}",
        ),
        ("tokens/s, recomputing the forward pass", f"{result['recompute_tokens_per_s']:.2f}"),
        ("speedup, cache vs recompute", f"{result['speedup']:.0f}x"),
        (
            f"time per token near position {result['early_position']}",
            f"{result['token_s_near_1000'] * 1e3:.2f} ms",
        ),
        (
            f"time per token near position {result['late_position']}",
            f"{result['token_s_near_8000'] * 1e3:.2f} ms",
        ),
        ("late / early", f"{result['late_over_early']:.2f}x"),
        (f"prefill of {result['prompt_len']} bytes", f"{result['prefill_s']:.2f} s"),
        ("one forward pass, same length", f"{result['forward_s']:.2f} s"),
        ("prefill / forward", f"{result['prefill_over_forward']:.2f}x"),
        ("decode steps", result["steps"]),
    ]
    for name, value in rows:
        table.add_row(name, value)
    return table


def cache_table(result: dict) -> Table:
    """`htcli bench --decode`'s H-cache against exact attention's KV cache, per context."""
    together = f"{result['batch']} at once"
    table = Table(
        title=f"decode caches, {result['preset']} preset, {result['device']}",
        title_justify="left",
        caption="cache: H-attention's or exact attention's KV; ms/byte early, late: near the context's start,"
        f" near its end; {together}: {result['batch']} samples decoded together",
        caption_justify="left",
        box=box.SIMPLE_HEAD,  # (no vertical rules, a space between columns, headers on two lines: the
        show_edge=False,  # table fits 80 columns, where its long headers were cut to "conte…", "atten…")
        padding=0,
    )
    for name in ("context", "cache", "first\nbyte", "bytes/s", "ms/byte\nearly", "ms/byte\nlate",
                 "late/\nearly", f"{together}:\nfirst byte", f"{together}:\nbytes/s"):  # fmt: skip
        table.add_column(name, justify="right", overflow="fold")
    for row in result["caches"]:
        together = row.get("batch_bytes_per_s")
        table.add_row(
            f"{row['context']:,}",
            "KV" if row["attention"] == "exact" else row["attention"].upper(),  # (exact attention's KV cache)
            f"{row['first_byte_s']:.2f} s",
            f"{row['bytes_per_s']:.0f}",
            f"{row['token_s_early'] * 1e3:.2f}",
            f"{row['token_s_late'] * 1e3:.2f}",
            f"{row['late_over_early']:.2f}x",
            "-" if together is None else f"{row['batch_first_byte_s']:.2f} s",
            "-" if together is None else f"{together:.0f} ({row['batch_speedup']:.1f}x)",
        )
    return table


def runs_table(runs: list) -> Table:
    """Where each run is (htcli.curves.Curves): its step, bytes trained on, training time, and its
    last and best validation bits per byte."""
    table = Table(title="runs", title_justify="left")
    for name in ("run", "step", "bytes", "time", "last val bpb", "best val bpb (step)"):
        table.add_column(name, justify="left" if name == "run" else "right", overflow="fold")
    for run in runs:
        last, best = run.last, run.best_val
        final = run.val[-1] if run.val else None
        table.add_row(
            escape(run.name),
            "-" if last is None else f"{last.step:,}",
            "-" if last is None else human(last.bytes),
            "-" if last is None else f"{last.seconds:,.0f} s",
            "-" if final is None else f"{final.value:.4f}",
            "-" if best is None else f"{best.value:.4f} ({best.step:,})",
        )
    return table
