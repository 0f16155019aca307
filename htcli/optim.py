"""The optimizer, and the schedules of a run: learning rate, context length."""

from __future__ import annotations

import math

import torch

from htcli.config import TrainConfig


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup over `warmup` steps, then cosine decay from lr to min_lr at the last step."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - 1 - config.warmup)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def context_length(step: int, config: TrainConfig) -> int:
    """The training window's length at a step. With context_warmup, the first that fraction of the steps
    train on windows of context_warmup_start bytes, as many more of them per step (the bytes per step
    stay the same: many more places of the corpus per step), the rest on windows of the whole context.
    (Doubling the length in stages instead did worse: see README, "Long context".)"""
    full = config.model.max_seq_len
    start = min(config.context_warmup_start, full)
    if step < config.context_warmup * config.steps and full % start == 0:
        return start
    return full


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings only (not on norms and biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))
