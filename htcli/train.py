"""Training: `train(config)` runs (or resumes) a run in config.out and returns its summary.

Every event (start, step, eval, sample, checkpoint, end) goes to `on_event` as a dict and, as one JSON
line, to OUT/log.jsonl. The first Ctrl-C (SIGINT) stops the run after the current step and saves it; where
the step goes on for over a second after it, `on_event` gets a "stopping" event at once, from another
thread (not logged: the "interrupt" event follows at the step's end); before and after a corpus file is
unpacked into the cache (its first use), an "unpacking" event (not logged: they come before the log is
opened; "done" false, then true).

Inside a process group (`htcli.distributed.process_group`, under torchrun) the same function trains
data-parallel: each rank draws its own windows, backward averages the gradients over ranks, evaluation
is spread over them, and rank 0 alone logs, samples and saves (with every rank's data sampler state, so
that a resume under torchrun continues exactly). Every step the ranks agree on the loss and on whether
to stop, so a Ctrl-C or a divergence on one rank stops all of them at the same step.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from htcli import __version__, distributed
from htcli.attention import check_device
from htcli.checkpoint import (
    best_step,
    commit_best,
    load_weights,
    rng_from_text,
    rng_to_text,
    save_best,
    save_checkpoint,
    start_weights,
)
from htcli.checkpoint_checks import check_optimizer_state
from htcli.config import TrainConfig
from htcli.corpus import (
    ByteCorpus,
    ByteSpan,
    RecordOptions,
    check_hidden_applies,
    check_records_apply,
    resolve_corpus,
)
from htcli.data import split
from htcli.device import (
    PRECISIONS,
    dtype_name,
    keep_freed_memory,
    peak_memory,
    resolve_device,
    resolve_dtype,
    torch_dtype,
)
from htcli.errors import HtcliError, room_advice, unwritable_advice
from htcli.files import (
    CONFIG_FILE,
    LOCK_FILE,
    LOG_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    printable,
    remove_write_leftovers,
    write_json,
)
from htcli.flops import peak_bf16_flops, train_flops
from htcli.loggers import check_loggers, close_loggers, open_loggers
from htcli.model import HTransformer1D
from htcli.optim import context_length, context_schedule, learning_rate, make_optimizer, newton_schulz_dtype
from htcli.resume_changes import resume_changes
from htcli.rundir import check_still_new, open_run, resolve_resume
from htcli.runlock import RunLock, Whereabouts
from htcli.runlog import LogError, RunLog, lowest_val, trim_log
from htcli.sample import SamplingConfig, generate
from htcli.stop import StopRequest, signals_held
from htcli.train_checks import check_held_out
from htcli.train_step import optimizer_step, rank_sampler, validation_bpb

SAMPLE_PROMPT_BYTES = 64  # periodic samples continue the validation data's first bytes
SAMPLE_TEMPERATURE = 0.8


@dataclass
class TrainResult:
    out: Path
    step: int  # the run's step count at the end
    steps: int  # the step count it was asked to reach
    train_loss: float | None  # last step's loss (nats per byte)
    val_bpb: float | None  # last validation bits per byte
    interrupted: bool  # stopped by Ctrl-C, SIGTERM or SIGHUP before `steps` (and saved)
    seconds: float  # this invocation's training time
    tokens: int  # bytes trained on in this invocation
    params: int
    stopped_by: str | None = None  # "SIGINT", "SIGTERM" or "SIGHUP" when interrupted (on any rank)
    step_seconds: float = 0.0  # the part of `seconds` in training steps (not validating, sampling, saving)
    resumed_at: int | None = None  # the step this invocation resumed from (None: a new run)
    best: tuple[int, float] | None = None  # (step, val bpb) of the run's lowest val bpb: OUT/best.safetensors
    stopped_early: bool = False  # stopped (and saved) after `patience` evals that did not beat the best


def train(
    config: TrainConfig,
    *,
    resume: bool | str = False,
    on_event: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train config.model on config.corpus, saving in config.out; resume continues that run exactly
    ("auto": resume when config.out holds a checkpoint, else start).

    Every input is checked before anything is written; a checkpoint already in config.out is only
    ever replaced by a later one of the same run (resume), and only this process writes into config.out
    while it trains. The first Ctrl-C, SIGTERM or SIGHUP saves and stops. Inside a process group, every rank
    calls it.
    """
    if on_event is not None and not callable(on_event):  # (a TypeError once the run directory was made)
        raise HtcliError(f"on_event must be a function of one event (a dict), got {type(on_event).__name__}")
    run = Run(config, resolve_resume(resume, Path(config.out)), on_event)
    try:
        loggers = _start_writing(run)
        # (the stop request outlives the log: a Ctrl-C as the loggers close is recorded, cuts none short)
        with (
            StopRequest(_stop_notice(on_event, run) if run.main else None) as stop,
            RunLog(run.out / LOG_FILE, on_event, enabled=run.main, loggers=loggers) as log,
        ):
            log("start", **run.start_fields())
            if run.stopped_early:  # (a run resumed after it stopped early, its patience unchanged)
                run.log_early_stop(log)
            started, first_step, loss, stopped_by = time.perf_counter(), run.step, None, None
            while (
                run.step < config.steps
                and not run.stopped_early
                and not (stopped_by := _agreed_stop(stop, run.device))
            ):
                loss = run.train_step(log)
                run.after_step(log, stop)
            stop.acknowledge()
            if stopped_by:
                _save_at_stop(run, log, stopped_by)
            elif run.stopped_early and run.saved_step != run.step:
                run.save(log)
            seconds = time.perf_counter() - started
            tokens = (run.step - first_step) * config.tokens_per_step * run.world_size
            end = dict(interrupted=bool(stopped_by), seconds=seconds, val_bpb=run.val_bpb, train_loss=loss)
            log("end", step=run.step, **end, **({"stopped_early": True} if run.stopped_early else {}))
    except LogError as error:  # (a full disk: the log's file or a logger's)
        raise HtcliError(f"{error}; stopped ({run.kept()}): {run.advice(error.errno)}") from None
    except RuntimeError as error:
        if not _compile_failed(error):
            raise
        said = str(error).strip().splitlines()[0]  # (then dynamo's advice to set its variables)
        raise HtcliError(
            f"compile failed ({said}); stopped ({run.kept()}): train without compile", fields=("compile",)
        ) from None
    finally:
        with signals_held():  # (one now is taken after: the lock let go of, the corpora closed)
            run.close()
    best = run.best if run.best and best_step(run.out) == run.best[0] else None  # (what the file holds)
    return TrainResult(run.out, run.step, config.steps, loss, run.val_bpb, bool(stopped_by), seconds, tokens,
                       run.params, stopped_by, run.step_seconds, run.resumed_at, best,
                       run.stopped_early)  # fmt: skip


def _compile_failed(error: RuntimeError) -> bool:
    """Whether error is torch.compile's failure to compile (no working C++ compiler for inductor on a CPU,
    say: it came as a traceback at the first step)."""
    dynamo = sys.modules.get("torch._dynamo.exc")  # (not imported: nothing was compiled)
    return dynamo is not None and isinstance(error, dynamo.BackendCompilerFailed)


def _stop_notice(on_event: Callable[[dict], None] | None, run: Run) -> Callable | None:
    """What tells on_event of a stop that waits for a slow step (a "stopping" event, from another thread and
    not logged: the "interrupt" event follows when the loop stops)."""
    if on_event is None:
        return None
    return lambda signum, quits: on_event(
        {"event": "stopping", "step": run.step, "signal": signum.name, "again_quits": quits}
    )


def _save_at_stop(run: Run, log: RunLog, signal_name: str) -> None:
    """The stop logged, and the steps since the last save saved: also where the log cannot take the stop
    (a full disk; its error is raised after the save), not where a second Ctrl-C comes (quit at once)."""
    failed = None
    try:
        log("interrupt", step=run.step, signal=signal_name)
    except LogError as error:
        failed = error
    if run.saved_step != run.step:
        run.save(log)
    if failed is not None:
        raise failed


def _start_writing(run: Run) -> list:
    """Rank 0's first writes: the run directory claimed, the loggers started (rank 0's, returned), then
    config.json (so that a logger that cannot start, W&B without a login, leaves a resumed run's config as
    it was, and a resume without that logger goes on as before). Every rank stops with an error that rank 0
    meets here (the others waited for it at the first step, then said they had lost contact)."""
    loggers: list = []
    try:
        failure = None
        try:
            run.claim_directory()
            if run.main:
                config, moving = run.config, run.lock.moving_path()
                loggers = open_loggers(
                    config.loggers, run.out, config.to_dict(), run.step, resumed=run.resumed, moving=moving
                )
            run.write_config()
        except HtcliError as error:
            if not distributed.is_distributed():
                raise
            failure = error
        distributed.raise_together(failure)
        return loggers
    except BaseException:
        close_loggers(loggers)
        run.unmake_directory()
        raise


def _first_missing(path: Path) -> Path | None:
    """The first folder of path (path itself included) that does not exist, None where path exists."""
    path = Path(os.path.abspath(path))  # (normalised: "new/../existing" is the existing folder)
    for folder in [*reversed(path.parents), path]:
        if not folder.exists():
            return folder
    return None


def _agreed_stop(stop: StopRequest, device) -> str | None:
    """The signal that stops every rank at this step: SIGTERM if any rank got one, else SIGHUP, else
    SIGINT if any did, else None (a collective: all ranks call it every step). A rank whose torchrun is
    gone counts as one that got SIGTERM."""
    stop.poll()
    got = stop.signal.name if stop.signal else None
    names = ("SIGTERM", "SIGHUP", "SIGINT")
    counts = distributed.all_sum([got == name for name in names], device)
    return next((name for name, count in zip(names, counts, strict=True) if count), None)


def due(step: int, every: int, *, last: bool = False) -> bool:
    """Whether something done every `every` steps (0: never) is due after `step`; always when `last`."""
    return last or (every > 0 and step % every == 0)


@contextlib.contextmanager
def _writing(out: Path, *, resuming: bool) -> Iterator[None]:
    """An OSError inside as HtcliError naming the run directory (resuming: advice for a run to resume)."""
    try:
        yield
    except OSError as error:
        advice = unwritable_advice(error, resuming=resuming)
        raise HtcliError(
            f"cannot write the run directory {out}: {error.strerror or error}; {advice}", fields=("out",)
        ) from None


MISSING = object()  # (a state.json of an htcli before it kept the run's best)


def _best_in_state(state: dict) -> tuple[int, float] | None | object:
    """state.json's best (step, val bpb), None where the run has none yet, MISSING where it has no such field
    or one that is not a step and a finite number (a state of an older htcli, or damaged)."""
    best = state.get("best", MISSING)
    if best is None:
        return None
    valid = isinstance(best, list) and len(best) == 2 and type(best[0]) is int and type(best[1]) is float
    return (best[0], best[1]) if valid and math.isfinite(best[1]) else MISSING


def _one_precision(dtype: torch.dtype) -> torch.dtype:
    """dtype where every rank chose it, else fp32 (a collective). dtype auto (and Muon's precision)
    resolves per machine: bf16 on a CPU with AMX or AVX-512 BF16, fp32 on one without or on a GPU without
    bf16; ranks on unlike machines would otherwise average gradients computed, or make updates, in different
    precisions. fp32 is what every device computes in at its own speed (bf16 on a CPU without either is
    emulated)."""
    names = distributed.all_gather(dtype_name(dtype))  # ([dtype's] in a single process)
    return dtype if len(set(names)) == 1 else torch.float32


class Run:
    """A run being trained: its data, model, optimizer and position, and the steps of training it."""

    def __init__(self, config: TrainConfig, resume: bool, on_event: Callable[[dict], None] | None = None):
        """on_event: told of "unpacking" events (not logged) before and after a corpus file is unpacked into
        the cache, on rank 0."""
        self.config, self.resumed, self.on_event = config, resume, on_event
        self.rank, self.world_size = distributed.rank(), distributed.world_size()
        self.main = self.rank == 0  # rank 0 alone logs, samples and saves
        self.out = Path(config.out)
        self.device = distributed.local_device(resolve_device(config.device))
        self.dtype = resolve_dtype(config.dtype, self.device, training=True)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.lock, self.corpora = RunLock(self.out), []  # let go of by close()
        self.window = config.model.max_seq_len + 1
        on_gpu = self.device.type == "cuda"
        self.peak_flops = peak_bf16_flops(torch.cuda.get_device_name(self.device)) if on_gpu else None
        try:
            self._prepare(resume)
        except BaseException:
            self.close()
            raise

    def _prepare(self, resume: bool) -> None:
        """The run directory checked (and locked), the data opened, the model and optimizer built: new,
        or as the checkpoint left them."""
        config = self.config
        check_loggers(config.loggers)
        if config.model.attention == "h":
            check_device(self.device.type)
        self._check_same_options()
        checkpoint = open_run(self.out, config, resume, self.lock, main=self.main)
        # (another machine's copy of out, not up to date: the ranks hung, then said they lost contact)
        steps = distributed.all_gather(None if checkpoint is None else checkpoint[0].step)
        if len(set(steps)) > 1:
            found = ", ".join(map(str, steps))
            raise HtcliError(
                f"the ranks found different checkpoints in out (of steps {found}, by rank): give every rank"
                " the run directory as rank 0 saved it",
                fields=("out",),
            )
        # what the resume changes of the run (before config.json takes the new options)
        self.changes = [] if checkpoint is None else resume_changes(config, checkpoint[0].step)
        if checkpoint is not None:
            self.dtype = self._resumed_dtype(checkpoint[-1])
        self.dtype = _one_precision(self.dtype)
        failure = None
        try:
            self._open_inputs(fresh=checkpoint is None)
        except Exception as error:  # a file missing on this machine alone: said by every rank (they waited)
            if not distributed.is_distributed():
                raise
            failure = error
        distributed.raise_together(failure, own_first=True)
        self.params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)  # (not rotary freqs)
        self.products = self._muon_products(None if checkpoint is None else checkpoint[-1])
        self.optimizer = make_optimizer(self.model, config, self.products)
        self.sampler = rank_sampler(len(self.train_data), self.window, config, self.rank, self.world_size)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.step, self.val_bpb, self.saved_step, self.resumed_at = 0, None, None, None
        self.best: tuple[int, float] | None = None  # (step, val bpb) of best.safetensors (rank 0)
        self.saved_best: tuple[int, float] | None | object = MISSING  # (the checkpoint's: see _resumed_best)
        self.step_seconds = 0.0  # this invocation's time in train_step
        self.evals_since_best = 0  # evals in a row that did not beat the run's best (rank 0 counts)
        self.stopped_early = False  # patience spent (every rank agrees)
        self.made: Path | None = None  # the first folder of out that claim_directory made
        self.corpus_was = None  # [train, val] bytes at the checkpoint, where a resume finds others
        if checkpoint is not None:
            self._restore(*checkpoint)
        self.parallel = distributed.data_parallel(self.model, self.device)
        self.forward = torch.compile(self.parallel) if config.compile else self.parallel

    def _open_inputs(self, fresh: bool) -> None:
        """The data opened, the model built, and where a new run starts from another checkpoint's weights
        (--init-from), those loaded (that checkpoint's info kept)."""
        config = self.config
        self.train_data, self.val_data = self._open_data()
        torch.manual_seed(config.seed)
        self.model = HTransformer1D(config.model).to(self.device)
        starts_from = config.init_from if fresh else None
        self.started_from = start_weights(self.model, starts_from) if starts_from else None

    def _check_same_options(self) -> None:
        """Every rank's options are rank 0's (out aside: rank 0 alone writes): ranks started with others (by
        hand, on two machines) trained apart without a word, each its own replica, or hung."""
        mine = {**self.config.to_dict(), **self.config.model.to_dict()}
        del mine["model"], mine["out"]
        ranks = distributed.all_gather(mine)
        differ = sorted(
            {name for other in ranks[1:] for name in mine if other.get(name) != ranks[0].get(name)}
        )
        if differ:
            raise HtcliError(
                f"the ranks were started with different options ({', '.join(differ)}): start every rank with"
                " the same",
                fields=differ,
            )

    def _open_data(self) -> tuple[ByteSpan, ByteSpan]:
        """The training and validation spans (the corpora stay open until close())."""
        config = self.config
        records = RecordOptions(config.text_field, config.skip_bad_records)
        found = dict(include_hidden=config.include_hidden, exclude=[config.out])
        files = resolve_corpus(config.corpus, **found)
        val_files = resolve_corpus(config.val, **found, role="held-out corpus (val)") if config.val else []
        # (checked before any file is unpacked into the cache; a run resumed goes on as it began)
        if not self.resumed:
            check_records_apply(files + val_files, records)
            check_hidden_applies([*config.corpus, *(config.val or [])], config.include_hidden)
        if val_files:  # (before either is unpacked: a val file's bad record was said first)
            check_held_out(files, val_files)
        unpacking = self._unpacking if self.main and self.on_event is not None else None
        corpus = ByteCorpus.open(config.corpus, records=records, files=files, on_unpack=unpacking)
        self.corpora.append(corpus)
        val = (
            ByteCorpus.open(config.val, records=records, files=val_files, on_unpack=unpacking)
            if config.val
            else None
        )
        self.corpora += [val] if val else []
        return split(corpus, val, config.val_fraction, self.window)

    @contextlib.contextmanager
    def _unpacking(self, file: Path) -> Iterator[None]:
        """While a corpus file is unpacked into the cache: "unpacking" events, done False, then True."""
        self.on_event({"event": "unpacking", "file": printable(file), "done": False})
        try:
            yield
        finally:
            self.on_event({"event": "unpacking", "file": printable(file), "done": True})

    def _resumed_dtype(self, state: dict) -> torch.dtype:
        """The precision a resumed run goes on in: with dtype auto, the one it trained in (its state.json's;
        before htcli saved it, auto meant fp32 on a CPU), where this device can use it, so that a run
        started in fp32 (before auto meant bf16 on a CPU with AMX or AVX-512 BF16, or on one without) goes
        on exactly as it began; an explicit dtype, as given."""
        saved = state.get("dtype")
        if saved is None and self.device.type == "cpu":
            saved = "fp32"
        if self.config.dtype != "auto" or saved not in PRECISIONS:
            return self.dtype
        try:
            return resolve_dtype(saved, self.device)
        except HtcliError:  # (say, fp16 from a GPU, resumed on a CPU: auto's choice here)
            return self.dtype

    def _muon_products(self, state: dict | None) -> torch.dtype:
        """The precision of Muon's Newton-Schulz products. A new run: bf16 where every rank's device
        multiplies it in hardware, else fp32 (optim.newton_schulz_dtype; a collective: ranks on unlike
        machines must make the same updates). A resumed run goes on in the one it began in, wherever it
        resumes, so that it goes on exactly (its state.json's; bf16 before htcli saved it, as then always)."""
        agreed = _one_precision(newton_schulz_dtype(self.device))  # (every rank, resumed or not)
        if state is None:
            return agreed
        saved = state.get("muon_products", "bf16")
        if saved not in ("bf16", "fp32"):
            raise HtcliError(
                f"{self.out / STATE_FILE} names Muon's precision {saved!r}, not bf16 or fp32: the checkpoint "
                "is damaged; resume from a copy, or start a new run"
            )
        return torch_dtype(saved)

    def _restore(self, info, weights, optimizer_state, state) -> None:
        """Continue exactly where the checkpoint left off: weights, optimizer, step, this rank's RNGs."""
        load_weights(self.model, weights, info.path)
        optimizer_file = self.out / OPTIMIZER_FILE
        # the hyperparameters come from this run's config (a resume may change --weight-decay, as it may
        # --lr), never from the file: only the moments and step counts are the checkpoint's
        groups = self.optimizer.param_groups
        settings = [{k: v for k, v in group.items() if k != "params"} for group in groups]
        try:
            self.optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError, TypeError, RuntimeError) as error:
            raise HtcliError(f"{optimizer_file} is not the optimizer state of this model ({error})") from None
        for group, own in zip(self.optimizer.param_groups, settings, strict=True):
            params = group["params"]
            group.clear()  # (keys the file adds go too)
            group.update(own, params=params)
        check_optimizer_state(self.optimizer, info.step, not state["grad_scaler"], optimizer_file)
        self.step, self.val_bpb, self.saved_step = info.step, state.get("val_bpb"), info.step
        self.saved_best = _best_in_state(state)
        self.resumed_at = info.step
        now, then = [len(self.train_data), len(self.val_data)], state.get("corpus_bytes")
        known = isinstance(then, list) and len(then) == 2 and all(type(n) is int for n in then)
        moved = state.get("corpus_layout", self._corpus_layout()) != self._corpus_layout()
        if known and (then != now or moved):  # (older checkpoints: not known)
            self.corpus_was = then
        count = state.get("evals_since_best", 0)  # (a corpus changed: its best anew, and the count)
        self.evals_since_best = count if type(count) is int and count >= 0 and self.corpus_was is None else 0
        # (a run that stopped early, its patience not raised; not one that ended at its steps: it trains on,
        # its count going on; every rank reads the state)
        stopped = state.get("stopped_early") is True
        self.stopped_early = stopped and 0 < self.config.patience <= self.evals_since_best
        mine = state["ranks"][self.rank]
        try:
            torch.set_rng_state(rng_from_text(mine["torch_rng"]))
            if mine.get("cuda_rng") is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng_from_text(mine["cuda_rng"]), self.device)
            self.sampler.load_state_dict({"generator": rng_from_text(mine["sampler"])})
            if state["grad_scaler"]:
                self.scaler.load_state_dict(state["grad_scaler"])
        except (ValueError, RuntimeError, KeyError, TypeError):
            raise HtcliError(
                f"{self.out / STATE_FILE} holds damaged random or scaler states: cannot resume"
            ) from None

    def claim_directory(self) -> None:
        """The run directory made and locked (rank 0): one made since open_run looked is checked as open_run
        checks one it finds, one open_run locked is checked to be still there; the temporary files of writes
        cut short are removed, and the log loses the events a crash left past the checkpoint resumed from (a
        new run: all those of a run that never saved; a damaged log stops the run before anything is
        written)."""
        if self.main:
            with _writing(self.out, resuming=self.resumed):
                if self.lock.held:  # (open_run found the directory and locked it)
                    self.follow_directory()
                else:
                    made = _first_missing(self.out)
                    self.out.mkdir(parents=True, exist_ok=True)
                    self.lock.acquire()
                    check_still_new(self.out)
                    self.made = made  # (not before: a directory another run made and used meanwhile is kept)
                remove_write_leftovers(self.out)
                kept = trim_log(
                    self.out / LOG_FILE, self.step, then="resume" if self.resumed else "run again"
                )
                commit_best(self.out, self.step if self.resumed else None)  # (a save's, cut short: finished)
                self.best = self._resumed_best(kept) if self.resumed else None

    def _resumed_best(self, kept: list[dict]) -> tuple[int, float] | None:
        """The run's best (step, val bpb) at its checkpoint (its state.json's; before htcli kept it there, the
        lowest of its logged evals); none where the corpus changed since (the scores may not compare)."""
        if self.corpus_was is not None:
            return None
        if self.saved_best is not MISSING:
            return self.saved_best
        return lowest_val(kept)

    def unmake_directory(self) -> None:
        """Where a new run's start failed (a logger that cannot start) in a directory it made: that directory
        removed, with the folders made for it, so that the failure leaves the disk as it was."""
        out = Path(os.path.abspath(self.out))
        if self.main and self.made is not None and not self.resumed and self.lock.held:
            if not out.is_relative_to(self.made):  # (never a folder that was there before)
                return
            shutil.rmtree(out, ignore_errors=True)  # (locked: no other process trains into it)
            self.lock.release()
            for folder in out.parents:
                if not folder.is_relative_to(self.made):
                    break
                with contextlib.suppress(OSError):  # (one that holds something else now stays)
                    folder.rmdir()

    def write_config(self) -> None:
        """config.json (rank 0), in the claimed run directory."""
        if self.main:
            with _writing(self.out, resuming=self.resumed):
                write_json(self.out / CONFIG_FILE, {"htcli_version": __version__, **self.config.to_dict()})

    def start_fields(self) -> dict:
        config = self.config
        return dict(
            step=self.step, steps=config.steps, resumed=self.resumed, params=self.params,
            device=str(self.device), dtype=dtype_name(self.dtype), train_bytes=len(self.train_data),
            val_bytes=len(self.val_data), skipped_records=sum(c.skipped_records for c in self.corpora),
            tokens_per_step=config.tokens_per_step * self.world_size,
            world_size=self.world_size, batch_size=config.batch_size, grad_accum=config.grad_accum,
            seq_len=config.model.max_seq_len, corpus_was=self.corpus_was, val_from_corpus=not config.val,
            warmup=config.warmup,
            muon_products=dtype_name(self.products) if config.optimizer == "muon" else None,
            **context_schedule(config),
            changes=[[line, list(fields)] for line, fields in self.changes],  # (fields: those the line names)
            **self._start_weights_fields(),
        )  # fmt: skip

    def _start_weights_fields(self) -> dict:
        """Where a new run's weights came from: the checkpoint it starts from and its step (none: random)."""
        if self.started_from is None:
            return {}
        return {"init_from": str(self.started_from.name), "init_step": self.started_from.step}

    def train_step(self, log: RunLog) -> float:
        """One optimizer step on fresh windows; logs it and returns its loss (the mean over ranks)."""
        config = self.config
        lr = learning_rate(self.step, config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        length = context_length(self.step, config)
        batch_size = config.batch_size * config.model.max_seq_len // length  # the same bytes per step
        batches = [
            self.train_data.windows(self.sampler.starts(length + 1, batch_size), length + 1)
            for _ in range(config.grad_accum)
        ]
        no_sync = self.parallel.no_sync if self.parallel is not self.model else contextlib.nullcontext
        loss, grad_norm = optimizer_step(
            self.forward, self.optimizer, self.scaler, batches, config.clip, self.device, self.dtype, no_sync
        )
        # NaN on every rank if it is NaN on one (the gradient norm, of the averaged gradients, is the same)
        loss = distributed.all_sum([loss], self.device)[0] / self.world_size
        if not (math.isfinite(loss) and (self.scaler.is_enabled() or math.isfinite(grad_norm))):
            self._diverged(log, loss, grad_norm)
        self.step += 1
        seconds = time.perf_counter() - started
        self.step_seconds += seconds
        log("step", step=self.step, loss=loss, lr=lr, grad_norm=grad_norm, context=length,
            **self._speed(seconds, batch_size * config.grad_accum, length))  # fmt: skip
        return loss

    def _speed(self, seconds: float, windows: int, length: int) -> dict:
        """A step's time, bytes/s (all ranks), this process's model TFLOP/s and peak memory, and
        model FLOPs utilisation against the GPU's bf16 peak where known."""
        flops = train_flops(self.config.model, windows, length) / seconds
        speed = dict(
            step_seconds=seconds,
            tokens_per_s=self.config.tokens_per_step * self.world_size / seconds,
            tflops=flops / 1e12,
            peak_memory=peak_memory(self.device),
        )
        if self.peak_flops:
            speed["mfu"] = flops / self.peak_flops
        return speed

    def _diverged(self, log: RunLog, loss: float, grad_norm: float) -> None:
        log("diverged", step=self.step + 1, loss=loss, grad_norm=grad_norm)
        kept = "none saved yet"
        if self.saved_step is not None:  # (0 too: a stop before the first step saves step 0)
            kept = f"the checkpoint of step {self.saved_step} in {self.where_now()} is intact"
        fp32 = "" if self.dtype == torch.float32 else " or use dtype fp32"  # (not where it is already)
        again = ""
        if self.step == self.resumed_at:  # (a checkpoint's weights can be ruined and still finite)
            again = "; if it diverges at once again, the checkpoint itself is past saving"
            again += ": start anew in another run directory"  # (not "out": a run named out would be --out)
        raise HtcliError(
            f"training diverged at step {self.step + 1} (loss {loss}, gradient norm {grad_norm}); "
            f"stopped without saving ({kept}): lower lr (now {self.config.lr:g}){fp32}{again}",
            fields=("lr", "dtype"),
        )

    def after_step(self, log: RunLog, stop: StopRequest | None = None) -> None:
        """Evaluate, sample and save where due (a validation or a sample ends early at a stop request)."""
        config, step = self.config, self.step
        last = step == config.steps
        if due(step, config.eval_every, last=last):
            # (the last one is the run's result: a stop there is not acted on, and resuming cannot redo it)
            scores = self.validate(None if last else stop)
            if scores:  # (none for one that a stop cut short: the save follows; the last val bpb stands)
                val_loss, self.val_bpb = scores
                best = (
                    self.main
                    and math.isfinite(self.val_bpb)
                    and (not self.best or self.val_bpb < self.best[1])
                )
                if best:
                    self.save_best(log)
                log(
                    "eval",
                    step=step,
                    val_loss=val_loss,
                    val_bpb=self.val_bpb,
                    **({"best": True} if best else {}),
                )
                self._count_patience(log, best, last)
        if self.main and due(step, config.sample_every):
            prompt, text, cut = self.sample(stop)
            log("sample", step=step, prompt=prompt, text=text, **({"cut_short": True} if cut else {}))
        if due(step, config.save_every, last=last):
            self.save(log)

    def _count_patience(self, log: RunLog, best: bool, last: bool) -> None:
        """After an eval: the evals in a row that did not beat the best counted (rank 0), and, with patience,
        whether they are that many: then the run stops early (every rank, at this step: rank 0 decides)."""
        self.evals_since_best = 0 if best else self.evals_since_best + 1
        patience = self.config.patience
        if patience and not last:
            spent = self.main and self.evals_since_best >= patience
            self.stopped_early = bool(distributed.all_sum([spent], self.device)[0])
            if self.stopped_early:
                self.log_early_stop(log)

    def log_early_stop(self, log: RunLog) -> None:
        best_step, best_bpb = self.best if self.best else (None, None)  # (rank 0's: the others do not log)
        log("early_stop", step=self.step, patience=self.config.patience,
            evals_since_best=self.evals_since_best, best_step=best_step, best_val_bpb=best_bpb)  # fmt: skip

    def validate(self, stop: StopRequest | None = None) -> tuple[float, float] | None:
        """(nats, bits) per byte on the validation windows: --eval-batches of the batch of one process
        without --split-global-batch (the default), of the global batch with it (one process training on
        that batch scores as many windows: the same val bpb). None where a stop request (on any rank) cut
        it short: the save comes first (a long validation outlasted a scheduler's grace period)."""
        self.model.eval()
        try:
            batch = self.config.batch_size * (self.world_size if self.config.split_global_batch else 1)
            windows = self.config.eval_batches * batch
            return validation_bpb(
                self.model,
                self.val_data,
                windows=windows,
                batch_size=self.config.batch_size,
                dtype=self.dtype,
                stopped=None if stop is None else lambda: stop.requested,
            )
        finally:
            self.model.train()

    def sample(self, stop: StopRequest | None = None) -> tuple[str, str, bool]:
        """A continuation of the validation data's first bytes, from a fixed seed (no global RNG used),
        ended early by a stop request (Ctrl-C, SIGTERM, SIGHUP: the save comes first, a long sample took
        minutes): prompt, text, and whether the stop cut it short."""
        prompt = self.val_data.read(0, min(SAMPLE_PROMPT_BYTES, len(self.val_data)))
        config = self.config
        self.model.eval()
        try:
            sampling = SamplingConfig(config.sample_length, temperature=SAMPLE_TEMPERATURE, seed=config.seed)
            made, cut = bytearray(), False
            for byte in generate(self.model, prompt, sampling, dtype=self.dtype):
                made.append(byte)
                if stop is not None and stop.requested:
                    cut = len(made) < config.sample_length
                    break
            text = made.decode("utf-8", "replace")
        finally:
            self.model.train()
        return prompt.decode("utf-8", errors="replace"), text, cut

    def _corpus_layout(self) -> str:
        """A digest of the training and held-out corpora's files' sizes, in order."""
        return hashlib.sha256(b"|".join(corpus.layout() for corpus in self.corpora)).hexdigest()[:16]

    def save(self, log: RunLog) -> None:
        """A checkpoint of this step, with every rank's random state (all ranks take part)."""
        ranks = distributed.all_gather(self._rank_state())
        if self.main:
            state = {"world_size": self.world_size, "ranks": ranks, "grad_scaler": self.scaler.state_dict()}
            state["corpus_bytes"] = [len(self.train_data), len(self.val_data)]  # (a resume compares)
            state["corpus_layout"] = self._corpus_layout()  # (and this: the files' sizes, in order)
            state["dtype"] = dtype_name(self.dtype)  # (a resume with dtype auto keeps it)
            state["muon_products"] = dtype_name(self.products)  # (a resume keeps it)
            state["best"] = list(self.best) if self.best else None  # (of best.safetensors, this save commits)
            state["evals_since_best"] = self.evals_since_best  # (a resume goes on counting)
            state["stopped_early"] = self.stopped_early
            self._write_where_it_is(
                log,
                f"the checkpoint of step {self.step}",
                lambda place: save_checkpoint(
                    place, self.model, self.optimizer, state, step=self.step, val_bpb=self.val_bpb
                ),
            )
            self.saved_step = self.step  # (before the log says so, which may fail)
            log("checkpoint", step=self.step, path=str(self.out))
        distributed.barrier(self.device)  # nobody goes on (or exits) before the checkpoint is written
        self.saved_step = self.step

    def save_best(self, log: RunLog) -> None:
        """This step's weights for best.safetensors, which the next save puts in place (rank 0, at an eval
        that beats the run's best)."""
        self._write_where_it_is(
            log,
            f"the best weights (step {self.step})",
            lambda place: save_best(place, self.model, step=self.step, val_bpb=self.val_bpb),
        )
        self.best = (self.step, self.val_bpb)

    def _write_where_it_is(self, log: RunLog, what: str, write: Callable[[Path], None]) -> None:
        """write(place) into the run directory where it is (a move during the write: the files go with it);
        a failure one line that names `what` and the run directory, what is kept and what to do (rank 0)."""
        self.follow_directory(log)
        place = self.lock.moving_path() or self.out
        try:
            write(place)
        except (OSError, HtcliError) as error:
            if not self.lock.in_place():  # (deleted meanwhile: that is what to say; moved: name it)
                self.follow_directory(log)
            if isinstance(error, HtcliError):
                raise HtcliError(str(error).replace(str(place), str(self.out)), fields=error.fields) from None
            reason = str(error.strerror or error).replace(str(place), str(self.out))
            raise HtcliError(
                f"cannot save {what} in {self.out}: {reason} ({self.kept()}); {self.advice(error.errno)}"
            ) from None

    def follow_directory(self, log: RunLog | None = None) -> None:
        """Saves go where the run directory is (rank 0): where it was moved since this process locked it
        (renamed, or an --out link pointed elsewhere), there, logged as `moved`, never to whatever stands at
        its old name (another run's directory, maybe). HtcliError where it was deleted or its lock file
        deleted or replaced (no lock then keeps other runs out), where the system does not say where it is,
        where it moved before training (no log: nothing to lose), and where its permissions were taken
        away."""
        if self.lock.in_place():
            return
        now = self.lock.where_now()
        if now is not None and now.ours and log is not None:
            self.out = now.path
            self.lock.follow(self.out)
            log("moved", step=self.step, path=str(self.out))
            return
        denied = None if now is not None and (now.deleted or now.ours) else self.lock.denied(now and now.path)
        if denied is not None:  # (its lock unseen for its permissions: not "moved, deleted or replaced")
            again = "start the run again" if self.saved_step is None else "resume"
            raise HtcliError(
                f"cannot reach the run directory {printable(self.out)} any more: {denied} ({self.kept()});"
                f" restore its permissions (and its parents'), then {again}"
            )
        raise HtcliError(self._lost_directory(now, started=log is None))

    def where_now(self) -> Path:
        """Where the run directory is now, for a message: where it was moved since the last save (rank 0, on
        a system that says), else its path."""
        if self.main and not self.lock.in_place():
            now = self.lock.where_now()
            if now is not None and now.ours:
                return now.path
        return self.out

    def _lost_directory(self, now: Whereabouts | None, *, started: bool) -> str:
        """What follow_directory says where it cannot follow (now: the lock's where_now)."""
        when = "started" if started else "trained into it"
        stopped = "stopped before training" if started else f"stopped without saving step {self.step}"
        if now is None:
            gone = f"the run directory {printable(self.out)} was moved or deleted"
            return f"{gone} while this run {when}: {stopped}"
        place = printable(now.path)
        if now.deleted:
            return (
                f"the run directory {place} was deleted (or moved to another file system) while this run"
                f" {when}: {stopped}"
            )
        if now.ours:  # (before training)
            return (
                f"the run directory {printable(self.out)} was moved to {place} while this run started:"
                f" {stopped}; run again with --out {place}"
            )
        lock = printable(now.path / LOCK_FILE)
        return (
            f"the lock file {lock} of this run was moved, deleted or replaced while"
            f" it {when} (another run may train there now): {stopped}; resume it once no other run trains"
            f" in {place}"
        )

    def kept(self) -> str:
        """What a run that stops here keeps: its last checkpoint."""
        return (
            "none saved yet"
            if self.saved_step is None
            else f"the checkpoint of step {self.saved_step} is intact"
        )

    def advice(self, number: int | None) -> str:
        """What to do after a write failed with this errno: free space where it ran out, then go on."""
        mend = room_advice(number) or "mend that"
        if number in (errno.EMFILE, errno.ENFILE):  # (the process's limit: ulimit -n)
            mend = "raise the limit on open files (ulimit -n)"
        if number in (errno.EACCES, errno.EPERM):  # (a chmod of the run directory while it trained)
            mend = "restore its permissions"
        return f"{mend}, then {'start the run again' if self.saved_step is None else 'resume'}"

    def _rank_state(self) -> dict:
        """What this rank needs to continue exactly: its random number generators and data sampler."""
        cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        return {
            "torch_rng": rng_to_text(torch.get_rng_state()),
            "cuda_rng": None if cuda is None else rng_to_text(cuda),
            "sampler": rng_to_text(self.sampler.state_dict()["generator"]),
        }

    def close(self) -> None:
        for corpus in self.corpora:
            corpus.close()
        self.lock.release()
