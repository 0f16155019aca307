"""--patience: a run stops early (saving) once that many evals in a row have not beaten its best."""

import json

from conftest import TINY_FLAGS, assert_user_error, events, invoke, tiny_config
from safetensors.torch import load_file

from htcli.checkpoint import read_checkpoint_info
from htcli.train import train

# AdamW at a learning rate this high, held constant (min_lr = lr: a schedule that does not depend on the
# steps asked): the val bpb falls, then rises
RISING = dict(eval_every=1, optimizer="adamw", lr=0.3, min_lr=0.3, warmup=0, save_every=1000)


def test_a_run_stops_once_patience_evals_have_not_beaten_its_best(corpus, tmp_path):
    """It stops right after the patience-th eval that is no better than the best, saves that step, says so
    (an early_stop event, the end event's stopped_early, state.json's count) and keeps the best's weights."""
    out = tmp_path / "run"
    result = train(tiny_config(corpus, out, steps=40, patience=2, **RISING))
    assert result.stopped_early and not result.interrupted and result.step < 40
    evals = events(out, "eval")
    assert [e.get("best", False) for e in evals[-3:]] == [True, False, False]
    assert evals[-3]["val_bpb"] == min(e["val_bpb"] for e in evals)  # (the best of the run)
    stop = events(out, "early_stop")
    assert len(stop) == 1 and stop[0]["step"] == evals[-1]["step"] == result.step
    assert (stop[0]["best_step"], stop[0]["evals_since_best"]) == (evals[-3]["step"], 2)
    assert events(out, "end")[-1]["stopped_early"] is True
    assert read_checkpoint_info(out).step == result.step  # (saved at the stop)
    assert read_checkpoint_info(out / "best.safetensors").step == evals[-3]["step"] == result.best[0]
    assert json.loads((out / "state.json").read_text())["evals_since_best"] == 2


def test_the_count_goes_on_across_a_resume(corpus, tmp_path):
    """Ended one step before it would have stopped early, then resumed: it stops at the same step with the
    same weights as the run that went straight (the count was kept in state.json)."""
    straight = train(tiny_config(corpus, tmp_path / "straight", steps=40, patience=2, **RISING))
    first = train(tiny_config(corpus, tmp_path / "split", steps=straight.step - 1, patience=2, **RISING))
    assert not first.stopped_early
    resumed = train(tiny_config(corpus, tmp_path / "split", steps=40, patience=2, **RISING), resume=True)
    assert resumed.stopped_early and resumed.step == straight.step
    expected, got = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("straight", "split"))
    assert all(expected[name].equal(got[name]) for name in expected)


def test_a_run_that_stopped_early_resumes_to_nothing_unless_given_more_patience(corpus, tmp_path):
    """Resumed with its patience (a requeued job): it trains nothing and says it stopped early again, its
    files as they were; with patience 0 it trains on to its steps."""
    out = tmp_path / "run"
    stopped = train(tiny_config(corpus, out, steps=40, patience=2, **RISING))
    weights = (out / "model.safetensors").read_bytes()
    again = train(tiny_config(corpus, out, steps=40, patience=2, **RISING), resume=True)
    assert again.stopped_early and again.step == stopped.step and again.tokens == 0
    assert (out / "model.safetensors").read_bytes() == weights
    assert len(events(out, "early_stop")) == 2
    on = train(tiny_config(corpus, out, steps=stopped.step + 3, patience=0, **RISING), resume=True)
    assert on.step == stopped.step + 3 and not on.stopped_early


def test_the_command_line_of_patience(corpus, tmp_path):
    flags = [
        *TINY_FLAGS,
        "--steps",
        40,
        "--eval-every",
        1,
        "--optimizer",
        "adamw",
        "--lr",
        0.3,
        "--min-lr",
        0.3,
    ]
    result = invoke("train", corpus, *flags, "--patience", 2, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output
    assert "evals in a row have not beaten the best" in result.stderr
    assert "training run, stopped early (patience)" in result.stdout
    assert "--patience 0 (or a larger one)" in result.stderr
    result = invoke("train", corpus, *flags, "--patience", 2, "--eval-every", 0, "--out", tmp_path / "no")
    assert_user_error(result, "--patience counts the evals that do not beat the best, and --eval-every 0")
    assert not (tmp_path / "no").exists()


def test_an_early_stop_a_crash_left_past_the_checkpoint_is_dropped_at_the_resume(corpus, tmp_path):
    """The early_stop event is logged before the save it makes: one that a crash left after the checkpoint
    is dropped with that step's other events when the run resumes (it is redone, or not)."""
    out = tmp_path / "run"
    train(tiny_config(corpus, out, steps=4, patience=5, **RISING))
    with (out / "log.jsonl").open("a") as log:
        for event in ({"event": "step", "step": 5}, {"event": "early_stop", "step": 5}):
            log.write(json.dumps(event) + "\n")
    train(tiny_config(corpus, out, steps=5, patience=5, **RISING), resume=True)
    assert events(out, "early_stop") == [] and [e["step"] for e in events(out, "step")] == [1, 2, 3, 4, 5]


def test_a_run_that_ended_at_its_steps_trains_on_when_given_more(corpus, tmp_path):
    """A run whose last evals did not beat its best but which ended at its steps (the last step does not stop
    early) is resumed with more steps: it trains on, its count going on, and stops at its next eval (it said
    it had stopped early and trained nothing)."""
    straight = train(tiny_config(corpus, tmp_path / "straight", steps=40, patience=2, **RISING))
    out = tmp_path / "run"
    ended = train(tiny_config(corpus, out, steps=straight.step, patience=2, **RISING))
    assert not ended.stopped_early
    resumed = train(tiny_config(corpus, out, steps=40, patience=2, **RISING), resume=True)
    assert resumed.stopped_early and resumed.step == straight.step + 1
