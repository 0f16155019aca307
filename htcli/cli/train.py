"""`htcli train`: its options, a config from them (and a config file), the run, its summary."""

from __future__ import annotations

import contextlib
import inspect
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from htcli.cli.common import (
    DEVICE,
    DTYPE,
    FLAGS,
    SEED,
    Corpus,
    IncludeHidden,
    SkipBadRecords,
    TextField,
    app,
    console,
    err_console,
    flag,
    os_error_line,
    parse_path,
    report_os_error,
    respell,
    switch,
    train_option,
    user_errors,
)
from htcli.errors import HtcliError
from htcli.help_layout import Command, with_default
from htcli.presets import DEFAULT_PRESET, PRESETS
from htcli.stop import Terminated, command_over, signals_held, to_devnull

PREEMPTED = 75  # exit code of a run stopped (and saved) by SIGTERM: EX_TEMPFAIL, "try again later"
HUNG_UP = 129  # exit code of a run stopped (and saved) by SIGHUP: 128 + 1, as the signal's default action
STOP_CODES = {"SIGTERM": PREEMPTED, "SIGHUP": HUNG_UP}  # (a Ctrl-C's save and stop exits 0)

# train's options, None when not given (a resumed run keeps its saved value)
DEFAULT_OUT = "runs/htcli"
OutDir = Annotated[
    str | None,
    typer.Option(
        help=f"Run directory: checkpoint, config.json, log.jsonl (default {DEFAULT_OUT}).", show_default=False
    ),
]
ConfigFile = Annotated[
    Path | None,
    typer.Option(
        flag("config_file"),
        parser=parse_path,
        help="Options from a TOML file (keys spelled like the options: seq-len = 2048; also ff-mult, rotary "
        "and sample-length, which have none) or a run's config.json; options given here override it.",
        show_default=False,
    ),
]
PrintConfig = Annotated[
    bool, typer.Option("--print-config", help="Print the resolved configuration as TOML and exit.")
]
Loggers = Annotated[
    list[str] | None,
    typer.Option(
        flag("loggers"),
        help="Also log to tensorboard (event files in --out) or wandb (Weights & Biases); repeat for "
        "both. log.jsonl is always written.",
        show_default=False,
    ),
]
Resume = Annotated[
    str | None,
    typer.Option(
        "--resume",
        metavar="[auto]",
        help="Continue the run in --out exactly where its checkpoint left it (an error if it has none); "
        "--resume auto: continue if --out holds a checkpoint, else start it (one command to requeue).",
        show_default=False,
    ),
]
# (written out: the small preset's sizes are the model config's defaults, and --help does not import torch;
# tests/test_cli.py holds them to the presets)
PRESET_SIZES = {
    "tiny": "dim 64, depth 2, 256-byte context: minutes on a CPU",
    "small": "dim 256, depth 6, 8192 bytes",
    "base": "dim 512, depth 8, 8192 bytes",
}
Preset = Annotated[
    str | None,
    typer.Option(
        help="Model size: "
        + ", ".join(f"{name} ({PRESET_SIZES[name]})" for name in PRESETS)
        + f"; default {DEFAULT_PRESET}. The size options below override it."
    ),
]
InitFrom = Annotated[
    str | None,
    typer.Option(
        help="Start a new run from this checkpoint's weights (a run directory, or a .safetensors file such "
        "as its best.safetensors) and its model, with a fresh optimizer and schedule: to fine-tune on "
        "another corpus, or to go on at another --seq-len (the one model option that may change).",
        show_default=False,
    ),
]
Val = Annotated[
    list[str] | None, train_option("Validation corpus (repeat for several); default: the end of CORPUS.")
]
ValFraction = Annotated[
    float | None, train_option("Hold out this last fraction of CORPUS (not with --val)", "val_fraction")
]
Dim = Annotated[int | None, train_option("Model width (default: the preset's).")]
Depth = Annotated[int | None, train_option("Number of layers (default: the preset's).")]
Heads = Annotated[int | None, train_option("Attention heads (default: the preset's).")]
DimHead = Annotated[int | None, train_option("Width of one head (default: the preset's).")]
BlockSize = Annotated[
    int | None,
    train_option("H-attention block size in bytes (even, divides --seq-len; default: the preset's)."),
]
SeqLen = Annotated[
    int | None,
    typer.Option(
        flag("max_seq_len"), help="Context length in bytes: the training window (default: the preset's)."
    ),
]
AttentionKind = Annotated[
    str | None,
    train_option(
        "Attention: h (hierarchical, O(n): the default) or exact (softmax attention through SDPA, O(n^2): "
        "the baseline to compare with)."
    ),
]
# the model switches' defaults, every preset's (the model config's: tests/test_cli.py holds them to it)
MODEL_DEFAULTS = dict(
    reversible="off", norm="layer", qk_norm="on", activation="relu2", logit_softcap=0, zero_init="off"
)


def _model_help(help: str, name: str) -> str:
    return with_default(help, MODEL_DEFAULTS[name])


Reversible = Annotated[
    bool | None,
    switch("reversible", _model_help("Reversible layers: less activation memory", "reversible")),
]
Norm = Annotated[
    str | None, train_option(_model_help("Normalisation: rms (RMSNorm) or layer (LayerNorm)", "norm"))
]
QkNorm = Annotated[
    bool | None, switch("qk-norm", _model_help("RMSNorm of each head's queries and keys", "qk_norm"))
]
Activation = Annotated[
    str | None,
    train_option(_model_help("Feed-forward activation: relu2 (ReLU squared) or gelu", "activation")),
]
LogitSoftcap = Annotated[
    float | None,
    train_option(
        _model_help("Soft-cap the logits at this value (c * tanh(x / c)); 0: none", "logit_softcap")
    ),
]
ZeroInit = Annotated[
    bool | None,
    switch("zero-init", _model_help("Residual output projections start at zero", "zero_init")),
]
LevelDecay = Annotated[
    float | None,
    train_option(
        "H-attention's locality prior A: at each coarser level a key weighs 2^-A as much for the first "
        "head, 2^-1 as much for the last, heads between spaced geometrically; 0: none (default 16; 0 with "
        "--attention exact)."
    ),
]
Optimizer = Annotated[
    str | None,
    train_option(
        "muon (Muon for the layers' matrices, AdamW for the rest) or adamw (AdamW for all)", "optimizer"
    ),
]
ShiftTokens = Annotated[
    bool | None,
    switch("shift-tokens", "Half of each byte's features from the previous byte's (default: on)."),
]
Steps = Annotated[int | None, train_option("Optimizer steps for the whole run", "steps")]
BatchSize = Annotated[int | None, train_option("Windows per micro-batch", "batch_size")]
GradAccum = Annotated[int | None, train_option("Micro-batches per optimizer step", "grad_accum")]
Lr = Annotated[float | None, train_option("Peak learning rate (default 6e-3 with muon, 3e-3 with adamw).")]
Warmup = Annotated[int | None, train_option("Linear warmup steps", "warmup")]
ContextWarmup = Annotated[
    float | None,
    train_option(
        "Fraction of the steps that train on short windows first (--context-warmup-start bytes, the same "
        "bytes per step), before --seq-len",
        "context_warmup",
    ),
]
ContextWarmupStart = Annotated[
    int | None,
    train_option("Window length that --context-warmup starts from (needs it)", "context_warmup_start"),
]
MinLr = Annotated[
    float | None, train_option("Learning rate at the last step, after cosine decay (default --lr / 10).")
]
WeightDecay = Annotated[
    float | None,
    train_option(
        "Weight decay of the matrices and embeddings (AdamW's, and Muon's with --optimizer muon)",
        "weight_decay",
    ),
]
Clip = Annotated[float | None, train_option("Gradient norm clip, 0 for none", "clip")]
EvalEvery = Annotated[int | None, train_option("Steps between validations, 0: last only", "eval_every")]
Patience = Annotated[
    int | None,
    train_option(
        "Stop (saving) once this many validations in a row have not beaten the run's best val bpb "
        "(best.safetensors holds its weights; needs --eval-every above 0); 0: never",
        "patience",
    ),
]
EvalBatches = Annotated[int | None, train_option("Batches per validation", "eval_batches")]
SaveEvery = Annotated[int | None, train_option("Steps between checkpoints, 0: last only", "save_every")]
SampleEvery = Annotated[int | None, train_option("Steps between shown samples, 0: never", "sample_every")]
Compile = Annotated[bool | None, switch("compile", "torch.compile the model (default off).")]
SplitGlobalBatch = Annotated[
    bool | None,
    switch(
        "split-global-batch",
        "Under torchrun: every process trains on its slice of one global batch drawn from --seed "
        "(the data order of one process with the whole batch) instead of its own windows (default off).",
    ),
]


class _TrainCommand(Command):
    """`htcli train`, whose --resume takes an optional value: `--resume` alone, or `--resume auto`."""

    PANELS = {
        "Corpus": "val val_fraction text_field skip_bad_records include_hidden",
        "Model": "preset init_from dim depth heads dim_head block_size max_seq_len attention reversible "
        "shift_tokens norm qk_norm activation logit_softcap zero_init level_decay",
        "Optimisation": "steps optimizer batch_size grad_accum lr warmup context_warmup context_warmup_start "
        "min_lr weight_decay clip",
        "Validation, checkpoints, samples": "eval_every eval_batches patience save_every sample_every",
        "Hardware and logging": "device dtype compile seed split_global_batch loggers",
    }

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        given = [
            "--resume=yes" if arg == "--resume" and args[index + 1 : index + 2] != ["auto"] else arg
            for index, arg in enumerate(args)
        ]
        return super().parse_args(ctx, given)


@app.command(cls=_TrainCommand)
def train(
    corpus: Corpus = None,
    out: OutDir = None,
    resume: Resume = None,
    config_file: ConfigFile = None,
    print_config: PrintConfig = False,
    # every parameter below but preset is named like the TrainConfig or HTransformerConfig field it sets
    val: Val = None,
    val_fraction: ValFraction = None,
    text_field: TextField = None,
    skip_bad_records: SkipBadRecords = None,
    include_hidden: IncludeHidden = None,
    preset: Preset = None,
    init_from: InitFrom = None,
    dim: Dim = None,
    depth: Depth = None,
    heads: Heads = None,
    dim_head: DimHead = None,
    block_size: BlockSize = None,
    max_seq_len: SeqLen = None,
    attention: AttentionKind = None,
    reversible: Reversible = None,
    shift_tokens: ShiftTokens = None,
    norm: Norm = None,
    qk_norm: QkNorm = None,
    activation: Activation = None,
    logit_softcap: LogitSoftcap = None,
    zero_init: ZeroInit = None,
    level_decay: LevelDecay = None,
    steps: Steps = None,
    optimizer: Optimizer = None,
    batch_size: BatchSize = None,
    grad_accum: GradAccum = None,
    lr: Lr = None,
    warmup: Warmup = None,
    context_warmup: ContextWarmup = None,
    context_warmup_start: ContextWarmupStart = None,
    min_lr: MinLr = None,
    weight_decay: WeightDecay = None,
    clip: Clip = None,
    eval_every: EvalEvery = None,
    eval_batches: EvalBatches = None,
    patience: Patience = None,
    save_every: SaveEvery = None,
    sample_every: SampleEvery = None,
    device: Annotated[str | None, DEVICE] = None,
    dtype: Annotated[str | None, DTYPE] = None,
    compile: Compile = None,
    seed: Annotated[int | None, SEED] = None,
    split_global_batch: SplitGlobalBatch = None,
    loggers: Loggers = None,
) -> None:
    """Train a byte-level model on CORPUS, with checkpoints, log.jsonl and config.json in --out.

    Ctrl-C saves a checkpoint and exits; --resume continues from it.

    On several GPUs or machines, start it with torchrun: `torchrun --nproc-per-node 8 -m htcli train ...`.
    """
    options = {k: v for k, v in locals().items() if k not in ("resume", "config_file", "print_config")}
    _train(options, resume, config_file, print_config)


def _train(options: dict, resume: str | None, config_file: Path | None, print_config: bool) -> None:
    with user_errors(
        saves=True,
        smaller="--batch-size (with --grad-accum to keep the bytes per step), --seq-len or model",
        spell=_train_flag,
    ):
        resume_as = _resume_as(resume)
        given = {name for name, value in options.items() if value is not None and value != []}
        options, from_file = _with_config_file(options, config_file)
        try:
            _train_with(options, resume_as, print_config, given)
        except HtcliError as error:
            raise _in_file(error, from_file, config_file) from None


def _train_with(options: dict, resume: bool | str, print_config: bool, given: set[str]) -> None:
    """train with these options (the command line's, named in given, over the config file's): its config
    printed, or the run, its summary and the exit code of a stop that saved."""
    from htcli.checkpoint import model_fields
    from htcli.config import config_from_options

    config = config_from_options(
        options.pop("corpus", None) or [], out=_given(options.pop("out", None), DEFAULT_OUT),
        resume=resume, preset=options.pop("preset", None), read_model=model_fields, **options,
    )  # fmt: skip
    _check_ignored(config, given)
    from htcli.rundir import resolve_resume

    _check_corpus_options(config, given, printed_new=print_config and not resolve_resume(resume, config.out))
    if print_config:
        return _print_config(config, resume)
    dropped = _dropped_loggers(config) if "loggers" in given and resolve_resume(resume, config.out) else ""
    with _finished_is_done(resume):
        _train_and_report(config, resume, dropped)


@contextlib.contextmanager
def _finished_is_done(resume: bool | str) -> Iterator[None]:
    """With --resume auto, a run that has trained all its steps is a note and exit code 0 (a job requeued
    after its run finished: it was an error and exit 1); with --resume, still the error."""
    from htcli.distributed import launch_from_env
    from htcli.rundir import RunFinished

    try:
        yield
    except RunFinished as finished:
        if resume != "auto":
            raise
        if launch_from_env().main:
            err_console.print(f"{escape(_finished(finished))}", soft_wrap=True)


def _finished(finished) -> str:
    """The note of a run that has trained all its steps (a RunFinished), where resume auto asked for it."""
    out, step = finished.out, finished.step
    return (
        f"{out} is already at step {step} of --steps {step}: finished, nothing to train (a larger --steps "
        "trains on)"
    )


def _train_and_report(config, resume: bool | str, dropped: str) -> None:
    """The run, shown as it trains, then its summary and the exit code of a stop that saved."""
    from htcli.display import TrainDisplay, train_summary
    from htcli.distributed import process_group
    from htcli.train import train as run_training

    shown = True  # (until stderr takes no more)
    ended: dict = {}  # the run's "interrupt" and "end" events, once logged
    code = 0  # (the run's, where a stop after its end leaves _late_stop_ignored)
    with _late_stop_ignored(ended), process_group(config.device) as launch:
        with TrainDisplay(err_console, respell) as display:

            def on_event(event: dict) -> None:
                nonlocal shown
                if event["event"] in ("interrupt", "end"):
                    ended[event["event"]] = event
                if not shown:
                    return
                try:
                    # (once the resume is taken, not before a refusal)
                    if dropped and event["event"] == "start":
                        err_console.print(dropped, soft_wrap=True)
                    display(event)
                # (stderr that takes no more: a closed pipe, a full disk): the run goes on unseen
                except OSError:
                    shown = False  # (it stopped the run unsaved, without a word: its error line failed too)
                    to_devnull([2])

            result = run_training(config, resume=resume, on_event=on_event)
        if display.failed:  # (its last frame: what follows on stderr goes to /dev/null, the exit code kept)
            to_devnull([2])
        code = STOP_CODES.get(result.stopped_by, 0)
        if launch.main:
            with signals_held():  # (a stop now is taken after the summary: _late_stop_ignored)
                try:
                    console.print(train_summary(result))
                except OSError as error:  # (the run saved: a scheduler still learns why it stopped)
                    if not code:
                        raise
                    report_os_error(error, "; the run is saved")
                _how_to_continue(result, launch.world_size)
    if code:
        raise typer.Exit(code)


@contextlib.contextmanager
def _late_stop_ignored(ended: dict) -> Iterator[None]:
    """A Ctrl-C or SIGTERM that comes once the run has logged its end (its last checkpoint saved: while it
    lets go of its lock, or after its summary) keeps the run's exit code, with a note (it said "stopped
    without saving", 130 or 143, and a scheduler took a finished run as failed; review). (While the loggers
    close, a first one is the training loop's stop request's, recorded and left: train.py.)"""
    try:
        yield
    except (KeyboardInterrupt, Terminated) as stop:
        if "end" not in ended:
            raise
        what = "the Ctrl-C" if isinstance(stop, KeyboardInterrupt) else "the SIGTERM"
        step = ended["end"]["step"]
        err_console.print(
            f"[yellow]{what} came after the run had ended at step {step}, saved: its exit code kept"
        )
        code = STOP_CODES.get(ended.get("interrupt", {}).get("signal"), 0)
        if code:
            raise typer.Exit(code) from None
    finally:
        if "end" in ended:  # (the run is over, and so is the command's work: stops from now on keep its code)
            command_over()


def _print_config(config, resume: bool | str) -> None:
    """config as TOML on stdout (a dry run): refused where the config contradicts itself or its checkpoint;
    what a run would refuse on this machine (which the config may be meant for another: a GPU it lacks, a
    corpus elsewhere), and the warm-up's warning, said on stderr."""
    from htcli.config_file import write_toml
    from htcli.device import resolve_device, resolve_dtype
    from htcli.display import context_warning, warmup_warning
    from htcli.distributed import launch_from_env
    from htcli.optim import context_schedule
    from htcli.rundir import RunFinished, check_resumable, resolve_resume
    from htcli.train_checks import start_refusal

    finished = None
    try:
        check_resumable(config, resume)  # (what a resume would refuse of its checkpoint)
    except RunFinished as error:
        if resume != "auto":
            raise
        finished = error
    if config.device == "cpu":  # (fp16 on a CPU: on any machine)
        resolve_dtype(config.dtype, resolve_device("cpu"), training=True)
    if not launch_from_env().main:  # (under torchrun, once: every rank printed it)
        return
    resuming = resolve_resume(resume, config.out)
    refused = start_refusal(config, resuming)
    if isinstance(refused, OSError):  # (said as train's error says it)
        refused = HtcliError(os_error_line(refused))
    warnings = [warmup_warning(config.warmup, config.steps), finished and _finished(finished)]
    if not resuming:  # (a resumed run's is said from its step, when it starts)
        start = dict(context_schedule(config), seq_len=config.model.max_seq_len, steps=config.steps, step=0)
        warnings.append(context_warning(start))
    warnings += [
        f"a run on this machine would stop: {respell(str(refused), refused.fields, _train_flag)}"
        if refused
        else None
    ]
    for warning in filter(None, warnings):
        err_console.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)
    print(write_toml(config, _file_key), end="")


def _dropped_loggers(config) -> str:
    """The warning where a resume's --logger leaves out a logger of the run (its curves end there); ""."""
    from htcli.config import dropped_loggers
    from htcli.distributed import launch_from_env

    dropped = dropped_loggers(config)
    if not dropped or not launch_from_env().main:
        return ""
    names = " ".join(f"--logger {name}" for name in dropped)
    return (
        f"[yellow]warning:[/] --logger replaces the run's loggers: {', '.join(dropped)} gets no more of"
        f" this run; give {names} too to keep it"
    )


def _check_ignored(config, given: set[str]) -> None:
    """Options given on the command line that the run would ignore, refused: a held-out fraction beside
    held-out files, given or from the config file or the run (a config file's fraction gives way to --val),
    a context warm-up length with the warm-up off."""
    if "val" in given and "val_fraction" in given:
        raise HtcliError("--val and --val-fraction both choose the held-out bytes: give one of them")
    if "val_fraction" in given and config.val:  # (the val of a config file, or of the run resumed)
        raise HtcliError(
            "--val-fraction holds out the corpus's end, and this run's held-out bytes are files (val, from "
            "the config file or the run): leave --val-fraction out, or use a config without val"
        )
    if "context_warmup_start" in given and not config.context_warmup:
        raise HtcliError(
            "--context-warmup-start is the window length of the context warm-up, which is off "
            f"(--context-warmup {config.context_warmup}): give --context-warmup too, or leave it out"
        )


def _check_corpus_options(config, given: set[str], *, printed_new: bool) -> None:
    """The corpus's options given on the command line that would be ignored, refused as train refuses them
    for a new run: also for a resume (it skips them, so that a run goes on as it began, and they were
    recorded in its config.json without effect) and for --print-config; printed_new (a new run's config
    printed, not run): include_hidden from the config file too, as the run would refuse it."""
    from htcli.corpus import RecordOptions, check_hidden_applies, check_records_apply, resolve_corpus

    specs = [*config.corpus, *(config.val or [])]
    if printed_new or "include_hidden" in given:
        check_hidden_applies(specs, config.include_hidden)
    if given & {"text_field", "skip_bad_records"}:
        files = resolve_corpus(specs, include_hidden=config.include_hidden, exclude=[config.out])
        check_records_apply(files, RecordOptions(config.text_field, config.skip_bad_records))


def _given(value, default):
    return default if value is None else value


def _with_config_file(options: dict, path: Path | None) -> tuple[dict, set[str]]:
    """The options given on the command line (None: not given) over those of the config file, and the
    names of those that come from the file."""
    if path is None:
        return options, set()
    from htcli.config import without_derived
    from htcli.config_file import check_run_home, read_options

    given = {k: v for k, v in options.items() if v is not None and v != []}
    from_file = without_derived(read_options(path, _file_key), given)
    if "out" in from_file and "out" not in given:
        check_run_home(path, from_file["out"])
    return {**from_file, **given}, set(from_file) - set(given)


def _file_key(field: str) -> str:
    """How a config file (and --print-config) spells a field: its flag without the dashes."""
    return flag(field)[2:]


def _train_flag(field: str) -> str:
    """How train's errors name a field: its flag, or, for a field train has no flag for (ff_mult, rotary:
    set only in a --config file), the file's key (it said --ff-mult, a flag train does not have)."""
    return flag(field) if field in FLAGS or field in inspect.signature(train).parameters else _file_key(field)


def _in_file(error: HtcliError, from_file: set[str], path: Path | None) -> HtcliError:
    """An error about options that all come from the config file, said as the file's: its path first, the
    options by their keys (as flags, the user would look for options never given)."""
    if path is None or not error.fields or not set(error.fields) <= from_file:
        return error
    return HtcliError(f"{path}: {respell(str(error), error.fields, _file_key)}")


def _resume_as(resume: str | None) -> bool | str:
    """--resume's value as train() takes it: absent False, alone True, "auto"."""
    value = {None: False, "yes": True, "auto": "auto"}.get(resume)
    if value is None:
        raise HtcliError(f"--resume takes no value or auto, got {resume!r}")
    return value


def _how_to_continue(result, world_size: int) -> None:
    """After a stop on request, or an early stop: the command that continues the run."""
    again = "torchrun ... -m htcli train" if world_size > 1 else "htcli train"
    if result.stopped_early and not result.interrupted:
        err_console.print(
            f"stopped early at step {result.step}; to train on: {again} --resume --out "
            f"{escape(shlex.quote(str(result.out)))} --patience 0 (or a larger one)",
            soft_wrap=True,
        )
    if result.interrupted:
        err_console.print(
            f"stopped at step {result.step} by {result.stopped_by}; continue with: "
            f"{again} --resume --out {escape(shlex.quote(str(result.out)))}",
            soft_wrap=True,
        )
