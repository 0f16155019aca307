"""Named model sizes, and a model config built from a preset plus command-line overrides.

Importing this module does not import torch, so `htcli --help` can list the presets instantly.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from htcli.errors import HtcliError

if TYPE_CHECKING:
    from htcli.model import HTransformerConfig

DEFAULT_PRESET = "small"

# model config fields each preset sets; everything else keeps HTransformerConfig's default
PRESETS: dict[str, dict] = {
    # tests and CPU demos: 0.13M parameters, ~35k bytes/s of training on 2 CPU cores
    "tiny": dict(dim=64, depth=2, heads=2, dim_head=32, block_size=16, max_seq_len=256),
    # a first real model: 4.9M parameters, 8k context
    "small": dict(dim=256, depth=6, heads=4, dim_head=64, block_size=64, max_seq_len=8192),
    # 25M parameters, 8k context
    "base": dict(dim=512, depth=8, heads=8, dim_head=64, block_size=128, max_seq_len=8192),
}

# how the command line spells a model config field, for error messages
FLAGS = {
    "max_seq_len": "--seq-len",
    "block_size": "--block-size",
    "dim_head": "--dim-head",
    "dim": "--dim",
    "depth": "--depth",
    "heads": "--heads",
    "reversible": "--reversible",
    "shift_tokens": "--shift-tokens",
}


def model_config(base: str | dict, **overrides) -> HTransformerConfig:
    """A preset's config (or the config dict `base`) with every override that is not None applied.

    Raises HtcliError, naming the command-line flags, if the result is impossible.
    """
    from htcli.model import HTransformerConfig

    if isinstance(base, str) and base not in PRESETS:
        raise HtcliError(f"unknown --preset {base!r}: use one of {', '.join(PRESETS)}")
    values = {**(PRESETS[base] if isinstance(base, str) else base)}
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return HTransformerConfig(**values)
    except (TypeError, ValueError) as error:
        raise HtcliError(f"impossible model options: {flag_names(str(error))}") from None


def flag_names(message: str) -> str:
    """Rewrite config field names in a message as the flags a user typed (max_seq_len -> --seq-len)."""
    return re.sub(r"\b(" + "|".join(FLAGS) + r")\b", lambda m: FLAGS[m.group(1)], message)
