"""The package's shape: every module in one layer, imports only downwards, short functions."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "htcli"

# bottom to top: a module imports only modules of lower layers (imports for type checking aside)
LAYERS = [
    ("htcli", "errors"),
    (
        "files",
        "environment",
        "device",
        "stop",
        "display",
        "help_layout",
    ),  # run files, devices, Ctrl-C, terminal output
    (
        "attention.geometry",
        "attention.triton_kernels",
        "attention.graphed",
        "corpus.cache",
        "loggers",
        "plots",
    ),
    (
        "attention.oracle",
        "attention.eager",
        "attention.cache",
        "attention.kv_cache",
        "attention.triton_launch",
        "corpus.formats",
        "corpus.find",
    ),
    ("attention.ops", "attention.static_step", "corpus.reader"),
    ("attention", "reversible", "fused", "corpus"),
    ("model",),
    ("presets", "data", "distributed", "runlog", "flops", "decode_steps"),
    ("config", "checkpoint_checks", "evaluate", "runlock", "curves"),
    ("checkpoint", "sample", "optim", "config_file", "train_step"),
    ("rundir", "resume_changes"),
    ("train_checks",),
    ("train", "bench"),
    ("bench_report",),
    ("cli.common",),
    ("cli.train", "cli.sample", "cli.eval", "cli.bench", "cli.plot"),
    ("cli",),
    ("__main__",),
]
LONGEST_FUNCTION = 60  # lines


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    name = ".".join(part for part in parts if part != "__init__")
    return name or "htcli"


def modules() -> dict[str, ast.Module]:
    return {module_name(path): ast.parse(path.read_text()) for path in sorted(PACKAGE.rglob("*.py"))}


def htcli_imports(tree: ast.Module) -> set[str]:
    """The htcli modules a module imports, anywhere in it, except under `if TYPE_CHECKING:`."""
    skipped = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
        for inner in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("htcli")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("htcli"):
            submodules = [f"{node.module}.{alias.name}" for alias in node.names]
            submodules = [name for name in submodules if _is_module(name)]
            found |= set(submodules) if submodules else {node.module}
    return {name.removeprefix("htcli.") if name != "htcli" else name for name in found}


def _is_module(dotted: str) -> bool:
    path = PACKAGE.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def test_every_module_has_a_layer():
    """Each module of the package sits in exactly one layer (a new module must be placed)."""
    placed = [name for layer in LAYERS for name in layer]
    assert sorted(placed) == sorted(modules()), "LAYERS and the package's modules differ"


def test_imports_only_go_down():
    """No module imports one of its own layer or above."""
    level = {name: index for index, layer in enumerate(LAYERS) for name in layer}
    upward = [
        f"{name} imports {imported}"
        for name, tree in modules().items()
        for imported in sorted(htcli_imports(tree))
        if level[imported] >= level[name]
    ]
    assert not upward, upward


def test_functions_are_short():
    """No function or method is longer than LONGEST_FUNCTION lines."""
    long = [
        f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines"
        for name, tree in modules().items()
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > LONGEST_FUNCTION
    ]
    assert not long, long


def test_library_errors_name_fields_not_flags():
    """Only the CLI spells htcli's flags in error messages: the library names its fields (torchrun's
    own flags aside)."""
    offenders = []
    for name, tree in modules().items():
        if name == "cli" or name.startswith("cli.") or name == "__main__":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "HtcliError":
                text = (ast.unparse(node.args[0]) if node.args else "").replace("torchrun --", "")
                if " --" in text or "'--" in text or '"--' in text or "(--" in text:
                    offenders.append(f"{name}: {text[:80]}")
    assert not offenders, offenders
