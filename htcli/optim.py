"""The optimizer, and the schedules of a run: learning rate, context length."""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from htcli.config import TrainConfig
from htcli.device import resolve_dtype


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup over `warmup` steps, then cosine decay from lr to min_lr at the last step."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - 1 - config.warmup)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def short_steps(config: TrainConfig) -> int:
    """How many steps (the first ones) context_length gives short windows: the context warm-up counts whole
    steps, so a fraction of the steps rounds up (0.01 of 4 steps is one). The fraction as its decimal is
    written (0.07 of 100 steps is 7: as binary floats the product is 7.000000000000001, which made it 8)."""
    if not config.context_warmup:
        return 0
    return math.ceil(Fraction(repr(float(config.context_warmup))) * config.steps)


def context_schedule(config: TrainConfig) -> dict:
    """The context warm-up as a run's start event carries it (and display.context_warning reads it, with the
    event's seq_len, steps and step): its fraction, the length of the last step (whether any step trains at
    the whole context) and the number of short steps."""
    return dict(
        context_warmup=config.context_warmup,
        last_context=context_length(config.steps - 1, config),
        short_steps=short_steps(config),
    )


def context_length(step: int, config: TrainConfig) -> int:
    """The training window's length at a step. With context_warmup, the first that fraction of the steps
    train on windows of context_warmup_start bytes, as many more of them per step (the bytes per step
    stay the same: many more places of the corpus per step), the rest on windows of the whole context.
    (Doubling the length in stages instead did worse: see README, "Long context".)"""
    full = config.model.max_seq_len
    start = min(config.context_warmup_start, full)
    if step < short_steps(config):  # (the config checks that start divides full)
        return start
    return full


def make_optimizer(
    model: torch.nn.Module, config: TrainConfig, products: torch.dtype | None = None
) -> torch.optim.Optimizer | MuonAdamW:
    """AdamW with weight decay on matrices and embeddings only (not on norms and biases); with
    config.optimizer "muon", Muon for the matrices inside the layers and AdamW for the rest (the
    embedding, the output head, norms and biases), as in the nanoGPT speedrun. products: the precision of
    Muon's Newton-Schulz products (None: newton_schulz_dtype of the model's device)."""
    hidden = set()
    if config.optimizer == "muon":
        hidden = {id(p) for p in model.layers.parameters() if p.ndim == 2 and p.requires_grad}
    params = [p for p in model.parameters() if p.requires_grad and id(p) not in hidden]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    adamw = torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))
    if not hidden:
        return adamw
    matrices = [p for p in model.layers.parameters() if id(p) in hidden]
    # the update's RMS matched to AdamW's, so that both follow one learning rate
    if products is None:
        products = newton_schulz_dtype(next(model.parameters()).device)
    rates = dict(lr=config.lr, weight_decay=config.weight_decay, adjust_lr_fn="match_rms_adamw")
    muon = Muon(matrices, products=products, **rates)
    return MuonAdamW(muon, adamw)


def newton_schulz_dtype(device: torch.device) -> torch.dtype:
    """bf16 (torch's Muon's precision) where device multiplies it in hardware, else fp32: the precision
    training's dtype auto takes there (a CUDA GPU with bf16, a CPU with AMX or AVX-512 BF16). On a CPU
    without either, bf16's emulated products made a step of the recipe's model 1,790 ms against 833 ms for
    the first recipe, with AdamW (a 2-core AVX2 EPYC, 1,024-byte windows); in fp32 890 ms, and more
    precise."""
    return resolve_dtype("auto", device, training=True)


class Muon(torch.optim.Muon):
    """torch's Muon (the same hyperparameters, update, state and state dict), with the matrices of one
    shape orthogonalised together: one batched matrix product per Newton-Schulz operation for all the
    layers' matrices of that shape, where torch's makes one per matrix, and the elementwise steps as
    one foreach operation per group. Measured on the recipe benchmark's model (16 matrices of 4 shapes,
    2 CPU cores), inside training steps: the optimizer step 7.1 ms against torch's 9.95 ms. The same
    arithmetic (bf16 products, fp32 momentum and weights): bit for bit the same updates at the small
    and recipe models' shapes (tested); for larger tall matrices (the base preset's 1536 x 512) CPU
    bf16 products of the contiguous transposed copy round differently from torch's strided view, at
    bf16's rounding (up to ~2e-3 of an update of RMS ~1). products: the precision of the Newton-Schulz
    products, bf16 as torch's (make_optimizer takes fp32 where bf16 is emulated)."""

    def __init__(self, params, *, products: torch.dtype = torch.bfloat16, **options):
        super().__init__(params, **options)
        self.products = products

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)
            if not params:
                continue
            if group["ns_steps"] >= 100 or any(param.ndim != 2 for param in params):  # (as torch's refuses)
                raise ValueError("Muon takes 2-D matrices and fewer than 100 Newton-Schulz steps")
            momentum, lr = group["momentum"], group["lr"]
            torch._foreach_lerp_(buffers, grads, 1 - momentum)
            updates = torch._foreach_lerp(grads, buffers, momentum) if group["nesterov"] else buffers
            torch._foreach_mul_(params, 1 - lr * group["weight_decay"])
            by_shape: dict[tuple[int, ...], list[int]] = {}
            for index, param in enumerate(params):
                by_shape.setdefault(tuple(param.shape), []).append(index)
            for shape, indices in by_shape.items():
                stacked = torch.stack([updates[i] for i in indices])
                orthogonal = orthogonalise(
                    stacked, group["ns_coefficients"], group["ns_steps"], group["eps"], self.products
                )
                rate = lr * rate_ratio(group["adjust_lr_fn"], shape)
                torch._foreach_add_([params[i] for i in indices], orthogonal.float().unbind(), alpha=-rate)
        return loss


def rate_ratio(adjust_lr_fn: str | None, shape: tuple[int, ...]) -> float:
    """What torch.optim.Muon multiplies its learning rate by for a matrix of shape (rows, columns):
    sqrt(max(1, rows / columns)) ("original", None), or 0.2 sqrt(max(rows, columns)) ("match_rms_adamw":
    the update's RMS that of AdamW's, so both follow one learning rate)."""
    rows, columns = shape[:2]
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, columns))
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1.0, rows / columns))
    return 1.0  # (as torch's, for any other name)


def orthogonalise(
    matrices: torch.Tensor,
    coefficients: tuple[float, float, float],
    steps: int,
    eps: float,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Muon's Newton-Schulz iteration (torch.optim.Muon's quintic, in bf16 or dtype) on a batch of matrices
    (m, rows, columns) at once: each is scaled to Frobenius norm 1, then mapped towards the nearest
    semi-orthogonal matrix (U S' V^T with S' around 1, where the matrix is U S V^T)."""
    a, b, c = coefficients
    x = matrices.to(dtype)
    wide = matrices.shape[-2] <= matrices.shape[-1]  # work on the side with fewer rows, as torch does
    x = x if wide else x.mT.contiguous()
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x if wide else x.mT


class MuonAdamW:
    """Two torch optimizers stepped as one, with one state dict: its parameter indices are Muon's,
    then AdamW's, as param_groups lists them (what training and checkpoints need of an optimizer)."""

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.parts = (muon, adamw)

    @property
    def param_groups(self) -> list[dict]:
        return [group for part in self.parts for group in part.param_groups]

    @property
    def state(self) -> dict:
        return {**self.parts[0].state, **self.parts[1].state}

    def step(self) -> None:
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        offset, states, groups = 0, {}, []
        for part in self.parts:
            own = part.state_dict()
            states.update({index + offset: value for index, value in own["state"].items()})
            groups += [{**g, "params": [i + offset for i in g["params"]]} for g in own["param_groups"]]
            offset += sum(len(g["params"]) for g in own["param_groups"])
        return {"state": states, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        groups, offset = list(state_dict["param_groups"]), 0
        if len(groups) != len(self.param_groups):
            raise ValueError("the state has another number of parameter groups")
        for part in self.parts:
            own = groups[: len(part.param_groups)]
            groups = groups[len(part.param_groups) :]
            indices = [i for g in own for i in g["params"]]
            part.load_state_dict({
                "state": {i - offset: state_dict["state"][i] for i in indices if i in state_dict["state"]},
                "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in own],
            })  # fmt: skip
            offset += len(indices)
