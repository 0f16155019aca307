"""How htcli's commands lay out their --help so that it reads at 80 columns: a switch's two names stacked
in one column (side by side they took the width of the help text), no type for a switch (`<bool>` read
as a value to give), a repeated option or argument typed by one value (`<list[str]>` read as a list
given at once), a command's options in named panels, and defaults written in the help's sentence,
`(default 8)`, as train's are (typer's `[default: 8]` took a line of its own)."""

import contextlib
from collections.abc import Iterator

from typer.core import TyperCommand, TyperGroup


class _Layout:
    """htcli's help layout for a typer command or group (mixed in before it)."""

    def format_help(self, ctx, formatter) -> None:
        with _help_names(self.get_params(ctx), ctx):
            super().format_help(ctx, formatter)


class Command(_Layout, TyperCommand):
    """A command with htcli's help layout; PANELS: a panel's title -> its parameters' names (separated
    by spaces), in the order printed after the Options panel, which holds the rest; NEEDED: arguments
    optional to the parser that the command asks for (its own error), written as required in its usage."""

    PANELS: dict[str, str] = {}
    NEEDED: frozenset[str] = frozenset()

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        panel_of = {name: panel for panel, names in self.PANELS.items() for name in names.split()}
        unknown = set(panel_of) - {param.name for param in self.params}
        assert not unknown, f"panels name parameters {self.name} lacks: {sorted(unknown)}"
        for param in self.params:
            param.rich_help_panel = panel_of.get(param.name, param.rich_help_panel)

    def collect_usage_pieces(self, ctx) -> list[str]:
        """The usage line's arguments as click writes them, whatever typer's version: `CHECKPOINT`,
        `CORPUS...`, `[CORPUS]...` (typer 0.29 wrote `{checkpoint}` and `[corpus]...`)."""
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                if param.metavar:  # (as given, as click writes it)
                    pieces.append(param.metavar)
                    continue
                name = param.name.upper()
                name = name if param.required or param.name in self.NEEDED else f"[{name}]"
                pieces.append(name + ("..." if param.nargs != 1 else ""))
        return pieces


class Group(_Layout, TyperGroup):
    """The command group (`htcli --help`) with htcli's help layout (its --version and --help are switches)."""


@contextlib.contextmanager
def _help_names(params: list, ctx) -> Iterator[None]:
    """Params renamed and typed for the help alone (parsing reads the names), put back after it."""
    fields = ("opts", "secondary_opts", "metavar", "help", "show_default")
    saved = [(param, {name: getattr(param, name, None) for name in fields}) for param in params]
    try:
        for param in params:
            flag = getattr(param, "is_flag", False)
            if getattr(param, "show_default", None) is True and not flag and param.default not in (None, ""):
                param.help, param.show_default = with_default(param.help or "", param.default), False
            if flag and param.metavar is None:
                param.metavar = ""
            elif getattr(param, "multiple", False) and param.metavar is None:
                param.metavar = "<str>"
            elif param.nargs != 1 and param.metavar is None:  # an argument of many values (`corpus...`)
                one = param.display_type_rich(ctx).replace("<list[", "<").replace("]>", ">")
                param.display_type_rich = lambda ctx, one=one: one
            if param.secondary_opts and len(param.opts) == 1:
                param.opts = [f"{param.opts[0]}\n{' '.join(param.secondary_opts)}"]
                param.secondary_opts = []
        yield
    finally:
        for param, values in saved:
            vars(param).pop("display_type_rich", None)
            for name, value in values.items():
                if hasattr(param, name):
                    setattr(param, name, value)


def with_default(help: str, default: object) -> str:
    """A help sentence ending with its default: "Windows per pass (default 8).", "... (RMSNorm),
    default layer."."""
    body = help.removesuffix(".")
    said = f", default {default}" if body.endswith(")") else f" (default {default})"  # (not "(...) (...)")
    return f"{body}{said}.".lstrip()
