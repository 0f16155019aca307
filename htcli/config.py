"""A training run's configuration: one dataclass, validated when created, saved as OUT/config.json.

Importing this module does not import torch, so the CLI can show these defaults in `--help` instantly.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING

from htcli.device import DTYPES, check_choice, check_device_name
from htcli.errors import HtcliError
from htcli.files import (
    CONFIG_FILE,
    check_complete_checkpoint,
    check_out_path,
    check_utf8_path,
    has_checkpoint,
    no_checkpoint,
    read_json,
)
from htcli.presets import DEFAULT_PRESET, PRESETS, model_config

if TYPE_CHECKING:
    from collections.abc import Callable

    from htcli.model import HTransformerConfig

MAX_COUNT = 2**53  # steps, batch sizes, intervals: whole numbers a float holds exactly (schedules divide)
MAX_SEED = 2**63  # seeds are below it (torch takes 64 bits; distributed ranks add to the seed)
MAX_LR = 1e3  # far above any learning rate that trains (~1e-4 to 1e-1); above ~3e38 the optimizers fail
POSITIVE = ("steps", "batch_size", "grad_accum", "eval_batches", "context_warmup_start")
LOGGERS = ("tensorboard", "wandb")  # where a run's metrics go besides log.jsonl
OPTIMIZERS = ("muon", "adamw")  # Muon for the layers' matrices (AdamW for the rest), or AdamW for all
DEFAULT_LR = {"muon": 6e-3, "adamw": 3e-3}  # the best of each on README's recipe benchmark
NON_NEGATIVE = ("warmup", "eval_every", "save_every", "sample_every", "sample_length", "patience")


def finite(value: int | float) -> bool:
    """Whether value is a finite float (an integer too large for one is not)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


@dataclass
class TrainConfig:
    corpus: list[str]  # files, directories, glob patterns (htcli.corpus): read as one byte string
    out: str = "runs/htcli"  # run directory: checkpoint, log.jsonl, config.json
    model: HTransformerConfig = field(default_factory=lambda: model_config(DEFAULT_PRESET))
    val: list[str] = field(default_factory=list)  # held-out corpus; empty: the end of `corpus`
    val_fraction: float = 0.01  # without `val`: this last fraction of the bytes (at least one window)
    text_field: str = "text"  # JSONL and Parquet files: the field of each record that holds its text
    skip_bad_records: bool = False  # JSONL and Parquet: leave out (and count) bad records, not stop
    include_hidden: bool = False  # read hidden files and directories (".*") inside named directories
    steps: int = 1000  # optimizer steps in the whole run (resumed runs included)
    batch_size: int = 8  # windows of max_seq_len + 1 bytes per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    optimizer: str = "muon"  # OPTIMIZERS
    lr: float | None = None  # peak learning rate, reached after `warmup` steps; None: DEFAULT_LR
    warmup: int = 100  # linear warmup steps
    # the first context_warmup fraction of the steps trains on windows of context_warmup_start bytes (as
    # many more per step), the rest on max_seq_len: a long-context model learns faster at equal bytes
    context_warmup: float = 0.0
    context_warmup_start: int = 256
    min_lr: float | None = None  # cosine decay ends here at the last step; None: lr / 10
    weight_decay: float = 0.1  # decoupled weight decay of the matrices and embeddings, not norms or biases
    clip: float = 1.0  # clip the gradient norm to this; 0: no clipping
    eval_every: int = 100  # steps between validation evaluations (and at the last step); 0: last only
    eval_batches: int = 8  # validation batches per evaluation
    # stop (saving) once this many evals in a row have not beaten the run's best val bpb, whose weights
    # best.safetensors holds (early stopping); 0: never
    patience: int = 0
    save_every: int = 500  # steps between checkpoints (and at the last step); 0: last only
    sample_every: int = 500  # steps between generated samples; 0: never
    sample_length: int = 200  # bytes generated per periodic sample
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto | fp32 | bf16 | fp16 (autocast; auto: see htcli.device.resolve_dtype)
    compile: bool = False  # torch.compile the model
    seed: int = 0  # model initialisation and data order
    # a new run starts from this checkpoint's weights (a run directory or a .safetensors file) instead of
    # random ones, with a fresh optimizer and schedule; its model must be the checkpoint's (the context
    # aside: no weight depends on it). A resumed run goes on from its own checkpoint. None: random
    init_from: str | None = None
    # several processes (torchrun): False: each rank draws its own windows (seeded by rank); True: each
    # takes its slice of one global batch drawn from `seed`, the windows of one process with the whole batch
    split_global_batch: bool = False
    loggers: list[str] = field(default_factory=list)  # LOGGERS that also get the metrics (rank 0)

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            from htcli.model import HTransformerConfig

            self.model = HTransformerConfig.from_dict(self.model)
        if self.lr is None:
            check_choice("optimizer", self.optimizer, OPTIMIZERS)
            self.lr = DEFAULT_LR[self.optimizer]
        if self.min_lr is None and isinstance(self.lr, int | float):
            self.min_lr = derived_min_lr(self.lr)
        self._check_types()
        self._check_values()

    def _check_types(self) -> None:
        """Each field holds what it should (a config.json may come from anywhere)."""
        from htcli.corpus import check_corpus_given
        from htcli.model import HTransformerConfig

        if not isinstance(self.model, HTransformerConfig):  # (None was an AttributeError)
            raise HtcliError(
                "model must be an HTransformerConfig (htcli.presets.model_config(preset), or a dict of its "
                f"fields), got {type(self.model).__name__}",
                fields=("model",),
            )
        for name in ("corpus", "val", "loggers"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                what = "names" if name == "loggers" else "paths"
                raise HtcliError(f"{name} must be a list of {what}, got {value!r}", fields=(name,))
        check_corpus_given(self.corpus)
        if not isinstance(self.out, str) or not self.out.strip():
            raise HtcliError(f"out must name the run directory, got {self.out!r}", fields=("out",))
        check_utf8_path(self.out, run_directory=True)
        for name in ("compile", "split_global_batch", "skip_bad_records", "include_hidden"):
            if not isinstance(getattr(self, name), bool):
                raise HtcliError(f"{name} must be true or false, got {getattr(self, name)!r}", fields=(name,))
        for name in ("lr", "min_lr", "weight_decay", "clip", "val_fraction", "context_warmup"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not finite(value):
                what = "a finite number" if isinstance(value, float) else "a number"
                raise HtcliError(f"{name} must be {what}, got {value!r}", fields=(name,))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < MAX_SEED:
            raise HtcliError(
                f"seed must be a whole number from 0 to 2**63 - 1, got {self.seed!r}", fields=("seed",)
            )
        if self.init_from is not None and not _a_path(self.init_from):
            raise HtcliError(
                f"init_from must name a checkpoint (a run directory or a .safetensors file), got"
                f" {self.init_from!r}",
                fields=("init_from",),
            )
        if not isinstance(self.text_field, str) or not self.text_field:
            raise HtcliError(f"text_field must name a field, got {self.text_field!r}", fields=("text_field",))

    def _check_values(self) -> None:
        """Values a run can use."""
        for name in POSITIVE + NON_NEGATIVE:
            value = getattr(self, name)
            low = 1 if name in POSITIVE else 0
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= MAX_COUNT:
                kind = "a positive integer" if low else "an integer >= 0"
                raise HtcliError(f"{name} must be {kind} up to 2**53, got {value!r}", fields=(name,))
        if not (math.isfinite(self.lr) and 0 < self.lr <= MAX_LR):
            raise HtcliError(f"lr must be a positive number up to {MAX_LR:g}, got {self.lr}", fields=("lr",))
        if not 0 <= self.min_lr <= self.lr:
            raise HtcliError(
                f"min_lr must be between 0 and lr ({self.lr}), got {self.min_lr}", fields=("min_lr", "lr")
            )
        for name in ("weight_decay", "clip"):
            if getattr(self, name) < 0:
                raise HtcliError(f"{name} must be >= 0, got {getattr(self, name)}", fields=(name,))
        if not 0 <= self.context_warmup <= 1:
            raise HtcliError(
                f"context_warmup must be a fraction of the steps, 0 to 1, got {self.context_warmup}",
                fields=("context_warmup",),
            )
        if self.model.causal is not True:  # (only a config file or config.json can set it)
            raise HtcliError(
                "the model is bidirectional (model.causal false): htcli trains next-byte language models,"
                " whose predictions must not see the bytes they predict; remove causal = false from the"
                " config file (a run that trained so cannot be continued)"
            )
        from htcli.model import BYTE_TOKENS

        if self.model.num_tokens != BYTE_TOKENS:  # (a byte model: sample and eval refuse any other)
            raise HtcliError(
                f"model.num_tokens is {self.model.num_tokens}: htcli trains byte-level models, of "
                f"{BYTE_TOKENS} tokens; remove num_tokens from the config file"
            )
        full, start = self.model.max_seq_len, self.context_warmup_start
        if self.context_warmup and start >= full:  # (was taken as no warm-up, without a word)
            raise HtcliError(
                f"context_warmup_start ({start}) must be shorter than the context length ({full}) for a "
                "context warm-up: lower it, or drop context_warmup",
                fields=("context_warmup_start", "max_seq_len", "context_warmup"),
            )
        if self.context_warmup and full % start:
            raise HtcliError(
                f"context_warmup_start ({start}) must divide the context length ({full}): each full window"
                " is trained as that many short ones",
                fields=("context_warmup_start", "max_seq_len"),
            )
        self._check_patience()
        if not 0 < self.val_fraction < 1:
            raise HtcliError(
                f"val_fraction must be above 0 and below 1, got {self.val_fraction}", fields=("val_fraction",)
            )
        for logger in self.loggers:
            check_choice("loggers", logger, LOGGERS)
        self.loggers = list(dict.fromkeys(self.loggers))
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_device_name(self.device)
        check_choice("dtype", self.dtype, DTYPES)

    def _check_patience(self) -> None:
        if self.patience and not self.eval_every:
            raise HtcliError(
                "patience counts the evals that do not beat the best, and eval_every 0 evaluates at the last"
                " step only: give eval_every, or drop patience",
                fields=("patience", "eval_every"),
            )

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.model.max_seq_len

    def to_dict(self) -> dict:
        return {**asdict(self), "model": self.model.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """The config saved as config.json (its model as a dict); HtcliError for a foreign one."""
        try:
            return cls(**data)
        except (TypeError, ValueError) as error:
            raise HtcliError(f"not an htcli training config: {error}") from None


def without_derived(saved: dict, given: dict) -> dict:
    """saved options (a run's config.json, a config file) without the values that were derived from an
    option that given changes, so that they are derived again: the learning rate an optimizer defaults to
    where given picks another optimizer, min_lr (lr / 10) where lr changes, the level decay an attention
    defaults to where given picks another attention. Values set by hand stay (one that equals the derived
    value counts as derived). A preset given replaces the model's sizes that the file holds from a preset
    (a printed config writes them out as dim, depth, ...); sizes of the file's own stay."""
    from htcli.model import default_level_decay

    saved = dict(saved)
    if "preset" in given:
        for name in _preset_sizes(saved):
            del saved[name]
    attention, decay = saved.get("attention", "h"), saved.get("level_decay")
    if "attention" in given and given["attention"] != attention and decay == default_level_decay(attention):
        del saved["level_decay"]
    optimizer, lr = saved.get("optimizer"), saved.get("lr")
    default = DEFAULT_LR.get(optimizer)
    if "optimizer" in given and given["optimizer"] != optimizer and lr is not None and lr == default:
        del saved["lr"]
    changed = (lr is not None and "lr" not in saved) or ("lr" in given and given["lr"] != lr)
    if changed and "min_lr" not in given and isinstance(lr, int | float):
        if saved.get("min_lr") in (derived_min_lr(lr), lr / 10):  # (lr / 10 itself: runs before 2026-11-29)
            del saved["min_lr"]
    return saved


def _absolute(spec: str | os.PathLike) -> str:
    """A corpus spec as an absolute path, keeping a trailing "/" (a glob pattern's `'data/*/'` matches
    directories alone: Path drops the slash, and the pattern read data's files too)."""
    if os.fspath(spec) == "-":  # (standard input: refused as such, not as a file named - that is missing)
        return "-"
    path = str(Path(spec).expanduser().absolute())
    return path + "/" if os.fspath(spec).endswith("/") and not path.endswith("/") else path


def derived_min_lr(lr: float) -> float:
    """min_lr where it is not given: lr / 10, to 15 digits (0.0003 for 0.003, not 0.00030000000000000003, in
    config.json and --print-config)."""
    return float(f"{lr / 10:.15g}")


def _preset_sizes(saved: dict) -> list[str]:
    """The model sizes in saved that a preset set: where saved writes out every size (a printed config, a
    run's config.json), those equal to the preset's that most of them equal (at least half); the others
    were set by hand (`--preset tiny --seq-len 64`: all but seq_len)."""
    sizes = sorted({name for fields in PRESETS.values() for name in fields})  # (dim, depth, ...)
    if not all(name in saved for name in sizes):
        return []
    matches = [[n for n in sizes if saved[n] == getattr(model_config(p), n)] for p in PRESETS]
    best = max(matches, key=len)
    return best if 2 * len(best) >= len(sizes) else []


def train_default(name: str) -> object:
    """The default of one TrainConfig field (for help texts)."""
    spec = TrainConfig.__dataclass_fields__[name]
    return spec.default_factory() if callable(spec.default_factory) else spec.default


def config_from_options(
    corpus: list[str],
    *,
    out: str,
    resume: bool | str = False,
    preset: str | None = None,
    read_model: Callable[[str], dict] | None = None,
    **options,
) -> TrainConfig:
    """A run's config from options named like the fields of TrainConfig and of its model config
    (HTransformerConfig), where None means "not given".

    A new run: TrainConfig's defaults, the preset (default small) with the model options, the options;
    with init_from, the model is read_model(init_from)'s (htcli.checkpoint.model_fields) with the
    model options on top, and a preset is refused.
    Resuming: the run's saved config.json with the given options on top. resume "auto": resuming when
    out holds a run's config.json and a checkpoint, else a new run.
    """
    from htcli.model import HTransformerConfig

    model_fields = {f.name for f in fields(HTransformerConfig)}
    given = {k: v for k, v in options.items() if v is not None}
    model = {k: given.pop(k) for k in list(given) if k in model_fields}
    from htcli.corpus import check_corpus_given

    for paths in (corpus, given.get("val")):  # (before the paths are made absolute: "" would be ".")
        if paths:
            check_corpus_given(paths)
    if corpus:
        given["corpus"] = [_absolute(c) for c in corpus]
    if given.get("val"):
        given["val"] = [_absolute(c) for c in given["val"]]
    if _a_path(given.get("init_from")):  # (as a path, normalised)
        given["init_from"] = os.path.abspath(os.path.expanduser(given["init_from"]))
    if resume == "auto":  # (as train decides it: a run killed before its first save is begun anew)
        resume = (Path(out) / CONFIG_FILE).exists() and has_checkpoint(Path(out))
    if not resume:
        base_model = _new_model(preset, model, given, read_model)
        return TrainConfig(**{"corpus": [], **given, "out": out, "model": base_model})
    saved = without_derived(saved_config(Path(out)), given)
    _check_kept_on_resume(saved, given, out)
    if preset is not None:
        _check_preset_of_run(preset, model, saved["model"], out)
    # (the saved model's level decay derived again where the attention given is another: it was kept, and
    # the resume was refused for a level decay never given, not for the model)
    base = preset if preset is not None else without_derived(saved.pop("model"), model)
    try:
        return TrainConfig.from_dict({**saved, **given, "out": out, "model": model_config(base, **model)})
    except HtcliError as error:
        chosen = {"out", *given, *model, *(("preset", *model_fields) if preset is not None else ())}
        if not error.fields or set(error.fields) & chosen:
            raise
        # (no option given names it: the value is the run's own; the CLI would have blamed a flag)
        raise HtcliError(
            f"{Path(out) / CONFIG_FILE}: {error}: fix it in that file, or give another value as an option"
        ) from None


def _new_model(
    preset: str | None, model: dict, given: dict, read_model: Callable[[str], dict] | None
) -> HTransformerConfig:
    """A new run's model: the preset's with the model options given, or init_from's with them."""
    start = given.get("init_from")
    if not (_a_path(start) and read_model):  # (TrainConfig says what else is wrong)
        return model_config(DEFAULT_PRESET if preset is None else preset, **model)
    if preset is not None:
        raise HtcliError(
            f"a run that starts from init_from takes its model ({start}'s): drop preset",
            fields=("preset", "init_from"),
        )
    # (its values derived from an option given anew derived again: exact attention's level decay)
    return model_config(without_derived(read_model(start), model), **model)


def _check_kept_on_resume(saved: dict, given: dict, out: str) -> None:
    """Options a resume cannot change (the optimizer, the seed) or paths of the run that are gone, said."""
    if given.get("optimizer", saved["optimizer"]) != saved["optimizer"]:
        raise HtcliError(
            f"cannot resume a run trained with {saved['optimizer']} with optimizer {given['optimizer']}: "
            "drop optimizer",
            fields=("optimizer",),
        )
    seed = saved.get("seed")
    if has_checkpoint(Path(out)) and given.get("seed", seed) != seed:  # (config.json took it)
        raise HtcliError(
            f"a resumed run goes on with the random state of its checkpoint (seed {seed} at its"
            " start): drop seed",
            fields=("seed",),
        )
    asked, began = given.get("init_from"), saved.get("init_from")
    if has_checkpoint(Path(out)) and _a_path(asked) and not (_a_path(began) and _same_path(asked, began)):
        began = f"init_from was {began}" if _a_path(began) else "it began with random ones"
        raise HtcliError(
            f"a resumed run goes on from its own checkpoint's weights ({began}): drop init_from",
            fields=("init_from",),
        )
    fraction, asked = saved.get("val_fraction"), given.get("val_fraction")
    valid = isinstance(asked, float | int) and 0 < asked < 1  # (TrainConfig says what is wrong with others)
    if valid and asked != fraction and not (saved.get("val") or given.get("val")):
        raise HtcliError(
            f"a resumed run keeps its held-out split (val_fraction {fraction}): another fraction would score"
            " bytes it trained on, or train on bytes it scored; drop val_fraction",
            fields=("val_fraction",),
        )
    _check_saved_paths_exist(saved, given, out)


def _a_path(value: object) -> bool:
    """Whether value is a path (a string that is not blank; TrainConfig says what is wrong with others)."""
    return isinstance(value, str) and bool(value.strip())


def _same_path(given: str, saved: str) -> bool:
    """Whether two paths name the same thing: by another spelling too (src/, ../here/src, a link to it)."""
    return given == saved or os.path.realpath(given) == os.path.realpath(saved)


def _check_preset_of_run(preset: str, model: dict, saved_model: dict, out: str) -> None:
    """A preset given to a resume is the run's own model (the model options given aside): said so where it
    is not, naming the preset (the resume's check of the checkpoint named the sizes, as options never
    given)."""
    from htcli.model import complete

    asked = model_config(preset, **model).to_dict()
    try:
        theirs = complete(saved_model)
    except ValueError:
        return  # (a foreign config.json: TrainConfig says what is wrong with it)
    changed = [name for name in asked if name not in model and name in theirs and asked[name] != theirs[name]]
    if changed:
        shown = ", ".join(f"{name} {asked[name]} (the run's: {theirs[name]})" for name in changed[:4])
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        raise HtcliError(
            f"cannot resume {out} with preset {preset}: it gives {shown}{more}; drop preset (a resume keeps"
            " the run's model)",
            fields=("preset",),
        )


def _check_saved_paths_exist(saved: dict, given: dict, out: str) -> None:
    """A resumed run's own corpus or val files (from its config.json, not given again) that are gone now
    (moved, renamed): said so, with how to give them again (a missing corpus said only that it was)."""
    from htcli.corpus import has_wildcard

    for name in ("corpus", "val"):
        specs = saved.get(name) or []
        if not (isinstance(specs, list) and all(isinstance(spec, str) for spec in specs)):
            continue  # (TrainConfig says what is wrong with it)
        gone = [spec for spec in specs if not has_wildcard(spec) and not Path(spec).expanduser().exists()]
        if gone and name not in given:
            again = "the corpus again" if name == "corpus" else "val again"  # (the corpus: no option's)
            raise HtcliError(
                f"the run's {name} {gone[0]} (from {Path(out) / CONFIG_FILE}) is not there any more: if it "
                f"was moved, give {again} where it is now, and the resume reads it there",
                fields=() if name == "corpus" else ("val",),
            )


def dropped_loggers(config: TrainConfig) -> list[str]:
    """The loggers of the run in config.out that config (a resume's, given loggers of its own) leaves out:
    their curves end at the checkpoint."""
    try:
        saved = saved_config(Path(config.out)).get("loggers")
    except HtcliError:
        return []
    return [name for name in saved if name not in config.loggers] if isinstance(saved, list) else []


def saved_config(out: Path) -> dict:
    """The config.json of the run in out, as a dict (without the version that wrote it)."""
    check_out_path(out)
    path = out / CONFIG_FILE
    missing = no_checkpoint(out)
    if not path.exists() and has_checkpoint(out):
        check_complete_checkpoint(out)
        missing = HtcliError(
            f"cannot continue {out}: its {CONFIG_FILE} (the run's options) is missing, its checkpoint is"
            " there: give the corpus and the run's options again with resume auto (which takes the weights,"
            " optimizer and step from the checkpoint), or start a new run in another out",
            fields=("resume", "out"),
        )
    saved = read_json(path, missing=missing)
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        raise HtcliError(f"{path} is not an htcli training config")
    unknown = sorted(set(saved) - {f.name for f in fields(TrainConfig)} - {"htcli_version"})
    if unknown:  # (TrainConfig's own message named neither the file nor what to do)
        raise HtcliError(
            f"{path} is not an htcli training config of this version: unknown key {unknown[0]!r}"
            f"{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''}; a newer htcli wrote it, or"
            " it was edited"
        )
    saved.pop("htcli_version", None)
    saved.setdefault("optimizer", "adamw")  # a run from before the choice trained with AdamW
    return saved
