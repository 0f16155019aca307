"""--init-from: a new run that starts from another checkpoint's weights and model (fine-tuning, or going on
at another context length), with a fresh optimizer and schedule."""

import json
import shutil

import pytest
import torch
from conftest import TINY_MODEL, assert_user_error, events, invoke, make_text, tiny_config
from safetensors.torch import load_file

from htcli.errors import HtcliError
from htcli.presets import model_config
from htcli.train import Run, train

# train's flags without model options: the model comes from the checkpoint
FLAGS = ["--batch-size", 2, "--eval-batches", 1, "--warmup", 0, "--sample-every", 0, "--device", "cpu"]


@pytest.fixture
def source(corpus, tmp_path):
    """A trained tiny run (3 steps) to start from, and a second corpus to fine-tune on."""
    train(tiny_config(corpus, tmp_path / "source", steps=3))
    other = tmp_path / "other.txt"
    other.write_bytes(make_text(20_000, seed=1))
    return tmp_path / "source", other


@pytest.mark.parametrize("context", [64, 128])
def test_a_new_run_starts_with_the_checkpoints_weights(source, tmp_path, context):
    """The model of a run that starts from a checkpoint holds its weights, at its own context or another."""
    run_dir, other = source
    model = model_config("tiny", **{**TINY_MODEL, "max_seq_len": context})
    config = tiny_config(other, tmp_path / "new", model=model, init_from=str(run_dir))
    run = Run(config, resume=False)
    try:
        weights = load_file(str(run_dir / "model.safetensors"))
        mine = run.model.state_dict()
        assert weights.keys() <= mine.keys()
        assert all(torch.equal(mine[name], weights[name]) for name in weights)
        assert run.model.config.max_seq_len == context
    finally:
        run.close()
    fresh = Run(tiny_config(other, tmp_path / "fresh", model=model), resume=False)  # (without: random)
    try:
        assert not torch.equal(fresh.model.state_dict()["token_emb.weight"], weights["token_emb.weight"])
    finally:
        fresh.close()


def test_a_run_started_from_a_checkpoint_resumes_exactly(source, tmp_path):
    """Stopped after 2 steps and resumed to 4 (from its own checkpoint, not init_from's): the weights and
    losses of 4 steps straight; its start event names the checkpoint it started from, the resume's none."""
    run_dir, other = source
    straight = tiny_config(other, tmp_path / "straight", steps=4, init_from=str(run_dir))
    train(straight)
    split = tiny_config(other, tmp_path / "split", steps=2, init_from=str(run_dir))
    train(split)
    train(tiny_config(other, tmp_path / "split", steps=4, init_from=str(run_dir)), resume=True)
    expected, got = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("straight", "split"))
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    losses = [[e["loss"] for e in events(tmp_path / name, "step")] for name in ("straight", "split")]
    assert losses[0] == losses[1]
    starts = events(tmp_path / "split", "start")
    assert starts[0]["init_from"] == str(run_dir / "model.safetensors") and starts[0]["init_step"] == 3
    assert "init_from" not in starts[1]


def test_the_command_line_takes_the_checkpoints_model(source, tmp_path):
    """Without model options the new run's model is the checkpoint's (--seq-len may change it); the start
    line says where its weights come from; config.json keeps init_from."""
    run_dir, other = source
    out = tmp_path / "new"
    result = invoke(
        "train", other, "--init-from", run_dir, "--out", out, "--steps", 2, "--seq-len", 128, *FLAGS
    )
    assert result.exit_code == 0, result.output
    assert f"training from {run_dir / 'model.safetensors'} (its step 3)" in result.stderr
    theirs = json.loads((run_dir / "config.json").read_text())["model"]
    mine = json.loads((out / "config.json").read_text())
    assert mine["model"] == {**theirs, "max_seq_len": 128}
    assert mine["init_from"] == str(run_dir)
    best = invoke("train", other, "--init-from", run_dir / "best.safetensors", "--out", tmp_path / "b",
                  *FLAGS, "--steps", 1)  # fmt: skip
    assert best.exit_code == 0 and "(its step 3)" in best.stderr, best.output
    printed = invoke("train", other, "--init-from", run_dir, "--out", tmp_path / "p", "--print-config")
    assert f'init-from = "{run_dir}"' in printed.stdout and "dim = 32" in printed.stdout


def test_what_a_run_started_from_a_checkpoint_refuses(source, tmp_path):
    """Another model than the checkpoint's, a preset, a path that holds no checkpoint, another init_from on a
    resume: one line each, and nothing written."""
    run_dir, other = source
    out = tmp_path / "new"
    start = ["train", other, "--out", out, "--steps", 2, *FLAGS]
    result = invoke(*start, "--init-from", run_dir, "--dim", 16)
    assert_user_error(result, "holds a model of --dim 32 (this run's: 16): a run that starts from it keeps")
    assert "drop --dim" in result.stderr and not out.exists()
    result = invoke(*start, "--init-from", run_dir, "--preset", "tiny")
    assert_user_error(
        result, f"a run that starts from --init-from takes its model ({run_dir}'s): drop --preset"
    )
    result = invoke(*start, "--init-from", tmp_path / "nothing")
    assert_user_error(result, f"--init-from {tmp_path / 'nothing'} does not exist: give a run directory")
    result = invoke(*start, "--init-from", other)
    assert_user_error(result, f"--init-from: {other} is not a checkpoint")
    result = invoke(*start, "--init-from", run_dir / "optimizer.safetensors")
    assert_user_error(result, "is a run's optimizer state, not its weights")
    assert not out.exists()
    assert invoke(*start, "--init-from", run_dir).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    result = invoke("train", "--out", out, "--resume", "--steps", 4, "--init-from", tmp_path / "source2")
    assert_user_error(result, "a resumed run goes on from its own checkpoint's weights (--init-from was")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_a_requeue_may_spell_the_checkpoints_path_another_way(source, tmp_path):
    """`--resume auto` run again with the path as src/, through .., or through a link: the same checkpoint,
    resumed (it said "drop --init-from"); a blank path is said to name no checkpoint."""
    run_dir, other = source
    (tmp_path / "link").symlink_to(run_dir)
    out = tmp_path / "new"
    spellings = [f"{run_dir}/", run_dir, tmp_path / "x" / ".." / "source", tmp_path / "link"]
    for steps, spelling in enumerate(spellings, start=1):
        result = invoke("train", other, "--init-from", spelling, "--resume", "auto", "--out", out, *FLAGS,
                        "--steps", steps)  # fmt: skip
        assert result.exit_code == 0, result.output
    assert [e["step"] for e in events(out, "start")] == [0, 1, 2, 3]
    result = invoke("train", other, "--init-from", "  ", "--out", tmp_path / "blank", *FLAGS)
    assert_user_error(result, "--init-from must name a checkpoint (a run directory or a .safetensors file)")


def test_what_the_messages_of_a_run_started_from_a_checkpoint_name(source, tmp_path):
    """A checkpoint in a folder named like rich's markup (sweep[lr=3e-3], [/x]) is named as it is on the start
    line (the first lost its brackets, the second was a traceback); exact attention asked of an H-model's
    checkpoint names the attention, not the level decay it derives; another init_from given to the resume
    of a run that began from random weights says so (it said "init_from was None")."""
    run_dir, other = source
    for name in ("sweep[lr=3e-3]", "odd[/x]"):
        moved = shutil.copytree(run_dir, tmp_path / name)
        result = invoke("train", other, "--init-from", moved, "--out", tmp_path / f"from-{len(name)}", *FLAGS,
                        "--steps", 1)  # fmt: skip
        assert result.exit_code == 0, result.output
        assert f"training from {moved / 'model.safetensors'} (its step 3)" in result.stderr
    result = invoke("train", other, "--init-from", run_dir, "--out", tmp_path / "x", "--attention", "exact")
    assert_user_error(result, "holds a model of --attention h (this run's: exact): a run that starts")
    result = invoke("train", "--out", run_dir, "--resume", "--steps", 9, "--init-from", tmp_path / "y")
    assert_user_error(result, "own checkpoint's weights (it began with random ones): drop --init-from")


def test_a_model_field_train_has_no_flag_for_is_named_as_the_config_file_key(source, tmp_path):
    """ff_mult is set only in a --config file: the refusal named it `--ff-mult`, a flag train does not have;
    it is named as the file's key, the flags beside it as flags."""
    run_dir, other = source
    config = tmp_path / "run.toml"
    config.write_text("ff-mult = 2\n")
    result = invoke(
        "train", other, "--init-from", run_dir, "--out", tmp_path / "x", "--config", config, *FLAGS
    )
    assert_user_error(result, "--init-from ")
    assert "holds a model of ff-mult 4 (this run's: 2)" in result.stderr and "drop ff-mult" in result.stderr
    assert "--ff-mult" not in result.stderr


def test_the_library_errors_name_what_they_say(source, tmp_path):
    """A model that differs from the checkpoint's in more fields than the message shows lists as fields only
    those it names (it listed block_size too, unnamed); a model option model_config does not know is said so,
    with the known ones (it was Python's "unexpected keyword argument")."""
    run_dir, other = source
    model = model_config(
        "tiny", **{**TINY_MODEL, "dim": 64, "depth": 2, "heads": 4, "dim_head": 8, "block_size": 16}
    )
    with pytest.raises(HtcliError) as refused:
        Run(tiny_config(other, tmp_path / "new", model=model, init_from=str(run_dir)), resume=False)
    named = [field for field in refused.value.fields if field not in ("init_from", "max_seq_len")]
    assert named == ["dim", "depth", "heads", "dim_head"] and all(
        name in str(refused.value) for name in named
    )
    with pytest.raises(
        HtcliError, match="dimm is not a model option: the model's are num_tokens, dim, depth"
    ):
        model_config("tiny", dimm=3)
