"""How htcli's commands lay out their --help so that it reads at 80 columns: a switch's two names stacked
in one column (side by side they took the width of the help text), no type for a switch (`<bool>` read
as a value to give), a repeated option typed by one value (`<list[str]>` read as a list given at once),
and a command's options in named panels."""

import contextlib
from collections.abc import Iterator

from typer.core import TyperCommand


class Command(TyperCommand):
    """A command with htcli's help layout; PANELS: a panel's title -> its parameters' names (separated
    by spaces), in the order printed after the Options panel, which holds the rest."""

    PANELS: dict[str, str] = {}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        panel_of = {name: panel for panel, names in self.PANELS.items() for name in names.split()}
        unknown = set(panel_of) - {param.name for param in self.params}
        assert not unknown, f"panels name parameters {self.name} lacks: {sorted(unknown)}"
        for param in self.params:
            param.rich_help_panel = panel_of.get(param.name, param.rich_help_panel)

    def format_help(self, ctx, formatter) -> None:
        with _help_names(self.get_params(ctx)):
            super().format_help(ctx, formatter)


@contextlib.contextmanager
def _help_names(params: list) -> Iterator[None]:
    """Params renamed and typed for the help alone (parsing reads the names), put back after it."""
    saved = [(param, param.opts, param.secondary_opts, param.metavar) for param in params]
    try:
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
            elif getattr(param, "multiple", False) and param.metavar is None:
                param.metavar = "<str>"
            if param.secondary_opts and len(param.opts) == 1:
                param.opts = [f"{param.opts[0]}\n{' '.join(param.secondary_opts)}"]
                param.secondary_opts = []
        yield
    finally:
        for param, opts, secondary_opts, metavar in saved:
            param.opts, param.secondary_opts, param.metavar = opts, secondary_opts, metavar
