"""The example scripts stay runnable: a short training run, then sampling and evaluation from it."""

import ast
import importlib.util
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_text

EXAMPLES = Path(__file__).parent.parent / "examples"


def torch_sees_a_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def test_library_examples(tmp_path):
    """train_tiny.py writes a checkpoint that sample_and_eval.py samples from and evaluates."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(make_text(10_000))
    trained = subprocess.run(
        [sys.executable, EXAMPLES / "train_tiny.py", tmp_path / "run", corpus, "--steps", "3"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "validation" in trained.stdout and "3 steps in" in trained.stdout
    used = subprocess.run(
        [sys.executable, EXAMPLES / "sample_and_eval.py", tmp_path / "run", "the ", corpus],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert used.stdout.startswith("step 3 model") and "bits per byte over 9,999 bytes" in used.stdout


@pytest.mark.parametrize(
    "args,said",
    [
        (
            ["train_tiny.py", "{tmp}/run", "{tmp}/missing.txt"],
            "error: corpus {tmp}/missing.txt does not exist",
        ),
        (["sample_and_eval.py", "{tmp}/none", "a", "{tmp}/c.txt"], "error: {tmp}/none does not exist"),
        (
            ["recipe.py", "{tmp}/missing.txt", "{tmp}/runs", "first"],
            "error: corpus {tmp}/missing.txt does not",
        ),
        (
            ["decode_profile.py", "--preset", "tiny"],
            "error: --prompt-len must be 1 to 255 (the tiny preset's",
        ),
        (["decode_profile.py", "--preset", "tiny", "--prompt-len", "100", "--steps", "50"], "3 * --steps at"),
        (["recipe_parts.py", "--rounds", "0"], "error: --rounds must be 1 or more"),
        # (the review's: the corpus checked before any work; OUT not made, nothing sampled or trained first)
        (
            ["sample_and_eval.py", "{tmp}/none", "a", "{tmp}/empty.txt"],
            "error: corpus {tmp}/empty.txt is empty",
        ),
        (
            ["long_context.py", "{tmp}/c.txt", "{tmp}/missing.txt", "{tmp}/out", "h-256"],
            "error: corpus {tmp}/missing.txt does not exist",
        ),
        (["measure_start.py", "{tmp}/c.txt", "{tmp}/out", "5"], "error: NOFILE must be 64 or more"),
        (["step_profile.py", "--preset", "bogus", "--device", "cpu"], "error: unknown preset 'bogus'"),
        (
            ["step_profile.py", "--preset", "tiny", "--seq-len", "100", "--device", "cpu"],
            "must be a multiple of block_size (16)",
        ),
        (["step_profile.py", "--batch-size", "0"], "--batch-size and --repeats must be 1 or more"),
        (["step_profile.py", "--repeats", "0"], "--batch-size and --repeats must be 1 or more"),
        # (the review's of 2026-11-29: each was a traceback, or a wrong run)
        (
            ["measure_start.py", "{tmp}/c.txt", "{tmp}/out", "{over}"],
            "error: NOFILE must be at most the hard",
        ),
        (["step_profile.py", "--compile", "bogus"], "argument --compile: invalid choice: 'bogus'"),
        (["triton_precision.py", "--dtypes", "fp8"], "--dtypes a list of fp32, fp16, bf16"),
        (["triton_precision.py", "--lengths", "abc"], "--lengths and --repeat-shape take whole numbers"),
        (["triton_precision.py", "--lengths", "-5"], "must be positive"),
        (["triton_precision.py", "--repeat-shape", "1,1"], "--repeat-shape is batch,heads,length"),
        (
            ["triton_sweep.py", "--seq-len", "-5"],
            "--block-size, --variants and --max-seconds must be positive",
        ),
        (["attention_profile.py", "--seq-len", "0"], "--block-size must be positive, --rows >= 0"),
    ],
)
def test_examples_refuse_bad_input_in_one_line(tmp_path, args, said):
    """An example given what it cannot take ends with one line (each was a traceback), before any work and
    leaving no file (recipe.py made OUT, long_context.py trained before it read its held-out corpus)."""
    (tmp_path / "c.txt").write_bytes(make_text(2_000))
    (tmp_path / "empty.txt").write_bytes(b"")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if "{over}" in args and hard == resource.RLIM_INFINITY:
        pytest.skip("no hard limit on descriptors here to go over")
    over = hard + 1
    command = [sys.executable, EXAMPLES / args[0], *(arg.format(tmp=tmp_path, over=over) for arg in args[1:])]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode in (1, 2) and "Traceback" not in done.stderr, done.stderr
    assert said.format(tmp=tmp_path) in done.stderr.strip().splitlines()[-1], done.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["c.txt", "empty.txt"] and not done.stdout


@pytest.mark.skipif(torch_sees_a_gpu(), reason="checks the machine without a GPU")
def test_recipe_refuses_an_out_that_holds_another_corpus(tmp_path):
    """recipe.py's OUT keeps its corpus's split and the variants trained on it: run again with another
    corpus it scored the old split under the new name (review); the same corpus again reuses it."""
    spec = importlib.util.spec_from_file_location("recipe", EXAMPLES / "recipe.py")
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    (tmp_path / "a.txt").write_bytes(make_text(2_000))
    (tmp_path / "b.txt").write_bytes(make_text(3_000, seed=1))
    train, held_out = recipe.split(str(tmp_path / "a.txt"), tmp_path / "out")
    assert len(train.read_bytes()) == 1_800 and len(held_out.read_bytes()) == 200
    assert recipe.split(str(tmp_path / "a.txt"), tmp_path / "out") == (train, held_out)
    from htcli.errors import HtcliError

    with pytest.raises(
        HtcliError, match="out holds the split of another corpus, and its variants: give another"
    ):
        recipe.split(str(tmp_path / "b.txt"), tmp_path / "out")
    assert len(train.read_bytes()) == 1_800


def test_demo_replaces_only_a_run(tmp_path):
    """demo.sh starts anew by removing OUT: a folder that holds no htcli run is refused, untouched."""
    (tmp_path / "notes.txt").write_text("mine")
    environment = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    done = subprocess.run(["bash", EXAMPLES / "demo.sh"], capture_output=True, text=True, env=environment)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert (
        done.stderr.strip().splitlines()[-1]
        == f"error: {tmp_path} exists and holds no htcli run: give another OUT=dir"
    )
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_gpu_check_stops_at_once_without_a_gpu(tmp_path):
    """gpu_check.sh on a machine without a GPU: one line (it ran every step to its failure)."""
    environment = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", EXAMPLES / "gpu_check.sh", tmp_path], capture_output=True, text=True, env=environment
    )
    assert done.returncode == 1 and done.stdout == "", done.stdout
    said = f"error: gpu_check.sh needs a CUDA GPU, and torch ({sys.executable}) sees none (or"
    assert done.stderr.strip().splitlines() == [
        f"{said} {sys.executable} has no torch: give PYTHON=.venv/bin/python): run it on a GPU machine"
    ]


def test_decode_profile_runs_on_the_cpu():
    """decode_profile.py times a few decode steps and counts the operations in them."""
    result = subprocess.run(
        [sys.executable, EXAMPLES / "decode_profile.py", "--preset", "tiny", "--prompt-len", "100",
         "--steps", "4", "--device", "cpu", "--batch", "2"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "tiny preset, cpu" in result.stdout and "batch 2" in result.stdout
    assert "ms/step" in result.stdout and "aten ops/step" in result.stdout
    assert "device busy" not in result.stdout  # (it said "nan" on the CPU, where the host's time is all)


def test_step_profile_runs_on_the_cpu():
    """step_profile.py times both models' training steps (as bench --model builds them) and profiles them."""
    result = subprocess.run(
        [sys.executable, EXAMPLES / "step_profile.py", "--preset", "tiny", "--seq-len", "128",
         "--batch-size", "1", "--device", "cpu", "--repeats", "2", "--rows", "3"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "tiny preset, causal, batch 1 x 128, cpu" in result.stdout
    for label in ("H-attention model", "exact-attention model"):
        assert f"{label}: step " in result.stdout
        assert f"{label}, 3 steps, by self_cpu_time_total" in result.stdout


def test_recipe_parts_times_every_variant():
    """recipe_parts.py steps each variant of the recipe in turn and prints its median step time; --only
    picks some (beside the first), and an unknown one is refused."""
    spec = importlib.util.spec_from_file_location("recipe_parts", EXAMPLES / "recipe_parts.py")
    recipe_parts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe_parts)
    command = [sys.executable, EXAMPLES / "recipe_parts.py", "--rounds", "1", "--seq-len", "64"]
    command += ["--warmup", "0"]  # (one step of each variant: the script, not its timings, is tested)
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    lines = result.stdout.splitlines()
    assert len(lines) == len(recipe_parts.VARIANTS) and all("ms/step" in line for line in lines)
    assert "first: " in lines[0] and "(1.000x first)" in lines[0] and "default, AdamW" in result.stdout
    assert "default, torch's Muon" in result.stdout and "default, no token shift" in result.stdout
    only = subprocess.run([*command, "--only", "default, GELU"], capture_output=True, text=True, check=True)
    assert [line.split(":")[0].strip() for line in only.stdout.splitlines()] == ["first", "default, GELU"]
    unknown = subprocess.run([*command, "--only", "defualt"], capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown variants ['defualt']" in unknown.stderr


def test_triton_sweep_runs_in_the_interpreter(tmp_path):
    """triton_sweep.py (a GPU script) checks, times and picks variants; here through Triton's
    interpreter at a tiny size, two variants per kernel and one mode (--mode), so that a GPU session does
    not find it broken."""
    pytest.importorskip("triton")
    out = tmp_path / "tuning.json"
    result = subprocess.run(
        [sys.executable, EXAMPLES / "triton_sweep.py", "--device", "cpu", "--dtype", "fp16",
         "--seq-len", "96", "--batch-size", "1", "--heads", "1", "--dim-head", "16", "--block-size", "16",
         "--variants", "2", "--out", out, "--mode", "causal"],
        capture_output=True, text=True, check=True, env={**os.environ, "TRITON_INTERPRET": "1"},
    )  # fmt: skip
    assert "times summed over modes: causal" in result.stdout
    assert "fastest good setting: HTCLI_TRITON_TUNING=" in result.stdout
    assert set(json.loads(out.read_text())) == {"forward", "dq", "dkdv"}


def test_triton_precision_runs_in_the_interpreter():
    """triton_precision.py (a GPU script) compares the kernels with eager attention and repeats them;
    here through Triton's interpreter at a tiny size."""
    pytest.importorskip("triton")
    result = subprocess.run(
        [sys.executable, EXAMPLES / "triton_precision.py", "--device", "cpu", "--lengths", "64",
         "--dtypes", "fp32,fp16", "--dim-head", "16", "--block-size", "16", "--repeat-shape", "1,2,64"],
        capture_output=True, text=True, check=True, env={**os.environ, "TRITON_INTERPRET": "1"},
    )  # fmt: skip
    assert "n=    64 causal fp16: eager" in result.stdout and "arithmetic: eager" in result.stdout
    assert result.stdout.count("two runs equal; last row alone equal") == 6


def test_long_context_names_its_recipes_and_refuses_unknown_variants(tmp_path):
    """long_context.py: "new-NAME" is NAME with the default recipe, a plain name the first recipe's
    pinned flags, "@SEED" a seed; an unknown name (or seed) stops it before anything trains."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("long_context", EXAMPLES / "long_context.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.recipe_of("new-h-2048-cw90") == ("h-2048-cw90", [])
    assert script.recipe_of("new-h-256@2") == ("h-256", []) and script.seed_of("new-h-256@2") == [
        "--seed",
        "2",
    ]
    assert script.seed_of("h-256") == [] and script.recipe_of("h-256@1")[0] == "h-256"
    base, flags = script.recipe_of("h-256")
    assert base == "h-256" and flags[:2] == ["--optimizer", "adamw"] and "--lr" in flags
    refused = subprocess.run(
        [sys.executable, EXAMPLES / "long_context.py", "corpus", "held", tmp_path / "out", "new-h-9999"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert refused.returncode != 0 and "unknown variant new-h-9999" in refused.stderr
    no_seed = subprocess.run(
        [sys.executable, EXAMPLES / "long_context.py", "corpus", "held", tmp_path / "out", "new-h-256@x"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert no_seed.returncode != 0 and "unknown variant new-h-256@x" in no_seed.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args,said",
    [
        (
            ["long_context.py"],
            "usage: python examples/long_context.py TRAIN_CORPUS HELD_OUT OUT [VARIANT ...]",
        ),
        (["recipe.py"], "usage: python examples/recipe.py CORPUS OUT [VARIANT ...]"),
        (["measure_start.py", "a"], "usage: python examples/measure_start.py CORPUS OUT [NOFILE]"),
        (["sample_and_eval.py", "run"], "usage: python examples/sample_and_eval.py CHECKPOINT PROMPT CORPUS"),
        (["recipe.py", "CORPUS", "OUT", "nosuch"], "error: unknown variant nosuch: choose from first; "),
    ],
)
def test_examples_given_too_little_say_their_usage(tmp_path, args, said):
    """An example run without its arguments ended in a TypeError or IndexError traceback; recipe.py split
    its corpus into OUT before it found a variant name unknown."""
    script, *rest = args
    done = subprocess.run(
        [sys.executable, EXAMPLES / script, *rest], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert done.returncode == 1 and done.stderr.startswith(said), done.stderr
    assert "Traceback" not in done.stderr and list(tmp_path.iterdir()) == []


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="what a machine without a GPU says")
@pytest.mark.parametrize("script", ["step_profile.py", "triton_precision.py", "triton_sweep.py"])
def test_gpu_examples_without_a_gpu_say_so(script):
    """The GPU examples' default device on a machine without one: one line (a traceback before)."""
    done = subprocess.run([sys.executable, EXAMPLES / script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1].startswith(f"{script}: error: ")


@pytest.mark.parametrize("script", ["long_context", "measure_start", "recipe", "sample_and_eval"])
def test_scripts_without_argparse_answer_help(script):
    """--help prints the script's docstring, exit 0 (it was a one-line usage, exit 1)."""
    path = EXAMPLES / f"{script}.py"
    done = subprocess.run([sys.executable, path, "--help"], capture_output=True, text=True)
    doc = ast.get_docstring(ast.parse(path.read_text()), clean=False)
    assert (done.returncode, done.stdout.strip()) == (0, doc.strip()), done.stderr
