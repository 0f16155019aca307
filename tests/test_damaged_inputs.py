"""Untrusted and damaged files and options: one line, exit 1, no traceback, no file changed, and nothing
huge allocated before the check."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import TINY_FLAGS, assert_user_error, invoke, make_text, tiny_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from htcli.checkpoint import CHECKSUM
from htcli.train import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged")
    corpus = root / "corpus.txt"
    corpus.write_bytes(make_text(20_000))
    train(tiny_config(corpus, root / "run", steps=2, save_every=2))
    return root / "run", corpus


@pytest.fixture
def run(trained, tmp_path):
    """A copy of a 2-step run that a test may damage."""
    shutil.copytree(trained[0], tmp_path / "run")
    return tmp_path / "run", trained[1]


def snapshot(directory) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def metadata_of(path) -> dict:
    with safe_open(str(path), "pt") as opened:
        return opened.metadata()


def rewrite_model(path, config_changes=None, tensors=None, metadata=None) -> None:
    """model.safetensors with its config (or tensors, or metadata) changed."""
    meta = metadata_of(path)
    del meta[CHECKSUM]  # (written by hand: with no checksum, as by htcli before it, or by another tool)
    config = json.loads(meta["htcli_config"])
    meta["htcli_config"] = json.dumps({**config, **(config_changes or {})})
    save_file(
        tensors if tensors is not None else load_file(str(path)),
        str(path),
        metadata={**meta, **(metadata or {})},
    )


def peak_rss_of_sample(checkpoint) -> tuple[int, str]:
    """(peak RSS in MiB, stderr) of `htcli sample CHECKPOINT` in its own process."""
    script = (
        "import resource, sys\n"
        "from htcli.cli import app\n"
        "try:\n    app(sys.argv[1:], prog_name='htcli')\n"
        "finally:\n    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    )
    args = ["sample", str(checkpoint), "--max-new-tokens", "2", "--device", "cpu"]
    process = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True)
    lines = process.stderr.strip().splitlines()
    return int(lines[-1]) // 1024, "\n".join(lines[:-1])


@pytest.mark.parametrize("claim", [dict(dim=2048, depth=64, heads=32), dict(dim=10**9)])
def test_a_small_file_claiming_a_huge_model_is_refused_cheaply(run, claim):
    """A checkpoint whose metadata claims dim 2048 x depth 64 (13 GB) or dim 10**9 is refused before anything
    is allocated: peak memory stays that of a normal small checkpoint."""
    out, _ = run
    normal, _ = peak_rss_of_sample(out)
    fake = out.parent / "fake.safetensors"
    save_file({"w": torch.zeros(2)}, str(fake), metadata={**metadata_of(out / "model.safetensors")})
    meta = metadata_of(fake)
    meta["htcli_config"] = json.dumps({**json.loads(meta["htcli_config"]), **claim})
    save_file({"w": torch.zeros(2)}, str(fake), metadata=meta)
    assert fake.stat().st_size < 1000
    peak, stderr = peak_rss_of_sample(fake)
    assert stderr.startswith("error: ") and len(stderr.splitlines()) == 1, stderr
    assert "tensors do not match its model config" in stderr or "up to" in stderr
    assert peak < normal + 64, f"{peak} MiB to refuse, {normal} MiB to sample a real checkpoint"


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(block_size=16.0), "block_size must be an even number >= 2, got 16.0"),
        (dict(causal="no"), "causal must be true or false, got 'no'"),
        (dict(num_tokens=300), "a byte model has 256 tokens, its config 300"),
        (dict(depth="2"), "depth must be a positive integer"),
    ],
)
@pytest.mark.parametrize("command", ["sample", "eval"])
def test_wrongly_typed_model_configs(run, changes, message, command):
    """Config values of the wrong type or a vocabulary other than bytes: refused by name."""
    out, corpus = run
    rewrite_model(out / "model.safetensors", changes)
    args = ["sample", out] if command == "sample" else ["eval", out, corpus]
    assert_user_error(invoke(*args, "--device", "cpu"), message)


def flip_a_byte(path, from_end: int) -> None:
    data = bytearray(path.read_bytes())
    data[-from_end] ^= 1
    path.write_bytes(bytes(data))


def test_a_byte_damaged_in_place_is_found(run, tmp_path):
    """A byte flipped inside a weight, a moment or a number of the metadata (a disk's bit rot; the file's
    size unchanged) loaded as it was: sample and eval ran, a resume went on (review). Each file's checksum
    finds it: one line, exit 1, the file as it was; a file without one (htcli before it) loads as before."""
    out, corpus = run
    model, optimizer = out / "model.safetensors", out / "optimizer.safetensors"
    damaged = "is damaged: its bytes do not match the checksum saved with them"
    commands = {
        "sample": ["sample", out, "--device", "cpu", "--max-new-tokens", 5],
        "eval": ["eval", out, corpus, "--device", "cpu"],
        "resume": ["train", "--out", out, "--resume", "--steps", 4],
    }
    for file, hit in [(model, commands), (optimizer, ["resume"])]:
        kept = file.read_bytes()
        flip_a_byte(file, 5000)
        for name, args in commands.items():
            result = invoke(*args)
            if name in hit:
                assert_user_error(result, f"{file} {damaged}")
            else:
                assert result.exit_code == 0, result.output
        file.write_bytes(kept)
    header = model.read_bytes()
    at = header.index(b'"val_bpb":"') + len(b'"val_bpb":"')  # (a digit of its val bpb)
    model.write_bytes(header[:at] + bytes([header[at] ^ 1]) + header[at + 1 :])
    assert_user_error(invoke(*commands["sample"]), f"{model} {damaged}")
    model.write_bytes(header)
    rewrite_model(model)  # (as htcli before the checksum wrote it: none)
    assert invoke(*commands["sample"]).exit_code == 0


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_nan_weights(run, command):
    """A checkpoint holding NaN weights is refused by sample and eval, naming a tensor."""
    out, corpus = run
    tensors = load_file(str(out / "model.safetensors"))
    tensors["norm.weight"] = torch.full_like(tensors["norm.weight"], float("nan"))
    rewrite_model(out / "model.safetensors", tensors=tensors)
    args = ["sample", out] if command == "sample" else ["eval", out, corpus, "--json"]
    result = invoke(*args, "--device", "cpu")
    assert_user_error(result, "holds NaN or infinite weights (in norm.weight)")
    assert "NaN" not in result.stdout


def test_a_bidirectional_model_is_not_evaluated_sampled_or_trained(run, tmp_path):
    """eval and sample refuse a non-causal model, whose predictions see the bytes they predict (sample
    drew bytes from it); train refuses to make one (a config file could: it trained on next bytes it saw)."""
    out, corpus = run
    rewrite_model(out / "model.safetensors", dict(causal=False))
    assert_user_error(invoke("eval", out, corpus, "--device", "cpu"), "the model is bidirectional")
    assert_user_error(invoke("sample", out, "--device", "cpu"), "the model is bidirectional (causal false)")
    config = tmp_path / "bidirectional.toml"
    config.write_text("[model]\ncausal = false\n")
    made = invoke("train", corpus, "--out", tmp_path / "new", "--config", config, *TINY_FLAGS)
    assert_user_error(made, f"{config}: model.causal = false makes the model bidirectional: htcli trains")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("kind", [torch.int64, torch.bool, torch.uint8])
@pytest.mark.parametrize("command", ["sample", "eval"])
def test_weights_that_are_not_numbers_of_a_model(run, kind, command):
    """A tensor of integers or booleans where a weight belongs: refused, naming it (they were converted)."""
    out, corpus = run
    tensors = load_file(str(out / "model.safetensors"))
    tensors["norm.weight"] = tensors["norm.weight"].to(kind)
    rewrite_model(out / "model.safetensors", tensors=tensors)
    args = ["sample", out] if command == "sample" else ["eval", out, corpus]
    said = (
        f"its tensor norm.weight holds {safe_name(kind)} values, where a model's weights are floating-point"
    )
    assert_user_error(invoke(*args, "--device", "cpu"), said)


def safe_name(kind: torch.dtype) -> str:
    return {torch.int64: "I64", torch.bool: "BOOL", torch.uint8: "U8"}[kind]


@pytest.mark.parametrize(
    "version,changes,message",
    [
        ("9.1.0", dict(window="sliding"), "was written by htcli 9.1.0, newer than this htcli 0."),
        ("0.1.0", dict(window="sliding"), "is not an htcli checkpoint (bad metadata:"),
        ("?", dict(window="sliding"), "is not an htcli checkpoint (bad metadata:"),
        ("9.1.0", {}, None),  # a newer htcli's checkpoint that this one can read: read
    ],
)
def test_a_checkpoint_from_a_newer_htcli(run, version, changes, message):
    """A model config this htcli cannot read, from a newer htcli: it says to upgrade."""
    out, _ = run
    rewrite_model(out / "model.safetensors", changes, metadata={"htcli_version": version})
    result = invoke("sample", out, "--device", "cpu", "--max-new-tokens", 3)
    if message is None:
        assert result.exit_code == 0, result.output
    else:
        assert_user_error(result, message)
        assert ("upgrade htcli" in result.stderr) == version.startswith("9")


@pytest.mark.parametrize("step", ["abc", "-1", "1.5", "\u0663", "9" * 5000])
def test_a_step_that_is_not_a_whole_number(run, step):
    """A step that is not a whole number (int() said "invalid literal"), or too long for int() (with a
    version as long, that _newer does not read): one line."""
    out, _ = run
    rewrite_model(out / "model.safetensors", metadata={"step": step, "htcli_version": "9" * 5000})
    said = f"bad metadata: step {step!r} is not a whole number)" if len(step) < 10 else "(bad metadata: "
    assert_user_error(invoke("sample", out, "--device", "cpu"), said)


@pytest.mark.parametrize("val_bpb", ["nan", "", "true", '"3.5"', "[1]"])
def test_a_val_bpb_that_is_not_a_number(run, val_bpb):
    """A val_bpb in the metadata that is not a JSON number (json said "Expecting value" without naming
    the field, and took true for a number): one line naming it."""
    out, _ = run
    rewrite_model(out / "model.safetensors", metadata={"val_bpb": val_bpb})
    assert_user_error(
        invoke("sample", out, "--device", "cpu"), f"bad metadata: val_bpb {val_bpb!r} is not a number)"
    )


@pytest.mark.parametrize(
    "state,message",
    [
        ("[1, 2]", "is not an htcli training state (not a JSON object)"),
        ('{"step": 2, "val_bpb": 1.0}', "'world_size' missing or not a whole number)"),
        ('{"step": 2, "world_size": 1, "ranks": {}}', "'ranks' missing or not a list)"),
        ('{"step": 2, "world_size": 1, "ranks": [{}], "grad_scaler": {}}', "not one state per process"),
    ],
)
def test_damaged_state_json(run, state, message):
    """A state.json that is not an object, or misses keys: the resume is refused, nothing written."""
    out, _ = run
    (out / "state.json").write_text(state)
    before = snapshot(out)
    assert_user_error(invoke("train", "--out", out, "--resume", "--steps", 4), message)
    assert snapshot(out) == before


def test_config_json_with_a_string_corpus(run):
    """A config.json whose corpus is a string (not a list) is refused; config.json and log.jsonl unchanged."""
    out, corpus = run
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "corpus": str(corpus)}))
    before = snapshot(out)
    assert_user_error(
        invoke("train", "--out", out, "--resume", "--steps", 4), "corpus must be a list of paths"
    )
    assert snapshot(out) == before


@pytest.mark.parametrize(
    "change,flags,message",
    [
        (
            {"lr": -1},
            [],
            "{out}/config.json: lr must be a positive number up to 1000, got -1: fix it in that file",
        ),
        (
            {"model": {"block_size": 12}},
            [],
            "{out}/config.json: impossible model options: max_seq_len (64) must be a multiple of block_size",
        ),
        (
            {"model": {"block_size": 12}},
            ["--block-size", "12"],
            "--seq-len (64) must be a multiple of --block-size",
        ),
    ],
)
def test_bad_values_in_config_json_are_blamed_on_the_file(run, change, flags, message):
    """A value in a run's config.json that its checks refuse: the error names the file and the field, not
    a flag the command did not give (it said "--lr must be a positive number"); a flag given keeps the
    blame."""
    out, _ = run
    config = json.loads((out / "config.json").read_text())
    config.update({k: {**config[k], **v} if isinstance(v, dict) else v for k, v in change.items()})
    (out / "config.json").write_text(json.dumps(config))
    before = snapshot(out)
    result = invoke("train", "--out", out, "--resume", "--steps", 4, *flags)
    assert_user_error(result, message.format(out=out))
    assert snapshot(out) == before


@pytest.mark.parametrize("line", [b'{"event": "step", "step": 1, "x": "\xff"}', b"[1, 2]", b'"text"'])
def test_damaged_log(run, line):
    """A log.jsonl with a line that is not UTF-8 or not an object: refused before config.json or the log
    is written."""
    out, _ = run
    with open(out / "log.jsonl", "ab") as log:
        log.write(line + b"\n")
    before = snapshot(out)
    assert_user_error(invoke("train", "--out", out, "--resume", "--steps", 4), "is not an htcli event")
    assert snapshot(out) == before


def test_out_under_a_file_or_empty(run, tmp_path):
    """--out below a regular file, or empty: one line each, nothing created."""
    _, corpus = run
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    assert_user_error(invoke("train", corpus, "--out", blocker / "run", *TINY_FLAGS), "is under")
    assert_user_error(invoke("train", corpus, "--out", "", *TINY_FLAGS), "--out must name the run directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "run"]


def without_root_override() -> list[str]:
    """A command prefix that runs a program without the power to ignore file permissions (root's
    CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH), so that permission bits hold as for any user."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    assert setpriv, "running as root, these tests need setpriv (util-linux) to drop the permission override"
    drop = "-dac_override,-dac_read_search"
    return [setpriv, f"--inh-caps={drop}", f"--bounding-set={drop}"]


def htcli_without_override(*args) -> subprocess.CompletedProcess:
    command = [*without_root_override(), sys.executable, "-m", "htcli", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def owned_by_nobody(path, mode: int):
    os.chown(path, 65534, 65534) if os.geteuid() == 0 else None
    os.chmod(path, mode)
    return path


def test_read_only_out(run, tmp_path):
    """An --out that cannot be written: one line, exit 1, nothing written."""
    _, corpus = run
    locked = owned_by_nobody(tmp_path / "locked", 0o555) if (tmp_path / "locked").mkdir() is None else None
    process = htcli_without_override("train", corpus, "--out", locked / "run", *TINY_FLAGS)
    assert process.returncode == 1, process.stderr
    assert process.stderr.startswith(
        f"error: cannot write the run directory {locked / 'run'}: Permission denied; give an --out you may"
        " write, or change its permissions"  # (what to do was not said)
    )
    assert len(process.stderr.strip().splitlines()) == 1
    assert list(locked.iterdir()) == []


def test_a_run_directory_whose_permissions_are_taken_while_it_trains(run, tmp_path):
    """chmod 000 of the run directory mid-run was told as its lock file "moved, deleted or replaced ...
    (another run may train there now)" (review): the permissions are named, the last checkpoint kept."""
    _, corpus = run
    out = tmp_path / "mine"
    command = [*without_root_override(), sys.executable, "-m", "htcli", "train", corpus, "--out", out,
               *TINY_FLAGS, "--steps", 100_000, "--save-every", 1, "--eval-every", 0]  # fmt: skip
    process = subprocess.Popen(list(map(str, command)), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (out / "state.json").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    out.chmod(0)
    try:
        _, stderr = process.communicate(timeout=120)
    finally:
        out.chmod(0o755)
    said = stderr.decode().strip().splitlines()[-1]
    assert process.returncode == 1 and "Traceback" not in stderr.decode(), stderr
    reach = f"error: cannot reach the run directory {out} any more: Permission denied (the checkpoint of "
    assert said.startswith(reach), said
    assert said.endswith("is intact); restore its permissions (and its parents'), then resume"), said
    assert invoke("sample", out, "--max-new-tokens", 2, "--device", "cpu").exit_code == 0


def test_a_resume_that_cannot_write_is_told_to_mend_and_resume(run):
    """A run to resume whose directory cannot be written was told to "give an --out you may write" (review):
    a resume stays where its run is: mend it, then resume."""
    out, corpus = run
    owned_by_nobody(out, 0o555)
    try:
        process = htcli_without_override("train", corpus, "--out", out, *TINY_FLAGS, "--resume", "--steps", 4)
    finally:
        out.chmod(0o755)
    said = process.stderr.strip().splitlines()
    assert process.returncode == 1 and len(said) == 1, process.stderr
    assert said[0].startswith(f"error: cannot write the run directory {out}: Permission denied;"), said
    assert said[0].endswith("; change its permissions, then resume"), said


def test_directory_entry_that_cannot_be_looked_at(run, tmp_path):
    """A corpus directory whose entries cannot be stat'ed (readable, not searchable): one line naming it."""
    _, corpus = run
    tree = tmp_path / "tree"
    (tree / "blind").mkdir(parents=True)
    (tree / "a.txt").write_bytes(make_text(20_000))
    (tree / "blind" / "b.txt").write_bytes(b"x")
    owned_by_nobody(tree / "blind", 0o644)
    process = htcli_without_override("train", tree, "--out", tmp_path / "new", *TINY_FLAGS)
    assert process.returncode == 1, process.stderr
    assert process.stderr.strip() == (
        f"error: cannot read {tree / 'blind' / 'b.txt'}: Permission denied: give a path you may read, or"
        " change its permissions"
    )
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "CORPUS", "--seed", str(2**70)], "--seed must be a whole number from 0 to 2**63 - 1"),
        (["sample", "RUN", "--seed", str(2**70)], "--seed must be a whole number from 0 to 2**63 - 1"),
        (["sample", "RUN", "--temperature", "nan"], "--temperature must be a finite number >= 0 (0: greedy)"),
        (["sample", "RUN", "--temperature", "inf"], "--temperature must be a finite number >= 0 (0: greedy)"),
        (["sample", "RUN", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1 (the bytes to"),
    ],
)
def test_impossible_numbers(run, args, message):
    """A seed beyond 64 bits, a NaN or infinite temperature, no bytes to make: refused by the flag's name."""
    out, corpus = run
    args = [{"CORPUS": corpus, "RUN": out}.get(arg, arg) for arg in args]
    extra = TINY_FLAGS + ["--out", out.parent / "new"] if args[0] == "train" else ["--device", "cpu"]
    assert_user_error(invoke(*args, *extra), message)


def test_huge_distributed_timeout(run, monkeypatch, tmp_path):
    """HTCLI_DIST_TIMEOUT of 1e308 is refused with the largest it takes."""
    _, corpus = run
    for name, value in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_PORT", "29999")
    monkeypatch.setenv("HTCLI_DIST_TIMEOUT", "1e308")
    result = invoke("train", corpus, "--out", tmp_path / "new", *TINY_FLAGS)
    assert_user_error(result, "HTCLI_DIST_TIMEOUT must be a positive number of seconds, got '1e308' (at most")


def test_prompt_file_reads_only_the_context(run, tmp_path):
    """--prompt-file uses (and reads) only its last context's worth of bytes: a 1 GB sparse file is quick."""
    out, _ = run
    big = tmp_path / "big.txt"
    with open(big, "wb") as file:
        file.truncate(1 << 30)
        file.seek((1 << 30) - 10)
        file.write(b"the end.\n!")
    result = invoke("sample", out, "--prompt-file", big, "--max-new-tokens", 1, "--device", "cpu")
    assert result.exit_code == 0, result.output
    # the prompt's end, one new byte (a character, or U+FFFD for a byte that is not UTF-8), a newline
    before, _, new = result.stdout.rpartition("the end.\n!")
    assert before.strip("\x00") == "" and len(new) == 2 and new.endswith("\n"), result.stdout[-20:]
    assert len(result.stdout.encode()) <= 64 + 1 + 4 + 1  # context, new byte (<= 4 as UTF-8), newline


@pytest.mark.parametrize("kind", ["fifo", "dev_zero"])
def test_prompt_file_that_is_not_a_file(run, tmp_path, kind):
    """A FIFO (no writer) or /dev/zero as --prompt-file is refused at once instead of hanging."""
    out, _ = run
    if kind == "fifo":
        path = tmp_path / "fifo"
        os.mkfifo(path)
    else:
        path = "/dev/zero"
    outcome = {}
    worker = threading.Thread(
        target=lambda: outcome.update(result=invoke("sample", out, "--prompt-file", path))
    )
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "sample hung on the prompt file"
    assert_user_error(outcome["result"], "is not a regular file")


@pytest.mark.parametrize(
    ("name", "command"),
    [
        ("model.safetensors", ["sample", "{out}", "--max-new-tokens", "1", "--device", "cpu"]),
        ("model.safetensors", ["eval", "{out}", "{corpus}", "--device", "cpu"]),
        ("log.jsonl", ["plot", "{out}", "-o", "{out}.png"]),
        ("config.json", ["train", "--out", "{out}", "--resume", "--steps", "4"]),
        ("log.jsonl", ["train", "--out", "{out}", "--resume", "--steps", "4"]),
        (".lock", ["train", "--out", "{out}", "--resume", "--steps", "4"]),
    ],
)
def test_run_files_that_are_fifos_are_refused(run, name, command):
    """A FIFO where a run's file belongs was opened and waited on for ever (no writer comes), deaf to
    Ctrl-C and SIGTERM: refused at once, in one line (a real process, killed if it hangs)."""
    out, corpus = run
    (out / name).unlink()
    os.mkfifo(out / name)
    args = [part.format(out=out, corpus=corpus) for part in command]
    try:
        done = subprocess.run(
            [sys.executable, "-m", "htcli", *args], capture_output=True, text=True, timeout=60
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"htcli {command[0]} hung on a FIFO as {name}")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: {out / name} is not a regular file (a pipe or a device?): give the file htcli wrote"
    ]


def htcli_to(stdout, *args) -> subprocess.CompletedProcess:
    """htcli ARGS in its own process, its stdout to `stdout` (None: closed), its stderr read; stdout
    buffered, as on a terminal user's machine (PYTHONUNBUFFERED would hide a second failed flush)."""
    command = [sys.executable, "-m", "htcli", *map(str, args)]
    if stdout is None:
        command = ["sh", "-c", 'exec "$@" >&-', "sh", *command]
    env = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    return subprocess.run(command, stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=120, env=env)


def test_output_that_cannot_be_written_is_one_line(trained, tmp_path):
    """stdout to a full disk (a traceback before; then, printed through rich, the same line twice), and
    closed (an AttributeError): one line, exit 1; eval's --plot is not written then (it was, before the
    output failed)."""
    out, corpus = trained
    full_disk = "error: cannot write the output: No space left on device: free some space, or send the output"
    full_disk += " elsewhere"
    sample = ["sample", out, "--max-new-tokens", "2", "--device", "cpu"]
    plot = ["--by-position", "--plot", tmp_path / "p.png"]
    with open("/dev/full", "w") as full:
        for args in (
            ["eval", out, corpus, "--json", "--device", "cpu"],
            ["eval", out, corpus],
            ["eval", out, corpus, "--json", *plot],
            ["eval", out, corpus, *plot],
            sample,
            ["--help"],
        ):
            done = htcli_to(full, *args)
            assert (done.returncode, done.stderr.strip()) == (1, full_disk), (args, done.stderr)
    assert not (tmp_path / "p.png").exists()
    done = htcli_to(None, *sample)
    assert (done.returncode, done.stderr.strip()) == (
        1,
        "error: stdout is closed: send it to a file or to /dev/null",
    ), done.stderr


def test_a_path_in_a_directory_one_may_not_enter_is_one_line(trained, tmp_path):
    """A corpus or run inside a directory without permissions was a PermissionError traceback."""
    out, corpus = trained
    closed = tmp_path / "closed"
    closed.mkdir()
    shutil.copy(corpus, closed / "a.txt")
    closed.chmod(0)
    advice = "Permission denied: give a path you may read (and write, for a run), or change that"
    try:
        for args, path in (
            (["eval", out, closed / "a.txt"], closed / "a.txt"),
            (["sample", closed / "r"], closed / "r"),
        ):
            done = htcli_without_override(*args, "--device", "cpu")
            assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
            assert done.stderr.strip().splitlines() == [f"error: {path}: {advice}"], done.stderr
    finally:
        closed.chmod(0o755)


def test_a_held_out_file_one_may_not_read_beside_a_corpus_file_of_its_size(trained, tmp_path):
    """--val of an unreadable file the size of a corpus file (compared byte by byte, to refuse a copy) said
    "give a path you may read (and write, for a run) ... any checkpoint saved before is intact" before any
    run began (review): it names the file as an unreadable corpus file is named."""
    _, corpus = trained
    held_out = tmp_path / "held_out.txt"
    held_out.write_bytes(make_text(len(corpus.read_bytes()), seed=3))
    held_out.chmod(0)
    try:
        done = htcli_without_override("train", corpus, "--val", held_out, "--out", tmp_path / "r", "--preset",
                                      "tiny", "--steps", "1", "--device", "cpu")  # fmt: skip
    finally:
        held_out.chmod(0o644)
    said = f"error: cannot read {held_out}: Permission denied: give a path you may read, or change its"
    said += " permissions"
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [said], done.stderr
    assert not (tmp_path / "r").exists()


# resolve_corpus of each pattern in argv[1:], printed as what it gives or the error it raises
RESOLVE_EACH = """
import sys
from htcli.corpus import resolve_corpus
from htcli.errors import HtcliError
for pattern in sys.argv[1:]:
    try:
        print([str(path) for path in resolve_corpus([pattern])])
    except HtcliError as error:
        print(error)
"""


def test_a_glob_through_a_directory_one_may_not_enter_is_one_line(trained, tmp_path):
    """A glob whose matches could lie in a directory one may not enter read the rest without a word
    (less data than asked for); a glob that cannot match there is not stopped by it."""
    out, corpus = trained
    for name in ("ok", "closed"):
        (tmp_path / "d" / name).mkdir(parents=True)
        shutil.copy(corpus, tmp_path / "d" / name / "a.txt")
    closed = tmp_path / "d" / "closed"
    refused = f"cannot read directory {closed}: Permission denied: give a path you may read, or change its "
    refused += "permissions"
    closed.chmod(0)
    try:
        done = htcli_without_override("eval", out, tmp_path / "d/**/*.txt", "--device", "cpu")
        assert done.returncode == 1 and done.stderr.strip().splitlines() == [f"error: {refused}"], done.stderr
        patterns = [str(tmp_path / pattern) for pattern in ("d/*/*.txt", "d/c*/a.txt", "d/*", "d/o*/*.txt")]
        command = [*without_root_override(), sys.executable, "-c", RESOLVE_EACH, *patterns]
        said = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    finally:
        closed.chmod(0o755)
    assert said.splitlines() == [refused] * 3 + [str([str(tmp_path / "d/ok/a.txt")])]


def test_a_file_where_tensorboards_directory_belongs(run):
    """A file named tensorboard in the run directory was a FileExistsError traceback."""
    out, corpus = run
    (out / "tensorboard").write_text("mine")
    result = invoke("train", "--out", out, "--resume", "--steps", "4", "--logger", "tensorboard")
    assert_user_error(result, f"{out / 'tensorboard'} is not a directory: TensorBoard's event files go there")
    assert (out / "tensorboard").read_text() == "mine"


def test_a_run_whose_name_is_not_utf8(trained, tmp_path):
    """A run directory whose name is not UTF-8 trained, then was called corrupt by sample, eval and resume
    (safetensors cannot open such a path) and was a traceback in plot: train refuses such an out at once,
    a checkpoint there is refused by its name, plot shows the name escaped."""
    out, corpus = trained
    odd = os.fsdecode(bytes(tmp_path) + b"/run\xfe")
    shown = os.fsencode(odd).decode("utf-8", "backslashreplace")
    refused = " is not a UTF-8 name, which safetensors cannot open: use another name"
    given = invoke("train", corpus, *TINY_FLAGS, "--out", odd)
    assert_user_error(given, "the run directory (--out) " + shown + refused)
    assert not os.path.exists(odd)
    shutil.copytree(out, odd)
    assert_user_error(invoke("sample", odd, "--device", "cpu"), f"{shown}/model.safetensors{refused}")
    result = invoke("plot", odd, "-o", tmp_path / "curves.png")
    assert result.exit_code == 0 and "run\\xfe" in result.stdout, result.output


def test_an_error_naming_a_path_of_control_characters_is_one_line(trained, tmp_path):
    """A corpus name holding an escape sequence and a newline: the error line sent the escape to the
    terminal and broke in two (review); they are shown as \\x1b and \\x0a."""
    out, _ = trained
    name = tmp_path / "no\x1b[31mred\nx.txt"
    result = invoke("eval", out, name, "--device", "cpu")
    assert_user_error(result, "no\\x1b[31mred\\x0ax.txt")
    assert "\x1b" not in result.stderr


def test_a_run_name_too_long_says_to_shorten_it(corpus, tmp_path):
    """An --out of 300 bytes (past the filesystem's 255 a name): the system's words and what to do (it
    said only "File name too long"; review)."""
    result = invoke("train", corpus, *TINY_FLAGS, "--out", tmp_path / ("b" * 300))
    assert_user_error(result, "File name too long: give a shorter name or path")
    printed = invoke("train", corpus, *TINY_FLAGS, "--out", tmp_path / ("b" * 300), "--print-config")
    assert printed.exit_code == 0 and "File name too long: give a shorter name or path" in printed.stderr


def test_a_utf8_named_run_in_a_locale_that_is_not_utf8(trained, tmp_path):
    """A run named in UTF-8 (rün), used where the locale is ASCII (Python then holds the name's bytes as
    surrogates): it was refused as "not a UTF-8 name", which it is (review); safetensors opens it."""
    out, _ = trained
    shutil.copytree(out, tmp_path / "rün")
    ascii_locale = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    command = [sys.executable, "-m", "htcli", "sample", "rün", "--max-new-tokens", "3", "--json"]
    done = subprocess.run(
        [*command, "--device", "cpu"], cwd=tmp_path, env=ascii_locale, capture_output=True, timeout=120
    )
    assert done.returncode == 0 and json.loads(done.stdout)["bytes"] == 3, done.stderr


@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_a_run_file_one_may_not_read_is_named_so(run, name):
    """A checkpoint or config.json without read permission was called corrupt ("truncated or corrupt?")."""
    out, _ = run
    (out / name).chmod(0)
    done = htcli_without_override("train", "--out", out, "--resume", "--steps", "4", "--device", "cpu")
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        f"error: cannot read {out / name}: Permission denied: give a path you may read, or change its"
        " permissions"
    ], done.stderr


def _pending(run, name: str):
    return run / f".{name}.pending"


PENDING_DAMAGE = {
    "junk weights": lambda run: _pending(run, "model.safetensors").write_bytes(b"junk"),
    "a folder": lambda run: (
        _pending(run, "optimizer.safetensors").unlink(),
        _pending(run, "optimizer.safetensors").mkdir(),
    ),
    "a pipe": lambda run: (_pending(run, "state.json").unlink(), os.mkfifo(_pending(run, "state.json"))),
    "another step": lambda run: _pending(run, "state.json").write_text(
        json.dumps({**json.loads((run / "state.json").read_text()), "step": 7})
    ),
}


@pytest.mark.parametrize("damage", PENDING_DAMAGE)
def test_a_damaged_save_cut_short_is_refused_before_it_replaces_anything(run, damage):
    """A save cut short between its renames is finished by the resume; where its pending files are not what
    it wrote (damaged, or put there by hand: htcli never leaves these), the resume refused them only
    after they had replaced the checkpoint's good files. Now they are checked first and nothing changes."""
    out, _ = run
    for name in ("model.safetensors", "optimizer.safetensors", "state.json"):
        shutil.copy(out / name, _pending(out, name))
    before = {name: (out / name).read_bytes() for name in ("model.safetensors", "optimizer.safetensors")}
    PENDING_DAMAGE[damage](out)
    result = invoke("train", "--out", out, "--resume", "--steps", 4)
    assert_user_error(result, f"a save cut short cannot be finished; remove the .pending files in {out}")
    assert {name: (out / name).read_bytes() for name in before} == before
    assert json.loads((out / "state.json").read_text())["step"] == 2


LOW_LIMIT = """
import errno, os, resource, sys, types
from htcli.checkpoint import read_checkpoint_info
from htcli.cli import os_error_line
from htcli.train import Run

taken = {int(fd) for fd in os.listdir("/proc/self/fd")}
free = min(fd for fd in range(max(taken) + 2) if fd not in taken)
resource.setrlimit(resource.RLIMIT_NOFILE, (free, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
try:  # (no descriptor left)
    read_checkpoint_info(sys.argv[1])
except OSError as error:
    unsaved = types.SimpleNamespace(saved_step=None)
    print(error.errno == errno.EMFILE, os_error_line(error), Run.advice(unsaved, error.errno), sep="\\n")
"""


def test_a_checkpoint_read_under_a_low_limit_on_open_files(run, tmp_path):
    """A checkpoint's metadata read with no descriptor left (a save's check of its files, under a low
    `ulimit -n`) said "not a readable safetensors file (truncated or corrupt?)", and torch's map of the file
    failing so was a RuntimeError's traceback: both are the OSError, said with the advice to raise the limit,
    as a save's failure is."""
    from htcli.checkpoint import _mapping_error

    out, _ = run
    done = subprocess.run([sys.executable, "-c", LOW_LIMIT, str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    emfile, said, advice = done.stdout.splitlines()
    assert emfile == "True" and said.endswith("Too many open files: raise the limit on open files (ulimit -n)"
                                              " and start again")  # fmt: skip
    assert str(out / "model.safetensors") in said and advice.startswith("raise the limit on open files")
    with pytest.raises(RuntimeError) as mapping:  # (torch's own words for a file it cannot map)
        torch.UntypedStorage.from_file(str(tmp_path / "gone"), shared=False, nbytes=8)
    error = _mapping_error(mapping.value, tmp_path / "gone")
    assert isinstance(error, FileNotFoundError) and error.filename == str(tmp_path / "gone")
