"""Training options kept in a file: TOML written by hand, or the config.json a run writes.

TOML because Python reads it without another package (tomllib) and its values are typed as written
(`lr = 1e-3` is a number, `"1e-3"` a string; YAML reads `no` as false and `1e3` as a string). A file
holds the options of `htcli train`, each key spelled as a caller says (the command line: as its flag
without the dashes, `seq-len`) or as its config field (`max_seq_len`, as config.json has them), with
dashes or underscores between its words; a
`model` table (as in config.json) holds model fields. `write_toml` writes a config back as TOML that
`read_options` reads again unchanged.
"""

from __future__ import annotations

import datetime
import difflib
import json
import os
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from htcli import __version__, is_newer
from htcli.config import TrainConfig, finite
from htcli.errors import HtcliError
from htcli.files import CONFIG_FILE, LOG_FILE, STATE_FILE, has_checkpoint

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

# the value each field takes, from its annotation; "model" is its fields, flattened
KINDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}
NOT_IN_FILES = ("resume", "config", "print_config")  # actions of one command, not settings of a run
VERSION_KEY = "htcli_version"  # written into a run's config.json, not an option


def option_fields() -> dict[str, str]:
    """Every field a config file may set, with its annotation: TrainConfig's (its model aside), the
    model config's, and the preset."""
    from htcli.model import HTransformerConfig

    train = {f.name: str(f.type) for f in fields(TrainConfig) if f.name != "model"}
    model = {f.name: str(f.type) for f in fields(HTransformerConfig)}
    return {**train, **model, "preset": "str"}


def read_options(path: Path, spell: Callable[[str], str]) -> dict[str, object]:
    """The options in a TOML or JSON file as {field: value}; spell(field) is how a caller writes the
    field (a key may be spelled that way or as the field). HtcliError, naming the key, for a key that
    is not an option or a value of the wrong type."""
    from htcli.model import HTransformerConfig

    data = _load(path)
    version = _run_version(path, data.pop(VERSION_KEY, None))
    known = option_fields()
    spellings = {spell(name): name for name in known} | {name: name for name in known}
    # (either way with dashes or underscores: seq_len and max-seq-len were refused where batch_size was not)
    loose = {key.replace("-", "_"): name for key, name in spellings.items()}
    model = data.pop("model", {})
    if not isinstance(model, dict):
        raise HtcliError(f"{path}: model must be a table of model options, got {_shown(model)}")
    model_fields = {f.name for f in fields(HTransformerConfig)}
    options, keys = {}, {}
    given = [(key, key, value) for key, value in data.items()]
    for key, where, value in given + [(key, f"model.{key}", value) for key, value in model.items()]:
        name = loose.get(key.replace("-", "_"))
        if name is None:
            upgrade = f"; htcli {version} wrote this file: upgrade htcli"
            raise HtcliError(
                f"{path}: {_unknown(key, where, spellings)}{upgrade if version and is_newer(version) else ''}"
            )
        if where != key and name not in model_fields:  # (a model table of train options: misplaced)
            raise HtcliError(
                f"{path}: {where} is not a model option ({key} is one of htcli train's): move it out of the "
                "model table"
            )
        checked = _checked(path, where, value, known[name])
        if name in options and options[name] != checked:  # (seq-len and max_seq_len, say)
            raise HtcliError(
                f"{path}: {keys[name]} and {where} are the same option, given {options[name]!r} and "
                f"{checked!r}: keep one"
            )
        options[name], keys[name] = checked, where
    _check_byte_model(path, options, keys)
    if version is not None:  # a run's config.json: its model as that run built it
        from htcli.model import FIRST_RECIPE

        for name, value in FIRST_RECIPE.items():  # (fields added since: as such a model was built)
            options.setdefault(name, value)
    return options


def _check_byte_model(path: Path, options: dict, keys: dict) -> None:
    """HtcliError, naming the file and its key, for a vocabulary other than bytes or a bidirectional model
    (TrainConfig refuses them too, but cannot say which file gave them)."""
    from htcli.model import BYTE_TOKENS

    if options.get("num_tokens", BYTE_TOKENS) != BYTE_TOKENS:
        raise HtcliError(
            f"{path}: {keys['num_tokens']} is {options['num_tokens']}: htcli trains byte-level models, of "
            f"{BYTE_TOKENS} tokens; remove {keys['num_tokens']} from this file"
        )
    if options.get("causal", True) is not True:
        raise HtcliError(
            f"{path}: {keys['causal']} = false makes the model bidirectional: htcli trains next-byte language"
            f" models, whose predictions must not see the bytes they predict; remove {keys['causal']} from"
            " this file (a run that trained so cannot be continued)"
        )


MAX_CONFIG_BYTES = 2**20  # a config is a few hundred bytes; a stream that never ends is not one


WRITER_WAIT = 10.0  # seconds a named pipe may go without a writer before it is refused


def _read_bytes(path: Path, limit: int) -> bytes:
    """Up to `limit` bytes of path. A pipe (`--config <(envsubst < exp.toml)`, or a named one) is read as a
    file; a named pipe that nothing writes to within WRITER_WAIT seconds is refused, where a blocking open
    would wait for a writer for ever. Opened without blocking, a pipe reads empty while
    it has no writer, and raises BlockingIOError once a writer is there with nothing written yet."""
    with os.fdopen(os.open(path, os.O_RDONLY | os.O_NONBLOCK), "rb", buffering=0) as file:
        first, deadline = b"", time.monotonic() + WRITER_WAIT
        while stat.S_ISFIFO(os.fstat(file.fileno()).st_mode):
            try:
                first = os.read(file.fileno(), limit)
            except BlockingIOError:  # a writer, that has not written yet
                break
            if first:
                break
            if time.monotonic() > deadline:
                raise HtcliError(
                    f"config file {path} is a pipe that nothing wrote to within {WRITER_WAIT:g} s (or it was "
                    "empty): give a .toml file"
                )
            time.sleep(0.05)
        os.set_blocking(file.fileno(), True)
        raw = bytearray(first)
        while len(raw) < limit and (chunk := file.read(limit - len(raw))):
            raw += chunk
        return bytes(raw)


def _run_version(path: Path, version: object) -> str | None:
    """The htcli version a run's config.json records (None: none, a file written by hand); HtcliError for
    the key in a TOML file, where it would change the model's recipe without a word, or of another type."""
    if version is None:
        return None
    if path.suffix.lower() != ".json":
        raise HtcliError(
            f"{path}: {VERSION_KEY} is what a run's {CONFIG_FILE} records, not an option: remove it"
        )
    if not isinstance(version, str):
        example = f'a version such as "{__version__}"'
        raise HtcliError(f"{path}: {VERSION_KEY} must be {example}, got {_shown(version)}")
    return version


def _load(path: Path) -> dict:
    if path.name in (STATE_FILE, LOG_FILE) and (path.parent / CONFIG_FILE).is_file():
        what = "state" if path.name == STATE_FILE else "log"
        raise HtcliError(
            f"config file {path} is a run's {what}, not its options: give {path.parent / CONFIG_FILE}"
        )
    try:
        if stat.S_ISCHR(path.stat().st_mode) or stat.S_ISBLK(path.stat().st_mode):  # (/dev/zero never ends)
            raise HtcliError(f"config file {path} is a device: give a .toml file or a run's config.json")
        raw = _read_bytes(path, MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise HtcliError(f"config file {path} is over {MAX_CONFIG_BYTES // 2**20} MiB: not a config")
    except FileNotFoundError:
        raise HtcliError(
            f"config file {path} does not exist: give a .toml file or a run's config.json"
        ) from None
    except IsADirectoryError:
        raise HtcliError(f"config file {path} is a directory: give a .toml or config.json file") from None
    except OSError as error:
        raise HtcliError(f"cannot read config file {path}: {error.strerror or error}") from None
    if b"\x00" in raw:  # (binary, such as a safetensors header's length, which is valid UTF-8)
        raise HtcliError(
            f"config file {path} is not text (a checkpoint?): give a .toml file or a run's config.json"
        )
    try:
        text = raw.decode("utf-8-sig")  # (a byte-order mark, as some Windows editors write, is skipped)
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise HtcliError(
            f"config file {path} is not UTF-8 text (byte 0x{raw[error.start]:02x} on line {line}): save it "
            "as UTF-8"
        ) from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text, object_pairs_hook=_unique_keys)
        else:
            data = tomllib.loads(text)
    except _TwiceGiven as error:
        raise HtcliError(f"config file {path} gives the key {error} twice: keep one") from None
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as error:
        kind = "JSON" if path.suffix.lower() == ".json" else "TOML"
        raise HtcliError(f"config file {path} is not valid {kind}: {error}") from None
    except (RecursionError, ValueError):  # nested thousands deep, or a number of thousands of digits
        raise HtcliError(f"config file {path} is not a config: values nested too deep or too long") from None
    if not isinstance(data, dict):
        raise HtcliError(f"config file {path} must hold a table of options, got {type(data).__name__}")
    return data


def _shown(value: object) -> str:
    """value as a message shows it: as Python writes it, a TOML date or time as TOML does, true, false and
    null as the file does (not True, False and None)."""
    if isinstance(value, datetime.date | datetime.time):
        return f"{value.isoformat()} (a date or time)"
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return repr(value)


class _TwiceGiven(ValueError):
    """A JSON object holds this key twice."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object as a dict; _TwiceGiven for a key it holds twice (json takes the last without a word,
    where TOML refuses it)."""
    data = {}
    for key, value in pairs:
        if key in data:
            raise _TwiceGiven(repr(key))
        data[key] = value
    return data


def _unknown(key: str, where: str, spellings: dict[str, str]) -> str:
    """What a key that is no option is; where: the key as the file holds it (model.x in a model table)."""
    field = key.replace("-", "_")
    if field in NOT_IN_FILES:
        return f"{where} is given on the command line, not in a config file"
    close = difflib.get_close_matches(key, list(spellings), n=1)
    hint = f" (did you mean {where[: -len(key)]}{close[0]}?)" if close else ""
    return f"{where} is not an option of htcli train{hint}"


def _checked(path: Path, key: str, value: object, annotation: str) -> object:
    """value if it has the field's type (an integer where a number is asked, a single path where a
    list is); HtcliError naming the key otherwise."""
    kind = annotation.split(" | ")[0]
    if kind == "list[str]":
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return value
        what = "a name or a list of names" if key in ("logger", "loggers") else "a path or a list of paths"
        raise HtcliError(f"{path}: {key} must be {what}, got {_shown(value)}")
    if value is None and "None" in annotation:
        return None
    fits = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
    }[kind]
    if not fits:
        raise HtcliError(f"{path}: {key} must be {KINDS[kind]}, got {_shown(value)}")
    if kind != "float":
        return value
    if not finite(value):  # (TOML's nan and inf, 1e400; an integer beyond a float's range)
        shown = str(value) if isinstance(value, float) else f"{str(value)[:20]}..."
        raise HtcliError(f"{path}: {key} must be a finite number, got {shown}")
    return float(value)


def check_run_home(path: Path, out: str) -> None:
    """A run's config.json given as a config file, whose out (not given otherwise) is not the directory
    that holds it and its checkpoint, refused: the run was moved or copied (or trained from another
    working directory), and the resume said "no checkpoint" where it had been, resume auto began a new
    run there, or the original of a copy was resumed instead of the copy."""
    home = path.parent
    if path.name != CONFIG_FILE or not has_checkpoint(home) or Path(out).resolve() == home.resolve():
        return
    raise HtcliError(
        f"{path} is the config of the run in {home}, whose out it gives as {out} (the run was moved or "
        f"copied, or trained from another directory): give out {home} to go on with that run, or another out"
        " for a new run from its options",
        fields=("out",),
    )


def write_toml(config: TrainConfig, spell: Callable[[str], str]) -> str:
    """config as TOML, one `key = value` line per field (model fields included), keys as spell() writes
    them: a file that read_options turns back into the same config."""
    values = {k: v for k, v in config.to_dict().items() if k != "model"} | config.model.to_dict()
    lines = [f"{spell(name)} = {_toml_value(value)}" for name, value in values.items() if value is not None]
    return "\n".join(lines) + "\n"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    if isinstance(value, str):
        # a JSON string is a TOML basic string, with characters past U+FFFF as themselves (TOML has no
        # surrogate pairs) and DEL escaped (TOML's one control character that JSON leaves as it is)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise HtcliError(f"{value!r} is not UTF-8 text: TOML cannot hold it (rename the path)") from None
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    return repr(value)
