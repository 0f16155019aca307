"""The command-line interface: parses options, calls a library function, prints. One module per command,
each registering its command on `app` when imported (in the order `htcli --help` lists them); what they
share in `common`."""

from htcli.cli.common import app, os_error_line, respell, run

# isort: off
from htcli.cli import train  # noqa: F401
from htcli.cli import sample  # noqa: F401
from htcli.cli import eval  # noqa: F401
from htcli.cli import bench  # noqa: F401
from htcli.cli import plot  # noqa: F401

# isort: on
from htcli.cli.eval import curve_label
from htcli.cli.train import MODEL_DEFAULTS

__all__ = ["MODEL_DEFAULTS", "app", "curve_label", "os_error_line", "respell", "run"]
