"""What a checkpoint's files must be before anything is built from them: checkpoints come from others.

Each check raises an HtcliError naming the file and what is wrong with it. The weights file's tensor
names and shapes are compared with its model config's from the safetensors header alone (the
model's shapes come from building it on the meta device, which allocates nothing), so a small file
that claims a huge model is refused before any memory is spent on it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from htcli.errors import HtcliError
from htcli.model import HTransformer1D, HTransformerConfig

STATE_KEYS = {"step": int, "world_size": int, "ranks": list, "grad_scaler": dict}
KIND_NAMES = {int: "a whole number", list: "a list", dict: "an object", str: "a string"}  # (as JSON has them)
RANK_KEYS = {"torch_rng": str, "sampler": str}
# per parameter: AdamW's step count and moments, Muon's momentum
OPTIMIZER_STATE_NAMES = ("step", "exp_avg", "exp_avg_sq", "momentum_buffer")


FLOAT_KINDS = ("F64", "F32", "F16", "BF16")  # safetensors' names of the dtypes a model's weights may have


def model_shapes(config: HTransformerConfig) -> dict[str, tuple[int, ...]]:
    """The model's tensors by name and shape, without allocating them."""
    with torch.device("meta"):
        model = HTransformer1D(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def check_weights_header(file: Path, config: HTransformerConfig, *, shown: Path | None = None) -> None:
    """The file holds exactly the model's tensors, by name and shape (read from its header only); shown: its
    name in messages, where file is another name of it."""
    file, shown = Path(file), Path(shown or file)
    try:
        with safe_open(str(file), framework="pt") as opened:
            slices = {name: opened.get_slice(name) for name in opened.keys()}  # noqa: SIM118
            found = {name: tuple(part.get_shape()) for name, part in slices.items()}
            kinds = {name: part.get_dtype() for name, part in slices.items()}
    except (SafetensorError, OSError, ValueError):
        raise HtcliError(f"{shown} is not a readable safetensors file (truncated or corrupt?)") from None
    not_float = sorted(name for name, kind in kinds.items() if kind not in FLOAT_KINDS)
    if not_float:
        raise HtcliError(
            f"{shown} is not an htcli checkpoint: its tensor {not_float[0]} holds {kinds[not_float[0]]}"
            " values, where a model's weights are floating-point numbers"
        )
    expected = model_shapes(config)
    if found == expected:
        return
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    wrong = sorted(name for name in set(found) & set(expected) if found[name] != expected[name])
    what = (
        f"tensor {wrong[0]} is {list(found[wrong[0]])}, the config makes it {list(expected[wrong[0]])}"
        if wrong
        else f"no tensor {missing[0]}"
        if missing
        else f"an unknown tensor {extra[0]}"
    )
    raise HtcliError(
        f"{shown} is not an htcli checkpoint: its tensors do not match its model config ({what})"
    )


def check_finite(tensors: dict[str, torch.Tensor], file: Path, what: str = "weights") -> None:
    """No NaN or infinite value in any floating-point tensor (what: the file's tensors, as named in
    the error)."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise HtcliError(
                f"{file} holds NaN or infinite {what} (in {name}): it cannot be used; "
                "take an earlier checkpoint"
            )


def check_state(state: object, file: Path, step: int) -> dict:
    """state.json as training wrote it: an object with the step, random states and sampler of every rank."""
    if not isinstance(state, dict):
        raise HtcliError(f"{file} is not an htcli training state (not a JSON object)")
    for key, kind in STATE_KEYS.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise HtcliError(
                f"{file} is not an htcli training state ({key!r} missing or not {KIND_NAMES[kind]})"
            )
    if state["step"] != step:
        raise HtcliError(
            f"{file.parent} holds files of different steps ({step} and {state['step']}): cannot resume"
        )
    ranks = state["ranks"]
    if len(ranks) != state["world_size"] or not all(
        isinstance(rank, dict) and all(isinstance(rank.get(k), t) for k, t in RANK_KEYS.items())
        for rank in ranks
    ):
        raise HtcliError(f"{file} is not an htcli training state (its 'ranks' are not one state per process)")
    return state


def check_optimizer_state(optimizer: torch.optim.Optimizer, step: int, exact_steps: bool, file: Path) -> None:
    """The optimizer state loaded from file fits the model's parameters and the checkpoint's step: every
    parameter's moments have its shape, and its own step count (AdamW's) is the checkpoint's (at most,
    where a gradient scaler may have skipped steps)."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if set(state) - set(OPTIMIZER_STATE_NAMES):
                raise HtcliError(
                    f"{file} is not an optimizer state of this model (unknown entries {sorted(state)})"
                )
            for name in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
                if name in state and tuple(state[name].shape) != tuple(param.shape):
                    raise HtcliError(
                        f"{file} is not the optimizer state of this model: a parameter of shape "
                        f"{list(param.shape)} has {name} of shape {list(state[name].shape)}"
                    )
            if "ns_steps" in group:
                continue  # a Muon group: no step count (AdamW's parameters carry the run's)
            count = state.get("step", torch.zeros(()))
            if not torch.is_tensor(count) or count.numel() != 1:
                raise HtcliError(f"{file} is not an AdamW state (a step count that is not one number)")
            own = int(count)
            if own > step or (exact_steps and own != step):
                raise HtcliError(
                    f"{file} is from another step: its optimizer took {own} steps, "
                    f"the checkpoint is of step {step}"
                )
