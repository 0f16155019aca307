"""The environment variables that change how htcli computes (not what: results are the same to
rounding), their values, and one check of them all, which the CLI runs before any work: a misspelt
value (HTCLI_DECODE_GRAPH=false) would otherwise be taken as the default without a word, or be
refused late (after a prompt was echoed, or minutes into a run).

    HTCLI_ATTENTION          auto, eager, triton   H-attention's implementation (attention.ops)
    HTCLI_ATTENTION_GRAPHS   0, 1                  Triton passes from CUDA graphs (attention.graphed)
    HTCLI_DECODE_GRAPH       0, 1                  decode steps from a CUDA graph (decode_steps)
    HTCLI_STEP_PRODUCT       linear, columns       a decode step's product on a CPU (model.StepLinear)
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from htcli.errors import HtcliError

IMPLEMENTATION = "HTCLI_ATTENTION"
ATTENTION_GRAPHS = "HTCLI_ATTENTION_GRAPHS"
DECODE_GRAPH = "HTCLI_DECODE_GRAPH"
STEP_PRODUCT = "HTCLI_STEP_PRODUCT"
CHOICES = {
    IMPLEMENTATION: ("auto", "eager", "triton"),
    ATTENTION_GRAPHS: ("0", "1"),
    DECODE_GRAPH: ("0", "1"),
    STEP_PRODUCT: ("linear", "columns"),
}


def read(name: str, environ: Mapping[str, str] = os.environ) -> str:
    """The value of variable `name` of CHOICES ("": unset or empty, the default); HtcliError for one it does
    not take."""
    value, choices = environ.get(name, ""), CHOICES[name]
    if value and value not in choices:
        raise HtcliError(f"{name} must be {' or '.join(choices)} (or unset), got {value!r}")
    return value


def check_environment(environ: Mapping[str, str] = os.environ) -> None:
    """HtcliError naming the first of CHOICES' variables set to a value it does not take."""
    for name in CHOICES:
        read(name, environ)
