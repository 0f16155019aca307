"""Experiments people keep: config files, TensorBoard and W&B loggers, model FLOPs, `htcli plot`, and
progress on terminals only."""

import errno
import glob
import json
import math
import os
import pty
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_FLAGS, assert_user_error, events, invoke, tiny_config
from safetensors.torch import save_file
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from htcli import config_file
from htcli.attention import eager
from htcli.config_file import read_options, write_toml
from htcli.errors import HtcliError
from htcli.flops import attention_flops, dense_flops_per_token, peak_bf16_flops
from htcli.model import HTransformer1D, HTransformerConfig

SPELL = {"max_seq_len": "seq-len", "loggers": "logger"}


def spell(field: str) -> str:
    return SPELL.get(field, field.replace("_", "-"))


def resolved(*args) -> str:
    result = invoke("train", *args, "--print-config")
    assert result.exit_code == 0, result.output
    return result.stdout


# config files


def test_print_config_reads_back_as_the_same_config(corpus, tmp_path):
    """--print-config writes TOML that, given as --config, resolves to the same configuration (with --val
    too: it holds val-fraction beside val, which the file may)."""
    val = tmp_path / "val.txt"
    val.write_bytes(corpus.read_bytes()[:2000])
    first = resolved(
        corpus,
        *TINY_FLAGS,
        "--lr",
        "0.002",
        "--out",
        tmp_path / "run",
        "--logger",
        "tensorboard",
        "--val",
        val,
    )
    assert 'logger = ["tensorboard"]' in first and "seq-len = 64" in first and "lr = 0.002" in first
    assert "val-fraction = " in first and f'val = ["{val}"]' in first
    (tmp_path / "run.toml").write_text(first)
    assert resolved("--config", tmp_path / "run.toml") == first
    config = tiny_config(corpus, tmp_path / "run")
    assert read_options_round_trip(config, tmp_path) == config


def test_print_config_under_torchrun_prints_once(corpus, tmp_path, monkeypatch):
    """Under torchrun every rank printed the config (twice the TOML, interleaved); rank 0 alone does."""
    launch = {"WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    printed = []
    for rank in ("0", "1"):
        for name, value in {**launch, "RANK": rank, "LOCAL_RANK": rank}.items():
            monkeypatch.setenv(name, value)
        printed.append(resolved(corpus, *TINY_FLAGS, "--out", tmp_path / "run"))
    assert "seq-len = " in printed[0]
    assert printed[1] == ""
    odd = tiny_config(corpus, tmp_path / 'run \U0001f600 \x7f \\ " \u00e9')  # (was not valid TOML)
    assert read_options_round_trip(odd, tmp_path) == odd


def read_options_round_trip(config, tmp_path):
    from htcli.config import TrainConfig

    path = tmp_path / "written.toml"
    path.write_text(write_toml(config, spell))
    options = read_options(path, spell)
    model = {k: options.pop(k) for k in list(options) if k in HTransformerConfig.__dataclass_fields__}
    return TrainConfig(**options, model=HTransformerConfig(**model))


def test_flags_override_the_file_and_the_file_overrides_defaults(corpus, tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text(f'corpus = "{corpus}"\npreset = "tiny"\nseq-len = 128\nlr = 1e-3\nsteps = 7\n')
    text = resolved("--config", path, "--steps", "9", "--out", tmp_path / "x")
    assert "steps = 9" in text and "lr = 0.001" in text and "seq-len = 128" in text and "dim = 64" in text
    assert "warmup = 100" in text  # neither file nor flag: the default


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("bath-size = 3", "exp.toml: bath-size is not an option of htcli train (did you mean batch-size?)"),
        ('steps = "ten"', "exp.toml: steps must be an integer, got 'ten'"),
        ("lr = true", "exp.toml: lr must be a number, got true"),
        ("corpus = 3", "exp.toml: corpus must be a path or a list of paths, got 3"),
        ("[model]\ndepth = 1.5", "exp.toml: model.depth must be an integer, got 1.5"),
        ("resume = true", "exp.toml: resume is given on the command line, not in a config file"),
        ("steps = ", "exp.toml is not valid TOML"),
        ("steps = " + "[" * 5000, "exp.toml is not "),  # (nested too deep: RecursionError or a depth limit)
        (
            "steps = 0",
            "exp.toml: steps must be a positive integer up to 2**53, got 0",
        ),  # (was spelled --steps)
        (
            "steps = 9223372036854775808",
            "exp.toml: steps must be a positive integer up to 2**53, got 9223372036854775808",
        ),
        ('logger = ["mlflow"]', "exp.toml: unknown logger 'mlflow': use one of tensorboard, wandb"),
        (
            'logger = ["tensorboard,wandb"]',
            "unknown logger 'tensorboard,wandb': use one of tensorboard, wandb (repeat logger for several)",
        ),
        ("logger = [1, 2]", "exp.toml: logger must be a name or a list of names, got [1, 2]"),
        ("clip = -1", "exp.toml: clip must be >= 0, got -1"),
        (
            "seq-len = 64\nblock-size = 12",
            "exp.toml: impossible model options: seq-len (64) must be a multiple of",
        ),
        # (was an OverflowError traceback)
        ("lr = 1" + "0" * 400, "exp.toml: lr must be a finite number, got 1000000000000000000"),
        ("lr = nan", "exp.toml: lr must be a finite number, got nan"),  # (was "must be a number")
        ("min-lr = inf", "exp.toml: min-lr must be a finite number, got inf"),
        ("steps = 1979-05-27", "exp.toml: steps must be an integer, got 1979-05-27 (a date or time)"),
        (  # (the last of the two was taken without a word)
            "seq-len = 64\n[model]\nmax_seq_len = 128",
            "exp.toml: seq-len and model.max_seq_len are the same option, given 64 and 128: keep one",
        ),
        ("batch-size = 2\nbatch_size = 3", "exp.toml: batch-size and batch_size are the same option"),
        # (a key of a model table was named without its table; true and null as Python wrote them)
        (
            "[model]\ndimm = 3",
            "exp.toml: model.dimm is not an option of htcli train (did you mean model.dim?)",
        ),
        ("[model]\ndim = true", "exp.toml: model.dim must be an integer, got true"),
        ("steps = false", "exp.toml: steps must be an integer, got false"),
        # (a run's config.json of a JSONL corpus over plain text: "leave it out" alone, of a file not theirs)
        ("skip-bad-records = true", "exp.toml: skip-bad-records concerns the records of JSONL and Parquet"),
        ("skip-bad-records = true", "holds none: leave it out (or set skip-bad-records off)"),
        # (100 tokens: an IndexError traceback at the first step; 300: trained, then refused by sample)
        (
            "[model]\nnum_tokens = 100",
            "exp.toml: model.num_tokens is 100: htcli trains byte-level models, of 256 tokens; remove "
            "model.num_tokens from this file",
        ),
        # (the file that gave them was not named)
        ("num-tokens = 300", "exp.toml: num-tokens is 300: htcli trains byte-level models, of 256 tokens"),
        ("causal = false", "exp.toml: causal = false makes the model bidirectional: htcli trains next-byte"),
    ],
)
def test_bad_config_files_are_one_line_errors_naming_the_key(corpus, tmp_path, content, message):
    path = tmp_path / "exp.toml"
    path.write_text(content + "\n")
    assert_user_error(invoke("train", corpus, "--config", path, "--out", tmp_path / "r"), message)


def test_a_derived_min_lr_is_written_as_its_value():
    """min_lr of lr / 10 to 15 digits: config.json and --print-config read 0.0003 (was
    0.00030000000000000003), and a resume still takes an older run's lr / 10 for derived."""
    from htcli.config import TrainConfig, without_derived

    assert TrainConfig(corpus=["c"], optimizer="adamw").min_lr == 0.0003
    assert TrainConfig(corpus=["c"], lr=0.006).min_lr == 0.0006
    older = {"optimizer": "adamw", "lr": 0.003, "min_lr": 0.003 / 10}
    assert "min_lr" not in without_derived(older, {"lr": 0.001})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        # (the first recipe's model without a word, as for a run's config.json)
        ("htcli_version = 5", "exp.toml: htcli_version is what a run's config.json records, not an option"),
        ('preset = ""', "exp.toml: unknown preset '': use one of tiny, small, base"),  # (was small's)
        ("[model]\nsteps = 5", "exp.toml: model.steps is not a model option (steps is one of htcli train's)"),
    ],
)
def test_config_files_that_were_taken_without_a_word(corpus, tmp_path, content, message):
    """Keys that changed the config without a word (printed here: the run would train)."""
    path = tmp_path / "exp.toml"
    path.write_text(content + "\n")
    printed = invoke("train", corpus, "--config", path, "--out", tmp_path / "r", "--print-config")
    assert_user_error(printed, message)


def test_a_key_may_join_its_words_with_dashes_or_underscores(corpus, tmp_path):
    """batch_size and block_size were read, seq_len and max-seq-len refused ("did you mean seq-len?"): every
    key is read with dashes or underscores; two spellings of one option still clash."""
    for key in ("seq-len", "seq_len", "max_seq_len", "max-seq-len"):
        path = tmp_path / "exp.toml"
        path.write_text(f"{key} = 128\nlevel_decay = 4.0\ncontext-warmup_start = 64\n")
        printed = resolved(corpus, "--config", path)
        assert "seq-len = 128" in printed and "level-decay = 4.0" in printed, key
        assert "context-warmup-start = 64" in printed, key
    path.write_text("seq_len = 64\nmax-seq-len = 128\n")
    assert_user_error(
        invoke("train", corpus, "--config", path), "exp.toml: seq_len and max-seq-len are the same option"
    )


def test_a_moved_runs_own_config_json_names_where_the_run_is(corpus, tmp_path):
    """A run moved (or copied), then given its own config.json as --config without --out: the file's out,
    where the run had been, was taken: --resume said "no checkpoint at" the old place, --resume auto began
    a new run there (and a copy's resume went on with the original). Refused, naming the run's directory;
    with --out it goes on."""
    first, moved = tmp_path / "first", tmp_path / "moved"
    assert invoke("train", corpus, *TINY_FLAGS, "--out", first, "--steps", 2).exit_code == 0
    first.rename(moved)
    for resume in (["--resume"], ["--resume", "auto"], []):
        result = invoke("train", *resume, "--config", moved / "config.json", "--steps", 3)
        assert_user_error(
            result,
            f"{moved / 'config.json'} is the config of the run in {moved}, whose --out it gives as {first}"
            f" (the run was moved or copied, or trained from another directory): give --out {moved} to go on",
        )
        assert not first.exists()
    going_on = invoke("train", "--resume", "--config", moved / "config.json", "--out", moved, "--steps", 3)
    assert going_on.exit_code == 0, going_on.output


def test_a_json_key_given_twice_is_an_error(corpus, tmp_path):
    """json.loads keeps the last of two equal keys without a word (TOML refuses them): refused too."""
    path = tmp_path / "exp.json"
    path.write_text('{"steps": 5, "lr": 0.001, "steps": 7}')
    message = f"config file {path} gives the key 'steps' twice: keep one"
    assert_user_error(invoke("train", corpus, "--config", path, "--out", tmp_path / "r"), message)
    upper = tmp_path / "EXP.JSON"  # (read as TOML: "not valid TOML")
    upper.write_text('{"steps": 5}')
    printed = invoke("train", corpus, "--config", upper, "--out", tmp_path / "r", "--print-config")
    assert printed.exit_code == 0 and "steps = 5" in printed.stdout, printed.output


def test_missing_config_file_is_an_error(corpus, tmp_path):
    result = invoke("train", corpus, "--config", tmp_path / "none.toml")
    assert_user_error(result, "none.toml does not exist: give a .toml file or a run's config.json")


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null"])
def test_a_config_file_that_is_a_device_or_too_long_is_refused(corpus, tmp_path, device):
    """/dev/zero as --config read until memory ran out, /dev/null was an empty config: refused; a stream
    that does not end is cut at 1 MiB; a pipe (`--config <(envsubst < exp.toml)`) is read as a file."""
    result = invoke("train", corpus, "--config", device, "--out", tmp_path / "r", "--print-config")
    assert_user_error(result, f"config file {device} is a device: give a .toml file or a run's config.json")
    (tmp_path / "big.toml").write_bytes(b"#" * (2**20 + 1))
    result = invoke("train", corpus, "--config", tmp_path / "big.toml", "--print-config")
    assert_user_error(result, "big.toml is over 1 MiB: not a config")
    pipe = tmp_path / "exp.toml"
    os.mkfifo(pipe)
    writer = threading.Thread(target=lambda: pipe.write_text("steps = 3\n"))
    writer.start()
    result = invoke("train", corpus, "--config", pipe, "--out", tmp_path / "r", "--print-config")
    writer.join()
    assert result.exit_code == 0 and "steps = 3" in result.stdout, result.output


def test_a_named_pipe_that_nothing_writes_to_is_refused(corpus, tmp_path, monkeypatch):
    """--config on a named pipe without a writer waited for ever, deaf to Ctrl-C: refused after a wait."""
    monkeypatch.setattr(config_file, "WRITER_WAIT", 0.3)
    os.mkfifo(tmp_path / "exp.toml")
    result = invoke(
        "train", corpus, "--config", tmp_path / "exp.toml", "--out", tmp_path / "r", "--print-config"
    )
    assert_user_error(
        result, f"config file {tmp_path / 'exp.toml'} is a pipe that nothing wrote to within 0.3 s"
    )


def test_a_checkpoint_as_config_file_is_named_as_such(corpus, tmp_path):
    """--config model.safetensors (a run's other file) says what --config takes, not a decoding error."""
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(3)}, path)
    result = invoke("train", corpus, "--config", path, "--out", tmp_path / "r")
    assert_user_error(result, "is not text (a checkpoint?): give a .toml file or a run's config.json")


def test_a_runs_config_json_repeats_the_run_with_one_flag_changed(corpus, tmp_path):
    """--config A/config.json --out B --lr X: the run A was, with another learning rate."""
    first = invoke("train", corpus, *TINY_FLAGS, "--steps", "2", "--out", tmp_path / "a")
    assert first.exit_code == 0, first.output
    again = invoke(
        "train", "--config", tmp_path / "a" / "config.json", "--out", tmp_path / "b", "--lr", "0.003"
    )
    assert again.exit_code == 0, again.output
    a, b = (json.loads((tmp_path / name / "config.json").read_text()) for name in "ab")
    assert b["lr"] == 0.003 and b["out"] == str(tmp_path / "b")
    assert {k: v for k, v in a.items() if k not in ("lr", "min_lr", "out")} == {
        k: v for k, v in b.items() if k not in ("lr", "min_lr", "out")
    }
    # without --out, the file's out holds run a: the usual refusal, not an overwrite
    refused = invoke("train", "--config", tmp_path / "a" / "config.json")
    assert_user_error(refused, "already holds a checkpoint: pass --resume to continue it")


def test_an_old_runs_config_json_repeats_the_model_it_built(corpus, tmp_path):
    """A run's config.json written before a model field existed (here level_decay, or the recipe's
    fields) gives, as --config, the model that run built (read as such: no level decay), not today's
    default for the field."""
    first = invoke(
        "train", corpus, *TINY_FLAGS, "--steps", "2", "--out", tmp_path / "a", "--level-decay", "0"
    )
    assert first.exit_code == 0, first.output
    path = tmp_path / "a" / "config.json"
    saved = json.loads(path.read_text())
    del saved["model"]["level_decay"]
    path.write_text(json.dumps(saved))
    again = invoke("train", "--config", path, "--out", tmp_path / "b", "--steps", "2")
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "b" / "config.json").read_text())["model"]["level_decay"] == 0.0
    # a key set at the top level (as a flag's spelling) where the old file lacks the field: taken, not
    # refused as a second value beside the old model's own (the recipe the file's model was built with)
    saved["level-decay"] = 4.0
    path.write_text(json.dumps(saved))
    assert "level-decay = 4.0" in resolved("--config", path, "--out", tmp_path / "c")


def test_one_option_given_twice_with_one_value_is_taken(corpus, tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text(f'corpus = "{corpus}"\nseq-len = 128\n[model]\nmax_seq_len = 128\n')
    assert "seq-len = 128" in resolved("--config", path, "--out", tmp_path / "x")


def test_values_derived_from_a_changed_option_are_derived_again(corpus, tmp_path):
    """min_lr (lr / 10) and an optimizer's default lr were saved in config.json as if given: a resume with
    another --lr was refused (min_lr above it), a run's config.json with another --optimizer kept the old
    one's lr. Values given by hand stay."""
    run = tmp_path / "run"
    assert invoke("train", corpus, *TINY_FLAGS, "--steps", "2", "--out", run).exit_code == 0
    text = resolved("--resume", "--out", run, "--steps", "4", "--lr", "1e-4")
    assert "lr = 0.0001\n" in text and "min-lr = 1e-05\n" in text
    text = resolved("--config", run / "config.json", "--out", tmp_path / "other", "--optimizer", "adamw")
    assert 'optimizer = "adamw"' in text and "lr = 0.003\n" in text
    text = resolved("--resume", "--out", run, "--steps", "4")
    assert "lr = 0.006\n" in text and "min-lr = 0.0006\n" in text  # (unchanged: as saved)
    small = tmp_path / "small.toml"  # (no lr, no optimizer: a KeyError traceback once)
    small.write_text("steps = 20\n")
    assert "lr = 0.003\n" in resolved(
        corpus, "--config", small, "--out", tmp_path / "s", "--optimizer", "adamw"
    )
    kept = tmp_path / "kept"
    assert (
        invoke("train", corpus, *TINY_FLAGS, "--steps", "2", "--out", kept, "--min-lr", "1e-5").exit_code == 0
    )
    assert "min-lr = 1e-05\n" in resolved("--resume", "--out", kept, "--steps", "4", "--lr", "1e-3")


def test_a_preset_or_attention_over_a_config_file_derives_the_model_again(corpus, tmp_path):
    """A printed config (or a run's config.json) writes out the model's size and level decay: --preset
    over it was ignored (the file's tiny dim, depth and heads won: a run believed base trained tiny), and
    --attention exact over it was refused for a level decay never given (--attention h over an exact
    model's file kept decay 0). Both are derived again; a decay or size set beside them stays."""
    tiny = tmp_path / "tiny.toml"
    tiny.write_text(resolved(corpus, "--preset", "tiny", "--out", tmp_path / "t"))
    assert "dim = 64\n" in tiny.read_text() and "level-decay = 16.0\n" in tiny.read_text()
    text = resolved("--config", tiny, "--preset", "base", "--out", tmp_path / "b")
    assert "dim = 512\n" in text and "depth = 8\n" in text and "seq-len = 8192\n" in text
    text = resolved("--config", tiny, "--preset", "base", "--dim", "256", "--out", tmp_path / "b")
    assert "dim = 256\n" in text and "depth = 8\n" in text
    short = (
        tmp_path / "short.toml"
    )  # (a printed config of a preset with one size set by hand: that one stays)
    short.write_text(resolved(corpus, "--preset", "tiny", "--seq-len", "64", "--out", tmp_path / "t"))
    text = resolved("--config", short, "--preset", "small", "--out", tmp_path / "b")
    assert "dim = 256\n" in text and "depth = 6\n" in text and "seq-len = 64\n" in text
    mine = tmp_path / "mine.toml"  # (a size set by hand stays)
    mine.write_text('preset = "small"\nseq-len = 1024\n')
    assert "seq-len = 1024\n" in resolved(
        corpus, "--config", mine, "--preset", "base", "--out", tmp_path / "m"
    )
    exact = resolved("--config", tiny, "--attention", "exact", "--out", tmp_path / "e")
    assert 'attention = "exact"' in exact and "level-decay = 0.0\n" in exact and "dim = 64\n" in exact
    (tmp_path / "exact.toml").write_text(exact)
    back = resolved("--config", tmp_path / "exact.toml", "--attention", "h", "--out", tmp_path / "h")
    assert "level-decay = 16.0\n" in back
    tiny.write_text(tiny.read_text().replace("level-decay = 16.0", "level-decay = 4.0"))
    assert "level-decay = 4.0\n" in resolved("--config", tiny, "--out", tmp_path / "k")  # (set by hand)
    refused = invoke("train", "--config", tiny, "--attention", "exact", "--out", tmp_path / "e")
    assert_user_error(refused, "level-decay is H-attention's: with --attention exact set it to 0")


def test_resume_takes_the_saved_config_then_the_file_then_flags(corpus, tmp_path):
    run = tmp_path / "run"
    assert invoke("train", corpus, *TINY_FLAGS, "--steps", "2", "--out", run).exit_code == 0
    path = tmp_path / "more.toml"
    path.write_text("steps = 6\neval-every = 3\n")
    text = resolved("--resume", "--out", run, "--config", path, "--steps", "4")
    assert "steps = 4" in text and "eval-every = 3" in text and "dim = 32" in text  # flag, file, saved
    path.write_text("steps = 4\ndim = 64\n")
    refused = invoke("train", "--resume", "--out", run, "--config", path)
    changed = (
        f"{path}: cannot resume {run}: the model differs from its checkpoint (dim 32 in the checkpoint, 64"
    )
    assert_user_error(refused, changed)  # (named the file's dim as the flag --dim)
    # --print-config refuses what the run would (it printed the changed model)
    printed = invoke("train", "--resume", "--out", run, "--config", path, "--print-config")
    assert_user_error(printed, changed)
    printed = invoke("train", "--resume", "--out", run, "--steps", "2", "--print-config")
    assert_user_error(printed, "is already at step 2 of --steps 2: pass a larger --steps")
    printed = invoke("train", corpus, "--resume", "--out", tmp_path / "new", "--print-config")
    assert_user_error(printed, "no checkpoint at")
    assert "steps = 5" in resolved(corpus, "--resume", "auto", "--out", tmp_path / "new", "--steps", "5")


def test_print_config_is_a_dry_run(corpus, tmp_path):
    """--print-config refuses a config that contradicts itself (fp16 on a CPU), and says on stderr what a
    run on this machine would refuse before training, printing the config all the same (it may be meant for
    another machine: a GPU, a corpus there); it said nothing of a corpus that does not exist, an out that
    holds a run or a file, a device missing here (review), the corpus given as --val too, nor of the
    warm-up."""
    run = tmp_path / "run"
    assert invoke("train", corpus, *TINY_FLAGS, "--steps", "2", "--out", run).exit_code == 0
    new = ["--out", tmp_path / "new", "--print-config"]
    assert_user_error(
        invoke("train", corpus, *TINY_FLAGS, "--dtype", "fp16", *new), "--dtype fp16 needs a CUDA"
    )

    def warned(*args) -> str:
        printed = invoke("train", *args)
        assert printed.exit_code == 0 and "steps = " in printed.stdout, printed.output
        return " ".join(printed.stderr.split())

    missing = tmp_path / "nope.txt"
    stop = "warning: a run on this machine would stop:"
    assert f"{stop} corpus {missing} does not exist" in warned(missing, *TINY_FLAGS, *new)
    assert "does not exist" in warned(corpus, *TINY_FLAGS, "--val", missing, *new)
    said = warned(corpus, *TINY_FLAGS, "--val", corpus, *new)  # (train refused it, the dry run said nothing)
    assert f"{stop} {os.path.realpath(corpus)} is both in the corpus and in --val" in said
    said = warned(corpus, *TINY_FLAGS, "--out", run, "--print-config")
    assert f"{stop} {run} already holds a checkpoint: pass --resume to continue it" in said
    assert f"{stop} the run directory (--out) {corpus} is a file" in warned(
        corpus, *TINY_FLAGS, "--out", corpus, "--print-config"
    )
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")  # (a traceback in the corpus's check; review)
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    said = warned(corpus, *TINY_FLAGS, "--out", tmp_path / "loop1", "--print-config")
    assert f"{stop} the run directory (--out) {tmp_path / 'loop1'} is a link in a loop of links" in said
    junk = tmp_path / "junk"
    (junk / "notes").mkdir(parents=True)
    assert "holds what is not an htcli run's" in warned(corpus, *TINY_FLAGS, "--out", junk, "--print-config")
    flags = list(TINY_FLAGS)
    flags[flags.index("--device") + 1] = "cuda"
    assert (
        f"{stop} CUDA was requested but no GPU is available" in warned(corpus, *flags, *new)
        or torch.cuda.is_available()
    )
    said = warned(corpus, *TINY_FLAGS, "--steps", "2", "--warmup", "1", *new)
    assert "warning: --warmup (1) leaves one step" in said and "give --warmup 0" in said and stop not in said
    # (the context warm-up's warnings, as train says them at its start; review)
    flags = [*TINY_FLAGS, "--context-warmup-start", "32", *new]
    said = warned(corpus, *flags, "--steps", "1", "--context-warmup", "0.5")
    assert "warning: --context-warmup (0.5) leaves no step of --steps (1) at --seq-len (64)" in said
    said = warned(corpus, *flags, "--steps", "4", "--context-warmup", "0.01")
    assert "warning: --context-warmup (0.01) of --steps (4) rounds up to 1 step(s) on short windows" in said
    assert not (tmp_path / "new").exists()


# model FLOPs


@pytest.mark.parametrize("attention", ["h", "exact"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("length", [128, 100, 40])
def test_flop_count_matches_torch_flop_counter(attention, causal, length):
    """The analytic count against torch.utils.flop_counter: the dense layers in a model forward (its
    linear layers' mm/addmm), the attention in the attention computation itself (H: htcli's eager
    implementation; exact: SDPA's math backend)."""
    shape = dict(dim=64, depth=2, heads=2, dim_head=32, block_size=16, max_seq_len=128)
    config = HTransformerConfig(**shape, causal=causal, attention=attention)
    batch = 3
    with FlopCounterMode(display=False) as counter:
        HTransformer1D(config)(torch.randint(0, 256, (batch, length)))
    counted = counter.get_flop_counts()["Global"]
    dense = sum(count for op, count in counted.items() if op.__name__.split(".")[0] in ("mm", "addmm"))
    assert dense == batch * length * dense_flops_per_token(config)
    # (the flop counter has no formula for the in-place baddbmm_ that eager's scores take: baddbmm's)
    q, k, v = torch.randn(3, batch * config.heads, length, config.dim_head).unbind(0)
    in_place = {torch.ops.aten.baddbmm_: lambda _, a, b, **shapes: flop_counter.bmm_flop(a, b)}
    with FlopCounterMode(display=False, custom_mapping=in_place) as counter:
        if attention == "h":
            eager.forward(q, k, v, torch.ones(batch * config.heads, length), block_size=16, causal=causal)
        else:
            shape = (batch, config.heads, length, config.dim_head)
            with sdpa_kernel(SDPBackend.MATH):
                F.scaled_dot_product_attention(*(t.view(shape) for t in (q, k, v)), is_causal=causal)
    assert counter.get_total_flops() == batch * attention_flops(config, length)


def test_h_attention_flops_grow_linearly_and_exact_quadratically():
    h = HTransformerConfig(block_size=64, max_seq_len=65536)
    exact = HTransformerConfig(block_size=64, max_seq_len=65536, attention="exact")
    assert attention_flops(h, 65536) / attention_flops(h, 8192) < 8 * 1.05
    assert attention_flops(exact, 65536) == 64 * attention_flops(exact, 8192)


def test_peak_rates_by_gpu_name():
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops("NVIDIA L4") == 121e12
    assert peak_bf16_flops("Tesla V100-SXM2-16GB") is None


def test_step_events_carry_speed_memory_and_tflops(corpus, tmp_path):
    run = tmp_path / "run"
    assert invoke("train", corpus, *TINY_FLAGS, "--steps", "2", "--out", run).exit_code == 0
    for step in events(run, "step"):
        assert step["step_seconds"] > 0 and step["tokens_per_s"] > 0 and step["tflops"] > 0
        assert step["peak_memory"] > 10 * 2**20  # the process's RSS on the CPU
        assert "mfu" not in step  # only against a GPU's known peak


# loggers


def scalars(run, tag) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run / "tensorboard"))
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def test_tensorboard_event_files_hold_the_metrics(corpus, tmp_path):
    run = tmp_path / "run"
    result = invoke("train", corpus, *TINY_FLAGS, "--steps", "4", "--eval-every", "2", "--out", run,
                    "--logger", "tensorboard")  # fmt: skip
    assert result.exit_code == 0, result.output
    losses = scalars(run, "train/loss")
    assert [step for step, _ in losses] == [1, 2, 3, 4]
    assert [value for _, value in losses] == pytest.approx([e["loss"] for e in events(run, "step")])
    assert [step for step, _ in scalars(run, "val/bpb")] == [2, 4]
    for tag in (
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
        "train/tflops",
        "train/peak_memory_bytes",
    ):
        assert len(scalars(run, tag)) == 4


def test_a_resume_whose_logger_leaves_out_the_runs_says_so(corpus, tmp_path, monkeypatch):
    """--logger on a resume replaces the run's loggers (options given override the saved ones): a logger
    it leaves out is named in a warning (its curves just ended); none where the given ones keep it."""
    monkeypatch.setenv("WANDB_MODE", "offline")  # (not disabled: W&B would keep that for the process)
    run = tmp_path / "run"
    flags = [*TINY_FLAGS, "--out", run]
    assert invoke("train", corpus, *flags, "--steps", 1, "--logger", "tensorboard").exit_code == 0
    both = invoke("train", *flags, "--resume", "--steps", 2, "--logger", "tensorboard", "--logger", "wandb")
    assert both.exit_code == 0 and "warning: --logger" not in both.stderr, both.output
    only = invoke("train", *flags, "--resume", "--steps", 3, "--logger", "wandb")
    assert only.exit_code == 0, only.output
    said = " ".join(only.stderr.split())
    assert "warning: --logger replaces the run's loggers: tensorboard gets no more of this run; give" in said
    assert [step for step, _ in scalars(run, "train/loss")] == [1, 2]
    # a resume refused: its error alone (the warning came first, of a run that did not go on)
    refused = invoke("train", *flags, "--resume", "--steps", 2, "--logger", "tensorboard")  # (drops wandb)
    assert refused.exit_code == 1 and "warning" not in refused.stderr, (refused.stderr, refused.output)


def test_tensorboard_on_a_full_disk_is_one_line(corpus, tmp_path, monkeypatch):
    """TensorBoard's event file on a disk that fills up: its writer thread printed a traceback, then the
    error of closing it replaced the logging's own and blamed stdout ("cannot write the output"). One line
    names the event files, says what is kept and what to do; exit 1."""
    from tensorboard.summary.writer import record_writer

    real_write, writes = record_writer.RecordWriter.write, []

    def fills_up(self, data):
        writes.append(data)
        if len(writes) > 8:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, data)

    monkeypatch.setattr(record_writer.RecordWriter, "write", fills_up)
    run = tmp_path / "run"
    result = invoke("train", corpus, *TINY_FLAGS, "--steps", "30", "--out", run, "--logger", "tensorboard")
    said = f"error: cannot write TensorBoard's event files in {run / 'tensorboard'}: No space left on device"
    assert result.exit_code == 1 and result.stderr.splitlines()[-1].startswith(said + "; stopped ("), (
        result.stderr
    )
    assert "Traceback" not in result.stderr and "Exception in thread" not in result.stderr


def crash_after_step_4(corpus, run, flags: list) -> None:
    """A run of 2 steps resumed to 4 with flags, its checkpoint then put back to step 2: the run as a crash
    before the checkpoint of step 4 leaves it (steps 3 and 4 logged)."""
    saved = run.parent / f"{run.name}-saved"
    assert invoke("train", corpus, *flags, "--steps", "2").exit_code == 0
    saved.mkdir()
    for name in ("model.safetensors", "optimizer.safetensors", "state.json"):
        shutil.copy(run / name, saved / name)
    assert invoke("train", *flags, "--resume", "--steps", "4").exit_code == 0
    for name in ("model.safetensors", "optimizer.safetensors", "state.json"):
        shutil.copy(saved / name, run / name)


def test_tensorboard_curves_continue_after_a_crash_without_duplicate_steps(corpus, tmp_path):
    """Steps 3 and 4 logged, then a crash before their checkpoint: the resume from step 2 redoes them,
    and TensorBoard shows each step once."""
    run = tmp_path / "run"
    flags = [*TINY_FLAGS, "--out", run, "--logger", "tensorboard", "--eval-every", "1"]
    crash_after_step_4(corpus, run, flags)
    assert invoke("train", *flags, "--resume", "--steps", "4").exit_code == 0
    assert [step for step, _ in scalars(run, "train/loss")] == [1, 2, 3, 4]
    assert [step for step, _ in scalars(run, "val/bpb")] == [1, 2, 3, 4]


def test_a_session_without_tensorboard_drops_a_crashs_steps_there(corpus, tmp_path, monkeypatch):
    """A crash's steps 3 and 4 in TensorBoard, then a resume from step 2 without TensorBoard (it redoes them),
    then one with it from step 4: TensorBoard held the crash's values of steps 3 and 4 (its purge dropped
    only what lay past the later session's start); now none, and every value it shows is the log's."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    flags = [*TINY_FLAGS, "--out", run, "--eval-every", "1"]
    crash_after_step_4(corpus, run, [*flags, "--logger", "tensorboard"])
    # (each session's event file a second after the last: TensorBoard reads them in the order of their
    # names, which hold the second they were made and then a count of this process's writers, 10 before 9)
    time.sleep(1.1)
    assert invoke("train", *flags, "--resume", "--steps", "4", "--logger", "wandb").exit_code == 0
    time.sleep(1.1)
    assert invoke("train", *flags, "--resume", "--steps", "6", "--logger", "tensorboard").exit_code == 0
    logged = {e["step"]: e["loss"] for e in events(run, "step")}
    shown = scalars(run, "train/loss")
    assert [step for step, _ in shown] == [1, 2, 5, 6]
    assert all(value == pytest.approx(logged[step]) for step, value in shown)


def wandb_history(path) -> list[dict]:
    """The history rows of a W&B run file (.wandb: LevelDB-log records of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2

    data, rows, position, pending = open(path, "rb").read(), [], 7, b""
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        if left < 7:  # a block's tail too short for a record header is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})  # fmt: skip
    return rows


def test_wandb_offline_run_continues_on_resume(corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    flags = [*TINY_FLAGS, "--out", run, "--logger", "wandb"]
    assert invoke("train", corpus, *flags, "--steps", "3").exit_code == 0
    time.sleep(1.1)  # W&B names an offline session's directory by the second it started in
    assert invoke("train", *flags, "--resume", "--steps", "5").exit_code == 0
    run_id = (run / "wandb-id").read_text().strip()
    files = sorted(glob.glob(str(run / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb")))
    assert len(files) == 2  # one per session, one W&B run id
    steps = [[row["_step"] for row in wandb_history(path) if "train/loss" in row] for path in files]
    assert steps == [[1, 2, 3], [4, 5]]
    last = wandb_history(files[1])[-1]
    assert last["train/loss"] == pytest.approx(events(run, "step")[-1]["loss"])
    assert last["val/bpb"] == pytest.approx(events(run, "eval")[-1]["val_bpb"])


def test_wandb_settings_htcli_can_tell_are_wrong_say_so(corpus, tmp_path, monkeypatch):
    """A WANDB_MODE that W&B does not know, an OUT/wandb-id emptied or holding no id: one line that says
    so (W&B's error advised logging in)."""
    run = tmp_path / "run"
    monkeypatch.setenv("WANDB_MODE", "ofline")
    flags = [corpus, *TINY_FLAGS, "--out", run, "--logger", "wandb", "--steps", "2"]
    assert_user_error(
        invoke("train", *flags), "WANDB_MODE='ofline' is not a W&B mode: set online, offline or"
    )
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert invoke("train", *flags).exit_code == 0
    (run / "wandb-id").write_text("\n")
    resumed = invoke("train", "--out", run, "--resume", "--steps", "3")
    assert_user_error(resumed, f"{run / 'wandb-id'} holds no W&B run id (''): write the run's")


def test_a_logger_that_cannot_start_is_one_line_and_leaves_the_run_as_it_was(corpus, tmp_path):
    """W&B online without a login (was a 59-line traceback, after config.json had taken the new options,
    so that every resume failed again): one line saying what to do; a resumed run's config.json as it
    was, so that it resumes without the logger; a new run's directory without a config, started again, and
    removed where the run made it.
    (Real processes: W&B keeps a login it found for the life of a process.)"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_MODE="online", HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"))

    def without_login(*args):
        command = [sys.executable, "-m", "htcli", "train", *map(str, args), "--logger", "wandb"]
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.strip().splitlines() == [
            "error: --logger wandb could not start (No API key configured. Use `wandb login` to log in.): "
            "run `wandb login` or set WANDB_API_KEY, or WANDB_MODE=offline to log on disk"
        ]

    run, fresh = tmp_path / "run", tmp_path / "fresh"
    assert invoke("train", corpus, *TINY_FLAGS, "--out", run, "--steps", "2").exit_code == 0
    saved = (run / "config.json").read_bytes()
    resumed = [*TINY_FLAGS, "--out", run, "--resume", "--steps", "4"]
    without_login(*resumed)
    assert (run / "config.json").read_bytes() == saved
    assert not (run / "wandb-id").exists()  # (it was written before W&B failed to start)
    assert invoke("train", *resumed).exit_code == 0
    new = [corpus, *TINY_FLAGS, "--out", fresh, "--steps", "2"]
    without_login(*new)
    assert not fresh.exists()  # (the directory it made is removed: it held .lock and wandb-id)
    deep = tmp_path / "a" / "b" / "run"  # (and the folders made for it)
    without_login(corpus, *TINY_FLAGS, "--out", deep, "--steps", "2")
    assert not (tmp_path / "a").exists()
    precious = tmp_path / "precious"  # ("new/../precious" made "new" and removed precious, the user's)
    precious.mkdir()
    (precious / "notes.txt").write_bytes(b"important")
    without_login(corpus, *TINY_FLAGS, "--out", tmp_path / "new" / ".." / "precious", "--steps", "2")
    assert (precious / "notes.txt").read_bytes() == b"important"
    fresh.mkdir()  # (a directory there before: left, as the lock it took)
    without_login(*new)
    assert sorted(p.name for p in fresh.iterdir()) == [".lock"]
    assert invoke("train", *new).exit_code == 0


def test_a_bad_wandb_project_is_not_told_to_log_in(corpus, tmp_path):
    """W&B's reason decides the advice: a project name W&B refuses (offline too) was told to log in."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_PROJECT": "bad/name", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "htcli", "train", str(corpus), *TINY_FLAGS, "--logger", "wandb"]
    command += ["--out", str(tmp_path / "run")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Invalid project name 'bad/name'" in done.stderr
    assert done.stderr.strip().endswith("set WANDB_PROJECT to a project name W&B takes (unset: htcli)")


@pytest.mark.parametrize(("logger", "package"), [("wandb", "wandb"), ("tensorboard", "tensorboard")])
def test_missing_logger_package_names_the_install_command(corpus, tmp_path, logger, package):
    """In a process where the package cannot be imported: a one-line error, nothing written."""
    hide = f"import sys; sys.modules[{package!r}] = None; from htcli.cli import app; app(sys.argv[1:])"
    args = ["train", str(corpus), *map(str, TINY_FLAGS), "--out", str(tmp_path / "run"), "--logger", logger]
    result = subprocess.run([sys.executable, "-c", hide, *args], capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"error: --logger {logger} needs the {package} package: pip install 'htcli[{logger}]' "
        f"(or pip install {package})"
    )
    assert not (tmp_path / "run").exists()


# htcli plot


def test_plot_draws_runs_and_tables_them(corpus, tmp_path):
    import matplotlib.image

    for name, lr in (("fast", "0.01"), ("slow", "0.001")):
        result = invoke("train", corpus, *TINY_FLAGS, "--steps", "4", "--eval-every", "2", "--lr", lr,
                        "--out", tmp_path / name)  # fmt: skip
        assert result.exit_code == 0, result.output
    # a crashed run: its log ends in a line cut short
    with open(tmp_path / "slow" / "log.jsonl", "a") as log:
        log.write('{"event": "step", "ti')
    for x in ("step", "bytes", "time"):
        png = tmp_path / f"curves-{x}.png"
        result = invoke("plot", tmp_path / "fast", tmp_path / "slow", "-o", png, "--x", x)
        assert result.exit_code == 0, result.output
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(png).shape[:2] == (480, 1320)
    lines = result.stdout.splitlines()
    fast = events(tmp_path / "fast", "eval")
    row = next(line for line in lines if "fast" in line)
    assert "4" in row and f"{fast[-1]['val_bpb']:.4f}" in row and "512" in row  # step, val bpb, bytes
    assert any("slow" in line for line in lines)
    # PostScript: matplotlib's log said on stderr that it draws transparency opaque (review)
    command = [sys.executable, "-m", "htcli", "plot", tmp_path / "fast", "-o", tmp_path / "c.eps"]
    eps = subprocess.run(list(map(str, command)), capture_output=True, text=True)
    assert eps.returncode == 0 and eps.stderr == f"plot written to {tmp_path / 'c.eps'}\n"
    assert (tmp_path / "c.eps").read_bytes().startswith(b"%!PS")
    # stdout that cannot be written (a full disk): one line, and no figure (it was written, unsaid)
    with open("/dev/full", "w") as full:
        command = [sys.executable, "-m", "htcli", "plot", tmp_path / "fast", "-o", tmp_path / "f.png"]
        failed = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True)
    said = "error: cannot write the output: No space left on device: free some space, or send the output"
    assert failed.returncode == 1 and failed.stderr == said + " elsewhere\n"
    assert not (tmp_path / "f.png").exists()


def test_a_run_of_one_step_draws_its_point(corpus, tmp_path, monkeypatch):
    """A training curve of one step is drawn as a marker (a line of one point without markers was
    invisible: the panel showed only its legend); longer ones as lines."""
    from htcli import plots
    from htcli.curves import read_curves

    drawn = []
    monkeypatch.setattr(plots, "save_figure", lambda figure, path: drawn.append(figure))
    for steps in (1, 3):
        run = tmp_path / f"r{steps}"
        assert invoke("train", corpus, *TINY_FLAGS, "--steps", steps, "--out", run).exit_code == 0
        plots.curves_plot([read_curves(run)], "step", tmp_path / "c.png")
    markers = [[line.get_marker() for line in figure.axes[1].get_lines()] for figure in drawn]
    assert markers == [["o"], ["None"]]


def test_plot_says_which_lines_it_skipped(corpus, tmp_path):
    """Lines of a log that are not events, or events without their numbers (a string val_bpb), are counted
    in a warning, a last line a crash cut short is not; a NaN evaluation is never the best; a run with no
    evaluation yet draws without matplotlib's warning about an empty legend."""
    run = tmp_path / "run"
    assert (
        invoke("train", corpus, *TINY_FLAGS, "--steps", "4", "--eval-every", "2", "--out", run).exit_code == 0
    )
    log = run / "log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    evals = [r for r in records if r["event"] == "eval"]
    evals[-1]["val_bpb"] = math.nan
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + 'not json\n{"event": "eval", "ti')
    result = invoke("plot", run, "-o", tmp_path / "a.png")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[0] == f"warning: {log}: a line is not an htcli event (skipped)"
    assert f"{evals[0]['val_bpb']:.4f} (2)" in result.stdout  # the best: the first, not the NaN
    # no evaluation yet: the val_bpb of each a string
    log.write_text(
        "".join(json.dumps({**r, "val_bpb": "x"} if r["event"] == "eval" else r) + "\n" for r in records)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = invoke("plot", run, "-o", tmp_path / "b.png")
    assert result.exit_code == 0, result.output
    assert (
        result.stderr.splitlines()[0] == f"warning: {log}: {len(evals)} lines are not htcli events (skipped)"
    )
    # numbers no axis can take (a ValueError or OverflowError traceback from matplotlib): skipped too
    steps = [r for r in records if r["event"] == "step"]
    huge = [{**steps[0], "loss": 1e308}, {**steps[1], "step": 10**400}, {**steps[2], "time": -1e300}]
    log.write_text("".join(json.dumps(r) + "\n" for r in [*records, *huge]))
    result = invoke("plot", run, "-o", tmp_path / "c.png")
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[0] == f"warning: {log}: 3 lines are not htcli events (skipped)"


def test_a_diverged_value_is_a_gap_not_a_skipped_line(corpus, tmp_path):
    """A NaN loss or val bpb, which log.jsonl writes as null (strict JSON): a point of NaN, a gap in the
    curve, and no warning (plot said "a line is not an htcli event" and dropped the evaluation)."""
    from htcli.curves import read_curves

    run = tmp_path / "run"
    assert invoke("train", corpus, *TINY_FLAGS, "--steps", 4, "--eval-every", 2, "--out", run).exit_code == 0
    log = run / "log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    for record in records:
        if record["event"] == "eval" and record["step"] == 2:
            record["val_bpb"] = record["val_loss"] = None
        if record["event"] == "step" and record["step"] == 3:
            record["loss"] = None
    log.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in records))
    curves = read_curves(run)
    assert curves.skipped == 0
    assert [(p.step, math.isnan(p.value)) for p in curves.val] == [(2, True), (4, False)]
    assert [p.step for p in curves.train if math.isnan(p.value)] == [3] and len(curves.train) == 4
    result = invoke("plot", run, "-o", tmp_path / "a.png")
    assert result.exit_code == 0 and "warning" not in result.stderr, result.stderr


def test_a_figure_without_room_is_refused_before_the_work(tmp_path):
    """A directory that takes an empty file but not a figure's bytes (a full disk; here a limit on file
    sizes) passed the check made before the work, so the evaluation ran and its figure failed after it
    (review): the check writes a figure's worth of bytes."""
    code = (
        "import resource, signal, sys; from pathlib import Path; from htcli.errors import HtcliError;"
        " from htcli.plots import check_plot_path; signal.signal(signal.SIGXFSZ, signal.SIG_IGN);"
        " resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "try:\n    check_plot_path(Path(sys.argv[1]), '--plot')\n"
        "except HtcliError as error:\n    print(error)"
    )
    done = subprocess.run([sys.executable, "-c", code, tmp_path / "p.png"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    said = f"--plot {tmp_path / 'p.png'}: cannot write in the directory {tmp_path} (File too large): raise"
    assert done.stdout.strip() == f"{said} the limit on file sizes (ulimit -f), or give another directory"
    assert list(tmp_path.iterdir()) == []


def test_a_figure_cut_short_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    """A Ctrl-C while matplotlib writes a figure (plot -o, eval --plot, bench --plot wrote straight onto the
    path), or a full disk (a traceback): the earlier figure stays whole, no temporary file is left, and a
    full disk is one line."""
    from matplotlib.figure import Figure

    from htcli.plots import pyplot, save_figure

    path = tmp_path / "curves.png"
    path.write_bytes(b"an earlier figure")
    plt = pyplot()
    fig = plt.figure()

    def cut_short(self, file, **kwargs):
        file.write(b"\x89PNG half")
        raise KeyboardInterrupt

    def full(self, file, **kwargs):
        file.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", cut_short)
    with pytest.raises(KeyboardInterrupt):
        save_figure(fig, path)
    monkeypatch.setattr(Figure, "savefig", full)
    with pytest.raises(HtcliError, match=f"cannot write the figure {path}: No space left on device: free"):
        save_figure(fig, path)
    monkeypatch.undo()
    assert path.read_bytes() == b"an earlier figure" and [p.name for p in tmp_path.iterdir()] == [path.name]
    save_figure(fig, path)
    plt.close(fig)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_errors(corpus, tmp_path):
    assert_user_error(
        invoke("plot", tmp_path), "has no log.jsonl: give run directories written by htcli train"
    )
    assert_user_error(  # (a mistyped name said "has no log.jsonl")
        invoke("plot", tmp_path / "nowhere"), "nowhere does not exist: give run directories written by"
    )
    assert_user_error(
        invoke("plot", tmp_path, "--x", "epochs"), "unknown --x 'epochs': use one of step, bytes"
    )
    assert_user_error(invoke("plot", tmp_path, "-o", tmp_path), f"--output {tmp_path} is a directory")
    (tmp_path / "log.jsonl").write_text('{"event": "start"}\n{torn\n')
    result = invoke("plot", tmp_path, "-o", tmp_path / "c.png")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.splitlines() == [
        f"warning: {tmp_path / 'log.jsonl'}: 2 lines are not htcli events (skipped)",
        "error: nothing to plot: no run has logged a step or an evaluation yet",
    ]
    assert not (tmp_path / "c.png").exists()
    assert_user_error(
        invoke("plot", tmp_path / "log.jsonl"), "is a file: give the run directory that holds it"
    )
    assert_user_error(invoke("plot", tmp_path, "-o", tmp_path / "c.txt"), "ending in .png, .pdf or .svg")
    (tmp_path / "link").symlink_to(tmp_path)  # (a run given twice drew its curves twice, one label)
    assert_user_error(
        invoke("plot", tmp_path, tmp_path), f"the run {tmp_path} is given twice: give each run once"
    )
    assert_user_error(
        invoke("plot", tmp_path, tmp_path / "link"), f"is given twice (also as {tmp_path}): give"
    )


# progress


def run_on_a_terminal(*args) -> tuple[str, str]:
    """htcli ARGS with stderr on a pseudo-terminal: (stdout, what the terminal showed)."""
    leader, follower = pty.openpty()
    env = {**os.environ, "COLUMNS": "100", "TERM": "xterm"}
    process = subprocess.Popen([sys.executable, "-m", "htcli", *map(str, args)], stdout=subprocess.PIPE,
                               stderr=follower, env=env)  # fmt: skip
    os.close(follower)
    shown = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the process closed the terminal
            break
        if not chunk:
            break
        shown += chunk
    stdout = process.communicate()[0]
    os.close(leader)
    assert process.returncode == 0, shown
    return stdout.decode(), shown.decode(errors="replace")


def test_progress_shows_on_terminals_and_not_in_pipes(corpus, tmp_path):
    run = tmp_path / "run"
    assert invoke("train", corpus, *TINY_FLAGS, "--steps", "1", "--out", run).exit_code == 0
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(corpus.read_bytes()[:60])
    sample = ["sample", run, "--prompt-file", prompt, "--max-new-tokens", "5", "--device", "cpu"]
    evaluate = ["eval", run, corpus, "--device", "cpu"]
    _, shown = run_on_a_terminal(*sample)
    assert "reading the prompt (60 bytes)" in shown
    _, shown = run_on_a_terminal(*evaluate)
    assert "scoring" in shown
    for args in (sample, evaluate):
        piped = subprocess.run(
            [sys.executable, "-m", "htcli", *map(str, args)], capture_output=True, text=True
        )
        assert "reading the prompt" not in piped.stderr and "scoring" not in piped.stderr


def test_a_long_eval_off_a_terminal_says_how_far_it_is(corpus, tmp_path, monkeypatch):
    """Off a terminal eval showed no progress at all: an eval of 2 GB in a log file said nothing for hours
    (review). It prints a plain line every PLAIN_PROGRESS_SECONDS (here 0: at every batch), none for work
    shorter than that (the test above)."""
    from htcli import display

    run = tmp_path / "run"
    assert invoke("train", corpus, *TINY_FLAGS, "--steps", "1", "--out", run).exit_code == 0
    monkeypatch.setattr(display, "PLAIN_PROGRESS_SECONDS", 0.0)
    result = invoke("eval", run, corpus, "--device", "cpu", "--json")
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert lines and all(
        re.fullmatch(r"scoring: \d+% \([\d,]+ of [\d,]+\), about \d+ s left", x) for x in lines[:-1]
    )
    assert re.fullmatch(r"scoring: 100% \(([\d,]+) of \1\)", lines[-1]), lines[-1]  # (no "0 s left")
    assert json.loads(result.stdout)["bits_per_byte"] > 0
    assert [display._duration(s) for s in (5, 59.4, 59.6, 61, 3540, 3600, 11400)] == [
        "5 s", "59 s", "1 min", "1 min", "59 min", "1 h 0 min", "3 h 10 min"
    ]  # fmt: skip


def test_a_slow_work_notice_comes_once_during_the_work_only(monkeypatch):
    """display.said_if_slow: its line once the work has taken SLOW_SECONDS, none for quicker work, never
    after the work ended (a timer that fired as it ended printed after its error line), and no traceback
    from its thread where stderr is gone (review)."""
    import io

    from rich.console import Console

    from htcli import display

    class Gone(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    failures = []
    monkeypatch.setattr(threading, "excepthook", failures.append)
    monkeypatch.setattr(display, "SLOW_SECONDS", 0.05)
    for slow in (False, True):
        out = io.StringIO()
        with display.said_if_slow(Console(file=out, width=200), "unpacking x ..."):
            time.sleep(0.3 if slow else 0.0)
        time.sleep(0.2)  # (a timer, had one been left, would print now)
        assert out.getvalue() == ("unpacking x ...\n" if slow else "")
    with display.said_if_slow(Console(file=Gone(), width=200), "unpacking x ..."):
        time.sleep(0.3)
    assert failures == []
