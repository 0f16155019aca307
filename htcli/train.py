"""Training: `train(config)` runs (or resumes) a run in config.out and returns its summary.

Every event (start, step, eval, sample, checkpoint, end) goes to `on_event` as a dict and, as one JSON
line, to OUT/log.jsonl. The first Ctrl-C (SIGINT) stops the run after the current step and saves it.

Inside a process group (`htcli.distributed.process_group`, under torchrun) the same function trains
data-parallel: each rank draws its own windows, backward averages the gradients over ranks, evaluation
is spread over them, and rank 0 alone logs, samples and saves (with every rank's data sampler state, so
that --resume under torchrun continues exactly). Every step the ranks agree on the loss and on whether
to stop, so a Ctrl-C or a divergence on one rank stops all of them at the same step.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from htcli import __version__, distributed
from htcli.atomic import atomic_file, write_json
from htcli.checkpoint import has_checkpoint, load_training_state, load_weights, read_json, save_checkpoint
from htcli.config import TrainConfig
from htcli.data import ByteCorpus, WindowSampler, decode_state, encode_state, split
from htcli.device import autocast, dtype_name, resolve_device, resolve_dtype
from htcli.errors import HtcliError
from htcli.evaluate import byte_nll, validation_bpb
from htcli.model import HTransformer1D
from htcli.presets import DEFAULT_PRESET, FLAGS, model_config
from htcli.sample import SamplingConfig, generate

CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"
METRIC_EVENTS = ("step", "eval", "sample")  # events of one step, redone when a run resumes before it
SAMPLE_PROMPT_BYTES = 64  # periodic samples continue the validation data's first bytes
SAMPLE_TEMPERATURE = 0.8
RANK_SEED_STRIDE = 1_000_003  # rank r draws data with seed + r * this


@dataclass
class TrainResult:
    out: Path
    step: int  # the run's step count at the end
    steps: int  # the step count it was asked to reach
    train_loss: float | None  # last step's loss (nats per byte)
    val_bpb: float | None  # last validation bits per byte
    interrupted: bool  # stopped by Ctrl-C before `steps` (and saved)
    seconds: float  # this invocation's training time
    tokens: int  # bytes trained on in this invocation
    params: int


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup over `warmup` steps, then cosine decay from lr to min_lr at the last step."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - 1 - config.warmup)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def config_from_options(
    corpus: list[str],
    *,
    out: str,
    resume: bool = False,
    preset: str | None = None,
    model: dict | None = None,
    **options,
) -> TrainConfig:
    """A run's config from command-line options, where None means "not given".

    A new run: TrainConfig's defaults, the preset (default small) with the model options, the options.
    Resuming: the run's saved config.json with the given options on top.
    """
    model = {k: v for k, v in (model or {}).items() if v is not None}
    options = {k: v for k, v in options.items() if v is not None}
    if corpus:
        options["corpus"] = [str(Path(c).expanduser().absolute()) for c in corpus]
    if options.get("val"):
        options["val"] = [str(Path(c).expanduser().absolute()) for c in options["val"]]
    if not resume:
        return TrainConfig(
            **{"corpus": [], **options, "out": out, "model": model_config(preset or DEFAULT_PRESET, **model)}
        )
    saved = _saved_config(Path(out))
    base = preset if preset is not None else saved.pop("model")
    return TrainConfig.from_dict({**saved, **options, "out": out, "model": model_config(base, **model)})


def _saved_config(out: Path) -> dict:
    path = out / CONFIG_FILE
    saved = read_json(
        path, missing=f"no checkpoint at {out}: train one with `htcli train` (without --resume)"
    )
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        raise HtcliError(f"{path} is not an htcli training config")
    saved.pop("htcli_version", None)
    return saved


class RunLog:
    """Events to a callback and, one JSON line each, to OUT/log.jsonl; silent on non-main processes."""

    def __init__(self, path: Path, on_event: Callable[[dict], None] | None, enabled: bool):
        self.on_event = on_event
        self.file = open(path, "a") if enabled else None

    def __call__(self, event: str, **fields) -> None:
        record = {"event": event, "time": round(time.time(), 3), **fields}
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            if self.on_event is not None:
                self.on_event(record)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _trim_log(path: Path, step: int) -> None:
    """Before a resume from `step`: drop the metric events of later steps, which a crash left and
    the resumed run redoes, and any torn line, so that each step is logged once."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") in METRIC_EVENTS and record.get("step", 0) > step:
            continue
        kept.append(line + "\n")
    with atomic_file(path, "w") as file:
        file.writelines(kept)


class StopRequest:
    """While active, the first SIGINT only asks the loop to stop (it saves first); a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def make_optimizer(model: HTransformer1D, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only (not on norms and biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))


def _check_resume(out: Path, config: TrainConfig, world_size: int) -> tuple:
    """The checkpoint to resume from, checked against config and the number of processes."""
    if not has_checkpoint(out):
        raise HtcliError(f"no checkpoint at {out}: train one with `htcli train` (without --resume)")
    info, weights, optimizer_state, state = load_training_state(out)
    if info.config != config.model:
        ours, theirs = config.model.to_dict(), info.config.to_dict()
        changed = ", ".join(
            f"{FLAGS.get(k, k)} {theirs[k]} in the checkpoint, {ours[k]} asked"
            for k in ours
            if ours[k] != theirs[k]
        )
        raise HtcliError(
            f"cannot resume {out}: the model differs from its checkpoint ({changed}); drop those options"
        )
    if info.step >= config.steps:
        raise HtcliError(
            f"{out} is already at step {info.step} of --steps {config.steps}: pass a larger --steps"
        )
    saved = state.get("world_size", 1)
    if saved != world_size:
        how = "without torchrun" if saved == 1 else f"under torchrun with {saved} processes in all"
        raise HtcliError(
            f"cannot resume {out} in {_processes(world_size)}: it was trained in {_processes(saved)}, "
            f"each with its own data stream; resume it {how}"
        )
    return info, weights, optimizer_state, state


def _processes(count: int) -> str:
    return "one process" if count == 1 else f"{count} processes"


def train(
    config: TrainConfig,
    *,
    resume: bool = False,
    on_event: Callable[[dict], None] | None = None,
) -> TrainResult:
    """Train config.model on config.corpus, saving in config.out; resume continues that run exactly.

    Every input is checked before anything is written; a checkpoint already in config.out is only
    ever replaced by a later one of the same run (resume). Inside a process group, every rank calls it.
    """
    rank, world_size = distributed.rank(), distributed.world_size()
    main_process = rank == 0
    out = Path(config.out)
    device = distributed.local_device(resolve_device(config.device))
    dtype = resolve_dtype(config.dtype, device)
    if out.exists() and not out.is_dir():
        raise HtcliError(f"--out {out} is a file: give a directory for the run")
    if resume:
        checkpoint = _check_resume(out, config, world_size)
    elif has_checkpoint(out):
        raise HtcliError(
            f"{out} already holds a checkpoint: pass --resume to continue it, or choose another --out"
        )
    window = config.model.max_seq_len + 1
    corpus = ByteCorpus.open(config.corpus)
    val_corpus = ByteCorpus.open(config.val) if config.val else None
    train_data, val_data = split(corpus, val_corpus, config.val_fraction, window)

    torch.manual_seed(config.seed)
    model = HTransformer1D(config.model).to(device)
    optimizer = make_optimizer(model, config)
    sampler = _sampler(len(train_data), window, config, rank, world_size)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    step, val_bpb = 0, None
    if resume:
        info, weights, optimizer_state, state = checkpoint
        load_weights(model, weights, info.path)
        optimizer.load_state_dict(optimizer_state)
        step, val_bpb = info.step, state["val_bpb"]
        _restore_random_state(state, rank, sampler, scaler, device)
    parallel = distributed.data_parallel(model, device)
    no_sync = parallel.no_sync if parallel is not model else contextlib.nullcontext
    forward = torch.compile(parallel) if config.compile else parallel
    params = sum(p.numel() for p in model.parameters())

    if main_process:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / CONFIG_FILE, {"htcli_version": __version__, **config.to_dict()})
    if resume and main_process:
        _trim_log(out / LOG_FILE, step)
    log = RunLog(out / LOG_FILE, on_event, enabled=main_process)
    log(
        "start",
        step=step,
        steps=config.steps,
        resumed=resume,
        params=params,
        device=str(device),
        dtype=dtype_name(dtype),
        train_bytes=len(train_data),
        val_bytes=len(val_data),
        tokens_per_step=config.tokens_per_step * world_size,
        world_size=world_size,
        batch_size=config.batch_size,
        grad_accum=config.grad_accum,
        seq_len=config.model.max_seq_len,
    )

    def save() -> None:
        ranks = distributed.all_gather(_rank_state(sampler, device))  # every rank takes part
        if main_process:
            state = {"world_size": world_size, "ranks": ranks, "grad_scaler": scaler.state_dict()}
            save_checkpoint(out, model, optimizer, state, step=step, val_bpb=val_bpb)
            log("checkpoint", step=step, path=str(out))
        distributed.barrier(device)  # nobody goes on (or exits) before the checkpoint is written

    started, tokens, loss, saved_step = time.perf_counter(), 0, None, step if resume else None
    stopping = False
    with StopRequest() as stop:
        try:
            while step < config.steps:
                stopping = distributed.any_rank(stop.requested, device)
                if stopping:
                    break
                lr = learning_rate(step, config)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                step_started = time.perf_counter()
                batches = [train_data.windows(sampler.starts(), window) for _ in range(config.grad_accum)]
                loss, grad_norm = _optimizer_step(
                    forward, optimizer, scaler, batches, config.clip, device, dtype, no_sync
                )
                # the mean over ranks: NaN on every rank if it is NaN on one (the gradient norm, of the
                # averaged gradients, is the same on all)
                loss = distributed.all_sum([loss], device)[0] / world_size
                if not (math.isfinite(loss) and (scaler.is_enabled() or math.isfinite(grad_norm))):
                    log("diverged", step=step + 1, loss=loss, grad_norm=grad_norm)
                    kept = (
                        f"the checkpoint of step {saved_step} in {out} is intact"
                        if saved_step
                        else "none saved yet"
                    )
                    raise HtcliError(
                        f"training diverged at step {step + 1} (loss {loss}, gradient norm {grad_norm}); "
                        f"stopped without saving ({kept}): lower --lr (now {config.lr:g}) or use --dtype fp32"
                    )
                step += 1
                seconds = time.perf_counter() - step_started
                tokens += config.tokens_per_step * world_size
                tokens_per_s = config.tokens_per_step * world_size / seconds
                log("step", step=step, loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_s=tokens_per_s)
                last = step == config.steps
                if last or (config.eval_every and step % config.eval_every == 0):
                    val_loss, val_bpb = _evaluate(model, val_data, config, dtype)
                    log("eval", step=step, val_loss=val_loss, val_bpb=val_bpb)
                if main_process and config.sample_every and step % config.sample_every == 0:
                    prompt, text = _sample(model, val_data, config, dtype)
                    log("sample", step=step, prompt=prompt, text=text)
                if last or (config.save_every and step % config.save_every == 0):
                    save()
                    saved_step = step
            if stopping:
                log("interrupt", step=step)
                if saved_step != step:
                    save()
        finally:
            seconds = time.perf_counter() - started
            corpus.close()
            if val_corpus is not None:
                val_corpus.close()
    result = TrainResult(out, step, config.steps, loss, val_bpb, stopping, seconds, tokens, params)
    log("end", step=step, interrupted=stopping, seconds=seconds, val_bpb=val_bpb, train_loss=loss)
    log.close()
    return result


def _sampler(num_bytes: int, window: int, config: TrainConfig, rank: int, world_size: int) -> WindowSampler:
    """Rank r's windows: its own stream (seed + r * RANK_SEED_STRIDE) or its slice of one global batch."""
    if config.split_global_batch:
        return WindowSampler(num_bytes, window, config.batch_size, config.seed, shard=(rank, world_size))
    return WindowSampler(num_bytes, window, config.batch_size, config.seed + RANK_SEED_STRIDE * rank)


def _optimizer_step(
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

    Gradients are averaged over ranks once, in the last micro-batch's backward (no_sync before it).
    """
    total = torch.zeros((), device=device)
    for index, batch in enumerate(batches):
        batch = batch.to(device, non_blocking=True)
        with no_sync() if index < len(batches) - 1 else contextlib.nullcontext():
            with autocast(device, dtype):
                logits = forward(batch[:, :-1])
            loss = byte_nll(logits, batch[:, 1:])
            scaler.scale(loss / len(batches)).backward()
        total += loss.detach()
    scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return (total / len(batches)).item(), grad_norm.item()


def _evaluate(model, val_data, config: TrainConfig, dtype) -> tuple[float, float]:
    model.eval()
    try:
        windows = config.eval_batches * config.batch_size
        return validation_bpb(model, val_data, windows=windows, batch_size=config.batch_size, dtype=dtype)
    finally:
        model.train()


def _sample(model, val_data, config: TrainConfig, dtype) -> tuple[str, str]:
    """A short continuation of the validation data's first bytes, from a fixed seed (no global RNG used)."""
    prompt = val_data.read(0, min(SAMPLE_PROMPT_BYTES, len(val_data)))
    model.eval()
    try:
        sampling = SamplingConfig(config.sample_length, temperature=SAMPLE_TEMPERATURE, seed=config.seed)
        tokens = generate(model, prompt, sampling, dtype=dtype)
        text = bytes(tokens).decode("utf-8", errors="replace")
    finally:
        model.train()
    return prompt.decode("utf-8", errors="replace"), text


def _rank_state(sampler: WindowSampler, device: torch.device) -> dict:
    """What this rank needs to continue exactly: its random number generators and data sampler."""
    cuda = encode_state(torch.cuda.get_rng_state(device)) if device.type == "cuda" else None
    return {
        "torch_rng": encode_state(torch.get_rng_state()),
        "cuda_rng": cuda,
        "sampler": sampler.state_dict(),
    }


def _restore_random_state(
    state: dict, rank: int, sampler: WindowSampler, scaler, device: torch.device
) -> None:
    """Put back rank's part of a saved state.json (one written before "ranks" existed holds it at the top)."""
    mine = state["ranks"][rank] if "ranks" in state else state
    torch.set_rng_state(decode_state(mine["torch_rng"]))
    cuda = mine.get("cuda_rng")
    if isinstance(cuda, str) and device.type == "cuda":
        torch.cuda.set_rng_state(decode_state(cuda), device)
    elif isinstance(cuda, list) and cuda and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([decode_state(s) for s in cuda])  # older runs saved every GPU's
    sampler.load_state_dict(mine["sampler"])
    if state.get("grad_scaler"):
        scaler.load_state_dict(state["grad_scaler"])
