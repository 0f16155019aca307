"""Training: schedule, config checks, exact resume, Ctrl-C, divergence, logs, no overwriting."""

import json
import os
import signal

import pytest
import torch
from conftest import events, nan_loss_at_step, tiny_config
from safetensors.torch import load_file

from htcli import device
from htcli import train as train_module
from htcli.checkpoint import CHECKSUM, read_checkpoint_info
from htcli.config import TrainConfig, config_from_options
from htcli.device import cpu_multiplies_bf16, resolve_dtype
from htcli.errors import HtcliError
from htcli.model import HTransformer1D
from htcli.optim import learning_rate
from htcli.presets import model_config
from htcli.train import train
from htcli.train_step import optimizer_step


def weights(out) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def test_learning_rate_schedule():
    """Linear warmup to lr, then cosine decay reaching min_lr at the last step."""
    config = TrainConfig(corpus=["x"], steps=11, warmup=2, lr=1.0, min_lr=0.1)
    rates = [learning_rate(step, config) for step in range(11)]
    assert rates[:3] == [0.5, 1.0, 1.0]
    assert rates[-1] == pytest.approx(0.1)
    assert rates[6] == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(rates[1:], rates[2:]))


@pytest.mark.parametrize("sizes", [[4, 4], [6, 2], [1, 4, 3]])
def test_micro_batches_update_as_one_batch(sizes):
    """Every byte weighs alike however a step's windows are split into micro-batches (a split of 6 and 2
    weighed each half alike: an update 65% off one batch's)."""
    torch.manual_seed(0)
    model = HTransformer1D(model_config("tiny", max_seq_len=64))
    windows = torch.randint(0, 256, (8, 65))

    def update(batches):
        copy = HTransformer1D(model.config)
        copy.load_state_dict(model.state_dict())
        optimizer = torch.optim.SGD(copy.parameters(), lr=1.0)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        loss, _ = optimizer_step(copy, optimizer, scaler, batches, 0.0, torch.device("cpu"), torch.float32)
        pairs = zip(copy.parameters(), model.parameters())
        return loss, torch.cat([(new - old).flatten() for new, old in pairs])

    whole_loss, whole = update([windows])
    loss, split = update(list(windows.split(sizes)))
    assert loss == pytest.approx(whole_loss, abs=1e-6)
    assert torch.allclose(split, whole, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(steps=0), "steps must be a positive integer"),
        (dict(batch_size=-1), "batch_size must be a positive integer"),
        (dict(lr=0.0), "lr must be a positive number"),
        (dict(lr=1e-3, min_lr=1e-2), "min_lr must be between 0 and lr"),
        (dict(val_fraction=1.5), "val_fraction must be above 0 and below 1"),
        (dict(device="tpu"), "unknown device 'tpu'"),
        (dict(corpus=[]), "no corpus given"),
        (dict(model=None), "model must be an HTransformerConfig .*got NoneType"),  # (an AttributeError)
    ],
)
def test_config_validation(options, message):
    """Impossible training options are refused with the field's name, which the error lists."""
    with pytest.raises(HtcliError, match=message) as raised:
        TrainConfig(**{"corpus": ["x"], **options})
    assert set(raised.value.fields) <= set(TrainConfig.__dataclass_fields__)


@pytest.mark.parametrize(
    "visible,advice",
    [
        (None, "CUDA_VISIBLE_DEVICES=1"),
        ("2,3", "CUDA_VISIBLE_DEVICES=3"),
        # (not a GPU to name: past the list, after an empty entry, where CUDA stops reading it; review)
        ("0", r"CUDA_VISIBLE_DEVICES \(it is '0' here\) in"),
        ("2,,3", r"CUDA_VISIBLE_DEVICES \(it is '2,,3' here\) in"),
        ("-1,2", r"CUDA_VISIBLE_DEVICES \(it is '-1,2' here\) in"),
    ],
)
def test_one_gpu_of_several_is_chosen_by_cuda_visible_devices(monkeypatch, visible, advice):
    """device cuda:1 (torch's name of the second GPU it sees) is refused with the CUDA_VISIBLE_DEVICES that
    shows that GPU alone: where it is set, its entry (cuda:1 with 2,3 set is GPU 3; review)."""
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    with pytest.raises(HtcliError, match=f"unknown device 'cuda:1': give device cuda, .*{advice}"):
        TrainConfig(corpus=["x"], device="cuda:1")
    with pytest.raises(HtcliError, match="unknown device 'cuda:١': use one of"):  # (digits of another script)
        TrainConfig(corpus=["x"], device="cuda:١")


def test_an_on_event_that_is_not_a_function_is_refused_before_anything_is_written(corpus, tmp_path):
    """train(on_event=5) was a TypeError after the run directory, its lock, config.json and log.jsonl were
    made."""
    with pytest.raises(HtcliError, match="on_event must be a function of one event .a dict., got int"):
        train(tiny_config(corpus, tmp_path / "run"), on_event=5)
    assert not (tmp_path / "run").exists()


def test_impossible_model_options_name_the_fields(tmp_path):
    """A block size that does not divide the sequence length is reported in the config's terms."""
    with pytest.raises(
        HtcliError, match=r"max_seq_len \(100\) must be a multiple of block_size \(16\)"
    ) as raised:
        config_from_options(["c.txt"], out=str(tmp_path), preset="tiny", max_seq_len=100)
    assert set(raised.value.fields) == {"max_seq_len", "block_size"}


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_interrupted_and_resumed_run_equals_one_run(corpus, tmp_path, optimizer):
    """6 steps in one run == 3 steps, a Ctrl-C (SIGINT), and a resume to 6: bitwise equal weights
    (Muon's momentum and AdamW's moments saved and restored exactly)."""
    whole = train(tiny_config(corpus, tmp_path / "whole", optimizer=optimizer))
    assert whole.step == 6 and not whole.interrupted

    def interrupt_at_step_3(event):
        if event["event"] == "step" and event["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)

    config = tiny_config(corpus, tmp_path / "split", save_every=0, eval_every=2, optimizer=optimizer)
    first = train(config, on_event=interrupt_at_step_3)
    assert first.interrupted and first.step == 3
    assert json.loads((tmp_path / "split" / "state.json").read_text())["step"] == 3
    second = train(config, resume=True)
    assert second.step == 6 and not second.interrupted
    expected, got = weights(tmp_path / "whole"), weights(tmp_path / "split")
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    assert second.train_loss == whole.train_loss


def test_a_stop_that_waits_for_a_slow_step_is_said_at_once(corpus, tmp_path, monkeypatch):
    """A Ctrl-C that the loop cannot take for a while (a slow step: here the step event's handler, 2 s) gets a
    "stopping" event once it has waited NOTICE_AFTER seconds, from another thread, before the step ends and
    the "interrupt" event; it is not logged. A Ctrl-C the loop takes at once gets none (nor any SIGHUP)."""
    import threading
    import time

    from htcli import stop as stop_module

    monkeypatch.setattr(stop_module, "NOTICE_AFTER", 0.2)
    seen = []

    def slow_after_a_ctrl_c(event):
        seen.append((event, threading.current_thread() is threading.main_thread()))
        if event["event"] == "step" and event["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(2)

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # (a second Ctrl-C would quit)
    try:
        result = train(tiny_config(corpus, tmp_path / "slow", save_every=0), on_event=slow_after_a_ctrl_c)
    finally:
        signal.signal(signal.SIGINT, previous)
    kinds = [event["event"] for event, _ in seen]
    assert result.interrupted and result.step == 2
    assert kinds.count("stopping") == 1
    assert kinds.index("step") < kinds.index("stopping") < kinds.index("interrupt")
    stopping, in_main_thread = seen[kinds.index("stopping")]
    assert stopping == {"event": "stopping", "step": 2, "signal": "SIGINT", "again_quits": True}
    assert not in_main_thread
    assert events(tmp_path / "slow", "stopping") == [] and len(events(tmp_path / "slow", "interrupt")) == 1

    monkeypatch.setattr(stop_module, "NOTICE_AFTER", 1.0)
    seen.clear()

    def quick_ctrl_c(event):
        seen.append((event, True))
        if event["event"] == "step" and event["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    assert train(tiny_config(corpus, tmp_path / "quick", save_every=0), on_event=quick_ctrl_c).interrupted
    time.sleep(1.2)  # (a notice would have come by now)
    assert "stopping" not in [event["event"] for event, _ in seen]


def rewrite_optimizer_groups(out, change) -> None:
    """Rewrite out's optimizer.safetensors with change(group) applied to every saved parameter group."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(out / "optimizer.safetensors"), "pt") as opened:
        metadata = opened.metadata()
        tensors = {name: opened.get_tensor(name) for name in opened.keys()}  # noqa: SIM118
    del metadata[CHECKSUM]  # (written by hand: with no checksum, as by htcli before it)
    groups = json.loads(metadata["param_groups"])
    metadata["param_groups"] = json.dumps([change(group) for group in groups])
    save_file(tensors, str(out / "optimizer.safetensors"), metadata=metadata)


def test_resume_takes_hyperparameters_from_the_config_not_the_optimizer_file(corpus, tmp_path):
    """The optimizer file gives a resume its moments and step counts only: hyperparameters edited in
    the file (nonsense ones included) are ignored, and a resume that changes weight_decay uses the new
    value (as a changed lr does through the schedule), where torch's load_state_dict would keep the file's."""
    train(tiny_config(corpus, tmp_path / "whole"))
    whole = weights(tmp_path / "whole")
    split = tiny_config(corpus, tmp_path / "split", steps=3)
    train(split)
    saved = {p.name: p.read_bytes() for p in (tmp_path / "split").iterdir() if p.is_file()}
    rewrite_optimizer_groups(
        tmp_path / "split",
        lambda g: {**g, "weight_decay": 123.0, "momentum": None, "ns_steps": "5", "betas": [2, 2], "eps": -1},
    )
    train(tiny_config(corpus, tmp_path / "split", steps=6), resume=True)
    got = weights(tmp_path / "split")
    assert all(torch.equal(whole[name], got[name]) for name in whole)

    for name, content in saved.items():  # back to step 3, then resume with another weight decay
        (tmp_path / "split" / name).write_bytes(content)
    train(tiny_config(corpus, tmp_path / "split", steps=6, weight_decay=0.5), resume=True)
    changed = weights(tmp_path / "split")
    assert not all(torch.equal(whole[name], changed[name]) for name in whole)


def test_resume_after_a_crash_logs_each_step_once(corpus, tmp_path):
    """A crash after the checkpoint of step 4 leaves step 5 in log.jsonl; the resume redoes it once."""
    run = tmp_path / "run"

    def crash_at_step_5(event):
        if event["event"] == "step" and event["step"] == 5:
            raise RuntimeError("power cut")

    config = tiny_config(corpus, run, save_every=2, eval_every=1)
    with pytest.raises(RuntimeError, match="power cut"):
        train(config, on_event=crash_at_step_5)
    with open(run / "log.jsonl", "a") as log:
        log.write('{"event": "step", "st')  # a line torn by the crash
    train(config, resume=True)
    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3, 4, 5, 6]
    assert [e["step"] for e in events if e["event"] == "eval"] == [1, 2, 3, 4, 5, 6]
    assert [e["resumed"] for e in events if e["event"] == "start"] == [False, True]


def test_log_and_config_files(corpus, tmp_path):
    """log.jsonl has one line per step and per evaluation; config.json holds the resolved config."""
    run = tmp_path / "run"
    config = tiny_config(corpus, run)
    result = train(config)
    events = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3, 4, 5, 6]
    # the summary's time in steps is the steps' own (as the live view's tokens/s), not evaluation's and saves'
    in_steps = sum(e["step_seconds"] for e in events if e["event"] == "step")
    assert result.step_seconds == pytest.approx(in_steps) and 0 < in_steps < result.seconds
    assert [e["step"] for e in events if e["event"] == "eval"] == [3, 6]
    assert all(e["val_bpb"] > 0 for e in events if e["event"] == "eval")
    saved = json.loads((run / "config.json").read_text())
    assert TrainConfig.from_dict({k: v for k, v in saved.items() if k != "htcli_version"}) == config
    assert saved["min_lr"] == pytest.approx(config.lr / 10)
    # the parameters counted are those trained (rotary's frequencies, a frozen parameter, were counted)
    model = HTransformer1D(config.model)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trained < sum(p.numel() for p in model.parameters())
    assert [e["params"] for e in events if e["event"] == "start"] == [trained]


@pytest.mark.parametrize(("amx", "avx512_bf16"), [(True, False), (False, True), (False, False)])
def test_auto_dtype_trains_in_bf16_on_a_cpu_that_multiplies_it(
    corpus, tmp_path, monkeypatch, amx, avx512_bf16
):
    """dtype auto trains under bf16 autocast on a CPU with AMX or AVX-512 BF16 (7-37% faster steps
    measured), in fp32 on one without; sampling and evaluation on a CPU stay fp32 either way."""
    run = tmp_path / "run"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_init_amx", lambda: amx)  # (its own check, in C++, on a CPU without AMX)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    hardware = amx or avx512_bf16
    assert cpu_multiplies_bf16() is hardware
    train(tiny_config(corpus, run))
    assert [e["dtype"] for e in events(run, "start")] == ["bf16" if hardware else "fp32"]
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("fp32", torch.device("cpu"), training=True) == torch.float32


@pytest.mark.parametrize(
    ("amx_before", "amx_after", "old_state"),
    [(False, True, False), (True, False, False), (False, True, True)],
)
def test_resume_with_auto_dtype_goes_on_in_the_precision_it_began(
    corpus, tmp_path, monkeypatch, amx_before, amx_after, old_state
):
    """dtype auto: a run begun in fp32 (a CPU without AMX, or htcli before auto meant bf16 on one: its
    state.json names no dtype) and resumed where auto means bf16 goes on in fp32, bitwise as one run; one
    begun in bf16 goes on in bf16 anywhere."""
    monkeypatch.setattr(device, "cpu_multiplies_bf16", lambda: amx_before)
    whole = train(tiny_config(corpus, tmp_path / "whole"))
    config = tiny_config(corpus, tmp_path / "split", save_every=0)
    assert train(config, on_event=interrupt_at(3)).step == 3
    if old_state:
        state = json.loads((tmp_path / "split" / "state.json").read_text())
        (tmp_path / "split" / "state.json").write_text(
            json.dumps({k: v for k, v in state.items() if k != "dtype"})
        )
    monkeypatch.setattr(device, "cpu_multiplies_bf16", lambda: amx_after)
    assert train(config, resume=True).train_loss == whole.train_loss
    expected, got = weights(tmp_path / "whole"), weights(tmp_path / "split")
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    assert [e["dtype"] for e in events(tmp_path / "split", "start")] == ["bf16" if amx_before else "fp32"] * 2
    products = json.loads((tmp_path / "split" / "state.json").read_text())["muon_products"]
    assert products == ("bf16" if amx_before else "fp32")  # (Muon's, as it began)
    assert [e["muon_products"] for e in events(tmp_path / "split", "start")] == [products] * 2


def interrupt_at(step: int):
    """An on_event callback that sends this process a SIGINT (Ctrl-C) at a step's event."""

    def interrupt(event):
        if event["event"] == "step" and event["step"] == step:
            os.kill(os.getpid(), signal.SIGINT)

    return interrupt


def test_a_stop_cuts_a_validation_short_and_saves(corpus, tmp_path):
    """A Ctrl-C at a step whose validation is due: the validation stops at its next batch (it ran to its
    end, 5 s of 300 batches in a review: longer than a scheduler's grace period on a large model), no eval
    is logged for that step, and the step is saved with no val bpb; the resumed run equals one whole run."""
    config = tiny_config(corpus, tmp_path / "split", eval_batches=50, save_every=0)
    result = train(config, on_event=interrupt_at(3))
    assert (result.step, result.interrupted, result.val_bpb) == (3, True, None)
    assert [e["step"] for e in events(tmp_path / "split", "eval")] == []
    assert events(tmp_path / "split", "checkpoint")[-1]["step"] == 3
    assert read_checkpoint_info(tmp_path / "split").val_bpb is None
    train(config, resume=True)
    train(tiny_config(corpus, tmp_path / "whole", eval_batches=50, save_every=0))
    assert [e["step"] for e in events(tmp_path / "split", "eval")] == [6]
    vals = [[e["val_bpb"] for e in events(tmp_path / run, "eval")] for run in ("split", "whole")]
    assert vals[0] == vals[1][1:]
    expected, got = weights(tmp_path / "whole"), weights(tmp_path / "split")
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_a_stop_keeps_the_last_val_bpb_and_the_last_validation(corpus, tmp_path):
    """A stop that cuts a validation short leaves the last val bpb as it was (it became None: the summary,
    the end event and the checkpoint lost it); one at the last step leaves that validation whole: it is
    the run's result, which no resume could redo (the run is at its last step)."""
    config = tiny_config(corpus, tmp_path / "run", steps=9, eval_every=3, save_every=0)
    result = train(config, on_event=interrupt_at(6))
    evals = events(tmp_path / "run", "eval")
    assert [e["step"] for e in evals] == [3] and result.val_bpb == evals[0]["val_bpb"] is not None
    assert read_checkpoint_info(tmp_path / "run").val_bpb == evals[0]["val_bpb"]
    last = train(config, resume=True, on_event=interrupt_at(9))
    assert [e["step"] for e in events(tmp_path / "run", "eval")] == [3, 9] and last.step == 9
    assert last.val_bpb == events(tmp_path / "run", "eval")[-1]["val_bpb"]


def test_a_run_saved_before_muon_precision_was_recorded_goes_on_in_bf16(corpus, tmp_path, monkeypatch):
    """Runs saved before state.json named Muon's precision made its products in bf16 on every device:
    resumed, one goes on in bf16, bitwise as one run, also where a new run would take fp32."""
    monkeypatch.setattr(train_module, "newton_schulz_dtype", lambda device: torch.bfloat16)
    train(tiny_config(corpus, tmp_path / "whole"))
    config = tiny_config(corpus, tmp_path / "split", save_every=0)
    assert train(config, on_event=interrupt_at(3)).step == 3
    state = json.loads((tmp_path / "split" / "state.json").read_text())
    assert state.pop("muon_products") == "bf16"
    monkeypatch.setattr(train_module, "newton_schulz_dtype", lambda device: torch.float32)
    (tmp_path / "split" / "state.json").write_text(json.dumps({**state, "muon_products": "fp16"}))
    with pytest.raises(HtcliError, match="state.json names Muon's precision 'fp16', not bf16 or fp32"):
        train(config, resume=True)
    (tmp_path / "split" / "state.json").write_text(json.dumps(state))
    train(config, resume=True)
    expected, got = weights(tmp_path / "whole"), weights(tmp_path / "split")
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_the_start_line_names_muons_precision_where_it_is_not_the_dtype(corpus, tmp_path, monkeypatch):
    """--dtype fp32 on a CPU that multiplies bf16 in hardware: Muon's products stay bf16 (as torch's Muon's),
    which only log.jsonl said; the start line says so too (review). Where they are the dtype, nothing."""
    from conftest import TINY_FLAGS, invoke

    monkeypatch.setattr(device, "cpu_multiplies_bf16", lambda: True)
    for dtype, shown in (("fp32", "(fp32; Muon's products bf16)"), ("bf16", "(bf16),")):
        run = invoke("train", corpus, *TINY_FLAGS, "--steps", 1, "--dtype", dtype, "--out", tmp_path / dtype)
        assert run.exit_code == 0 and f"parameters on cpu {shown}" in run.stderr, run.output


def test_cpu_bf16_detection_without_torchs_check(monkeypatch):
    """A torch without its private AMX and AVX-512 BF16 checks means neither (auto stays fp32), not a
    crash."""
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert not cpu_multiplies_bf16()
    assert resolve_dtype("auto", torch.device("cpu"), training=True) == torch.float32


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_divergence_stops_and_keeps_the_last_checkpoint(corpus, tmp_path, monkeypatch, dtype):
    """A NaN loss stops training with a clear message (fp32 advised only where it is not the dtype); the
    checkpoint of the last save stays intact."""
    run = tmp_path / "run"
    nan_loss_at_step(monkeypatch, 5)
    diverged = r"training diverged at step 5 .*checkpoint of step 3 .* is intact"
    with pytest.raises(HtcliError, match=diverged) as e:
        train(tiny_config(corpus, run, dtype=dtype))
    assert str(e.value).endswith(")" if dtype == "fp32" else ") or use dtype fp32"), e.value
    lines = (run / "log.jsonl").read_text().splitlines()  # (strict JSON: the NaN loss as null)
    records = [
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in the log")) for line in lines
    ]
    assert records[-1]["event"] == "diverged" and records[-1]["loss"] is None
    state = json.loads((run / "state.json").read_text())
    assert state["step"] == 3
    assert set(weights(run)) and all(torch.isfinite(t).all() for t in weights(run).values())


def test_a_checkpoint_of_step_0_is_named_as_kept(corpus, tmp_path, monkeypatch):
    """A stop before the first step saves step 0; a divergence after its resume said "none saved yet"
    (the step number taken as a truth value)."""
    run = tmp_path / "run"

    def stop_at_start(event):
        if event["event"] == "start":
            os.kill(os.getpid(), signal.SIGTERM)

    assert train(tiny_config(corpus, run), on_event=stop_at_start).step == 0
    assert json.loads((run / "state.json").read_text())["step"] == 0
    real_step = train_module.optimizer_step
    monkeypatch.setattr(train_module, "optimizer_step", lambda *a, **k: (float("nan"), real_step(*a, **k)[1]))
    with pytest.raises(
        HtcliError, match=r"diverged at step 1 .*\(the checkpoint of step 0 in .* is intact\)"
    ) as error:
        train(tiny_config(corpus, run), resume=True)
    # (at the first step of a resume: the checkpoint's weights may be ruined, yet finite, where a lower lr
    # is no help)
    assert str(error.value).endswith(
        "; if it diverges at once again, the checkpoint itself is past saving: start anew in another run"
        " directory"
    )


def test_existing_checkpoint_is_not_overwritten(corpus, tmp_path):
    """Training into a directory that holds a checkpoint without --resume is refused, files untouched."""
    run = tmp_path / "run"
    train(tiny_config(corpus, run, steps=3))
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(HtcliError, match="already holds a checkpoint: pass resume"):
        train(tiny_config(corpus, run, steps=6))
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_resume_refuses_a_different_model(corpus, tmp_path):
    """Resuming with model options that differ from the checkpoint names the difference."""
    run = tmp_path / "run"
    train(tiny_config(corpus, run, steps=3))
    config = config_from_options([], out=str(run), resume=True, dim=48, steps=6)
    with pytest.raises(
        HtcliError, match="model differs from its checkpoint .*dim 32 in the checkpoint, 48 asked"
    ):
        train(config, resume=True)


def test_resume_needs_a_checkpoint_and_more_steps(corpus, tmp_path):
    """--resume without a checkpoint, or already at --steps, says what to do."""
    run = tmp_path / "run"
    with pytest.raises(HtcliError, match="no checkpoint at .*without resume"):
        config_from_options([str(corpus)], out=str(tmp_path / "none"), resume=True)
    train(tiny_config(corpus, run, steps=3))
    with pytest.raises(HtcliError, match="already at step 3 of steps 3: pass a larger steps"):
        train(config_from_options([], out=str(run), resume=True), resume=True)


def test_resume_refuses_a_foreign_config_json(corpus, tmp_path):
    """A config.json that is not htcli's (unknown keys, or no model) is refused by name."""
    run = tmp_path / "run"
    train(tiny_config(corpus, run, steps=3))
    saved = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**saved, "colour": "red"}))
    with pytest.raises(
        HtcliError, match="config.json is not an htcli training config of this version: unknown key 'colour'"
    ):
        config_from_options([], out=str(run), resume=True, steps=6)
    (run / "config.json").write_text(json.dumps({"steps": 3}))
    with pytest.raises(HtcliError, match="config.json is not an htcli training config"):
        config_from_options([], out=str(run), resume=True, steps=6)


def test_context_warmup_schedule():
    """context_warmup: short windows for that fraction of the steps, then the whole context."""
    from htcli.optim import context_length

    config = TrainConfig(corpus=["x"], steps=300, context_warmup=0.5, context_warmup_start=256)
    assert config.model.max_seq_len == 8192
    lengths = [context_length(step, config) for step in range(300)]
    assert set(lengths[:150]) == {256} and set(lengths[150:]) == {8192}
    plain = TrainConfig(corpus=["x"], steps=300)
    assert {context_length(step, plain) for step in range(300)} == {8192}


@pytest.mark.parametrize(
    ("fraction", "steps", "short"),
    [(0.07, 100, 7), (0.14, 100, 14), (0.01, 4, 1), (0.29, 100, 29), (1.0, 7, 7)],
)
def test_context_warmup_counts_the_steps_of_the_fraction_as_written(fraction, steps, short):
    """0.07 of 100 steps is 7 short ones (as floats 0.07 x 100 is 7.000000000000001: 8 were short, and the
    warning and the resume's check counted 8); a fraction that is not whole steps still rounds up."""
    from htcli.optim import context_length, short_steps

    config = TrainConfig(corpus=["x"], steps=steps, context_warmup=fraction, context_warmup_start=256)
    lengths = [context_length(step, config) for step in range(steps)]
    assert lengths.count(256) == short_steps(config) == short and lengths[:short] == [256] * short


def test_context_warmup_trains_on_short_windows_and_resumes_exactly(corpus, tmp_path):
    """A warmed-up run logs its window lengths, keeps the bytes per step, and resumes bitwise."""
    options = dict(steps=6, save_every=0, eval_every=0, context_warmup=0.5, context_warmup_start=16)
    whole = train(tiny_config(corpus, tmp_path / "whole", **options))
    events = [json.loads(line) for line in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    assert [e["context"] for e in events if e["event"] == "step"] == [16, 16, 16, 64, 64, 64]

    def interrupt_at_step_2(event):
        if event["event"] == "step" and event["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    config = tiny_config(corpus, tmp_path / "split", **options)
    assert train(config, on_event=interrupt_at_step_2).step == 2
    train(config, resume=True)
    expected, got = weights(tmp_path / "whole"), weights(tmp_path / "split")
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    assert whole.step == 6


def test_a_preview_sample_is_logged_whole_and_unmarked(corpus, tmp_path):
    """The preview sample drawn at sample_every: its prompt and sample_length bytes in a sample event,
    with no cut_short mark (a stop's sample has one: tests/test_runs.py)."""
    out = tmp_path / "run"
    train(tiny_config(corpus, out, steps=1, sample_every=1, sample_length=24))
    (sample,) = events(out, "sample")
    assert sample["step"] == 1 and sample["prompt"] and sample["text"] and "cut_short" not in sample
