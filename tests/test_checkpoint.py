"""Checkpoints: round trips, validation of foreign or damaged files, saves that survive a crash."""

import json
import re

import pytest
import torch
from conftest import TINY_MODEL
from safetensors.torch import save_file

from htcli import __version__, checkpoint
from htcli.checkpoint import load_model, load_training_state, read_checkpoint_info, save_checkpoint
from htcli.errors import HtcliError
from htcli.files import atomic_file
from htcli.model import HTransformer1D, HTransformerConfig
from htcli.runlock import RunLock


def training_state(marker: int) -> dict:
    """A state.json as one process writes it (its sampler's state marked)."""
    rank = {"torch_rng": "cng=", "cuda_rng": None, "sampler": f"sampler-{marker}"}
    return {"world_size": 1, "ranks": [rank], "grad_scaler": {}}


def make_run(out, step: int = 5, seed: int = 0):
    """A model and optimizer with some state, saved in out."""
    torch.manual_seed(seed)
    model = HTransformer1D(HTransformerConfig(**TINY_MODEL))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 256, (1, 16))).sum().backward()
    optimizer.step()
    save_checkpoint(out, model, optimizer, training_state(step), step=step, val_bpb=3.5)
    return model, optimizer


def test_round_trip(tmp_path):
    """Weights, metadata, optimizer state and state.json come back as saved."""
    model, optimizer = make_run(tmp_path)
    loaded, info = load_model(tmp_path)
    for (name, saved), restored in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(saved, restored), name
    assert (info.step, info.val_bpb, info.version, info.config) == (5, 3.5, __version__, model.config)
    _, _, optimizer_state, state = load_training_state(tmp_path)
    fresh = torch.optim.AdamW(loaded.parameters(), lr=1e-3)
    fresh.load_state_dict(optimizer_state)
    saved, restored = optimizer.state_dict()["state"], fresh.state_dict()["state"]
    assert saved.keys() == restored.keys() and len(saved) > 0
    for index in saved:
        assert all(
            torch.equal(saved[index][k], restored[index][k]) for k in ("step", "exp_avg", "exp_avg_sq")
        )
    assert state["ranks"][0]["sampler"] == "sampler-5" and state["step"] == 5


def test_metadata_describes_the_model(tmp_path):
    """model.safetensors alone says what it is: config JSON, version, step, tokenizer, val bpb."""
    make_run(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as opened:
        metadata = opened.metadata()
    assert json.loads(metadata["htcli_config"]) == HTransformerConfig(**TINY_MODEL).to_dict()
    assert (metadata["tokenizer"], metadata["step"], metadata["val_bpb"]) == ("bytes", "5", "3.5")
    assert metadata["htcli_version"] == __version__


@pytest.mark.skipif(torch.cuda.is_available(), reason="what a machine without a GPU says")
def test_load_model_onto_a_device_this_machine_lacks(tmp_path):
    """load_model(run, "cuda") on a machine without one ended in torch's AssertionError; "gpu" in its
    RuntimeError listing twenty device types."""
    make_run(tmp_path)
    for device in ("cuda", "cuda:1", torch.device("cuda")):
        with pytest.raises(HtcliError, match="CUDA was requested but no GPU is available; use device cpu"):
            load_model(tmp_path, device)
    with pytest.raises(HtcliError, match="unknown device 'gpu': use one of auto, cpu, cuda, mps"):
        load_model(tmp_path, "gpu")
    assert next(load_model(tmp_path, "auto")[0].parameters()).device.type == "cpu"


def test_missing_checkpoint(tmp_path):
    """A path without a checkpoint says how to make one."""
    with pytest.raises(HtcliError, match="no checkpoint at .*: train one with `htcli train`"):
        read_checkpoint_info(tmp_path / "nothing")
    with pytest.raises(HtcliError, match="no checkpoint at"):
        read_checkpoint_info(tmp_path)
    # a folder of runs (`runs`): its runs named (it said to train one; review)
    for name in ("b", "a", "c", "d"):
        (tmp_path / "runs" / name).mkdir(parents=True)
        make_run(tmp_path / "runs" / name)
    (tmp_path / "runs" / "notes").mkdir()
    runs = tmp_path / "runs"
    named = f"{runs}/a, {runs}/b, {runs}/c, ..."
    with pytest.raises(
        HtcliError, match=re.escape(f"no checkpoint at {runs}: it holds runs: give one of them ({named})")
    ):
        read_checkpoint_info(runs)
    # a run's directory before its first save: the run is there, its checkpoint is not ("train one" sent
    # users to train a run they had); still training (its lock held), it will save; stopped, it never will
    for name in (".lock", "config.json", "log.jsonl"):
        (tmp_path / name).write_text("{}")
    stopped = "the run in .* has no checkpoint, and no process here trains it .it stopped before its first"
    with pytest.raises(HtcliError, match=stopped):
        read_checkpoint_info(tmp_path)
    lock = RunLock(tmp_path).acquire()
    try:
        with pytest.raises(
            HtcliError, match="the run in .* has saved no checkpoint yet: wait for its first save"
        ):
            read_checkpoint_info(tmp_path)
    finally:
        lock.release()


def test_truncated_and_foreign_files(tmp_path):
    """Truncated or non-safetensors files and safetensors without htcli metadata are refused by name."""
    make_run(tmp_path)
    whole = (tmp_path / "model.safetensors").read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(HtcliError, match="not a readable safetensors file"):
        read_checkpoint_info(truncated)
    text = tmp_path / "notes.safetensors"
    text.write_text("just some notes, not tensors")
    with pytest.raises(HtcliError, match=r"notes.safetensors is not a checkpoint \(not a safetensors file\)"):
        read_checkpoint_info(text)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(HtcliError, match="is not an htcli checkpoint"):
        read_checkpoint_info(foreign)
    # the run's other safetensors file (it was "not an htcli checkpoint")
    with pytest.raises(
        HtcliError, match="optimizer.safetensors is a run's optimizer state, not its weights: give"
    ):
        read_checkpoint_info(tmp_path / "optimizer.safetensors")
    # a run's config.json, state.json or log.jsonl (it was "not a readable safetensors file (... corrupt?)")
    for name in ("config.json", "state.json", "log.jsonl"):
        (tmp_path / name).touch()
        with pytest.raises(
            HtcliError, match=f"{name} is a file of the run in {tmp_path}, not its weights: give"
        ):
            read_checkpoint_info(tmp_path / name)
    unsaved = tmp_path / "unsaved"  # (a run before its first save: it was "truncated or corrupt?")
    for name in (".lock", "config.json", "log.jsonl"):
        (unsaved / name).parent.mkdir(exist_ok=True)
        (unsaved / name).write_text("{}\n")
    with pytest.raises(
        HtcliError,
        match=f"config.json is a file of the run in {unsaved}, not its weights: give the run directory once",
    ):
        read_checkpoint_info(unsaved / "config.json")


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A save killed before its state file is written leaves the previous checkpoint whole."""
    make_run(tmp_path, step=5)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        make_run(tmp_path, step=6, seed=1)
    monkeypatch.undo()
    info, _, _, state = load_training_state(tmp_path)
    assert info.step == state["step"] == 5
    assert not list(tmp_path.glob(".*pending"))


def test_crash_while_renaming_is_finished_on_load(tmp_path, monkeypatch):
    """A save killed between its renames is completed by the next load: every file of the new step."""
    make_run(tmp_path, step=5)
    real_replace = checkpoint.os.replace

    def crash_before_optimizer(src, dst):
        if str(dst).endswith("optimizer.safetensors"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", crash_before_optimizer)
    with pytest.raises(KeyboardInterrupt):
        model, _ = make_run(tmp_path, step=6, seed=1)
    monkeypatch.undo()
    assert read_checkpoint_info(tmp_path).step == 6  # the model file was already renamed: loadable
    info, weights, _, state = load_training_state(tmp_path)
    assert info.step == state["step"] == 6
    assert not list(tmp_path.glob(".*pending"))


@pytest.mark.parametrize("hook", ["_with_context", "safe_open"])
def test_a_save_landing_while_a_checkpoint_is_read_is_not_mixed_in(tmp_path, monkeypatch, hook):
    """A run saving while another process reads its checkpoint (eval, sample, --init-from of a run that
    trains): a save that landed after the metadata was read gave weights of one step under the step and
    val_bpb of the other (10% of loads of a run saving every step; review), and one that landed inside
    safetensors' read (it opens the file again by name for the bytes) gave a good file's bytes under the
    other's header: "damaged". The file opened first is the one read, whatever is renamed over its name.
    (hook: where the save lands: between the two reads, or as the weights' file is opened.)"""
    run, later = tmp_path / "run", tmp_path / "later"
    run.mkdir(), later.mkdir()
    model, _ = make_run(run, step=5)
    make_run(later, step=6, seed=1)
    real, calls = getattr(checkpoint, hook), []

    def save_lands(*args, **kwargs):
        calls.append(1)
        if len(calls) == (1 if hook == "_with_context" else 2):  # (safe_open's first: the metadata)
            checkpoint.os.replace(later / "model.safetensors", run / "model.safetensors")
        return real(*args, **kwargs)

    monkeypatch.setattr(checkpoint, hook, save_lands)
    loaded, info = load_model(run)
    assert read_checkpoint_info(run).step == 6 and info.step == 5  # (the save landed; the step read: 5's)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_atomic_file_keeps_old_content_on_error(tmp_path):
    """An error while writing leaves the old file as it was and no temp file."""
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(path, "w") as file:
        file.write("new, half written")
        raise RuntimeError
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
