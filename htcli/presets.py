"""Named model sizes, and a model config built from a preset plus overrides.

Importing this module does not import torch, so `htcli --help` can list the presets instantly.
"""

from __future__ import annotations

import re
from dataclasses import fields
from typing import TYPE_CHECKING

from htcli.device import check_choice
from htcli.errors import HtcliError

if TYPE_CHECKING:
    from htcli.model import HTransformerConfig

DEFAULT_PRESET = "small"

# model config fields each preset sets; everything else keeps HTransformerConfig's default
PRESETS: dict[str, dict] = {
    # tests and CPU demos: 0.13M parameters, ~35k bytes/s of training on 2 CPU cores
    "tiny": dict(dim=64, depth=2, heads=2, dim_head=32, block_size=16, max_seq_len=256),
    # a first real model: HTransformerConfig's defaults (dim 256, depth 6, 4 heads of 64, block 64,
    # 8k context: 4.9M parameters)
    "small": {},
    # 25M parameters, 8k context
    "base": dict(dim=512, depth=8, heads=8, dim_head=64, block_size=128, max_seq_len=8192),
}


def model_config(base: str | dict, **overrides) -> HTransformerConfig:
    """A preset's config (or the config dict `base`) with every override that is not None applied.

    Raises HtcliError, naming the config's fields, if the result is impossible.
    """
    from htcli.model import HTransformerConfig, complete

    if isinstance(base, str):
        check_choice("preset", base, tuple(PRESETS))
    known = [f.name for f in fields(HTransformerConfig)]
    unknown = [name for name in overrides if name not in known]
    if unknown:  # (it was Python's "unexpected keyword argument" for the config's constructor)
        raise HtcliError(f"{unknown[0]} is not a model option: the model's are {', '.join(known)}")
    try:
        # a saved config (dict) from before a recipe field: that field as such a model was built
        values = {**(PRESETS[base] if isinstance(base, str) else complete(base))}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return HTransformerConfig(**values)
    except (TypeError, ValueError, OverflowError) as error:
        message = str(error)
        named = [f.name for f in fields(HTransformerConfig) if re.search(rf"\b{f.name}\b", message)]
        raise HtcliError(f"impossible model options: {message}", fields=named) from None
