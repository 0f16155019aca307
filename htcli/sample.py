"""Generating bytes from a model, one small function per stage (gpt-fast style).

`generate` gets each next-token distribution from a `Decoder`: by default through the model's
hierarchical decode cache (prefill once, then O(block_size * dim_head) per layer per byte), or
by recomputing the model over the same context for every byte (`cache=False`, for comparison).
"""

from __future__ import annotations

import codecs
import math
import os
import stat
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from htcli.config import MAX_SEED
from htcli.decode_steps import DecodeSteps
from htcli.device import autocast
from htcli.display import byte_count
from htcli.errors import HtcliError
from htcli.model import BYTE_TOKENS, HTransformer1D

STDIN = "-"  # (as --prompt-file: standard input)
STDIN_CHUNK = 1 << 20


@dataclass
class SamplingConfig:
    max_new_tokens: int = 500  # bytes to generate
    temperature: float = 0.8  # < 1 sharpens, > 1 flattens; 0: always the most likely byte
    top_k: int | None = None  # draw only from the k most likely bytes
    top_p: float | None = None  # draw only from the most likely bytes whose probabilities sum to top_p
    seed: int = 0  # same seed, same bytes

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "seed") + (("top_k",) if self.top_k is not None else ()):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise HtcliError(
                    f"{name} must be a whole number, got {getattr(self, name)!r}", fields=(name,)
                )
        for name in ("temperature",) + (("top_p",) if self.top_p is not None else ()):
            if not isinstance(getattr(self, name), (int, float)) or isinstance(getattr(self, name), bool):
                raise HtcliError(f"{name} must be a number, got {getattr(self, name)!r}", fields=(name,))
        if not math.isfinite(self.temperature):
            raise HtcliError(
                f"temperature must be a finite number >= 0 (0: greedy), got {self.temperature}",
                fields=("temperature",),
            )
        if not 0 <= self.seed < MAX_SEED:
            raise HtcliError(
                f"seed must be a whole number from 0 to 2**63 - 1, got {self.seed}", fields=("seed",)
            )
        if self.max_new_tokens < 0:
            raise HtcliError(
                f"max_new_tokens must be >= 0, got {self.max_new_tokens}", fields=("max_new_tokens",)
            )
        if self.temperature < 0:
            raise HtcliError(
                f"temperature must be >= 0 (0: greedy), got {self.temperature}", fields=("temperature",)
            )
        if self.top_k is not None and not 1 <= self.top_k <= BYTE_TOKENS:  # (past it: void, without a word)
            raise HtcliError(
                f"top_k must be a positive integer up to {BYTE_TOKENS} (the bytes a sample draws from), "
                f"got {self.top_k}",
                fields=("top_k",),
            )
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise HtcliError(
                f"top_p must be above 0 and at most 1 (the probability of the top bytes kept), got "
                f"{self.top_p}",
                fields=("top_p",),
            )
        void = [name for name in ("top_k", "top_p") if getattr(self, name) is not None]
        if self.temperature == 0 and void:  # (greedy: they would be ignored)
            raise HtcliError(
                f"temperature 0 always takes the most likely byte: {' and '.join(void)} would be ignored; "
                f"drop {'them' if len(void) > 1 else 'it'}, or give a temperature above 0",
                fields=("temperature", *void),
            )


# a row's uniforms are drawn from its generator this many at a time (one tensor operation per row per
# UNIFORMS_AT_ONCE bytes instead of one per byte)
UNIFORMS_AT_ONCE = 64


def logits_to_probs(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Next-token probabilities (..., vocab) from logits (..., vocab), sharpened by temperature (0: all on
    the most likely) and cut to top-k (exactly k tokens: of tokens tied with the k-th, as many as fit) /
    top-p (each row on its own)."""
    logits = logits.float()
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    # (the largest first taken away: any temperature above 0 divides without overflow; it was floored at
    # 1e-5, which a tiny temperature did not sharpen as it says. One below fp32's smallest normal number
    # divides as that number: it became 0 in fp32, and 0 / 0 a NaN that drew token 256)
    logits = (logits - logits.amax(-1, keepdim=True)) / max(temperature, torch.finfo(torch.float32).tiny)
    if top_k is not None and top_k < logits.shape[-1]:  # (all tied with the k-th were kept: bf16 ties)
        kept = torch.zeros_like(logits, dtype=torch.bool).scatter(-1, torch.topk(logits, top_k).indices, True)
        logits = logits.masked_fill(~kept, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # drop a token once the ones before it already cover top_p; the most likely always stays
        drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= top_p
        drop_sorted[..., 0] = False  # (also where top_p rounds to 0 in fp32)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


class TokenSampler:
    """Draws every row's next token at once, each row from its own generator (seeded by its config's
    seed) and with its own config's temperature, top-k and top-p: given the same logits, a row's tokens
    are the same whatever rows it is drawn beside. A draw is the inverse CDF of the row's probabilities
    at one uniform number (fp64), taken from the row's generator UNIFORMS_AT_ONCE at a time; temperature
    0 is the most likely token (its row's uniforms are drawn all the same)."""

    def __init__(self, configs: list[SamplingConfig]):
        self.generators = [torch.Generator().manual_seed(config.seed) for config in configs]
        groups: dict[tuple, list[int]] = {}
        for row, config in enumerate(configs):
            groups.setdefault((config.temperature, config.top_k, config.top_p), []).append(row)
        # rows sharing their options are drawn together (all of them, as with --num-samples, in one go)
        self.groups = [(key, torch.tensor(rows)) for key, rows in groups.items()]
        self.uniforms, self.used = torch.empty(0), UNIFORMS_AT_ONCE  # (UNIFORMS_AT_ONCE, rows) once drawn

    def __call__(self, logits: torch.Tensor) -> list[int]:
        """One token per row of logits (rows, vocab)."""
        if self.used == UNIFORMS_AT_ONCE:
            draws = [torch.rand(UNIFORMS_AT_ONCE, dtype=torch.float64, generator=g) for g in self.generators]
            self.uniforms, self.used = torch.stack(draws, 1), 0
        uniform = self.uniforms[self.used]
        self.used += 1
        logits = logits.float().cpu()
        _check_finite(logits)
        if len(self.groups) == 1:  # (every row: no gathering)
            return _draw(logits, uniform, *self.groups[0][0]).tolist()
        tokens = torch.empty(len(self.generators), dtype=torch.long)
        for options, rows in self.groups:
            tokens[rows] = _draw(logits[rows], uniform[rows], *options)
        return tokens.tolist()


def _check_finite(logits: torch.Tensor) -> None:
    """HtcliError where a row's scores hold NaN or +inf, or are all -inf: no distribution to draw from (a
    draw gave token 256, which the next step's embedding refused with an IndexError)."""
    bad = logits.isnan().any(-1) | logits.isposinf().any(-1) | (logits.amax(-1) == float("-inf"))
    if bad.any():
        row = int(bad.nonzero()[0]) + 1
        raise HtcliError(
            f"the model's next-byte scores are not finite (NaN or infinite) for sample {row}: its weights"
            " are not, or this precision overflows; try dtype fp32, or another checkpoint",
            fields=("dtype",),
        )


def _draw(logits: torch.Tensor, uniform: torch.Tensor, temperature: float, top_k, top_p) -> torch.Tensor:
    """Each row's token (rows,): the most likely at temperature 0, else inverse_cdf at its uniform."""
    if temperature == 0:
        return logits.argmax(-1)
    return inverse_cdf(logits_to_probs(logits, temperature, top_k, top_p), uniform)


def inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Per row of probs (rows, vocab), the token whose interval of the cumulative sum holds uniform (rows,)
    in [0, 1) times the row's total: token i with probability probs[i] / total, never one of probability 0.
    (uniform is fp64, at most 1 - 2**-53, and then u * total < total for every positive fp64 total: the
    search never runs past the last token with any probability.)"""
    cdf = probs.double().cumsum(-1)
    scaled = uniform * cdf[:, -1]
    return torch.searchsorted(cdf, scaled[:, None], right=True)[:, 0]


class Decoder:
    """Feeds bytes to a model, a batch of sequences at a time, and holds the logits (b, vocab) of the
    next byte of each.

    With the cache, a prompt is prefilled by one parallel forward pass (one for all `copies` of a
    prompt of one sequence: its state is copied) and each byte after it is one decode step
    (DecodeSteps: on a CUDA GPU replayed from a CUDA graph). When the context reaches max_seq_len, it
    is cut to its last max_seq_len // 2 bytes and prefilled again, so past the model's context every
    max_seq_len // 2 new bytes cost one prefill; the model never sees more than max_seq_len.
    Without the cache (or for a model that cannot use it), each byte recomputes the model over the
    same context (cut the same way: a sliding window of the last max_seq_len bytes gave other bytes
    than the cache past the model's context, where --no-cache is the cache's check).
    """

    def __init__(
        self, model: HTransformer1D, tokens: torch.Tensor, *, cache: bool, dtype: torch.dtype, copies: int = 1
    ):
        """tokens: (b, n) prompts; copies > 1: that many sequences of one prompt (b = 1), whose forward
        pass runs once for all of them."""
        self.model, self.dtype = model, dtype
        self.window = model.config.max_seq_len
        self.cached = cache and model.supports_decode_cache
        prompt = tokens[:, -self.window :]
        self.logits = self._start(prompt, copies)
        self.context = prompt.expand(copies, -1) if copies > 1 else prompt
        self.seen = prompt.shape[1]  # the bytes the model reads now: since the prompt, or the last cut

    def _start(self, tokens: torch.Tensor, copies: int = 1) -> torch.Tensor:
        """Logits of the byte after tokens (b, n), the state to go on from; copies: of one sequence."""
        with autocast(tokens.device, self.dtype):
            if not self.cached:
                logits = self.model(tokens)[:, -1]
                return logits.expand(copies, -1) if copies > 1 else logits
            logits, self.state = self.model.prefill(tokens, copies)
        self.steps = DecodeSteps(self.model, self.state, self.dtype)
        return logits[:, -1]

    def feed(self, tokens: list[int]) -> None:
        """Append one byte to each sequence; self.logits then predicts the bytes after them."""
        new = self.context.new_tensor(tokens)[:, None]
        self.context = torch.cat([self.context, new], dim=1)[:, -self.window :]
        cut = self.seen == self.window  # (the context is full: cut to its last half, the new byte's)
        self.seen = self.window // 2 if cut else self.seen + 1
        if cut or not self.cached:
            self.logits = self._start(self.context[:, -self.seen :])
        else:
            self.logits = self.steps(new[:, 0])


def generate(
    model: HTransformer1D,
    prompt: bytes,
    config: SamplingConfig,
    *,
    dtype: torch.dtype = torch.float32,
    cache: bool = True,
    stop: list[bytes] = (),
) -> Iterator[int]:
    """Up to config.max_new_tokens bytes continuing prompt, yielded one by one, ending early after a stop
    string. Same seed, same bytes. Its arguments are checked when it is called (an HtcliError), not at
    the first byte asked for."""
    steps = generate_batch(model, prompt, [config], dtype=dtype, cache=cache, stop=stop)
    return (tokens[0] for tokens in steps)


def generate_batch(
    model: HTransformer1D,
    prompt: bytes,
    configs: list[SamplingConfig],
    *,
    dtype: torch.dtype = torch.float32,
    cache: bool = True,
    stop: list[bytes] = (),
) -> Iterator[list[int | None]]:
    """Continue prompt once per config, all decoded together (one prefill, then one batched step per
    byte). Yields, for each step, every sample's next byte: None for a sample that has ended (its
    max_new_tokens reached, or, after it produced one of the stop strings, which it ends with).
    Each sample draws from its own generator seeded by its config's seed, as it would alone (the same
    bytes, up to floating-point differences between the batched step's logits and one sequence's, which
    can flip a near-tie now and then)."""
    if not model.config.causal:
        raise HtcliError(
            "the model is bidirectional (causal false): it learned to predict bytes it could see, so it"
            " cannot continue a text; sample a causal model"
        )
    if not isinstance(prompt, (bytes, bytearray)):
        raise HtcliError(f"the prompt must be bytes (text.encode()), got {type(prompt).__name__}")
    if isinstance(configs, SamplingConfig):  # ("'SamplingConfig' object is not iterable")
        raise HtcliError("configs is one SamplingConfig per sample: give a list, [config] for one sample")
    wrong = [type(c).__name__ for c in configs if not isinstance(c, SamplingConfig)]
    if wrong:  # (a dict of its fields said "'dict' object has no attribute 'max_new_tokens'"; None, too)
        raise HtcliError(
            "sampling options must be a SamplingConfig (SamplingConfig(**options)), got " + wrong[0]
        )
    if not configs:  # (the model's "copies of a prompt need ... copies >= 1")
        raise HtcliError("no SamplingConfig given: give one per sample to draw")
    if not prompt:
        raise HtcliError("the prompt is empty: generation needs at least one byte to continue")
    if isinstance(stop, (str, bytes)) or not all(isinstance(s, (bytes, bytearray)) for s in stop):
        shown = type(stop).__name__ if isinstance(stop, (str, bytes)) else "a list holding other things"
        raise HtcliError(f'stop must be a list of bytes (such as [b"\\n\\n"]), got {shown}')
    if any(not s for s in stop):
        raise HtcliError("a stop string is empty: give at least one character", fields=("stop",))
    most = max((config.max_new_tokens for config in configs), default=0)
    longer = next((s for s in stop if len(s) > most), None)  # (it cannot occur: void, taken without a word)
    if longer is not None:
        raise HtcliError(
            f"a stop string of {byte_count(len(longer))} cannot occur in max_new_tokens ({most:,}) bytes:"
            " raise max_new_tokens, or shorten or drop that stop",
            fields=("stop", "max_new_tokens"),
        )
    autocast(next(model.parameters()).device, dtype)  # (its check of dtype, now: torch.int64 ran as fp32)
    return _decode(model, prompt, configs, dtype, cache, stop)


@torch.no_grad()
def _decode(model, prompt: bytes, configs: list[SamplingConfig], dtype, cache: bool, stop) -> Iterator[list]:
    device = next(model.parameters()).device
    draw = TokenSampler(configs)
    tokens = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    decoder = Decoder(model, tokens, cache=cache, dtype=dtype, copies=len(configs))
    tails, live = [b""] * len(configs), [config.max_new_tokens > 0 for config in configs]
    longest = max((len(s) for s in stop), default=0)
    for index in range(max((config.max_new_tokens for config in configs), default=0)):
        step = []
        for row, (config, token) in enumerate(zip(configs, draw(decoder.logits))):
            step.append(token if live[row] else None)
            tails[row] = (tails[row] + bytes([token]))[-longest:] if longest else b""
            ended = index + 1 >= config.max_new_tokens or any(tails[row].endswith(s) for s in stop)
            live[row] = live[row] and not ended
        yield step
        if not any(live):
            return
        decoder.feed([token if token is not None else 0 for token in step])


def read_prompt_sized(path: Path, context: int) -> tuple[bytes, int]:
    """The last `context` bytes of a regular file (all a model of that context sees of a prompt): only
    those are read. Anything but a regular file (a FIFO, /dev/zero) is refused, so nothing hangs. The
    path - is standard input, read to its end (its last `context` bytes kept). With them, how many bytes
    the file or standard input held (more than context: the model sees only its end, which a caller may
    say)."""
    if os.fspath(path) == STDIN:
        tail, size = _read_stdin(context)
        return _not_empty(tail, "standard input (prompt file -)"), size
    try:
        with open(path, "rb", opener=_opener_without_blocking) as file:
            facts = os.fstat(file.fileno())
            if not stat.S_ISREG(facts.st_mode):
                raise HtcliError(f"prompt file {path} is not a regular file: give a file of text")
            file.seek(max(0, facts.st_size - context))
            return _not_empty(file.read(context), f"prompt file {path}"), facts.st_size
    except FileNotFoundError:
        raise HtcliError(
            f"prompt file {path} does not exist: give a file of text, or - for standard input"
        ) from None
    except IsADirectoryError:
        raise HtcliError(f"prompt file {path} is a directory: give a file of text") from None
    except OSError as error:
        raise HtcliError(f"cannot read prompt file {path}: {error.strerror or error}") from None


def _not_empty(prompt: bytes, source: str) -> bytes:
    """prompt, refused where its source gave no byte (it was "the prompt is empty", source unnamed)."""
    if not prompt:
        raise HtcliError(f"{source} is empty: generation needs at least one byte to continue; give some text")
    return prompt


def _read_stdin(context: int) -> tuple[bytes, int]:
    """The last `context` bytes of standard input, read to its end a chunk at a time, and how many it held."""
    if sys.stdin is None:  # (a process started without one)
        raise HtcliError("the prompt file - is standard input, and this process has none: give a file")
    tail, size = bytearray(), 0
    try:
        while chunk := sys.stdin.buffer.read(STDIN_CHUNK):
            tail += chunk
            size += len(chunk)
            del tail[:-context]
    except OSError as error:
        raise HtcliError(f"cannot read the prompt from standard input: {error.strerror or error}") from None
    return bytes(tail), size


def _opener_without_blocking(path: str, flags: int) -> int:
    """open(2) that returns at once for a FIFO without a writer (O_NONBLOCK; the read itself never
    happens, a FIFO is refused first)."""
    return os.open(path, flags | getattr(os, "O_NONBLOCK", 0))


class Utf8Stream:
    """Bytes in, text out, never splitting a character: an incomplete one waits for its next bytes.
    Invalid UTF-8 (a byte model can produce it) comes out as U+FFFD."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes | int) -> str:
        return self._utf8.decode(bytes([data]) if isinstance(data, int) else data)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
