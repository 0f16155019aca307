"""Generating bytes from a model, one small function per stage (gpt-fast style).

`generate` gets each next-token distribution from `next_token_logits`, which recomputes the model
over the last max_seq_len tokens; an incremental decode cache would replace just that function.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from htcli.device import autocast
from htcli.errors import HtcliError
from htcli.model import HTransformer1D


@dataclass
class SamplingConfig:
    max_new_tokens: int = 500  # bytes to generate
    temperature: float = 0.8  # < 1 sharpens, > 1 flattens; 0: always the most likely byte
    top_k: int | None = None  # draw only from the k most likely bytes
    top_p: float | None = None  # draw only from the most likely bytes whose probabilities sum to top_p
    seed: int = 0  # same seed, same bytes

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise HtcliError(f"--max-new-tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise HtcliError(f"--temperature must be >= 0 (0: greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise HtcliError(f"--top-k must be a positive integer, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise HtcliError(f"--top-p must be in (0, 1], got {self.top_p}")


def logits_to_probs(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Next-token probabilities (vocab,) from logits, sharpened by temperature and cut to top-k / top-p."""
    logits = logits.float() / max(temperature, 1e-5)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token once the ones before it already cover top_p; the most likely always stays
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sample_token(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """One token from logits (vocab,): the most likely when temperature is 0, else drawn with generator."""
    if temperature == 0:
        return int(logits.argmax())
    probs = logits_to_probs(logits, temperature, top_k, top_p).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


def next_token_logits(model: HTransformer1D, tokens: torch.Tensor) -> torch.Tensor:
    """Logits (vocab,) for the token after `tokens` (1, n): the model recomputed on the last max_seq_len."""
    return model(tokens[:, -model.config.max_seq_len :])[0, -1]


@torch.no_grad()
def generate(
    model: HTransformer1D, prompt: bytes, config: SamplingConfig, *, dtype: torch.dtype = torch.float32
) -> Iterator[int]:
    """Yield config.max_new_tokens bytes continuing prompt (at least one byte). Same seed, same bytes."""
    if not prompt:
        raise HtcliError("the prompt is empty: generation needs at least one byte to continue")
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(config.seed)
    tokens = torch.tensor([list(prompt)], dtype=torch.long, device=device)
    for _ in range(config.max_new_tokens):
        with autocast(device, dtype):
            logits = next_token_logits(model, tokens)
        token = sample_token(
            logits,
            temperature=config.temperature,
            top_k=config.top_k,
            top_p=config.top_p,
            generator=generator,
        )
        yield token
        # keep no more context than the model reads
        tokens = torch.cat([tokens[:, 1 - model.config.max_seq_len :], tokens.new_tensor([[token]])], dim=1)


class Utf8Stream:
    """Bytes in, text out, never splitting a character: an incomplete one waits for its next bytes.
    Invalid UTF-8 (a byte model can produce it) comes out as U+FFFD."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes | int) -> str:
        return self._decoder.decode(bytes([data]) if isinstance(data, int) else data)

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)
