"""Runs that survive a cluster: SIGTERM, --resume auto, one writer per run, checkpoints checked as one
unit, the user's umask. Real processes, real signals, real files."""

import json
import os
import pty
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import (
    TINY_FLAGS,
    TINY_MODEL,
    assert_user_error,
    events,
    invoke,
    nan_loss_at_step,
    tiny_config,
    wait_for_a_step,
)
from safetensors.torch import load_file, save_file

from htcli import checkpoint
from htcli import train as train_module
from htcli.checkpoint import CHECKSUM, commit_pending
from htcli.errors import HtcliError
from htcli.presets import model_config
from htcli.train import train

LONG_RUN = [*TINY_FLAGS, "--steps", "100000", "--eval-every", "0", "--save-every", "0"]


def start(*args, **popen) -> subprocess.Popen:
    """`htcli ARGS` as a real process."""
    command = [sys.executable, "-m", "htcli", *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def replace_optimizer_tensors(run, tensors: dict) -> None:
    """Rewrite run's optimizer.safetensors with these tensors, its metadata kept."""
    from safetensors import safe_open

    with safe_open(str(run / "optimizer.safetensors"), "pt") as opened:
        metadata = opened.metadata()
    del metadata[CHECKSUM]  # (written by hand: with no checksum, as by htcli before it)
    save_file(tensors, str(run / "optimizer.safetensors"), metadata=metadata)


def test_sigterm_saves_and_exits_75(corpus, tmp_path):
    """SIGTERM finishes the step, saves it, says how to continue and exits 75 (preempted); --resume
    continues from there."""
    out = tmp_path / "my run"  # (the command said --out /.../my run: not one argument in a shell)
    process = start("train", corpus, "--out", out, *LONG_RUN)
    wait_for_a_step(out, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 75, stderr
    assert f"by SIGTERM; continue with: htcli train --resume --out '{out}'" in stderr.replace("\n", "")
    assert "Traceback" not in stderr
    step = json.loads((out / "state.json").read_text())["step"]
    assert step == events(out, "step")[-1]["step"] == events(out, "interrupt")[0]["step"] > 0
    resumed = invoke("train", "--out", out, "--resume", "--steps", step + 2)
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming at step {step}" in resumed.stderr


def test_a_new_run_where_a_killed_one_never_saved_logs_each_step_once(corpus, tmp_path):
    """A run killed before its first save leaves its steps in log.jsonl; the new run started there logged
    after them, so that its curves mixed the two runs (plot showed the dead run's last step). With
    --resume auto, too: it took the dead run's config.json as a run to resume, and refused another
    optimizer ("cannot resume a run trained with muon"), where train begins such a run anew."""
    out = tmp_path / "run"
    process = start("train", corpus, "--out", out, *LONG_RUN)
    wait_for_a_step_after(out, process, 3)
    process.kill()
    process.communicate()
    assert len(events(out, "step")) > 3 and not (out / "state.json").exists()
    flags = [*TINY_FLAGS, "--steps", 3, "--optimizer", "adamw"]
    started = invoke("train", corpus, "--out", out, "--resume", "auto", *flags)
    assert started.exit_code == 0, started.output
    assert [event["step"] for event in events(out, "step")] == [1, 2, 3]


def run_in_a_terminal(*args) -> tuple[int, int]:
    """`htcli ARGS` as a real process whose controlling terminal is a new pseudo-terminal (as in an ssh
    session): its process id and the terminal's other end, which the test reads and closes."""
    pid, terminal = pty.fork()
    if pid == 0:  # (the child: nothing of pytest's runs here)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)  # (as a shell starts it; pytest may ignore it)
        os.execv(sys.executable, [sys.executable, "-m", "htcli", *map(str, args)])
    return pid, terminal


def wait_for_exit(pid: int, timeout: float = 60) -> int:
    """pid's exit code (-N: ended by signal N); it fails the test if the process outlives the timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("the process did not end")


def test_a_closed_terminal_saves_and_stops(corpus, tmp_path):
    """The terminal a run was started from closes (an ssh connection lost: SIGHUP, then writing to the
    terminal fails): the step finishes, the run is saved, exit 129, and --resume continues it (it was
    killed by the signal, everything since the last save lost)."""
    out = tmp_path / "run"
    pid, terminal = run_in_a_terminal("train", corpus, "--out", out, *LONG_RUN)
    log, deadline = out / "log.jsonl", time.monotonic() + 60
    while not (log.exists() and '"event": "step"' in log.read_text()) and time.monotonic() < deadline:
        if select.select([terminal], [], [], 0.05)[0]:
            os.read(terminal, 65536)  # (as a terminal shows it)
    os.close(terminal)  # (the terminal hangs up)
    assert wait_for_exit(pid) == 129
    step = json.loads((out / "state.json").read_text())["step"]
    (interrupt,) = events(out, "interrupt")
    assert step == events(out, "step")[-1]["step"] == interrupt["step"] > 0
    assert interrupt["signal"] == "SIGHUP"
    resumed = invoke("train", "--out", out, "--resume", "--steps", step + 2)
    assert resumed.exit_code == 0, resumed.output


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP])
def test_a_stop_request_puts_the_handlers_back(signum, monkeypatch):
    """After a stop, the process's handlers are as they were (a library caller's own, its next run's), except
    SIGHUP after a hangup: ignored from then on (the terminal is gone; a late one would end the process)."""
    from htcli import stop as stop_module
    from htcli.stop import StopRequest

    monkeypatch.setattr(stop_module, "_terminal_outputs", list)  # (pytest -s in a terminal keeps its output)

    def ours(*_):
        pass

    before = {
        number: signal.signal(number, ours) for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    }
    try:
        with StopRequest() as stop:
            os.kill(os.getpid(), signum)
            time.sleep(0.01)  # (Python runs the handler between instructions)
            assert stop.signal == signum
            if signum == signal.SIGHUP:
                os.kill(os.getpid(), signal.SIGHUP)  # (the shell's): nothing but output sent away
                time.sleep(0.01)
        expected = signal.SIG_IGN if signum == signal.SIGHUP else ours
        assert signal.getsignal(signal.SIGHUP) is expected
        assert signal.getsignal(signal.SIGINT) is ours and signal.getsignal(signal.SIGTERM) is ours
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)


@pytest.mark.parametrize(
    "signum,handler,quits",
    [
        (signal.SIGINT, signal.default_int_handler, True),
        (signal.SIGINT, signal.SIG_IGN, False),  # (a background job's: a second Ctrl-C is ignored too)
        (signal.SIGTERM, signal.SIG_DFL, True),
        (signal.SIGHUP, signal.SIG_DFL, None),
    ],
)
def test_a_stop_request_tells_of_a_stop_not_acknowledged_in_time(signum, handler, quits, monkeypatch):
    """on_wait hears of a first SIGINT or SIGTERM that waits NOTICE_AFTER seconds unacknowledged, once, from
    another thread, with whether another such signal would end the process (a SIGHUP: never; its terminal
    is gone); acknowledged in time, never; the watcher thread and its pipe end with the request (no
    descriptor left open)."""
    from htcli import stop as stop_module
    from htcli.stop import StopRequest

    monkeypatch.setattr(stop_module, "_terminal_outputs", list)
    monkeypatch.setattr(stop_module, "NOTICE_AFTER", 0.1)
    before = {number: signal.signal(number, lambda *_: None) for number in stop_module.STOPS}
    signal.signal(signum, handler)
    descriptors = len(os.listdir("/proc/self/fd"))
    try:
        heard = []
        with StopRequest(lambda *got: heard.append((*got, threading.current_thread().name))) as stop:
            os.kill(os.getpid(), signum)
            time.sleep(0.6)
            assert stop.signal == signum
        expected = [] if signum == signal.SIGHUP else [(signum, quits, "htcli-stop-notice")]
        assert heard == expected
        monkeypatch.setattr(stop_module, "NOTICE_AFTER", 1.0)  # (acknowledged well within it, loaded or not)
        with StopRequest(lambda *got: heard.append(got)) as stop:
            os.kill(os.getpid(), signum)
            time.sleep(0.01)
            stop.acknowledge()
            time.sleep(1.2)
        assert heard == expected
        assert len(os.listdir("/proc/self/fd")) == descriptors
        assert "htcli-stop-notice" not in [thread.name for thread in threading.enumerate()]
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)


def test_a_stop_request_without_a_descriptor_left_gives_no_notice_and_puts_the_handlers_back(monkeypatch):
    """Where the notice's pipe cannot be made (no descriptor left: `ulimit -n`), a stop is still recorded,
    no notice is given, and the handlers are put back (installed before the pipe failed, they were left)."""
    from htcli import stop as stop_module
    from htcli.stop import StopRequest

    def no_descriptor():
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(stop_module, "_terminal_outputs", list)
    monkeypatch.setattr(stop_module, "NOTICE_AFTER", 0.05)
    monkeypatch.setattr(os, "pipe", no_descriptor)
    before = {number: signal.signal(number, lambda *_: None) for number in stop_module.STOPS}
    try:
        heard = []
        with StopRequest(lambda *got: heard.append(got)) as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.3)
            assert stop.signal == signal.SIGINT
        assert heard == []
        assert all(signal.getsignal(number) != stop._handle for number in stop_module.STOPS)
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)


def test_a_stop_request_that_ends_before_its_watcher_starts_leaves_no_error(monkeypatch):
    """A request that ends before its watcher thread has run its first line (a run that fails at once, a
    loaded machine): the thread read the pipe through the request, whose pipe was gone by then (a
    TypeError printed as "Exception in thread htcli-stop-notice")."""
    from htcli import stop as stop_module
    from htcli.stop import StopRequest

    errors, real_watch = [], StopRequest._watch

    def late(self, *args):
        time.sleep(0.3)
        return real_watch(self, *args)

    monkeypatch.setattr(stop_module, "_terminal_outputs", list)
    monkeypatch.setattr(StopRequest, "_watch", late)
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_type))
    before = {number: signal.signal(number, lambda *_: None) for number in stop_module.STOPS}
    try:
        with StopRequest(lambda *got: None):
            pass
        time.sleep(0.5)
        assert errors == []
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)


def test_an_acknowledgement_waits_for_a_notice_being_given(monkeypatch):
    """A stop acknowledged while its notice is being given returns once the notice is out: the notice came
    after, or in the middle of, the loop's "interrupted at step N" that follows the acknowledgement."""
    from htcli import stop as stop_module
    from htcli.stop import StopRequest

    monkeypatch.setattr(stop_module, "_terminal_outputs", list)
    monkeypatch.setattr(stop_module, "NOTICE_AFTER", 0.05)
    before = {number: signal.signal(number, lambda *_: None) for number in stop_module.STOPS}
    order = []

    def slow_notice(*_):
        order.append("notice begins")
        time.sleep(0.5)
        order.append("notice ends")

    try:
        with StopRequest(slow_notice) as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.25)  # (the notice is being given)
            stop.acknowledge()
            order.append("acknowledged")
        assert order == ["notice begins", "notice ends", "acknowledged"]
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)


@pytest.mark.parametrize("torchrun", [True, False])
def test_a_rank_whose_torchrun_is_gone_asks_to_stop(torchrun, monkeypatch):
    """In a rank that torchrun's agent started, a parent that is no longer torchrun (it was SIGKILLed) is a
    stop as SIGTERM, asked wherever a stop is looked for (between a validation's batches too, not only at
    the steps' agreement); a process not started by torchrun (ranks started by hand, whose shell may end)
    never takes its parent's end for one."""
    from htcli import stop as stop_module
    from htcli.stop import StopRequest

    monkeypatch.setattr(stop_module, "_terminal_outputs", list)
    if torchrun:
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    else:
        monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    with StopRequest() as stop:
        assert not stop.requested
        monkeypatch.setattr(os, "getppid", lambda: 1)  # (handed to init)
        assert stop.requested is torchrun
        assert stop.signal == (signal.SIGTERM if torchrun else None)


def test_a_ranks_sigterm_with_its_ctrl_c_is_ignored_without_a_word(monkeypatch):
    """In a rank of torchrun's, a SIGTERM that arrives with the first stop (a group Ctrl-C, and torchrun's
    SIGTERM after it) is ignored, as later ones are; it was printed as "OSError: Signal 15 ignored due to
    race condition" with a traceback (its handler became SIG_IGN before Python ran it)."""
    from htcli import stop as stop_module
    from htcli.stop import StopRequest

    monkeypatch.setattr(stop_module, "_terminal_outputs", list)
    monkeypatch.setenv("LOCAL_RANK", "0")
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    before = {number: signal.signal(number, signal.SIG_DFL) for number in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    both = {signal.SIGINT, signal.SIGTERM}
    try:
        with StopRequest() as stop:
            # both arrive before Python runs a handler (sent to this thread, which blocks them: pytest-xdist's
            # worker has other threads, which would take a signal sent to the process at once)
            signal.pthread_sigmask(signal.SIG_BLOCK, both)
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.pthread_kill(threading.main_thread().ident, signum)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, both)
            time.sleep(0.01)
            assert stop.signal == signal.SIGINT
            os.kill(os.getpid(), signal.SIGTERM)  # (a later one: ignored too)
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)  # (after the stop: until the process ends)
        time.sleep(0.01)
        assert unraisable == []
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)


def test_a_run_that_ignores_sighup_goes_on(corpus, tmp_path):
    """Under nohup (SIGHUP ignored) a SIGHUP leaves the run training, as it asked; SIGTERM still stops it."""
    out = tmp_path / "run"
    command = ["sh", "-c", 'trap "" HUP; exec "$@"', "sh", sys.executable, "-m", "htcli", "train", corpus]
    process = subprocess.Popen([*map(str, command), "--out", str(out), *LONG_RUN], stderr=subprocess.PIPE)
    wait_for_a_step(out, process)
    process.send_signal(signal.SIGHUP)
    time.sleep(1)
    assert process.poll() is None and not events(out, "interrupt")
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 75, stderr
    assert events(out, "interrupt")[0]["signal"] == "SIGTERM"


@pytest.mark.parametrize("errors", ["full disk", "closed pipe"])
def test_a_run_whose_stderr_fails_trains_on_unseen(corpus, tmp_path, errors):
    """Progress on a stderr that takes no more (a full disk; `2>&1 | head`, the pipe closed): the run goes on
    to its last step and saves, exit 0, its summary on stdout. It ended at once, unsaved and without a
    word: rich's answer to a closed pipe was SystemExit(1) (after sending stdout to /dev/null), a full
    disk's OSError the command's error, whose own line failed too."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "htcli", "train", corpus, "--out", out, *TINY_FLAGS, "--steps", 30]
    command += ["--eval-every", 5, "--save-every", 0]
    with open("/dev/full", "w") as full:
        stderr = full if errors == "full disk" else subprocess.PIPE
        process = subprocess.Popen(list(map(str, command)), stdout=subprocess.PIPE, stderr=stderr, text=True)
    if errors == "closed pipe":
        process.stderr.close()
    stdout, _ = process.communicate(timeout=120)
    assert process.returncode == 0 and "training run" in stdout, stdout
    assert json.loads((out / "state.json").read_text())["step"] == 30


@pytest.mark.parametrize(
    "output,buffered,said",
    [
        ("full disk", True, "No space left on device"),
        ("full disk", False, "No space left on device"),
        ("closed pipe", True, "Broken pipe"),  # (`htcli train ... | head`: rich exited 1 without a word)
    ],
)
def test_a_stopped_run_whose_output_fails_keeps_its_exit_code(corpus, tmp_path, output, buffered, said):
    """SIGTERM stops and saves a run whose stdout is a full disk or a pipe nobody reads any more: the
    summary cannot be written, one line says so, and the exit code stays 75 (it was 1: a scheduler would
    not have requeued the run)."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not (buffered and k == "PYTHONUNBUFFERED")}
    command = [sys.executable, "-m", "htcli", "train", corpus, "--out", out, *LONG_RUN]
    with open("/dev/full", "w") as full:
        stdout = full if output == "full disk" else subprocess.PIPE
        process = subprocess.Popen(
            list(map(str, command)), stdout=stdout, stderr=subprocess.PIPE, text=True, env=env
        )
    if output == "closed pipe":
        process.stdout.close()
    wait_for_a_step(out, process)
    process.send_signal(signal.SIGTERM)
    stderr = process.stderr.read()
    process.wait(timeout=60)
    assert process.returncode == 75, stderr
    assert f"error: cannot write the output: {said}" in stderr and "Traceback" not in stderr
    assert "by SIGTERM; continue with: htcli train --resume" in stderr
    assert json.loads((out / "state.json").read_text())["step"] == events(out, "interrupt")[0]["step"]


def test_sigterm_during_a_long_preview_sample_saves_at_once(corpus, tmp_path):
    """A SIGTERM while the run draws its preview sample (sample-length 100,000,000 in a config file): the
    sample ends there, the step is saved, exit 75 (the sample went on for as long as it was, past a
    scheduler's grace period)."""
    out, config = tmp_path / "run", tmp_path / "long-sample.toml"
    config.write_text("sample-length = 100000000\n")
    process = start("train", corpus, "--out", out, *LONG_RUN, "--sample-every", 1, "--config", config)
    wait_for_a_step(out, process)
    time.sleep(1)  # (well into the sample)
    process.send_signal(signal.SIGTERM)
    try:
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 75, stderr
    assert json.loads((out / "state.json").read_text())["step"] == 1
    (sample,) = events(out, "sample")
    assert 0 < len(sample["text"]) < 100_000_000 and sample["cut_short"] is True  # (was unmarked)


def test_sigterm_while_a_corpus_is_cached_leaves_no_partial_file(tmp_path):
    """A SIGTERM while a compressed JSONL corpus is made into the cache (before any training): exit 143
    with one line, and neither the half-made entry nor its temporary file is left in the cache (the
    next run would otherwise find gigabytes of garbage there)."""
    import zstandard

    corpus = tmp_path / "records.jsonl.zst"
    corpus.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "abc"}\n' * 1_500_000))
    cache = tmp_path / "cache"
    env = {**os.environ, "HTCLI_CACHE_DIR": str(cache)}
    process = start("train", corpus, "--out", tmp_path / "run", *LONG_RUN, env=env)
    deadline = time.monotonic() + 60
    while not list(cache.glob(".*.tmp")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert process.poll() is None, "the cache entry was made before the signal could be sent"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert "terminated (SIGTERM): stopped without saving" in stderr and "Traceback" not in stderr
    assert sorted(path.name for path in cache.iterdir() if not path.name.endswith((".lock", ".TAG"))) == []


def test_resume_auto_starts_then_continues(corpus, tmp_path):
    """--resume auto: a fresh --out starts a run, one with a checkpoint continues it; --resume alone
    still needs a checkpoint."""
    out = tmp_path / "run"
    assert_user_error(invoke("train", corpus, "--out", out, "--resume", *TINY_FLAGS), "no checkpoint at")
    first = invoke("train", corpus, "--out", out, "--resume", "auto", "--steps", 2, *TINY_FLAGS)
    assert first.exit_code == 0, first.output
    again = invoke("train", corpus, "--out", out, "--resume", "auto", "--steps", 4, *TINY_FLAGS)
    assert again.exit_code == 0, again.output
    assert "resuming at step 2" in again.stderr
    assert [e["resumed"] for e in events(out, "start")] == [False, True]
    assert [e["step"] for e in events(out, "step")] == [1, 2, 3, 4]
    assert_user_error(invoke("train", "--out", out, "--resume=sometimes"), "--resume takes no value or auto")


def test_one_writer_per_run_directory(corpus, tmp_path):
    """A second train (new or --resume) on an --out a live process trains into is refused at once, naming
    that process, and touches nothing; once the first is killed (no clean exit), its lock is gone."""
    out = tmp_path / "run"
    train(tiny_config(corpus, out, steps=2))
    first = start(
        "train", "--out", out, "--resume", "--steps", "100000", "--save-every", "1", "--eval-every", "0"
    )
    try:
        wait_for_a_step_after(out, first, 2)
        before = sorted(p.name for p in out.iterdir())
        for args in (["--resume", "--steps", 10**6], [corpus, *TINY_FLAGS]):
            started = time.monotonic()
            result = invoke("train", "--out", out, *args)
            assert_user_error(
                result, f"{out} is being trained into by process {first.pid}: wait for it to end"
            )
            assert time.monotonic() - started < 10
        assert first.poll() is None
        assert "model.safetensors" in before
    finally:
        first.kill()
        first.communicate()
    commit_pending(out)  # as the resume will: the kill may have cut a save between its renames
    step = json.loads((out / "state.json").read_text())["step"]
    resumed = invoke("train", "--out", out, "--resume", "--steps", step + 1)
    assert resumed.exit_code == 0, resumed.output


def wait_for_a_step_after(out, process, step: int) -> None:
    deadline = time.monotonic() + 60
    while not (out / "log.jsonl").exists() or not any(e["step"] > step for e in events(out, "step")):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"training did not go on: {process.communicate()[1]}")
        time.sleep(0.05)


@pytest.fixture
def two_runs(corpus, tmp_path):
    """A run at step 4 and one of another model at step 2."""
    train(tiny_config(corpus, tmp_path / "run", steps=4, save_every=4))
    train(tiny_config(corpus, tmp_path / "other", steps=2, model=dict_model(dim=48)))
    return tmp_path / "run", tmp_path / "other"


def dict_model(**overrides):
    return model_config("tiny", **{**TINY_MODEL, **overrides})


def snapshot(directory) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_optimizer_of_another_step_is_refused(corpus, two_runs, tmp_path):
    """An optimizer file of another step of the same run: the checkpoint's files are not one unit."""
    run, _ = two_runs
    earlier = tmp_path / "earlier"
    train(tiny_config(corpus, earlier, steps=2))
    shutil.copy(earlier / "optimizer.safetensors", run / "optimizer.safetensors")
    before = snapshot(run)
    assert_user_error(
        invoke("train", "--out", run, "--resume", "--steps", 8), "holds files of different steps (4 and 2)"
    )
    assert snapshot(run) == before


def test_optimizer_whose_own_steps_differ_is_refused(two_runs):
    """An optimizer file whose metadata says step 4 but whose AdamW took 2 steps is refused."""
    run, _ = two_runs
    tensors = load_file(str(run / "optimizer.safetensors"))
    replace_optimizer_tensors(
        run, {k: (torch.tensor(2.0) if k.endswith(".step") else v) for k, v in tensors.items()}
    )
    before = snapshot(run)
    result = invoke("train", "--out", run, "--resume", "--steps", 8)
    assert_user_error(result, "is from another step: its optimizer took 2 steps, the checkpoint is of step 4")
    assert snapshot(run) == before


def test_optimizer_of_another_model_is_refused(two_runs):
    """An optimizer state whose moments have other shapes (another model's) is refused."""
    run, other = two_runs
    replace_optimizer_tensors(run, load_file(str(other / "optimizer.safetensors")))
    before = snapshot(run)
    result = invoke("train", "--out", run, "--resume", "--steps", 8)
    assert_user_error(result, "is not the optimizer state of this model")
    assert snapshot(run) == before


def test_optimizer_moments_with_nan_are_refused(two_runs):
    """A NaN in the saved moments would make the first resumed step diverge ("lower --lr", wrongly):
    the file is refused as damaged instead, before anything is trained or written."""
    run, _ = two_runs
    tensors = load_file(str(run / "optimizer.safetensors"))
    name = next(k for k in tensors if k.endswith("exp_avg_sq"))
    tensors[name] = tensors[name].clone().fill_(float("nan"))
    replace_optimizer_tensors(run, tensors)
    before = snapshot(run)
    result = invoke("train", "--out", run, "--resume", "--steps", 8)
    assert_user_error(result, "holds NaN or infinite optimizer moments")
    assert snapshot(run) == before


def test_malformed_optimizer_keys_are_refused(two_runs):
    """Optimizer tensors under names htcli never writes are refused by name."""
    run, _ = two_runs
    replace_optimizer_tensors(run, {"weights.x": torch.zeros(2)})
    before = snapshot(run)
    assert_user_error(  # (with what to do: it said nothing)
        invoke("train", "--out", run, "--resume", "--steps", 8),
        "is not an htcli optimizer state (malformed: a tensor named 'weights.x'): restore it from a copy of "
        "the run to resume, or start a new run in another --out",
    )
    assert snapshot(run) == before


def test_files_follow_the_umask(corpus, tmp_path):
    """Every file a run writes has the permissions the user's umask gives (077: owner only; 022: all read)."""
    for mask, mode in ((0o077, 0o600), (0o022, 0o644)):
        out = tmp_path / f"run{mask:o}"
        script = (
            f"import os, sys; os.umask({mask}); from htcli.cli import app; app(sys.argv[1:], prog_name='x')"
        )
        args = ["train", corpus, "--out", out, "--steps", 2, *TINY_FLAGS]
        process = subprocess.run(
            [sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True
        )
        assert process.returncode == 0, process.stderr
        modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
        assert set(modes.values()) == {mode}, modes


def test_full_disk_while_logging(corpus, tmp_path):
    """log.jsonl that cannot grow (a file size limit stands in for a full disk) between saves: one line
    naming it and the checkpoint that is intact, exit 1 (a traceback); the run resumes from it once there is
    room, the line cut short dropped."""
    out = tmp_path / "run"
    train(tiny_config(corpus, out, steps=2))
    before = snapshot(out)
    limit = (out / "log.jsonl").stat().st_size + 3000
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        "from htcli.cli import app\n"
        "app(sys.argv[1:], prog_name='htcli')\n"
    )
    args = ["train", "--out", out, "--resume", "--steps", 400, "--save-every", 1000, "--eval-every", 0]
    process = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True)
    assert process.returncode == 1 and "Traceback" not in process.stderr, process.stderr
    assert process.stderr.strip().splitlines()[-1] == (
        f"error: cannot write {out / 'log.jsonl'}: File too large; stopped (the checkpoint of step 2 is"
        " intact): raise the limit on file sizes (ulimit -f), then resume"  # (it said to free some space)
    )
    after = snapshot(out)
    assert all(
        after[name] == before[name] for name in ("model.safetensors", "optimizer.safetensors", "state.json")
    )
    assert not after["log.jsonl"].endswith(b"\n")  # a line cut short
    resumed = invoke("train", "--out", out, "--resume", "--steps", 4)
    assert resumed.exit_code == 0, resumed.output
    assert [e["step"] for e in events(out, "step")] == [1, 2, 3, 4]


def test_full_disk_while_saving(corpus, tmp_path):
    """A save that cannot be written (a file size limit stands in for a full disk) stops with one line,
    exit 1; the previous checkpoint stays whole and no half-written file is left."""
    out = tmp_path / "run"
    train(tiny_config(corpus, out, steps=2))
    before = snapshot(out)
    size = (out / "model.safetensors").stat().st_size
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({size // 2}, {size // 2}))\n"
        "from htcli.cli import app\n"
        "app(sys.argv[1:], prog_name='htcli')\n"
    )
    args = ["train", "--out", out, "--resume", "--steps", 4, "--save-every", 1, "--eval-every", 0]
    process = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True)
    assert process.returncode == 1, process.stderr
    line = process.stderr.strip().splitlines()[-1]  # (no eval before the save: no best weights written first)
    assert line.startswith("error: cannot save the checkpoint of step 3 in") and "File too large" in line
    assert "os error" not in line and "raise the limit on file sizes (ulimit -f)" in line
    assert "the checkpoint of step 2 is intact" in line and "Traceback" not in process.stderr
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k.endswith(".safetensors") or k == "state.json"} == {
        k: v for k, v in before.items() if k.endswith(".safetensors") or k == "state.json"
    }
    assert not [name for name in after if name.endswith(".pending")]


def test_the_number_of_an_os_error_from_safetensors():
    """safetensors (Rust) gives a failed write's errno only in its text: a full disk is still told to free
    space, another failure (a permission) is not; the words are the system's, without Rust's "(os error
    27)", which reached the user's message."""
    from htcli.checkpoint import _os_error

    full = _os_error("No space left on device (os error 28)")
    assert (full.errno, full.strerror) == (28, "No space left on device")
    # (out of inodes, safetensors names its temporary file, gone by then: "mend that" was the advice; review)
    inodes = _os_error('No space left on device (os error 28) at path "/r/.saving/.tmpdaQrWB"')
    assert (inodes.errno, inodes.strerror) == (28, "No space left on device")
    assert _os_error("something else").errno is None and str(_os_error("something else")) == "something else"


def test_a_stop_that_cannot_be_logged_is_saved_all_the_same():
    """A Ctrl-C or SIGTERM whose interrupt event the log cannot take (a full disk): the steps since the
    last save are saved first, then the log's error is raised (it skipped the save)."""
    from types import SimpleNamespace

    from htcli.runlog import LogError
    from htcli.train import _save_at_stop

    saved = []
    run = SimpleNamespace(step=7, saved_step=4, save=lambda log: saved.append(7))

    def full_log(event, **fields):
        raise LogError("cannot write log.jsonl: No space left on device", 28)

    with pytest.raises(LogError, match="No space left"):
        _save_at_stop(run, full_log, "SIGTERM")
    assert saved == [7]


def test_a_resume_says_what_it_changes_and_what_that_makes_of_the_schedule(corpus, tmp_path):
    """A resume takes changed options without a word, and a raised --steps stretches the learning rate's
    decay and the context warm-up over the new total: a finished run's learning rate went back up and a
    run past its context warm-up trained on short windows again, unsaid. Both are now said (with the
    --context-warmup that keeps the run's switch), and nothing is said where nothing changes."""
    out = tmp_path / "run"
    flags = [*TINY_FLAGS, "--out", out]
    first = invoke(
        "train", corpus, *flags, "--steps", 4, "--context-warmup", 0.5, "--context-warmup-start", 32
    )
    assert first.exit_code == 0, first.output
    longer = invoke("train", *flags, "--resume", "--steps", 12)
    assert longer.exit_code == 0, longer.output
    said = " ".join(longer.stderr.split())
    assert "resuming with --steps 12 (the run's: 4)" in said
    assert re.search(
        r"warning: --steps 12 stretches the run's schedules: step 5 trains at learning rate [\d.e-]+ "
        r"\(the run's schedule: [\d.e-]+\), and on windows of 32 bytes up to step 6 \(the run's schedule: the"
        r" full 64; --context-warmup 0.166 keeps its switch to 64 at step 3\)",
        said,
    ), said
    assert [e["context"] for e in events(out, "step")][4:] == [32, 32, 64, 64, 64, 64, 64, 64]
    starts = events(out, "start")  # (log.jsonl keeps them, naming the fields)
    assert starts[0]["changes"] == [] and [fields for _, fields in starts[1]["changes"]][0] == ["steps"]
    assert said.index("resuming at step 4") < said.index("resuming with")  # (once the run has started)
    again = invoke("train", *flags, "--resume", "--steps", 14, "--eval-every", 3, "--context-warmup", 0.166)
    said = " ".join(again.stderr.split())
    assert (
        "resuming with --steps 14 (the run's: 12), --context-warmup 0.166 (the run's: 0.5), --eval-every 3"
        " (the run's: 100) warning: --steps 14 and --context-warmup 0.166 change the run's schedules: step 13"
        " trains at learning rate" in said
    )
    assert again.exit_code == 0 and "on windows" not in said, again.output
    # a new --lr moves the rate too: not --steps' stretch alone (it was said to be)
    lr = invoke("train", *flags, "--resume", "--steps", 16, "--lr", "0.01", "--eval-every", 3)
    said = " ".join(lr.stderr.split())
    assert lr.exit_code == 0, lr.output
    assert "warning: --steps 16, --lr 0.01 and --min-lr 0.001 change the run's schedules: step 15" in said
    same = invoke("train", *flags, "--resume", "--steps", 16)  # (finished: refused, nothing listed)
    assert same.exit_code == 1 and "resuming with" not in same.stderr, same.output


@pytest.mark.parametrize(
    "run,resumed,step,said",
    [  # (the run: 20 steps, the first half on 16-byte windows; full windows are 64 bytes)
        (
            {},
            dict(context_warmup_start=32),
            5,
            "on windows of 32 bytes up to step 10 (the run's schedule: 16",
        ),
        (
            {},
            dict(steps=60),
            5,
            "on windows of 16 bytes up to step 30 (the run's schedule: 16 bytes up to step 10)",
        ),
        (
            {},
            dict(context_warmup=0.1),
            5,
            "on windows of the full 64 bytes (the run's schedule: 16 bytes up to",
        ),
        (
            {"context_warmup": 0},
            dict(steps=60, context_warmup=0.5),
            20,
            "16 bytes up to step 30 (the run's schedule: the full 64)",
        ),
        ({}, dict(eval_every=7), 5, None),
        # (a run that never reached full windows had no switch to keep; fewer steps, the same windows)
        (
            {"context_warmup": 1.0},
            dict(steps=30),
            20,
            "16 bytes up to step 30 (the run's schedule: 16 bytes to its last step)",
        ),
        ({"context_warmup": 1.0}, dict(steps=15), 5, None),
    ],
)
def test_what_a_resume_says_of_its_windows(corpus, tmp_path, run, resumed, step, said):
    """The windows' part of the warning, where the resume changes the context warm-up before or after the
    step it resumes at (a raised start was called "the full 32 bytes", a warm-up still running "again", a
    moved switch inside the warm-up was not said)."""
    from dataclasses import replace

    from htcli.resume_changes import _schedule_effect

    given = {"steps": 20, "context_warmup": 0.5, "context_warmup_start": 16, **run}
    saved = replace(tiny_config(corpus, tmp_path), **given)
    effect = _schedule_effect(saved, replace(saved, **resumed), step) or ""
    assert (said in effect) if said else "windows" not in effect, effect


@pytest.mark.parametrize("resume", [False, "auto"])
def test_a_run_saved_into_a_new_out_while_another_started_is_kept(corpus, tmp_path, monkeypatch, resume):
    """Two new runs into one --out that does not exist yet: the one that made it and saved there first (while
    the other opened its data) keeps its files; the other stops before writing (it replaced them)."""
    out = tmp_path / "new" / "run"
    opened = train_module.Run._open_data

    def another_run_meanwhile(self):
        monkeypatch.setattr(train_module.Run, "_open_data", opened)
        train(tiny_config(corpus, out, steps=2, save_every=2))
        return opened(self)

    monkeypatch.setattr(train_module.Run, "_open_data", another_run_meanwhile)
    with pytest.raises(HtcliError, match="holds a checkpoint now, which another run saved there while this"):
        train(tiny_config(corpus, out, steps=4, seed=1), resume=resume)
    assert [e["step"] for e in events(out, "step")] == [1, 2] and len(events(out, "start")) == 1
    assert json.loads((out / "config.json").read_text())["steps"] == 2
    assert json.loads((out / "state.json").read_text())["step"] == 2


@pytest.mark.parametrize("how", ["moved", "linked elsewhere", "moved, with TensorBoard"])
def test_a_run_whose_directory_moves_saves_where_it_went(corpus, tmp_path, how):
    """A run directory renamed while its run trains (or the --out link retargeted), and another directory
    made at its old name: the run saves where its directory went, logged, and writes nothing at the name
    (whatever stands there, another run's directory maybe); it ends as it would have, resumable there."""
    moved = tmp_path / "moved"
    out = tmp_path / "run" if how.startswith("moved") else tmp_path / "latest"
    loggers = ["tensorboard"] if "TensorBoard" in how else []
    if not how.startswith("moved"):
        moved.mkdir()
        out.symlink_to(moved)

    def move_at_step_4(event):
        if event["event"] == "step" and event["step"] == 4:
            if how.startswith("moved"):
                out.rename(moved)
                out.mkdir()
            else:
                out.unlink()
                out.symlink_to(tmp_path / "other")
                (tmp_path / "other").mkdir()
            (out / "notes.txt").write_text("another run's")

    result = train(tiny_config(corpus, out, steps=8, save_every=3, loggers=loggers), on_event=move_at_step_4)
    assert result.step == 8 and result.out == moved
    assert sorted(path.name for path in out.iterdir()) == ["notes.txt"]
    assert [e["step"] for e in events(moved, "checkpoint")] == [3, 6, 8]
    assert events(moved, "moved") == [dict(events(moved, "moved")[0], step=6, path=str(moved))]
    assert json.loads((moved / "state.json").read_text())["step"] == 8
    if loggers:  # (TensorBoard's writer followed too: every step's loss in the moved directory's events)
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        accumulator = EventAccumulator(str(moved / "tensorboard"))
        accumulator.Reload()
        assert [event.step for event in accumulator.Scalars("train/loss")] == list(range(1, 9))
    assert train(tiny_config(corpus, moved, steps=9, save_every=3), resume=True).step == 9


@pytest.mark.parametrize("then", ["moved", "deleted"])
def test_a_run_directory_moved_or_deleted_is_not_taken_for_one_without_permissions(
    corpus, tmp_path, monkeypatch, then
):
    """Where the directory's old path cannot be looked into (its parent's permissions taken after a move, or
    after it was deleted), the move is still followed and the deletion still said (review: both were told
    to restore the permissions, as the permissions were checked first)."""
    from htcli.runlock import RunLock

    monkeypatch.setattr(RunLock, "denied", lambda self, now=None: "Permission denied")
    out, moved = tmp_path / "run", tmp_path / "moved"

    def at_step_4(event):
        if event["event"] == "step" and event["step"] == 4:
            out.rename(moved) if then == "moved" else shutil.rmtree(out)

    config = tiny_config(corpus, out, steps=8, save_every=3)
    if then == "moved":
        assert train(config, on_event=at_step_4).out == moved
    else:
        with pytest.raises(HtcliError, match="was deleted"):
            train(config, on_event=at_step_4)


@pytest.mark.parametrize("moved_while", ["writing", "renaming"])
def test_a_run_directory_moved_during_a_save_gets_the_whole_save(corpus, tmp_path, monkeypatch, moved_while):
    """A run directory renamed while a save writes its files (or renames them into place), and another
    directory made at its old name: the whole save goes where the directory went (its files were written
    by path, at the old name, into whatever stood there), and the run goes on saving there."""
    out, moved = tmp_path / "run", tmp_path / "moved"
    hooked = checkpoint._save_safetensors if moved_while == "writing" else checkpoint.commit_pending
    calls, seen = [], []

    def move_then(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # (the first save's second file; its second commit_pending: the renames)
            out.rename(moved)
            out.mkdir()
        return hooked(*args, **kwargs)

    def saved_at_step_4(event):  # (the save of step 3 whole in the moved directory, before the next save)
        if event["event"] == "step" and event["step"] == 4:
            seen.append(json.loads((moved / "state.json").read_text())["step"])

    monkeypatch.setattr(checkpoint, hooked.__name__, move_then)
    result = train(tiny_config(corpus, out, steps=5, save_every=3), on_event=saved_at_step_4)
    assert result.step == 5 and result.out == moved and seen == [3]
    assert not any(out.iterdir())
    assert [e["step"] for e in events(moved, "checkpoint")] == [3, 5]
    assert [e["step"] for e in events(moved, "moved")] == [5]
    assert json.loads((moved / "state.json").read_text())["step"] == 5
    assert train(tiny_config(corpus, moved, steps=6, save_every=3), resume=True).step == 6


def test_a_run_directory_deleted_during_a_save_says_so(corpus, tmp_path, monkeypatch):
    """A run directory deleted while a save writes its files: the run stops saying the directory was deleted
    (not only that a write failed), and writes nothing at its old name."""
    out = tmp_path / "run"
    write, calls = checkpoint._save_safetensors, []

    def delete_then(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            shutil.rmtree(out)
        return write(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "_save_safetensors", delete_then)
    with pytest.raises(
        HtcliError, match=r"^the run directory .*run was deleted .*stopped without saving step 3$"
    ):
        train(tiny_config(corpus, out, steps=5, save_every=3))
    assert not out.exists()


def test_a_divergence_after_a_move_names_where_the_checkpoint_is(corpus, tmp_path, monkeypatch):
    """A run directory moved after the run's last save, then its loss NaN: the error names where the intact
    checkpoint is now (it named the old path, where another directory may stand)."""
    out, moved = tmp_path / "run", tmp_path / "moved"

    def move_at_step_4(event):
        if event["event"] == "step" and event["step"] == 4:
            out.rename(moved)
            out.mkdir()

    nan_loss_at_step(monkeypatch, 5)
    with pytest.raises(
        HtcliError, match=r"diverged at step 5 .*\(the checkpoint of step 3 in (.*) is intact\)"
    ) as e:
        train(tiny_config(corpus, out, steps=8, save_every=3), on_event=move_at_step_4)
    assert f"step 3 in {moved} is intact" in str(e.value)
    assert json.loads((moved / "state.json").read_text())["step"] == 3 and not any(out.iterdir())


@pytest.mark.parametrize("how", ["deleted", "replaced", "lock deleted", "lock moved out", "lock renamed"])
def test_a_run_whose_directory_or_lock_is_deleted_stops_before_saving(corpus, tmp_path, how):
    """A run directory deleted while its run trains (and maybe made again, by another run), or its lock file
    deleted or moved (no lock keeps other runs out then): the run stops at its next save, saying so, and
    writes nothing at the name, nor where the lock file went (it followed a lone .lock moved elsewhere)."""
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    elsewhere.mkdir()

    def delete_at_step_4(event):
        if event["event"] == "step" and event["step"] == 4:
            if how == "lock deleted":
                (out / ".lock").unlink()
            elif how == "lock moved out":
                (out / ".lock").rename(elsewhere / "stale-lock")
            elif how == "lock renamed":
                (out / ".lock").rename(out / ".lock.old")
            else:
                shutil.rmtree(out)
            if how == "replaced":
                out.mkdir()
                (out / "notes.txt").write_text("another run's")

    with pytest.raises(HtcliError) as raised:
        train(tiny_config(corpus, out, steps=8, save_every=3), on_event=delete_at_step_4)
    said, stopped = str(raised.value), "stopped without saving step 6"
    if how in ("deleted", "replaced"):
        gone = f"the run directory {out} was deleted (or moved to another file system)"
        assert said == f"{gone} while this run trained into it: {stopped}" and out.exists() == (
            how == "replaced"
        )
    else:
        lock = f"the lock file {out / '.lock'} of this run was moved, deleted or replaced while it trained"
        assert said.startswith(lock) and said.endswith(
            f": {stopped}; resume it once no other run trains in {out}"
        )
    assert os.listdir(elsewhere) == ([] if how != "lock moved out" else ["stale-lock"])
    if how == "replaced":
        assert sorted(path.name for path in out.iterdir()) == ["notes.txt"]
    elif how != "deleted":  # (the lock's cases)
        assert json.loads((out / "state.json").read_text())["step"] == 3
        assert train(tiny_config(corpus, out, steps=8, save_every=3), resume=True).step == 8


@pytest.mark.parametrize("what", ["file", "link"])
def test_a_file_or_link_at_the_saving_folder_is_refused(corpus, tmp_path, what):
    """Something a user put at OUT/.saving (htcli's folder for a save's files), a file or a link: the
    run refuses to start there, naming it, and a save refuses to write through it; nothing is removed."""
    out, new, target = tmp_path / "run", tmp_path / "new", tmp_path / "target"
    target.mkdir()

    def plant(folder) -> None:
        (folder / ".saving").write_text("mine") if what == "file" else (folder / ".saving").symlink_to(target)

    train(tiny_config(corpus, out, steps=2, save_every=2))
    plant(out)
    said = "is a file or a link, where htcli writes a checkpoint's files before renaming them into place"
    with pytest.raises(HtcliError, match=re.escape(f"{out / '.saving'} {said}")):
        train(tiny_config(corpus, out, steps=4, save_every=2), resume=True)
    assert json.loads((out / "state.json").read_text())["step"] == 2
    with pytest.raises(HtcliError, match=re.escape(f"in {new}: {new / '.saving'} {said}")):
        train(
            tiny_config(corpus, new, steps=4, save_every=3),
            on_event=lambda event: event["event"] == "start" and plant(new),
        )
    assert os.listdir(target) == [] and os.path.lexists(new / ".saving")


def test_a_resume_removes_what_writes_cut_short_left(corpus, tmp_path):
    """A kill -9 during a save leaves temporary files (safetensors' own, weights-sized, in the saving
    folder; htcli's): the run's next start there removes them, and nothing else."""
    out = tmp_path / "run"
    train(tiny_config(corpus, out, steps=2, save_every=2))
    leftovers = ["..state.json.pending.4242.tmp", ".config.json.17.tmp", ".log.jsonl.3.tmp"]
    others = [".tmpAb12Cd", ".tmpnotes", "notes.tmp", ".notes.txt.17.tmp", ".config.json.x.tmp"]
    for name in leftovers + others:
        (out / name).write_bytes(b"x" * 100)
    (out / ".saving").mkdir()
    (out / ".saving" / ".tmpAb12Cd").write_bytes(b"x" * 100)
    assert train(tiny_config(corpus, out, steps=3, save_every=2), resume=True).step == 3
    assert sorted(name for name in leftovers + others + [".saving"] if (out / name).exists()) == sorted(
        others
    )


def test_a_save_killed_while_writing_leaves_its_temporary_files_in_the_saving_folder(corpus, tmp_path):
    """kill -9 while safetensors writes a checkpoint file: its temporary file is in the run's saving folder
    (not beside the user's files, where it could not be told from theirs); the resume removes it."""
    out = tmp_path / "run"
    bigger = [*TINY_FLAGS, "--dim", 256, "--depth", 2]  # (a save of 25 MB: a while to catch it writing)
    process = start(
        "train", corpus, "--out", out, *bigger, "--steps", 10**6, "--eval-every", 0, "--save-every", 1
    )
    deadline = time.monotonic() + 120
    try:
        while not any(name.startswith(".tmp") for name in _names(out / ".saving")):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"no save caught while writing: {process.communicate()[1]}")
    finally:
        process.kill()
        process.communicate()
    assert not [name for name in _names(out) if name.startswith(".tmp")]
    commit_pending(out)  # (as the resume will, to know its step here)
    step = json.loads((out / "state.json").read_text())["step"] if (out / "state.json").exists() else 0
    resumed = invoke("train", corpus, "--out", out, "--resume", "auto", *bigger, "--steps", step + 1)
    assert resumed.exit_code == 0, resumed.output
    assert not (out / ".saving").exists()


def _names(folder) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []
