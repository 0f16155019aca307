"""Data-parallel training under torchrun: real processes on the CPU (gloo), 2 ranks, a tiny model."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_FLAGS, TINY_MODEL, assert_user_error, events, invoke, make_text
from safetensors.torch import load_file

from htcli.checkpoint import read_checkpoint_info
from htcli.model import HTransformer1D, HTransformerConfig
from htcli.runlock import RunLock

# a constant learning rate, so that a run stopped at step 3 and resumed to 6 equals one run of 6
FLAGS = [*TINY_FLAGS, "--lr", "1e-3", "--min-lr", "1e-3", "--eval-every", "3", "--save-every", "3"]
RUN_FILES = {"model.safetensors", "optimizer.safetensors", "state.json", "config.json", "log.jsonl", ".lock"}
ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def environment(**variables) -> dict:
    """This environment without launcher variables, one thread per process, and `variables`. Python's
    fault handler on: a rank that aborts (gloo's rare teardown abort, "terminate called without an active
    exception", should it come back) prints every thread's Python stack, for the failure's message. This
    tree's htcli first on the path (not an install of another), also for scripts run from elsewhere."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH}
    path = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    common = {"OMP_NUM_THREADS": "1", "HTCLI_DIST_TIMEOUT": "60", "PYTHONFAULTHANDLER": "1"}
    return {**env, **common, "PYTHONPATH": path, **variables}


# htcli run by a rank that says, as the last thing its interpreter does before exiting, which of gloo's
# threads still run (none should: a group left alive can abort the exit)
THREADS_AT_EXIT = """
import atexit, os, runpy, sys
def threads():
    names = [open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task")]
    print(f"gloo threads at exit: {sorted(name for name in names if 'gloo' in name)}", file=sys.stderr)
atexit.register(threads)  # (the first registered: the last to run)
sys.argv[0] = "htcli"
runpy.run_module("htcli", run_name="__main__")
"""


def torchrun(*args, script=None) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node 2 -m htcli train ARGS` on this machine (or `script` in place of
    `-m htcli`), waited for."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    command += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    command += [str(script), "train"] if script else ["-m", "htcli", "train"]
    process = subprocess.run(
        [*command, *map(str, args)], capture_output=True, text=True, env=environment(), timeout=120
    )
    assert process.returncode == 0, process.stderr
    return process


def weights(run) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """A 6-step run by 2 ranks (checkpoints at steps 3 and 6), its corpus and the launch's output."""
    root = tmp_path_factory.mktemp("ddp")
    corpus = root / "corpus.txt"
    corpus.write_bytes(make_text(20_000))
    script = root / "rank.py"
    script.write_text(THREADS_AT_EXIT)
    args = (corpus, "--out", root / "run", "--steps", 6, *FLAGS, "--logger", "tensorboard")
    return root / "run", corpus, torchrun(*args, script=script)


def test_torchrun_trains_and_writes_one_checkpoint(ddp_run):
    """2 ranks train, exit 0; rank 0 alone prints, logs (TensorBoard too) and saves; each rank drew its
    own data."""
    run, _, process = ddp_run
    assert {p.name for p in run.iterdir()} == RUN_FILES | {"tensorboard", "best.safetensors"}
    assert len(list((run / "tensorboard").iterdir())) == 1  # one writer: rank 0
    best = min(events(run, "eval"), key=lambda event: event["val_bpb"])  # (rank 0 wrote it)
    assert read_checkpoint_info(run / "best.safetensors").step == best["step"] and best["best"]
    assert "global batch: 2 ranks x 2 x 1 accum = 4 windows of 64 bytes" in process.stderr
    assert process.stdout.count("training run") == 1 and "6 of 6" in process.stdout
    assert [e["step"] for e in events(run, "step")] == [1, 2, 3, 4, 5, 6]
    assert [e["step"] for e in events(run, "checkpoint")] == [3, 6]
    assert events(run, "start")[0]["tokens_per_step"] == 2 * 2 * 64
    state = json.loads((run / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 6
    first, second = (rank["sampler"] for rank in state["ranks"])
    assert first != second
    plain = HTransformer1D(HTransformerConfig(**TINY_MODEL)).state_dict()
    assert set(weights(run)) == set(plain)  # the model's own names, no DDP "module." prefix


def test_ranks_end_the_group_before_their_interpreter_exits(ddp_run):
    """No rank has gloo's threads left when its interpreter exits: a process group that outlived
    destroy_process_group (torch._dynamo imported after the group began kept it) made a rank abort at
    exit now and then ("terminate called without an active exception"), failing a run that had saved."""
    assert ddp_run[2].stderr.count("gloo threads at exit: []") == 2, ddp_run[2].stderr


def test_distributed_checkpoint_samples_and_evaluates_in_one_process(ddp_run):
    """A checkpoint written by 2 ranks loads in a single-process `htcli sample` and `htcli eval`."""
    run, corpus, _ = ddp_run
    sampled = invoke("sample", run, "--prompt", "the ", "--max-new-tokens", 20, "--device", "cpu")
    assert sampled.exit_code == 0, sampled.output
    assert sampled.stdout.startswith("the ") and "20 bytes in" in sampled.stderr
    evaluated = invoke("eval", run, corpus, "--json", "--device", "cpu")
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.stdout)
    assert report["step"] == 6 and 0 < report["bits_per_byte"] < 8.5


@pytest.mark.parametrize(("optimizer", "tolerance"), [("adamw", 1e-5), ("muon", 5e-4)])
def test_two_ranks_equal_one_process_with_twice_the_batch(ddp_run, tmp_path, optimizer, tolerance):
    """With --split-global-batch, 2 ranks x batch 2 x 2 micro-batches == 1 process x batch 4: to 1e-5
    with AdamW; Muon's Newton-Schulz iteration magnifies the rounding differences of the summed
    gradients (to ~1e-4 after 4 steps), so to 5e-4 there. In fp32: bf16 (what auto trains in on a CPU
    with AMX or AVX-512 BF16, where Muon's products stay bf16 even so) rounds the two splits' products apart
    by more than the arithmetic under test. Their val bpb too."""
    _, corpus, _ = ddp_run
    flags = [*FLAGS, "--steps", 4, "--grad-accum", 2, "--optimizer", optimizer, "--dtype", "fp32"]
    torchrun(corpus, "--out", tmp_path / "two", *flags, "--split-global-batch")
    one = invoke("train", corpus, "--out", tmp_path / "one", *flags, "--batch-size", 4)
    assert one.exit_code == 0, one.output
    two, one = weights(tmp_path / "two"), weights(tmp_path / "one")
    error = max((two[name] - one[name]).abs().max().item() for name in one)
    print(f"max |2 ranks - 1 process| over all weights after 4 steps: {error:.2e}")
    assert error < tolerance
    losses = [[e["loss"] for e in events(tmp_path / run, "step")] for run in ("two", "one")]
    assert losses[0] == pytest.approx(losses[1], abs=tolerance)
    # the same val bpb: as many windows scored (the 2 ranks scored half as many, 7.0450 against 7.0422)
    vals = [[e["val_bpb"] for e in events(tmp_path / run, "eval")] for run in ("two", "one")]
    assert len(vals[0]) == 2 and vals[0] == pytest.approx(vals[1], abs=tolerance)


def test_resume_under_torchrun_is_exact(ddp_run, tmp_path):
    """3 steps, then --resume to 6, both under torchrun: the weights and losses of one 6-step run."""
    whole, corpus, _ = ddp_run
    torchrun(corpus, "--out", tmp_path / "run", "--steps", 3, *FLAGS)
    resumed = torchrun("--out", tmp_path / "run", "--resume", "--steps", 6)
    assert "resuming at step 3" in resumed.stderr
    expected, got = weights(whole), weights(tmp_path / "run")
    assert all(torch.equal(expected[name], got[name]) for name in expected)
    assert [e["loss"] for e in events(tmp_path / "run", "step")] == [e["loss"] for e in events(whole, "step")]


OTHER_OUT_ON_RANK_1 = """
import os, sys
from htcli.cli import app

if os.environ["RANK"] == "1":
    sys.argv = [arg.replace("newer", "older") for arg in sys.argv]
app(prog_name="htcli")
"""


def test_ranks_resuming_different_checkpoints_are_refused(ddp_run, tmp_path):
    """Rank 1 resumes a copy of the run that is not up to date (another machine's): every rank says so, one
    line, exit 1, both copies as they were (they hung until the timeout, then said they lost contact)."""
    whole, corpus, _ = ddp_run
    shutil.copytree(whole, tmp_path / "newer")
    torchrun(corpus, "--out", tmp_path / "older", "--steps", 3, *FLAGS, "--logger", "tensorboard")
    before = {name: (tmp_path / name / "state.json").read_bytes() for name in ("newer", "older")}
    program = ("-c", OTHER_OUT_ON_RANK_1)
    ranks = start_ranks("--out", tmp_path / "newer", "--resume", "--steps", 9, program=program)
    said = "the ranks found different checkpoints in --out (of steps 6, 3, by rank): give every rank the run"
    every_rank_says(ranks, said + " directory as rank 0 saved it")
    assert before == {name: (tmp_path / name / "state.json").read_bytes() for name in ("newer", "older")}


def test_resume_in_another_number_of_processes_is_refused(ddp_run, tmp_path):
    """A run of 2 ranks resumed in one process says how to resume it, and leaves it untouched."""
    run = shutil.copytree(ddp_run[0], tmp_path / "run")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    result = invoke("train", "--out", run, "--resume", "--steps", 9)
    assert_user_error(result, "it was trained in 2 processes, each with its own data stream; resume it under")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    # and a run of one process resumed in 2 (it said "one process, each with its own data stream")
    single = tmp_path / "single"
    assert invoke("train", ddp_run[1], "--out", single, "--steps", 1, *FLAGS).exit_code == 0
    ranks = start_ranks("--out", single, "--resume", "--steps", 2)
    said = f"cannot resume {single} in 2 processes: it was trained in one process, one data stream; resume"
    every_rank_says(ranks, said + " it without torchrun")
    # a run of 2 ranks with --split-global-batch drew one global batch, not a stream per rank
    split = tmp_path / "split"
    torchrun(ddp_run[1], "--out", split, "--steps", 1, *FLAGS, "--split-global-batch")
    result = invoke("train", "--out", split, "--resume", "--steps", 2)
    assert_user_error(result, "trained in 2 processes, each with its slice of one global batch; resume it")


@pytest.mark.parametrize(
    "variables,message",
    [
        (dict(WORLD_SIZE="2"), "RANK is not set but WORLD_SIZE is: start htcli with torchrun"),
        (dict(RANK="2", WORLD_SIZE="2", LOCAL_RANK="0"), "RANK 2 is outside 0..1 (WORLD_SIZE is 2)"),
        (dict(RANK="one", WORLD_SIZE="2", LOCAL_RANK="0"), "RANK is 'one', not a whole number"),
        (dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="2", LOCAL_WORLD_SIZE="2"), "LOCAL_RANK 2 must be below"),
        (dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1"), "MASTER_ADDR is not set, but WORLD_SIZE is 2"),
        (dict(HTCLI_DIST_TIMEOUT="soon", RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
              MASTER_PORT="1"), "HTCLI_DIST_TIMEOUT must be a positive number of seconds, got 'soon'"),
    ],
)  # fmt: skip
def test_inconsistent_launcher_environment(ddp_run, tmp_path, monkeypatch, variables, message):
    """Missing or impossible launcher variables: one line naming the variable, exit 1, nothing written."""
    for name in LAUNCH:
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    result = invoke("train", ddp_run[1], "--out", tmp_path / "run", *FLAGS)
    assert_user_error(result, message)
    assert not (tmp_path / "run").exists()


def test_inconsistent_launcher_environment_in_a_real_process(ddp_run, tmp_path):
    """Run as a real program, RANK >= WORLD_SIZE prints one line and exits 1, with no traceback."""
    variables = dict(RANK="3", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    command = [sys.executable, "-m", "htcli", "train", str(ddp_run[1]), "--out", str(tmp_path / "run")]
    process = subprocess.run(command, capture_output=True, text=True, env=environment(**variables))
    assert process.returncode == 1
    assert process.stderr.strip().splitlines() == [
        "error: RANK 3 is outside 0..1 (WORLD_SIZE is 2): start htcli with torchrun, which sets RANK, "
        "WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT"
    ]


def test_unreachable_rank_0_is_an_error_not_a_hang(ddp_run, tmp_path):
    """A rank that cannot reach MASTER_ADDR:MASTER_PORT gives up after HTCLI_DIST_TIMEOUT with one line, as
    a real program (torch's C++ layer printed two log lines and a 20-frame stack trace per try before it)."""
    port = free_port()  # nobody listens there
    variables = dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    command = [
        sys.executable,
        "-m",
        "htcli",
        "train",
        str(ddp_run[1]),
        "--out",
        str(tmp_path / "run"),
        *FLAGS,
    ]
    started = time.monotonic()
    process = subprocess.run(
        command, capture_output=True, text=True, env=environment(**variables, HTCLI_DIST_TIMEOUT="2")
    )
    assert time.monotonic() - started < 60
    assert process.returncode == 1
    lines = process.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error: rank 1 could not join the other process at 127.0.0.1:{port} within 2 s"
    ), process.stderr


# a program that is `htcli` except that rank 1's loss is NaN at its 5th step
NAN_ON_RANK_1_AT_STEP_5 = """
import os
from htcli import train
from htcli.cli import app

real_step, calls = train.optimizer_step, []

def nan_on_rank_1_at_step_5(*args, **kwargs):
    calls.append(1)
    loss, norm = real_step(*args, **kwargs)
    return (float("nan") if os.environ["RANK"] == "1" and len(calls) == 5 else loss), norm

train.optimizer_step = nan_on_rank_1_at_step_5
app(prog_name="htcli")
"""


# rank 1 on a CPU without AMX (dtype auto: fp32 there, bf16 on rank 0); each rank says what it computes in
UNLIKE_CPUS = """
import os, sys
from htcli import device, train
from htcli.cli import app
device.cpu_multiplies_bf16 = lambda: os.environ["RANK"] == "0"
prepare = train.Run._prepare
def said(self, resume):
    prepare(self, resume)
    muon = self.optimizer.parts[0].products
    print(f"rank {os.environ['RANK']} computes in {self.dtype}, Muon in {muon}", file=sys.stderr)
train.Run._prepare = said
app(prog_name="htcli")
"""


def start_ranks(*args, program: tuple = ("-m", "htcli"), **variables) -> list[subprocess.Popen]:
    """Ranks 0 and 1 of `htcli train ARGS`, started by hand with the variables torchrun would set."""
    shared = dict(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), **variables)
    # SIGHUP at its default action in the ranks, as torchrun starts them, also where pytest runs with it
    # ignored (under nohup): a signal the parent ignores stays ignored in the child
    ours = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        return [
            subprocess.Popen(
                [sys.executable, *program, "train", *map(str, args)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=environment(**shared, RANK=str(rank), LOCAL_RANK=str(rank)),
            )
            for rank in (0, 1)
        ]
    finally:
        signal.signal(signal.SIGHUP, ours)


def wait_for_a_step(run, ranks: list[subprocess.Popen]) -> None:
    log, deadline = run / "log.jsonl", time.monotonic() + 60
    while not (log.exists() and '"event": "step"' in log.read_text()):
        assert time.monotonic() < deadline and ranks[0].poll() is None, ranks[0].communicate()[1]
        time.sleep(0.05)


def finish(ranks: list[subprocess.Popen]) -> list[str]:
    """Each rank's stderr once it has exited (killed after 60 s)."""
    try:
        return [process.communicate(timeout=60)[1] for process in ranks]
    finally:
        kill(ranks)


def every_rank_says(ranks: list[subprocess.Popen], line: str) -> None:
    """Each rank exits 1 with this one line of error (and nothing else) on its stderr."""
    errors = finish(ranks)
    assert [process.returncode for process in ranks] == [1, 1], errors
    assert errors == [f"error: {line}\n"] * len(ranks), errors


def kill(ranks: list[subprocess.Popen]) -> None:
    for process in ranks:
        process.kill()
        process.communicate()


def test_ctrl_c_on_one_rank_stops_every_rank_at_the_same_step(ddp_run, tmp_path):
    """A SIGINT to rank 1 alone: both ranks stop after the same step, rank 0 saves both, both exit 0."""
    run = tmp_path / "run"
    ranks = start_ranks(ddp_run[1], "--out", run, *FLAGS, "--steps", 100_000, "--eval-every", 0)
    wait_for_a_step(run, ranks)
    ranks[1].send_signal(signal.SIGINT)
    errors = finish(ranks)
    assert [process.returncode for process in ranks] == [0, 0], errors
    assert "continue with: torchrun ... -m htcli train --resume" in errors[0]
    state = json.loads((run / "state.json").read_text())
    assert state["step"] == events(run, "step")[-1]["step"] == events(run, "interrupt")[0]["step"]
    assert len(state["ranks"]) == 2


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 75), (signal.SIGHUP, 129)])
def test_sigterm_on_one_rank_stops_every_rank_as_preempted(ddp_run, tmp_path, signum, code):
    """A SIGTERM to rank 1 alone (a scheduler preempting): both ranks stop after the same step, rank 0
    saves, both exit 75 (preempted). A SIGHUP (torchrun passes its own on when its terminal closes): the
    same, exit 129."""
    run = tmp_path / "run"
    ranks = start_ranks(ddp_run[1], "--out", run, *FLAGS, "--steps", 100_000, "--eval-every", 0)
    wait_for_a_step(run, ranks)
    ranks[1].send_signal(signum)
    errors = finish(ranks)
    assert [process.returncode for process in ranks] == [code, code], errors
    name = signal.Signals(signum).name
    assert f"by {name}; continue with: torchrun ... -m htcli train --resume" in errors[0]
    state = json.loads((run / "state.json").read_text())
    assert state["step"] == events(run, "step")[-1]["step"] == events(run, "interrupt")[0]["step"]
    assert events(run, "interrupt")[0]["signal"] == name


def test_sigterm_twice_to_every_rank_still_saves(ddp_run, tmp_path):
    """SIGTERM to every process of the job, as SLURM and systemd send it, and torchrun's own after it: each
    rank gets two; the second killed the rank during its save (steps since the last save lost)."""
    run = tmp_path / "run"
    ranks = start_ranks(ddp_run[1], "--out", run, *FLAGS, "--steps", 100_000, "--eval-every", 0)
    wait_for_a_step(run, ranks)
    for second in (False, True):
        time.sleep(0.2 if second else 0)  # (not at once: two signals pending are delivered as one)
        for process in ranks:
            process.send_signal(signal.SIGTERM)
    errors = finish(ranks)
    assert [process.returncode for process in ranks] == [75, 75], errors
    state = json.loads((run / "state.json").read_text())
    assert state["step"] == events(run, "step")[-1]["step"] == events(run, "interrupt")[0]["step"]


def test_ranks_stop_and_save_when_torchrun_is_killed(ddp_run, tmp_path):
    """torchrun killed by SIGKILL (the OOM killer; a kill -9 of its process group, which its ranks are not
    in): its ranks save and stop at the same step, the run's lock freed (they trained on to the last
    step, handed to another parent, and held the lock)."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr"]
    command += ["127.0.0.1", "--master-port", str(free_port()), "-m", "htcli", "train", str(ddp_run[1])]
    command += ["--out", str(run), *FLAGS, "--steps", "100000", "--eval-every", "0"]
    launcher = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment()
    )
    try:
        wait_for_a_step(run, [launcher])
        ranks = [int(pid) for pid in subprocess.check_output(["pgrep", "-P", str(launcher.pid)]).split()]
        assert len(ranks) == 2
    finally:
        launcher.kill()
        launcher.wait()
    deadline = time.monotonic() + 60
    while any(os.path.exists(f"/proc/{pid}") for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in ranks:  # (not left running where the test fails)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert time.monotonic() < deadline, "the ranks trained on after torchrun was killed"
    state = json.loads((run / "state.json").read_text())
    assert state["step"] == events(run, "step")[-1]["step"] == events(run, "interrupt")[0]["step"] < 100_000
    assert events(run, "interrupt")[0]["signal"] == "SIGTERM"
    RunLock(run).acquire().release()  # (free: a resume may go on)


OTHER_LR_ON_RANK_1 = """
import os, sys
from htcli.cli import app

sys.argv += ["--lr", "0.03", "--seq-len", "32"] if os.environ["RANK"] == "1" else []
app(prog_name="htcli")
"""


def test_ranks_started_with_different_options_are_refused(ddp_run, tmp_path):
    """Rank 1 started with another --lr and --seq-len (by hand, on another machine): every rank says which
    options differ, one line, exit 1, nothing written (they trained apart, each its own replica)."""
    run = tmp_path / "run"
    ranks = start_ranks(ddp_run[1], "--out", run, *FLAGS, "--steps", 2, program=("-c", OTHER_LR_ON_RANK_1))
    every_rank_says(ranks, "the ranks were started with different options (--lr, --seq-len): start every rank"
                    " with the same")  # fmt: skip
    assert not run.exists()


# each rank in a folder of its own (RANK_DIRS/0, RANK_DIRS/1), as on two machines
IN_A_FOLDER_OF_ITS_OWN = """
import os, runpy, sys
os.chdir(os.path.join(os.environ["RANK_DIRS"], os.environ["RANK"]))
sys.argv[0] = "htcli"
runpy.run_module("htcli", run_name="__main__")
"""


def test_a_corpus_missing_on_one_machine_is_said_by_every_rank(ddp_run, tmp_path):
    """A corpus path that exists on rank 0's machine only: rank 1 said so, and rank 0 only that it had lost
    contact with the others (review). Rank 0 names rank 1 and its error; each exits 1, nothing written."""
    for rank in (0, 1):
        (tmp_path / str(rank)).mkdir()
    shutil.copy(ddp_run[1], tmp_path / "0" / "corpus.txt")
    run = tmp_path / "run"
    ranks = start_ranks("/proc/self/cwd/corpus.txt", "--out", run, *FLAGS, "--steps", 2,
                        program=("-c", IN_A_FOLDER_OF_ITS_OWN), RANK_DIRS=str(tmp_path))  # fmt: skip
    errors = finish(ranks)
    assert [process.returncode for process in ranks] == [1, 1], errors
    assert errors[1].startswith("error: corpus /proc/self/cwd/corpus.txt does not exist"), errors
    assert errors[1].count("\n") == 1 and errors[0] == errors[1].replace("error: ", "error: rank 1: ")
    assert not run.exists()


FAILING_DATA_ON_RANK_1 = """
import os
from htcli import train
from htcli.cli import app

real_open = train.Run._open_data

def failing_on_rank_1(self):
    if os.environ["RANK"] == "1":
        raise OSError("the disk went away")
    return real_open(self)

train.Run._open_data = failing_on_rank_1
app(prog_name="htcli")
"""


def test_an_unforeseen_error_of_one_rank_is_named_by_the_others(ddp_run, tmp_path):
    """An error that is not htcli's own (an OSError while rank 1 opens its data) reached rank 0 only as
    "lost contact" after the timeout: rank 0 names rank 1 and the error at once."""
    run = tmp_path / "run"
    program = ("-c", FAILING_DATA_ON_RANK_1)
    ranks = start_ranks(ddp_run[1], "--out", run, *FLAGS, "--steps", 2, program=program)
    errors = finish(ranks)
    assert ranks[0].returncode == 1 and ranks[1].returncode != 0, errors
    assert errors[0] == "error: rank 1: OSError: the disk went away\n", errors
    assert "the disk went away" in errors[1] and not run.exists()


def test_nan_on_one_rank_stops_every_rank(ddp_run, tmp_path):
    """A NaN loss on rank 1 alone stops both ranks at that step with the divergence error; step 3 stays."""
    run = tmp_path / "run"
    program = ("-c", NAN_ON_RANK_1_AT_STEP_5)
    errors = finish(start_ranks(ddp_run[1], "--out", run, *FLAGS, "--steps", 6, program=program))
    for error in errors:
        assert error.strip().splitlines()[-1].startswith("error: training diverged at step 5 (loss nan"), (
            error
        )
        assert "the checkpoint of step 3" in error and "Traceback" not in error
    assert json.loads((run / "state.json").read_text())["step"] == 3


def test_ranks_on_unlike_cpus_compute_in_one_precision(ddp_run, tmp_path):
    """dtype auto resolves per machine: bf16 on rank 0 (AMX), fp32 on rank 1 (none); the ranks then both
    train in fp32 rather than average gradients computed in two precisions, and both orthogonalise Muon's
    updates in fp32 (rank 0 alone would in bf16: the ranks' weights would part)."""
    program = ("-c", UNLIKE_CPUS)
    ranks = start_ranks(ddp_run[1], "--out", tmp_path / "run", *FLAGS, "--steps", 1, program=program)
    errors = finish(ranks)
    assert [process.returncode for process in ranks] == [0, 0], errors
    for rank, error in enumerate(errors):
        assert f"rank {rank} computes in torch.float32, Muon in torch.float32" in error, error
    assert json.loads((tmp_path / "run" / "state.json").read_text())["dtype"] == "fp32"


def test_an_error_of_rank_0_alone_stops_every_rank_at_once(ddp_run, tmp_path):
    """A logger that cannot start (W&B online without a login) opens on rank 0 alone: every rank stops
    with its one line (rank 1 waited at the first step, and said it had lost contact with the others once
    rank 0 had exited)."""
    wandb = dict(WANDB_MODE="online", HOME=str(tmp_path), WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"))
    args = [ddp_run[1], "--out", tmp_path / "run", *FLAGS, "--steps", 2, "--logger", "wandb"]
    ranks = start_ranks(*args, HTCLI_DIST_TIMEOUT="600", **wandb)
    errors = finish(ranks)
    assert [process.returncode for process in ranks] == [1, 1], errors
    for error in errors:
        assert error.strip().splitlines() == [
            "error: --logger wandb could not start (No API key configured. Use `wandb login` to log in.): "
            "run `wandb login` or set WANDB_API_KEY, or WANDB_MODE=offline to log on disk"
        ], error
    assert not (tmp_path / "run" / "config.json").exists()


def test_a_hung_rank_stops_the_others_after_the_timeout(ddp_run, tmp_path):
    """When rank 1 stops answering mid-run, rank 0 exits 1 after HTCLI_DIST_TIMEOUT with one clear line."""
    run = tmp_path / "run"
    args = [ddp_run[1], "--out", run, *FLAGS, "--steps", 100_000, "--eval-every", 0, "--save-every", 0]
    ranks = start_ranks(*args, HTCLI_DIST_TIMEOUT="3")
    wait_for_a_step(run, ranks)
    ranks[1].send_signal(signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        stderr = ranks[0].communicate(timeout=60)[1]
        waited = time.monotonic() - stopped
    finally:
        kill(ranks)
    assert ranks[0].returncode == 1 and "Traceback" not in stderr
    assert (
        stderr.strip()
        .splitlines()[-1]
        .startswith("error: rank 0 lost contact with the other processes (Timed out waiting 3000ms")
    )
    assert 2 < waited < 30


def test_early_stopping_stops_every_rank_at_the_same_step(ddp_run, tmp_path):
    """--patience under torchrun: rank 0 decides, every rank stops after the same step (one that went on would
    wait in its next collective until the timeout), exit 0, one early_stop event; the hint to train on names
    torchrun; resumed with a larger patience, the ranks go on and stop together again."""
    _, corpus, _ = ddp_run
    rising = ["--eval-every", 1, "--optimizer", "adamw", "--lr", 0.3, "--min-lr", 0.3, "--steps", 40]
    run = tmp_path / "run"
    done = torchrun(corpus, "--out", run, *FLAGS, *rising, "--patience", 2)
    stop = events(run, "early_stop")
    assert len(stop) == 1 and json.loads((run / "state.json").read_text())["step"] == stop[0]["step"] < 40
    assert f"to train on: torchrun ... -m htcli train --resume --out {run}" in done.stderr
    torchrun("--out", run, "--resume", "--patience", 3)
    assert [e["step"] for e in events(run, "early_stop")][-1] > stop[0]["step"]
