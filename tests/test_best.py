"""best.safetensors: the weights of a run's lowest validation bits per byte, kept across resumes."""

import errno
import json
import os
import random
import signal

import torch
from conftest import TINY_FLAGS, assert_user_error, events, invoke, tiny_config
from safetensors.torch import load_file

from htcli import checkpoint
from htcli.checkpoint import load_model, read_checkpoint_info, save_best
from htcli.train import train

# AdamW at a learning rate this high: the val bpb falls, then rises (the best is not the last)
RISING = dict(steps=8, eval_every=1, optimizer="adamw", lr=0.3, warmup=0)


def test_best_weights_are_those_of_the_lowest_val_bpb(corpus, tmp_path):
    """best.safetensors holds the weights of the eval with the lowest val bpb (those of its step's checkpoint,
    bit for bit), with its step and val bpb; an eval that beats every earlier one says so (`best`); eval and
    sample take the file as they take model.safetensors."""
    out, at_step = tmp_path / "run", {}

    def keep_weights(event):
        if event["event"] == "checkpoint":
            at_step[event["step"]] = load_file(str(out / "model.safetensors"))

    result = train(tiny_config(corpus, out, save_every=1, **RISING), on_event=keep_weights)
    scores = [(event["step"], event["val_bpb"], event.get("best", False)) for event in events(out, "eval")]
    lowest = min(scores, key=lambda score: score[1])
    assert lowest[0] < result.step, scores  # (a run whose last eval is not its best)
    assert [best for *_, best in scores] == [bpb < min([s[1] for s in scores[:i]], default=9e9)
                                             for i, (_, bpb, _) in enumerate(scores)]  # fmt: skip
    info = read_checkpoint_info(out / "best.safetensors")
    assert (info.step, info.val_bpb) == lowest[:2] == result.best
    best = load_file(str(out / "best.safetensors"))
    assert all(torch.equal(best[name], at_step[lowest[0]][name]) for name in best)
    assert load_model(out / "best.safetensors")[1].step == lowest[0]
    assert invoke("eval", out / "best.safetensors", corpus, "--device", "cpu").exit_code == 0
    sampled = invoke("sample", out / "best.safetensors", "--max-new-tokens", 5, "--device", "cpu")
    assert sampled.exit_code == 0, sampled.output


def test_the_summary_and_the_eval_lines_say_the_best(corpus, tmp_path):
    flags = [*TINY_FLAGS, "--steps", 8, "--eval-every", 1, "--optimizer", "adamw", "--lr", 0.3]
    result = invoke("train", corpus, *flags, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    best = read_checkpoint_info(tmp_path / "run" / "best.safetensors")
    assert f"{best.val_bpb:.4f} (step {best.step}: best.safetensors)" in result.stdout
    lines = [line for line in result.stderr.splitlines() if "val bpb" in line and line.startswith("step")]
    assert lines[0].endswith("(best so far)") and not lines[-1].endswith("(best so far)"), lines


def test_a_resumed_run_keeps_its_best_as_a_straight_run_does(corpus, tmp_path):
    """Interrupted after its best and resumed: the same best.safetensors as a straight run's, bit for bit."""
    straight = train(tiny_config(corpus, tmp_path / "straight", save_every=3, **RISING))

    def interrupt_at_step_4(event):
        if event["event"] == "step" and event["step"] == 4:
            os.kill(os.getpid(), signal.SIGINT)

    config = tiny_config(corpus, tmp_path / "split", save_every=3, **RISING)
    assert train(config, on_event=interrupt_at_step_4).step == 4
    resumed = train(config, resume=True)
    assert resumed.best == straight.best
    expected, got = (load_file(str(tmp_path / name / "best.safetensors")) for name in ("straight", "split"))
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_a_best_of_steps_past_the_checkpoint_is_dropped_and_another_runs_too(corpus, tmp_path):
    """The weights of a new best wait as a hidden file for the next save, which puts them in place: a crash
    before it (those steps are redone, their log lines dropped) leaves best.safetensors of a step the
    checkpoint has passed, and the redone run's best, log and flags are a straight run's. One that a new
    run finds (a run killed before its first save left it) is removed."""
    straight = train(tiny_config(corpus, tmp_path / "straight", save_every=3, **RISING))
    config = tiny_config(corpus, tmp_path / "split", save_every=3, **RISING)

    def interrupt_at_step_3(event):
        if event["event"] == "step" and event["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    assert train(config, on_event=interrupt_at_step_3).step == 3
    model, _ = load_model(tmp_path / "split")
    save_best(tmp_path / "split", model, step=4, val_bpb=0.5)  # (as a crash after step 4's eval leaves it)
    assert (tmp_path / "split" / ".best.safetensors.next").exists()
    assert train(config, resume=True).best == straight.best
    assert not (tmp_path / "split" / ".best.safetensors.next").exists()
    flags = [
        {e["step"]: e.get("best") for e in events(tmp_path / name, "eval")} for name in ("straight", "split")
    ]
    assert flags[1] == {step: flag for step, flag in flags[0].items() if step != 3}  # (the stop cut step 3's)
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    save_best(fresh, model, step=2, val_bpb=0.4)
    assert train(tiny_config(corpus, fresh, save_every=3, **RISING)).best == straight.best
    # a best.safetensors without a checkpoint is not a run's (a run saves it with one): a copy put there
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "best.safetensors").write_bytes((fresh / "best.safetensors").read_bytes())
    result = invoke("train", corpus, *TINY_FLAGS, "--out", tmp_path / "copy")
    assert_user_error(result, "holds a best.safetensors but no checkpoint (another run's weights, or this")


def test_a_resume_takes_the_best_from_the_log_and_starts_anew_on_another_corpus(corpus, tmp_path):
    """A resume compares its evals with the best logged one, also where best.safetensors is gone (a run of
    an htcli before it, a file removed): a worse eval is not called the best; where the corpus changed
    (another --val: scores that may not compare), the best starts anew."""
    out = tmp_path / "run"
    first = train(tiny_config(corpus, out, save_every=4, **RISING))
    assert first.best is not None and first.best[0] < first.step
    assert json.loads((out / "state.json").read_text())["best"] == list(first.best)
    (out / "best.safetensors").unlink()
    state = json.loads((out / "state.json").read_text())
    del state["best"]  # (a checkpoint of an htcli before the field: the best of the log)
    (out / "state.json").write_text(json.dumps(state))
    resumed = train(tiny_config(corpus, out, save_every=4, **{**RISING, "steps": 10}), resume=True)
    assert resumed.best is None and not (out / "best.safetensors").exists()
    assert not any(event.get("best") for event in events(out, "eval") if event["step"] > 8)
    assert json.loads((out / "state.json").read_text())["best"] == list(first.best)
    held_out = tmp_path / "held.txt"
    held_out.write_bytes(random.Random(0).randbytes(5000))  # (scored far worse than the corpus's val)
    other = tiny_config(corpus, out, save_every=4, val=[str(held_out)], **{**RISING, "steps": 12})
    again = train(other, resume=True)
    scores = {event["step"]: event for event in events(out, "eval") if event["step"] > 10}
    assert scores[11]["best"] and again.best == min(
        ((s, e["val_bpb"]) for s, e in scores.items()), key=lambda x: x[1]
    )
    assert read_checkpoint_info(out / "best.safetensors").step == again.best[0]
    # and the resume after it goes on from that best (not from the old corpus's, which the log holds too)
    then = train(
        tiny_config(corpus, out, save_every=4, val=[str(held_out)], **{**RISING, "steps": 14}), resume=True
    )
    scores = {event["step"]: event["val_bpb"] for event in events(out, "eval") if event["step"] > 10}
    assert then.best == min(scores.items(), key=lambda score: score[1])
    # and so does one of a checkpoint without state.json's best: from the log, since the corpus changed
    state = json.loads((out / "state.json").read_text())
    del state["best"]
    (out / "state.json").write_text(json.dumps(state))
    later = train(
        tiny_config(corpus, out, save_every=4, val=[str(held_out)], **{**RISING, "steps": 16}), resume=True
    )
    scores = {event["step"]: event["val_bpb"] for event in events(out, "eval") if event["step"] > 10}
    assert later.best == min(scores.items(), key=lambda score: score[1])


def test_a_best_that_cannot_be_saved_stops_the_run_in_one_line(corpus, tmp_path, monkeypatch):
    """A full disk at the best weights' save: one line naming it, what is kept and what to do; no file left
    half written (the last checkpoint and the earlier best.safetensors whole)."""
    real, calls = checkpoint.save_file, []

    def full_at_the_second_best(tensors, path, metadata=None):
        if path.endswith(".best.safetensors.next"):
            calls.append(path)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", full_at_the_second_best)
    out = tmp_path / "run"
    flags = [*TINY_FLAGS, "--steps", 4, "--eval-every", 1, "--optimizer", "adamw", "--lr", 0.01]
    result = invoke("train", corpus, *flags, "--out", out, "--save-every", 1)  # (better at every eval)
    said = f"error: cannot save the best weights (step 2) in {out}: No space left on device"
    assert result.exit_code == 1 and result.stderr.strip().splitlines()[-1].startswith(said), result.stderr
    assert read_checkpoint_info(out / "best.safetensors").step == 1
    assert json.loads((out / "state.json").read_text())["step"] == 1
    assert sorted(os.listdir(out)) == sorted(
        ["best.safetensors", "config.json", "log.jsonl", "model.safetensors", "optimizer.safetensors",
         "state.json", ".lock"]
    )  # fmt: skip
