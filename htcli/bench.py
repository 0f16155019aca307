"""Benchmarks: H-attention vs exact attention (SDPA), alone or inside a full training step; sampling speed.

Every attention measurement runs in its own subprocess (`python -m htcli.bench --worker SPEC`), so
that a run that exceeds its time budget or memory can be stopped and reported as such, and so
that peak memory is measured cleanly: CUDA's max_memory_allocated, or on the CPU the peak
resident set size (VmHWM, reset through /proc/self/clear_refs) above what the inputs hold.
`decode_bench` times sampling with the decode cache against recomputing the forward pass.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import selectors
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from htcli.attention import IMPLEMENTATION_VARIABLE, check_block_size, check_device, resolve_implementation
from htcli.device import PRECISIONS, check_choice, resolve_device, resolve_dtype
from htcli.errors import HtcliError
from htcli.presets import PRESETS, model_config
from htcli.stop import signals_held

METHODS = ("h", "sdpa")
COLD_START = "cold run starts"  # the worker's signal that its imports and inputs are done
COLD_DONE = "cold run done"  # the worker's signal that its first forward+backward finished


DEFAULT_BLOCK_SIZE = 128
MAX_LENGTH = 2**24  # the longest --seq-len measured (as a model's context is bounded)
MAX_COUNT = 2**20  # the most heads, width of one, windows in a batch, repeats


@dataclass
class BenchConfig:
    seq_lens: list[int] = field(default_factory=lambda: [8192])
    batch_size: int = 1
    heads: int = 4
    dim_head: int = 64
    block_size: int = DEFAULT_BLOCK_SIZE
    modes: list[bool] = field(default_factory=lambda: [False, True])  # causal flags
    device: str = "auto"
    dtype: str = "fp32"
    warmup: int | None = None  # None: default_warmup (2 on CUDA, 1 elsewhere)
    repeats: int = 5
    max_seconds: float = 120.0  # per method and length: a cold run past it is reported as a timeout
    model: bool = False  # benchmark a full training step of the model instead
    preset: str = "small"  # the model's preset, with `model`
    impl: str = ""  # H-attention implementation, auto, eager or triton; "": $HTCLI_ATTENTION, else auto
    compile: bool = False  # with `model`: torch.compile both models, as `htcli train --compile` does

    def __post_init__(self) -> None:
        if not self.seq_lens or any(not 1 <= n <= MAX_LENGTH for n in self.seq_lens):
            raise HtcliError(
                f"seq_lens needs lengths from 1 to {MAX_LENGTH:,}, e.g. seq_lens 8192,32768",
                fields=("seq_lens",),
            )
        for name in ("batch_size", "heads", "dim_head", "repeats"):
            if not 1 <= getattr(self, name) <= MAX_COUNT:
                raise HtcliError(f"{name} must be 1 to {MAX_COUNT:,}", fields=(name,))
        if (
            self.warmup is not None and not 0 <= self.warmup <= MAX_COUNT
        ):  # (more: cut at the deadline unsaid)
            raise HtcliError(f"warmup must be 0 to {MAX_COUNT:,}", fields=("warmup",))
        if not 0 < self.max_seconds <= 1e6:
            raise HtcliError(
                f"max_seconds must be a positive number up to 1e6, got {self.max_seconds}",
                fields=("max_seconds",),
            )
        check_choice("preset", self.preset, tuple(PRESETS))
        if not self.model and self.block_size > max(DEFAULT_BLOCK_SIZE, *self.seq_lens):
            raise HtcliError(
                f"block_size ({self.block_size}) is longer than every length measured: lower it",
                fields=("block_size", "seq_lens"),
            )
        self.seq_lens = list(dict.fromkeys(self.seq_lens))  # each length once, in the order given
        if self.model:
            self._check_model_lengths()
        try:
            check_block_size(self.block_size)
        except ValueError as error:
            raise HtcliError(str(error), fields=("block_size",)) from None
        check_choice("dtype", self.dtype, PRECISIONS)
        device = resolve_device(self.device)
        resolve_dtype(self.dtype, device)  # (fp16 needs a CUDA GPU, as for sample and eval)
        if self.warmup is None:
            self.warmup = default_warmup(device)
        if self.compile and not self.model:
            raise HtcliError(
                "compile times a compiled training step: it needs model (the attention bench times the "
                "attention alone)",
                fields=("compile", "model"),
            )
        if self.model and False in self.modes:
            raise HtcliError(
                "model times the causal language model's training step: non-causal modes are not measured",
                fields=("model",),
            )
        if not self.impl:  # (HTCLI_ATTENTION=triton on a CPU: named, as train and sample name it)
            check_device(device.type)
        # auto resolved here: the title names what ran, and every worker runs the same
        self.impl = resolve_implementation(self.impl, device.type)

    def _check_model_lengths(self) -> None:
        """With `model`, every length must make a model of the preset (a multiple of its block size):
        refused here, in one line, rather than as an "error" cell per length."""
        for n in self.seq_lens:
            try:
                model_config(self.preset, max_seq_len=n)
            except HtcliError as error:
                message = str(error).removeprefix("impossible model options: ")
                message = message.replace("max_seq_len", "seq_lens").replace("block_size", "its block size")
                fields = ("model", "seq_lens")
                raise HtcliError(f"model with the {self.preset} preset: {message}", fields=fields) from None


# ---------------------------------------------------------------------------
# In the worker process
# ---------------------------------------------------------------------------


def _rss_kb(field_name: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"{field_name}:\s+(\d+)", status.read()).group(1))


def _trim_heap() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim), so that a call reusing
    memory freed before it raises the RSS it is measured by (without this, a small step that fitted in
    freed pages measured a peak of 0); nothing where there is no glibc."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator, or the process's RSS on a CPU."""

    def __init__(self, device):
        self.device = device

    def __enter__(self) -> PeakMemory:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            _trim_heap()
            self.base = _rss_kb("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w") as refs:
                refs.write("5")  # resets VmHWM to the current RSS
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = _rss_kb("VmHWM") * 1024 - self.base


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


@dataclass(frozen=True)
class Timing:
    """seconds per call, and how: "one by one" (the median of `calls` timed one at a time), "back to
    back" (the mean of `calls` queued one after another) or "alone" (one call)."""

    seconds: float
    calls: int
    way: str


def timed(fn: Callable[[], None], device, warmup: int, repeats: int, deadline: float, back_to_back=None):
    """fn's Timing after `warmup` untimed calls; warm-up is skipped and repeating stops once the deadline
    (a perf_counter time) has passed, but one call is always timed.

    On a CPU: the median of calls timed one by one. On CUDA: the first call is timed alone (its time says
    how many more fit before the deadline), then the mean of the others queued back to back, as a training
    loop runs them (the host queues the next call while the GPU works). Timed one by one, each call would
    also count the host's latency before its first kernel, which the GPU waits for only when nothing is
    queued (on a host whose kernel launches are slow, a large part of a short call).
    back_to_back: the CUDA way (True) or the CPU way (False); None: by the device."""
    for _ in range(warmup):
        if time.perf_counter() > deadline:
            break
        fn()
        _sync(device)
    times = [_seconds(fn, device)]
    if back_to_back is None:
        back_to_back = device.type == "cuda"
    if back_to_back:
        more = min(repeats - 1, int((deadline - time.perf_counter()) / max(times[0], 1e-9)))
        if more > 0:
            return Timing(_back_to_back(fn, device, more) / more, more, "back to back")
        return Timing(times[0], 1, "alone")
    while len(times) < repeats and time.perf_counter() <= deadline:
        times.append(_seconds(fn, device))
    return Timing(statistics.median(times), len(times), "one by one" if len(times) > 1 else "alone")


def _back_to_back(fn: Callable[[], None], device, calls: int) -> float:
    """Seconds for `calls` calls of fn queued one after another, from an idle device to its end."""
    start = _clock(device)
    for _ in range(calls):
        fn()
    return _clock(device) - start


def _attention_step(spec: dict, device, dtype):
    """Build inputs once; return (forward, forward+backward) callables for the spec's method."""
    import torch
    import torch.nn.functional as F

    from htcli.attention import h_attention

    gen = torch.Generator(device="cpu").manual_seed(0)
    shape = (spec["batch_size"], spec["heads"], spec["n"], spec["dim_head"])
    q, k, v, grad = (torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(4))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    causal = spec["causal"]
    if spec["method"] == "h":

        def attend():
            return h_attention(q, k, v, block_size=spec["block_size"], causal=causal)
    else:

        def attend():
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    def forward():
        with torch.no_grad():
            attend()

    def forward_backward():
        q.grad = k.grad = v.grad = None
        attend().backward(grad)

    return forward, forward_backward


def _model_config(spec: dict):
    """The preset's model with the spec's attention, mode and length."""
    attention = "exact" if spec["method"] == "sdpa" else "h"
    return model_config(spec["preset"], max_seq_len=spec["n"], attention=attention, causal=spec["causal"])


def model_step(spec: dict, device, dtype):
    """(forward, training step) callables: the step is forward, backward and AdamW of the spec's preset
    with the spec's attention and length (the forward alone under no_grad, returning the logits)."""
    import torch

    from htcli.model import HTransformer1D

    torch.manual_seed(0)
    model = HTransformer1D(_model_config(spec)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, 256, (spec["batch_size"], spec["n"] + 1), device=device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    # compiled for this one shape (the worker's first, smaller model is another; training compiles with
    # torch's default, dynamic shapes where its length changes); a string is torch.compile's mode
    # (examples/step_profile.py tries "reduce-overhead")
    mode = spec.get("compile")
    run = torch.compile(model, dynamic=False, mode=mode if isinstance(mode, str) else None) if mode else model

    def forward():
        with torch.no_grad(), autocast:
            return run(tokens[:, :-1])

    def step():
        with autocast:
            logits = run(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return forward, step


def run_worker(spec: dict) -> dict:
    """Measure one (method, length, mode): forward and forward+backward time (timed), peak memory."""
    import torch

    from htcli.device import resolve_device, torch_dtype

    device = resolve_device(spec["device"])
    dtype = torch_dtype(spec["dtype"])
    torch.manual_seed(0)
    build = model_step if spec.get("model") else _attention_step
    # a first call at a small size loads code and starts threads, which the peak should not count
    small = 2 * spec["block_size"] if not spec.get("model") else spec["block_size"]
    build({**spec, "n": small, "compile": False}, device, dtype)[1]()  # (compiled below, once)
    forward, forward_backward = build(spec, device, dtype)
    # peak memory of a first, cold forward+backward: nothing cached from earlier runs
    print(COLD_START, flush=True)  # the parent's time limit for the cold run starts here
    start = time.perf_counter()
    if spec.get("compile"):  # both graphs compiled first (the no-grad forward's is another), within the cold
        forward_backward()  # run's limit: the peak is then a compiled step's, not the compiler's (a CPU's
        forward()  # peak is the process's), and no timed call compiles
    with PeakMemory(device) as memory:
        forward_backward()
    print(COLD_DONE, flush=True)  # the parent's time limit for the cold run ends here
    deadline = start + spec["max_seconds"]
    warmup = spec["warmup"] if spec["warmup"] is not None else default_warmup(device)
    # the cold run was the first warm-up; the forward (about a third of the work) gets the last quarter
    # of the time left
    now = time.perf_counter()
    fb = timed(forward_backward, device, warmup - 1, spec["repeats"], now + (deadline - now) * 3 / 4)
    fwd = timed(forward, device, warmup, spec["repeats"], deadline)
    return {
        "status": "ok",
        "forward_s": fwd.seconds,
        "forward_backward_s": fb.seconds,
        "peak_bytes": memory.peak,
        "repeats": fb.calls,
        "calls": {"forward": fwd.calls, "forward_backward": fb.calls},
        "timing": {"forward": fwd.way, "forward_backward": fb.way},
    }


def default_warmup(device) -> int:
    """Untimed calls before timing where --warmup is not given: 2 on CUDA (the cold run and the call at
    which the attention passes are captured as CUDA graphs, graphed.py), else 1 (the cold run)."""
    return 2 if device.type == "cuda" else 1


# ---------------------------------------------------------------------------
# In the parent process
# ---------------------------------------------------------------------------


OUT_OF_MEMORY = ("out of memory", "can't allocate memory")  # (in a worker's errors, lowercased)


def run_isolated(spec: dict, startup_seconds: float = 60.0) -> dict:
    """Run one measurement in a subprocess. Its imports and inputs must be ready within `startup_seconds`,
    its cold forward+backward must end within spec["max_seconds"] from then, the whole run within three
    times that; past any of these it is killed and reported as a timeout. A kill by the system (out of
    memory) or a CUDA out-of-memory error is reported as "oom"; nothing is raised."""
    cmd = [sys.executable, "-m", "htcli.bench", "--worker", json.dumps(spec)]
    limit = spec["max_seconds"]
    with tempfile.TemporaryFile(mode="w+") as stderr:
        env = {**os.environ, **({IMPLEMENTATION_VARIABLE: spec["impl"]} if spec.get("impl") else {})}
        proc, ended = None, False
        try:
            with signals_held():  # (a SIGTERM inside Popen left the worker running on its own)
                proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
            deadline, cold_started, lines = time.monotonic() + startup_seconds, None, []
            with selectors.DefaultSelector() as selector:
                selector.register(proc.stdout, selectors.EVENT_READ)
                while True:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not selector.select(timeout=remaining):
                        return {"status": "timeout"}
                    line = proc.stdout.readline()
                    if not line:
                        break
                    if line.startswith(COLD_START):  # (imports took what they took: the limit starts)
                        cold_started = time.monotonic()
                        deadline = cold_started + limit
                    elif line.startswith(COLD_DONE) and cold_started is not None:
                        deadline = cold_started + 3 * limit
                    lines.append(line)
            ended = True  # (its output closed: it is ending by itself)
        finally:  # a timeout, or this process stopped (Ctrl-C, SIGTERM): the worker goes too
            if proc is not None:
                if not ended:
                    proc.kill()
                proc.wait()
        stderr.seek(0)
        errors = stderr.read()
    results = [line for line in lines if line.startswith("{")]
    if proc.returncode == 0 and results:
        return json.loads(results[-1])
    # (CUDA's and MPS's "out of memory", the CPU allocator's "can't allocate memory", or a kill by the system)
    if any(words in errors.lower() for words in OUT_OF_MEMORY) or proc.returncode in (-9, 137):
        return {"status": "oom"}
    last = errors.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
    return {"status": "error", "error": last[0]}


def padded_lengths(config: BenchConfig) -> list[tuple[int, int]]:
    """The lengths of config that H-attention computes padded, each with its padded length (its block size
    times a power of two, two blocks at least: 3,000 is 4,096 at block 128), where exact attention computes
    the length itself; none for --model, whose lengths are the model's."""
    from htcli.attention.geometry import num_levels

    if config.model:
        return []
    block = config.block_size
    padded = [(n, block * 2 ** num_levels(n, block)) for n in config.seq_lens]
    return [(n, length) for n, length in padded if length != n]


def correctness(device_name: str, dtype_name: str, block_size: int, impl: str | None = None) -> float:
    """Max |h_attention - dense oracle| at a small size, causal and not, with padding, on the
    bench's device and dtype (the oracle in fp64)."""
    import torch

    from htcli.attention import dense_h_attention, h_attention
    from htcli.device import resolve_device, torch_dtype

    device = resolve_device(device_name)
    dtype = torch_dtype(dtype_name)
    gen = torch.Generator().manual_seed(0)
    n = 5 * block_size + 3
    q, k, v = (torch.randn(2, 2, n, 32, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(2, n, generator=gen) > 0.2
    worst = 0.0
    for causal in (False, True):
        expected = dense_h_attention(q, k, v, block_size=block_size, causal=causal, key_padding_mask=mask)
        got = h_attention(
            *(t.to(device=device, dtype=dtype) for t in (q, k, v)),
            block_size=block_size,
            causal=causal,
            key_padding_mask=mask.to(device),
            impl=impl,
        )
        worst = max(worst, (got.double().cpu() - expected).abs().max().item())
    return worst


@dataclass
class Row:
    """One length and mode: both methods' measurements."""

    n: int
    causal: bool
    results: dict[str, dict]

    def ratio(self, key: str) -> float | None:
        h, s = self.results.get("h", {}), self.results.get("sdpa", {})
        if h.get("status") != "ok" or s.get("status") != "ok" or not h[key]:
            return None
        return s[key] / h[key]

    def memory_ratio(self) -> float | None:
        """H-attention's peak memory over SDPA's (None where one did not run, or SDPA's peak was 0)."""
        ratio = self.ratio("peak_bytes")
        return 1 / ratio if ratio else None


def run_bench(config: BenchConfig) -> Iterator[Row]:
    """Measure every length and mode for both methods, yielding one row at a time."""
    base = {k: v for k, v in asdict(config).items() if k not in ("seq_lens", "modes")}
    for n in config.seq_lens:
        for causal in config.modes:
            results = {}
            for method in METHODS:
                spec = {**base, "n": n, "causal": causal, "method": method}
                results[method] = run_isolated(spec)
            yield Row(n=n, causal=causal, results=results)


def scaling_exponent(rows: list[Row], method: str, causal: bool) -> float | None:
    """Least-squares slope a of log(time) against log(n): time ~ n^a."""
    points = [
        (math.log(r.n), math.log(r.results[method]["forward_backward_s"]))
        for r in rows
        if r.causal == causal and r.results.get(method, {}).get("status") == "ok"
    ]
    if len({x for x, _ in points}) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    sxx = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / sxx


DECODE_CONTEXTS = (8192, 32768)  # where bench --decode compares the H-cache with exact attention's KV cache


DECODE_PROMPT, DECODE_NEW = 7680, 512  # bench --decode's prompt and the bytes it decodes after it


def check_decode_preset(preset: str, length: int = DECODE_PROMPT + DECODE_NEW) -> None:
    """HtcliError where preset is unknown, or names the presets that fit where its context is shorter than
    length."""
    context = model_config(preset).max_seq_len
    if length > context:
        fit = [name for name in PRESETS if model_config(name).max_seq_len >= length]
        raise HtcliError(
            f"the decode bench's prompt and new tokens ({length}) exceed the context of preset {preset} "
            f"({context})" + (f": use preset {' or '.join(fit)}" if fit else ""),
            fields=("preset",),
        )


def decode_bench(
    preset: str = "small",
    *,
    prompt_len: int = DECODE_PROMPT,
    new_tokens: int = DECODE_NEW,
    recompute_tokens: int = 8,
    device_name: str = "auto",
    dtype_name: str = "fp32",
    contexts: tuple[int, ...] = (),
    batch: int = 8,
) -> dict:
    """Sampling speed with the hierarchical decode cache against recomputing the forward pass (timed
    over `recompute_tokens` tokens: each costs a forward pass), and at each of `contexts` the H-cache
    against exact attention's KV cache (_cache_rows). Random weights, greedy."""
    import torch

    from htcli.device import autocast, resolve_device, resolve_dtype
    from htcli.model import HTransformer1D

    check_choice("dtype", dtype_name, PRECISIONS)
    device, config = resolve_device(device_name), model_config(preset)
    dtype = resolve_dtype(dtype_name, device)  # (fp16 needs a CUDA GPU, as for sample and eval)
    check_decode_preset(preset, prompt_len + new_tokens)
    torch.manual_seed(0)
    model = HTransformer1D(config).to(device).eval()
    prompt = torch.randint(0, 256, (1, prompt_len), device=device)
    early_prompt = min(1000, prompt_len - 1)  # per-token cost early in the context, from a short prompt
    with torch.no_grad(), autocast(device, dtype):
        model(prompt[:, :256])  # warm-up
        forward_s = _seconds(lambda: model(prompt), device)
        prefill_s, step_times, steps = _cached_decoding(model, prompt, new_tokens, device, dtype)
        recompute_s = _seconds(lambda: _recompute(model, prompt, recompute_tokens), device) / recompute_tokens
        _, early, _ = _cached_decoding(model, prompt[:, :early_prompt], 64, device, dtype)
    cached_s = statistics.median(step_times)
    late = statistics.median(step_times[-64:])
    caches = _cache_rows(preset, contexts, new_tokens, batch, device, dtype)
    return {
        "caches": caches,
        "batch": batch,
        "preset": preset,
        "device": str(device),
        "dtype": dtype_name,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "cached_tokens_per_s": 1 / cached_s,
        "recompute_tokens_per_s": 1 / recompute_s,
        "speedup": recompute_s / cached_s,
        "early_position": early_prompt,
        "token_s_near_1000": statistics.median(early),
        "token_s_near_8000": late,
        "late_over_early": late / statistics.median(early),
        "late_position": prompt_len + new_tokens,
        "prefill_s": prefill_s,
        "forward_s": forward_s,
        "prefill_over_forward": prefill_s / forward_s,
        "steps": steps,
    }


def _clock(device) -> float:
    """perf_counter once the device's queued work is done."""
    _sync(device)
    return time.perf_counter()


def _seconds(fn: Callable[[], object], device) -> float:
    """Wall time of one call, the device's queued work included."""
    started = _clock(device)
    fn()
    return _clock(device) - started


def _cached_decoding(
    model, prompt, new_tokens: int, device, dtype, copies: int = 1
) -> tuple[float, list[float], str]:
    """Greedy decoding with the cache, as `htcli sample` decodes (on CUDA, steps replayed from a CUDA
    graph): the prefill's seconds, each step's, and how the steps ran (DecodeSteps.kind) (copies: of a
    prompt of one sequence, decoded together from its one prefill, as `htcli sample --num-samples` does)."""
    from htcli.decode_steps import DecodeSteps

    started = _clock(device)
    logits, state = model.prefill(prompt, copies)
    steps = DecodeSteps(model, state, dtype)
    prefill_s = _clock(device) - started
    token, step_times = logits[:, -1].argmax(-1), []
    for _ in range(new_tokens):
        started = _clock(device)
        token = steps(token).argmax(-1)
        step_times.append(_clock(device) - started)
    return prefill_s, step_times, steps.kind


def _cache_rows(preset: str, contexts, new_tokens: int, batch: int, device, dtype) -> list[dict]:
    """cache_figures of the preset with H-attention and with exact attention at each context."""
    from htcli.model import HTransformer1D

    caches = []
    for index, context in enumerate(contexts):
        for attention in ("h", "exact"):
            other = (
                HTransformer1D(model_config(preset, max_seq_len=context, attention=attention))
                .to(device)
                .eval()
            )
            figures = cache_figures(
                other, context - new_tokens, new_tokens, batch if index == 0 else 1, device, dtype
            )
            caches.append({"context": context, "attention": attention, **figures})
    return caches


def cache_figures(model, prompt_len: int, new_tokens: int, batch: int, device, dtype) -> dict:
    """Decoding speed of one model with its cache after a random prompt of prompt_len bytes: the first
    byte's latency (prefill included), bytes/s and per-byte times early and late at batch 1, and the
    first byte's latency and bytes/s of `batch` samples of the prompt at once (batch > 1)."""
    import torch

    from htcli.device import autocast

    prompt = torch.randint(0, 256, (1, prompt_len), device=device)
    with torch.no_grad(), autocast(device, dtype):
        _cached_decoding(model, prompt[:1, :256], 8, device, dtype)  # warm-up
        started = _clock(device)
        _cached_decoding(model, prompt[:1], 1, device, dtype)
        first_byte_s = _clock(device) - started
        prefill_s, steps, _ = _cached_decoding(model, prompt[:1], new_tokens, device, dtype)
        _, early, _ = _cached_decoding(model, prompt[:1, : min(1000, prompt_len - 1)], 64, device, dtype)
        figures = {
            "prompt_len": prompt_len, "first_byte_s": first_byte_s, "prefill_s": prefill_s,
            "bytes_per_s": 1 / statistics.median(steps), "token_s_early": statistics.median(early),
            "token_s_late": statistics.median(steps[-64:]),
        }  # fmt: skip
        figures["late_over_early"] = figures["token_s_late"] / figures["token_s_early"]
        if batch > 1:
            started = _clock(device)
            _cached_decoding(model, prompt, 1, device, dtype, copies=batch)
            figures["batch_first_byte_s"] = _clock(device) - started
            _, together, _ = _cached_decoding(model, prompt, new_tokens // 4, device, dtype, copies=batch)
            figures["batch_bytes_per_s"] = batch / statistics.median(together)
            figures["batch_speedup"] = figures["batch_bytes_per_s"] / figures["bytes_per_s"]
    return figures


def _recompute(model, prompt, new_tokens: int) -> None:
    """Greedy decoding without the cache: the whole forward pass for every new token."""
    import torch

    tokens = prompt
    for _ in range(new_tokens):
        following = model(tokens[:, -model.config.max_seq_len :])[:, -1].argmax(-1)
        tokens = torch.cat([tokens, following[:, None]], dim=1)


def _worker_main() -> None:
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    spec = json.loads(sys.argv[sys.argv.index("--worker") + 1])
    print(json.dumps(run_worker(spec)), flush=True)


if __name__ == "__main__":
    _worker_main()
