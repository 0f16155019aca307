"""htcli bench: measurements in subprocesses, ratios, exponents, the decode figures, errors."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import invoke, on_a_terminal
from typer.testing import CliRunner

from htcli.bench import BenchConfig, Row, correctness, decode_bench, run_isolated, scaling_exponent
from htcli.bench_report import to_json
from htcli.cli import app
from htcli.errors import HtcliError


def _spec(**overrides) -> dict:
    base = dict(
        n=256, causal=True, method="h", batch_size=1, heads=2, dim_head=16, block_size=16, device="cpu",
        dtype="fp32", warmup=0, repeats=2, max_seconds=30.0, model=False, preset="tiny",
    )  # fmt: skip
    return {**base, **overrides}


@pytest.mark.parametrize("method", ["h", "sdpa"])
def test_worker_measures_time_and_memory(method):
    """A worker subprocess reports positive times and a measured peak memory."""
    result = run_isolated(_spec(method=method))
    assert result["status"] == "ok"
    assert 0 < result["forward_s"] and 0 < result["forward_backward_s"]
    assert result["peak_bytes"] > 0


def test_worker_timeout_is_reported():
    """A measurement past its time limit is reported as a timeout, not a crash: a cold forward+backward
    longer than max_seconds (its limit began at the worker's start, with 60 s for imports on top, so
    that such a run was reported as measured), or a worker not ready within startup_seconds."""
    assert run_isolated(_spec(n=4096, max_seconds=0.01)) == {"status": "timeout"}
    assert run_isolated(_spec(n=64, max_seconds=30.0), startup_seconds=0) == {"status": "timeout"}


def test_model_step_worker():
    """--model times a full training step of the tiny preset with either attention."""
    for method in ("h", "sdpa"):
        result = run_isolated(_spec(model=True, method=method, n=128))
        assert result["status"] == "ok", result


def test_a_compiled_model_step_computes_what_the_uncompiled_one_does():
    """--model --compile times torch.compile of each model (what `train --compile` runs): the compiled
    forward gives the uncompiled one's logits, and its step runs."""
    import torch

    from htcli.bench import model_step

    spec = _spec(model=True, n=32, batch_size=2)
    plain = model_step(spec, torch.device("cpu"), torch.float32)
    compiled = model_step({**spec, "compile": True}, torch.device("cpu"), torch.float32)
    from torch._dynamo.utils import counters

    before = counters["stats"]["unique_graphs"]
    expected, got = plain[0](), compiled[0]()
    assert counters["stats"]["unique_graphs"] > before  # (compiled: the uncompiled call adds none)
    assert got.shape == (2, 32, 256)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5
    compiled[1]()
    assert not torch.equal(compiled[0](), got)  # (the step changed the weights)


def test_a_compiled_model_step_peak_is_the_steps_not_the_compilers():
    """--compile on a CPU: the cold run's peak (the process's memory) was the compiler's, ~90 MiB against
    under 1 MiB for the tiny step (review): the step is compiled first, then measured."""
    result = run_isolated(_spec(model=True, method="h", n=128, compile=True, max_seconds=120.0))
    assert result["status"] == "ok", result
    assert 0 < result["peak_bytes"] < 20 * 2**20


def test_the_model_bench_times_the_causal_model_only():
    """A bidirectional language model would see the bytes it predicts (train refuses one): --model
    times causal steps, its non-causal rows are refused (they timed the causal model until a later
    session, labelled non-causal)."""
    result = CliRunner().invoke(app, ["bench", "--model", "--preset", "tiny", "--seq-len", "128", "--device",
                                      "cpu", "--repeats", "1", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [row["causal"] for row in report["rows"]] == [True]
    # the attention measured, the preset's (the JSON said the attention bench's 4 heads x 64, block 128)
    assert {k: report["config"][k] for k in ("heads", "dim_head", "block_size")} == {
        "heads": 2, "dim_head": 32, "block_size": 16
    }  # fmt: skip
    assert "block 16" in result.stderr  # (the oracle's check, and the title)
    for mode in ("--non-causal", "--both"):
        refused = CliRunner().invoke(app, ["bench", "--model", "--preset", "tiny", mode, "--device", "cpu"])
        assert refused.exit_code == 1 and "causal language model" in refused.stderr
        assert "Traceback" not in refused.output
    with pytest.raises(HtcliError, match="model times the causal language model"):
        BenchConfig(model=True, preset="tiny", seq_lens=[128], device="cpu")


def test_default_warmup_by_device_and_the_forward_keeps_its_time(monkeypatch):
    """--warmup not given: 1 untimed call on a CPU (2 on CUDA, where graphs are captured at the second);
    the forward+backward is timed until three quarters of the time left, the forward until the end."""
    import htcli.bench as bench

    assert BenchConfig(device="cpu", seq_lens=[128]).warmup == 1
    seen = []
    real = bench.timed
    monkeypatch.setattr(bench, "timed", lambda fn, device, warmup, repeats, deadline: seen.append(
        (warmup, deadline)) or real(fn, device, warmup, repeats, deadline))  # fmt: skip
    started = time.perf_counter()
    result = bench.run_worker(_spec(warmup=None, max_seconds=100.0, n=64, block_size=16))
    assert result["status"] == "ok"
    assert result["timing"] == {"forward": "one by one", "forward_backward": "one by one"}
    (fb_warmup, fb_deadline), (fwd_warmup, fwd_deadline) = seen
    assert (fb_warmup, fwd_warmup) == (0, 1)  # (the cold run was the first)
    start = (
        fwd_deadline - 100
    )  # (the worker's start: after building the inputs, which a loaded machine slows)
    assert started < start < started + 30 and start + 75 <= fb_deadline < start + 76


@pytest.mark.parametrize("back_to_back", [False, True])
def test_timing_counts_the_calls_that_fit_before_the_deadline(back_to_back):
    """bench times calls one by one (CPU) or back to back after one alone (CUDA); repeats stop at the
    deadline, but one call is always timed, and the warm-up is never timed."""
    import torch

    from htcli.bench import timed

    calls = []

    def call():
        calls.append(time.perf_counter())
        time.sleep(0.05 if len(calls) <= 2 else 0.01)  # two slow warm-up calls, then fast ones

    cpu = torch.device("cpu")
    timing = timed(call, cpu, 2, 5, time.perf_counter() + 60, back_to_back)
    assert len(calls) == 7 and 0.01 <= timing.seconds < 0.03
    assert (timing.calls, timing.way) == ((4, "back to back") if back_to_back else (5, "one by one"))
    calls.clear()
    timing = timed(call, cpu, 2, 5, time.perf_counter(), back_to_back)  # no time left: one call
    assert len(calls) == 1 and (timing.calls, timing.way) == (1, "alone") and timing.seconds >= 0.05
    calls[:] = [0.0, 0.0]  # warmed up; a few calls fit before the deadline, not 100
    timing = timed(call, cpu, 0, 100, time.perf_counter() + 0.045, back_to_back)
    alone = timing.way == "alone"  # (back to back, where the first call took the time)
    way = "back to back" if back_to_back and not alone else "one by one" if timing.calls > 1 else "alone"
    assert timing.calls <= 6 and timing.way == way
    assert len(calls) == 2 + timing.calls + (back_to_back and not alone)


def test_bench_table_says_how_it_timed():
    """The table's caption names the way the times were taken (a CUDA row back to back)."""
    from rich.console import Console

    from htcli.bench_report import bench_table

    results = {"status": "ok", "forward_s": 1e-3, "forward_backward_s": 3e-3, "peak_bytes": 1, "repeats": 4}
    queued = {"forward": "back to back", "forward_backward": "back to back"}
    h = {**results, "timing": {**queued, "forward": "alone"}}
    rows = [Row(8192, True, {"h": h, "sdpa": {**results, "timing": queued}})]
    console = Console(width=80, record=True)
    console.print(bench_table(rows, BenchConfig(), "title"))
    text = " ".join(console.export_text().split())
    assert "times: the mean of calls queued back to back; some one call timed alone" in text
    assert "0.00MiB" in text  # (a peak under 1 MiB: shown as 0MiB beside its ratio)


def test_correctness_check():
    """The bench's oracle check reports a tiny error in fp32."""
    assert correctness("cpu", "fp32", 16) < 1e-5


def test_scaling_exponent_and_ratio():
    """The fitted exponent of time ~ n^a, and SDPA/H ratios, come out of the rows."""
    rows = [
        Row(n, True, {"h": {"status": "ok", "forward_backward_s": n * 1e-6, "peak_bytes": 10},
                      "sdpa": {"status": "ok", "forward_backward_s": n * n * 1e-9, "peak_bytes": 20}})
        for n in (1024, 2048, 4096)
    ]  # fmt: skip
    assert scaling_exponent(rows, "h", True) == pytest.approx(1.0)
    assert scaling_exponent(rows, "sdpa", True) == pytest.approx(2.0)
    assert rows[0].ratio("peak_bytes") == pytest.approx(2.0)
    rows[1].results["sdpa"] = {"status": "timeout"}
    assert rows[1].ratio("forward_backward_s") is None
    assert rows[0].memory_ratio() == pytest.approx(0.5) and rows[1].memory_ratio() is None
    # a peak of 0 bytes (a tiny size on a CPU): no ratio (the table and --json divided by zero)
    rows[2].results["sdpa"]["peak_bytes"] = 0
    assert rows[2].memory_ratio() is None
    assert (
        to_json(rows, BenchConfig(seq_lens=[1024]), 0.0, "cpu")["rows"][2]["memory_ratio_h_over_sdpa"] is None
    )


def test_decode_bench_figures():
    """--decode reports cached and recomputed speed, per-token times, prefill cost and how the steps ran
    (on a CPU: the ordinary steps, no CUDA graph)."""
    result = decode_bench("tiny", prompt_len=100, new_tokens=70, recompute_tokens=2, device_name="cpu",
                          contexts=(128, 256), batch=4)  # fmt: skip
    assert result["speedup"] > 0 and result["prefill_s"] > 0 and result["steps"] == "ordinary"
    assert (result["device"], result["dtype"]) == ("cpu", "fp32")  # (as an interrupted one's JSON says)
    caches = result["caches"]
    assert [(c["context"], c["attention"]) for c in caches] == [
        (128, "h"),
        (128, "exact"),
        (256, "h"),
        (256, "exact"),
    ]
    assert all(
        c["bytes_per_s"] > 0 and c["first_byte_s"] > 0 and c["prompt_len"] == c["context"] - 70
        for c in caches
    )
    assert caches[0]["batch_bytes_per_s"] > 0 and "batch_bytes_per_s" not in caches[2]
    assert caches[0]["batch_first_byte_s"] > 0 and "batch_first_byte_s" not in caches[2]
    with pytest.raises(HtcliError, match="exceed"):
        decode_bench("tiny", prompt_len=250, new_tokens=10, device_name="cpu")


def test_bench_config_validation():
    """Impossible bench options are refused with the field named."""
    with pytest.raises(HtcliError, match="block_size"):
        BenchConfig(block_size=7)
    with pytest.raises(HtcliError, match="seq_lens"):
        BenchConfig(seq_lens=[0])


def test_bench_cli(tmp_path):
    """`htcli bench` prints the correctness check and the table, or with --json one JSON object."""
    args = ["bench", "--seq-len", "128,256", "--heads", "1", "--dim-head", "16", "--block-size", "16",
            "--causal", "--repeats", "1", "--warmup", "0", "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "dense oracle" in result.stderr and "H-attn" in result.stdout
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [r["n"] for r in data["rows"]] == [128, 256] and data["interrupted"] is False
    assert data["exponents"]["h/causal"] is not None
    assert "note:" not in result.stderr  # (lengths H-attention computes as they are)


def test_a_bench_taller_than_its_terminal_leaves_no_frame_behind():
    """On a terminal of 5 rows, the live table (taller) was drawn whole as its last frame and then erased
    as far as the screen reached: its top stayed above the table printed after it (review). Every erase
    now moves up fewer lines than the terminal has."""
    rows = 5
    command = [sys.executable, "-m", "htcli", "bench", "--seq-len", "128", "--heads", "1", "--dim-head", "16",
               "--block-size", "16", "--repeats", "1", "--warmup", "0", "--device", "cpu"]  # fmt: skip
    command.append("--causal")  # (one mode: half the time)
    code, shown = on_a_terminal(command, rows=rows, columns=60, stdout=subprocess.DEVNULL)
    assert code == 0, shown
    up = b"\x1b[1A\x1b[2K"  # (rich erases a frame a line at a time, from its last line up)
    erased = [len(run.group()) // len(up) for run in re.finditer(b"(?:" + re.escape(up) + b")+", shown)]
    assert erased and max(erased) < rows, erased


def test_bench_says_which_lengths_h_attention_pads():
    """A length that is not the block size times a power of two is computed padded by H-attention (3,000
    as 4,096 at block 128), by SDPA as it is: a note says so (the table showed both without a word;
    review); --model's lengths are the model's."""
    from htcli.bench import padded_lengths

    config = BenchConfig(seq_lens=[100, 512, 3000], block_size=128, device="cpu")
    assert padded_lengths(config) == [(100, 256), (3000, 4096)]
    assert padded_lengths(BenchConfig(seq_lens=[192], model=True, modes=[True], device="cpu")) == []
    args = ["bench", "--seq-len", "48", "--heads", "1", "--dim-head", "16", "--block-size", "16",
            "--causal", "--repeats", "1", "--warmup", "0", "--device", "cpu"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    said = " ".join(result.stderr.split())
    assert "note: H-attention computes 48 as 64 (its block size, 16, times a power of two), padded" in said


def test_bench_cli_bad_impl():
    """An unknown --impl is one clear error line, exit 1."""
    result = CliRunner().invoke(app, ["bench", "--impl", "fast", "--device", "cpu"])
    assert result.exit_code == 1
    assert "--impl must be one of auto, eager, triton, got 'fast'" in result.output
    assert "Traceback" not in result.output


def test_bench_names_htcli_attention_triton_on_a_cpu():
    """HTCLI_ATTENTION=triton with a CPU: the variable is named, as train and sample name it (bench said
    "the triton attention needs CUDA tensors", once the correctness check had run; review)."""
    env = {**os.environ, "HTCLI_ATTENTION": "triton"}
    env.pop("TRITON_INTERPRET", None)  # (Triton's interpreter runs on a CPU)
    done = subprocess.run(
        [sys.executable, "-m", "htcli", "bench", "--seq-len", "256", "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1 and done.stderr.strip() == (
        "error: HTCLI_ATTENTION=triton needs a CUDA GPU, not cpu: use --device cuda, or HTCLI_ATTENTION=auto"
    ), done.stderr


@pytest.mark.parametrize("given", [["8k"], ["100,,"], ["100,", "200"], [","]])
def test_bench_cli_bad_seq_len(given):
    """A malformed --seq-len (an empty item of a comma list included: a typo, not "no length") is one
    clear error line, exit 1."""
    result = CliRunner().invoke(app, ["bench", *[a for value in given for a in ("--seq-len", value)]])
    assert result.exit_code == 1
    assert "--seq-len takes whole numbers" in result.output
    assert "Traceback" not in result.output


def test_bench_decode_refuses_attention_options():
    """--decode with options it would ignore is one clear error naming them, exit 1."""
    result = CliRunner().invoke(
        app, ["bench", "--decode", "--seq-len", "1024", "--heads", "2", "--plot", "p.png"]
    )
    assert result.exit_code == 1
    assert "--decode times sampling, not attention: drop --seq-len, --heads, --plot" in result.stderr
    assert "Traceback" not in result.output


def test_bench_decode_names_the_presets_whose_context_fits():
    """The tiny preset's context cannot take the decode bench's prompt: the error names those that can."""
    result = CliRunner().invoke(app, ["bench", "--decode", "--preset", "tiny", "--device", "cpu"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "(8192) exceed the context of --preset tiny (256): use --preset small or base" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1  # (the bench's header came first)
    alone = CliRunner().invoke(app, ["bench", "--preset", "tiny", "--seq-len", "16", "--device", "cpu"])
    assert alone.exit_code == 1 and "--preset chooses the model of --model and --decode" in alone.stderr
    unknown = CliRunner().invoke(app, ["bench", "--decode", "--preset", "huge", "--device", "cpu"])
    assert (
        unknown.exit_code == 1
        and unknown.stderr == "error: unknown --preset 'huge': use one of tiny, small, base\n"
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (
            ["--model", "--preset", "tiny", "--seq-len", "100"],
            "--model with the tiny preset: --seq-len (100) must",
        ),
        (
            ["--model", "--preset", "tiny", "--block-size", "64"],
            "--model times the preset's model (--preset tiny)",
        ),
        (["--both", "--causal"], "--both measures both modes"),
        (["--max-seconds", "0"], "--max-seconds must be a positive number up to 1e6, got 0.0"),
        (["--max-seconds", "3e6"], "--max-seconds must be a positive number up to 1e6"),  # (was a traceback)
        (["--block-size", "512", "--seq-len", "256"], "--block-size (512) is longer than every length"),
        (["--block-size", "1048576"], "--block-size (1048576) is longer than every length"),  # (hung)
        (["--seq-len", "99999999999999999999999"], "--seq-len needs lengths from 1 to 16,777,216"),
        (["--heads", "99999999999999999999"], "--heads must be 1 to 1,048,576"),
        (["--model", "--preset", "nosuch"], "unknown --preset 'nosuch'"),
        (["--decode", "--dtype", "fp64"], "unknown --dtype 'fp64'"),  # (was a KeyError traceback)
        (["--model", "--preset", "tiny", "--seq-len", "256", "--dtype", "fp16"], "--dtype fp16 needs a CUDA"),
        (["--dtype", "fp16"], "--dtype fp16 needs a CUDA GPU (device is cpu)"),  # (ran; sample, eval refused)
        (["--decode", "--dtype", "fp16"], "--dtype fp16 needs a CUDA GPU (device is cpu)"),
        (["--max-seconds", "-1"], "--max-seconds must be a positive number"),
        (["--max-seconds", "nan"], "--max-seconds must be a positive number"),
        (["--compile"], "--compile times a compiled training step: it needs --model (the attention bench"),
        (["--decode", "--compile"], "--decode times sampling, not attention: drop --compile"),
    ],
)
def test_bench_refuses_impossible_options(args, message):
    """Options bench cannot honour are one line before any work (a model length that is no multiple of the
    preset's block size was an "error" cell per length and exit 0; --block-size was ignored with --model,
    --causal with --both, and --max-seconds 0 timed nothing)."""
    result = CliRunner().invoke(app, ["bench", *args, "--device", "cpu"])
    assert result.exit_code == 1, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_bench_measures_each_length_once():
    """--seq-len 64,64,32 measures 64 and 32, once each, in that order."""
    assert BenchConfig(seq_lens=[64, 64, 32], device="cpu").seq_lens == [64, 32]


def test_bench_table_says_why_h_attention_is_slower_at_short_lengths():
    """`htcli bench --seq-len 1024` on a CPU showed H-attention 0.80x of SDPA without a word (review): the
    caption names the lengths where it was slower and why (n against n²); none where it never was."""
    from rich.console import Console

    from htcli.bench_report import bench_table

    def row(n: int, h_seconds: float) -> Row:
        ok = {"status": "ok", "forward_s": 1e-3, "peak_bytes": 2**30}
        return Row(
            n, True, {"h": {**ok, "forward_backward_s": h_seconds}, "sdpa": {**ok, "forward_backward_s": 1.0}}
        )

    slower = "H-attn is slower at 1,024: SDPA's cost grows as n², H-attn's as n, so H-attn wins at longer"
    cases = [
        ([row(1024, 1.25), row(8192, 0.2)], None),  # (no advice: a longer length was run, and won)
        ([row(1024, 1.25)], "(try --seq-len 8192)"),
        ([row(8192, 0.2)], ""),
    ]
    for rows, advice in cases:
        console = Console(width=80, record=True)
        console.print(bench_table(rows, BenchConfig(seq_lens=[row.n for row in rows]), "title"))
        text = " ".join(console.export_text().split())
        if advice == "":
            assert "is slower" not in text
        else:
            assert slower in text and "8,192:" not in text and ("(try" in text) == bool(advice)
            assert advice is None or text.endswith(f"sequences {advice}")
    # a sweep of 1,024 and 8,192 stopped by Ctrl-C after 1,024: no advice to try what it was measuring
    console = Console(width=80, record=True)
    console.print(bench_table([row(1024, 1.25)], BenchConfig(seq_lens=[1024, 8192]), "title"))
    text = " ".join(console.export_text().split())
    assert slower in text and "(try" not in text


def test_bench_table_does_not_compare_coarse_cpu_peaks():
    """On a CPU two peaks of a few MiB (the process's memory, in pages) gave mem ratios of 1.6x-9x in runs
    of one command (review): under 8 MiB the cell says "-" and a line says why; larger peaks, and a GPU's
    small ones, keep their ratio; --json keeps every figure."""
    import torch
    from rich.console import Console

    from htcli.bench_report import bench_table

    def row(n: int, h_mib: float, sdpa_mib: float) -> Row:
        ok = {"status": "ok", "forward_s": 1e-3, "forward_backward_s": 1e-3}
        h, sdpa = ({**ok, "peak_bytes": int(mib * 2**20)} for mib in (h_mib, sdpa_mib))
        return Row(n, True, {"h": h, "sdpa": sdpa})

    rows = [row(256, 4.83, 1.26), row(4096, 41.9, 20.9)]
    console = Console(width=200, record=True)
    console.print(bench_table(rows, BenchConfig(device="cpu"), "title"))
    lines = console.export_text().splitlines()
    assert [line.split()[-1] for line in lines if "H-attn" in line and "MiB" in line] == ["-", "2.00x"]
    text = " ".join(" ".join(lines).split())
    assert "mem at 256: not compared, a peak under 8 MiB of a CPU process's memory is too coarse" in text
    assert to_json(rows, BenchConfig(device="cpu"), 0.0, "cpu")["rows"][0]["memory_ratio_h_over_sdpa"] > 3
    if torch.cuda.is_available():  # (an allocator's count: exact at any size)
        console = Console(width=200, record=True)
        console.print(bench_table(rows, BenchConfig(device="cuda"), "title"))
        assert "not compared" not in console.export_text()


def test_bench_table_fits_80_columns():
    """The bench table, long lengths and timeouts included, is whole in an 80-column terminal."""
    from rich.console import Console

    from htcli.bench_report import bench_table

    ok = {"status": "ok", "forward_s": 124.8, "forward_backward_s": 328.3, "peak_bytes": 1234 * 2**20}
    rows = [Row(131072, causal, {"h": ok, "sdpa": {"status": "timeout"}}) for causal in (False, True)]
    console = Console(width=80, record=True)
    console.print(bench_table(rows, BenchConfig(model=True, modes=[True]), "a title"))
    text = console.export_text()
    assert "…" not in text
    for header in ("n", "mode", "method", "fwd", "step", "tok/s", "peak", "speedup", "mem", "timeout"):
        assert header in text
    # narrower, a number is folded onto the next line, never cut ("7…" read as a value of its own)
    console = Console(width=40, record=True)
    console.print(bench_table(rows, BenchConfig(model=True, modes=[True]), "a title"))
    assert "…" not in console.export_text()


def test_bench_plot_writes_a_png(tmp_path):
    """--plot draws time and memory against length into a PNG (matplotlib, the plot extra)."""
    from htcli.bench_report import plot

    ok = {"status": "ok", "forward_s": 0.1, "forward_backward_s": 0.3, "peak_bytes": 2**20}
    rows = [Row(n, True, {"h": ok, "sdpa": {**ok, "forward_backward_s": n / 1e4}}) for n in (1024, 2048)]
    path = tmp_path / "bench.png"
    plot(rows, BenchConfig(modes=[True]), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_plot_of_nothing_measured_warns_of_nothing(tmp_path):
    """Every length timed out: the plot's empty axes, without matplotlib's warning of a legend with no lines
    on stderr."""
    import warnings

    from htcli.bench_report import plot

    rows = [Row(n, True, {"h": {"status": "timeout"}, "sdpa": {"status": "timeout"}}) for n in (1024, 2048)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot(rows, BenchConfig(modes=[True]), tmp_path / "bench.png")
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _bench_workers(marker: str) -> list[int]:
    """Process ids of live bench workers whose command line holds marker."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                words = cmdline.read().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"--worker" in words and any(marker.encode() in word for word in words):
            found.append(int(entry))
    return found


def test_signals_held_while_a_worker_starts_are_delivered_after():
    """A SIGTERM that comes while bench starts its worker (inside Popen, between fork and the process object
    it returns: the worker then ran on alone) reaches the handler only once the block ends."""
    from htcli.stop import signals_held

    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _: seen.append(signum))
    try:
        with signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert seen == []
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_signal_ignored_stays_ignored_for_a_worker():
    """A bench started with Ctrl-C ignored (a background job): its worker, started inside signals_held,
    ignores it too (it inherited the hold's handler as the default: a Ctrl-C to the job's process group
    killed the worker, an "error" cell, and the bench went on and exited 0; review)."""
    from htcli.stop import signals_held

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with signals_held():
            child = subprocess.Popen(["sleep", "30"])
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        with open(f"/proc/{child.pid}/status") as status:
            ignored = int(next(line for line in status if line.startswith("SigIgn:")).split()[1], 16)
        child.kill()
        child.wait()
        assert ignored & (1 << (signal.SIGINT - 1))
    finally:
        signal.signal(signal.SIGINT, previous)


def test_sigterm_to_bench_stops_its_worker():
    """A SIGTERM to bench while a measurement runs in its worker process: one line, exit 143, and the
    worker is stopped too (it ran on for minutes after its parent had gone)."""
    marker = "4160"  # a length no other test measures: it names this test's workers
    command = [sys.executable, "-m", "htcli", "bench", "--seq-len", marker, "--block-size", "64"]
    command += ["--device", "cpu", "--repeats", "1000", "--max-seconds", "100"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not _bench_workers(marker) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _bench_workers(marker), "no worker started"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert "terminated (SIGTERM)" in stderr and "Traceback" not in stderr
    assert not _bench_workers(marker)


@pytest.mark.parametrize("json_output,first", [(False, "64,"), (True, "64,"), (True, "")])
def test_an_interrupted_bench_prints_the_rows_it_measured(json_output, first):
    """Ctrl-C during a sweep printed only the stop's line: the rows already measured were lost. They are
    printed (stdout) before it, as a table or with --json as JSON that says it was interrupted (it printed
    nothing; review), with no row where none was measured; exit 130."""
    marker = {(False, "64,"): "4224", (True, "64,"): "4288", (True, ""): "4352"}[json_output, first]
    command = [sys.executable, "-m", "htcli", "bench", "--seq-len", f"{first}{marker}", "--block-size", "64"]
    command += ["--causal", "--device", "cpu", "--repeats", "1000", "--max-seconds", "100"]
    command += ["--json"] if json_output else []
    # (SIGINT as a shell leaves it to a command it runs: a test run in the background ignores it, and so
    # would its children)
    interruptible = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=interruptible
    )
    deadline = time.monotonic() + 120
    while not _bench_workers(f'"n": {marker}') and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _bench_workers(f'"n": {marker}'), "no worker of the second length started"
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    if json_output:
        report = json.loads(stdout)
        assert report["interrupted"] is True and [row["n"] for row in report["rows"]] == [64] * bool(first)
        assert not first or report["rows"][0]["results"]["h"]["status"] == "ok"
        return
    lines = [line.split() for line in stdout.splitlines()]
    assert ["64", "causal", "H-attn"] in [line[:3] for line in lines] and marker not in stdout.replace(
        ",", ""
    )


@pytest.mark.parametrize("decode", [False, True])
def test_a_bench_stopped_before_it_measures_prints_its_json(monkeypatch, decode):
    """--json promises its object with "interrupted": true wherever a Ctrl-C stops the bench: one during the
    correctness check (or, --decode, the checks before its header) printed none (review)."""
    import htcli.bench

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(htcli.bench, "check_decode_preset" if decode else "correctness", stopped)
    args = ["--decode"] if decode else ["--seq-len", "128", "--block-size", "32"]
    result = invoke("bench", *args, "--device", "cpu", "--json")
    assert result.exit_code == 130 and "Traceback" not in result.output, result.output
    assert result.stderr.splitlines()[-1] == "interrupted: stopped; no file was changed"
    report = json.loads(result.stdout)
    assert report["interrupted"] is True and report["device"] == "cpu"
    assert decode or (report["rows"], report["oracle_max_error"]) == ([], None)


def test_decode_help_names_the_options_it_takes():
    """--decode's help says it takes only --preset, --device, --dtype and --json: every other option of
    bench is one it refuses."""
    import inspect

    from htcli.cli.bench import ATTENTION_BENCH_OPTIONS, bench

    taken = set(inspect.signature(bench).parameters) - set(ATTENTION_BENCH_OPTIONS) - {"ctx"}
    assert taken == {"preset", "decode", "device", "dtype", "json_output"}


def test_an_interrupted_decode_bench_with_json_prints_its_object():
    """--decode --json stopped by Ctrl-C printed nothing on stdout (the attention bench prints its object,
    review): a JSON object that says it was interrupted; exit 130."""
    command = [sys.executable, "-m", "htcli", "bench", "--decode", "--json"]  # (device auto: said "cpu")
    interruptible = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    # (one thread: two threads on cores the suite's other processes keep busy slowed its first, long
    # operations past the wait below, once in a suite's run; a signal is taken between operations)
    no_gpu = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process = subprocess.Popen(command, **pipes, preexec_fn=interruptible, env=no_gpu)
    assert process.stderr.readline().startswith("decode bench: small preset")  # (then it measures)
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert json.loads(stdout) == {"preset": "small", "device": "cpu", "dtype": "fp32", "interrupted": True}
    assert "interrupted" in stderr and "Traceback" not in stderr


def test_a_method_out_of_cpu_memory_is_oom_and_an_error_says_why():
    """The CPU allocator's "can't allocate memory" was an "error" cell with no reason (--json alone had it):
    it is OOM; any other error's reason is printed under the table."""
    from htcli.bench import run_isolated
    from htcli.bench_report import error_lines

    huge = _spec(n=1024, method="sdpa", batch_size=2**20, heads=4, dim_head=64)  # (q alone: 1 TiB)
    assert run_isolated(huge) == {"status": "oom"}
    failed = {"status": "error", "error": "RuntimeError: [bold]boom"}
    rows = [Row(1024, False, {"h": failed, "sdpa": {"status": "oom"}})]
    assert error_lines(rows) == ["H-attn at 1,024, non-causal: RuntimeError: [bold]boom"]
    with pytest.raises(HtcliError, match="warmup must be 0 to 1,048,576"):
        BenchConfig(warmup=10**8, device="cpu")


def test_a_bench_that_measured_nothing_exits_1(tmp_path):
    """Every cell OOM (a batch whose q alone is 1 TiB): the table, then one line saying nothing was measured,
    exit 1, no plot (it exited 0, and a script took the run for a measurement)."""
    command = [sys.executable, "-m", "htcli", "bench", "--seq-len", "1024", "--batch-size", str(2**20)]
    command += ["--device", "cpu", "--non-causal", "--plot", str(tmp_path / "b.png")]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
    assert done.returncode == 1, done.stderr
    assert "OOM" in done.stdout and done.stderr.splitlines()[-1] == (
        "error: nothing was measured: every method failed at every length (the table says how); give a "
        "shorter --seq-len or --batch-size"
    )
    assert not (tmp_path / "b.png").exists()


def test_the_decode_caches_table_fits_80_columns():
    """bench --decode's second table had its headers cut to "conte…", "atten…" and its values wrapped."""
    from rich.console import Console

    from htcli.display import cache_table

    row = dict(
        context=32768, attention="exact", first_byte_s=15.46, bytes_per_s=1174.3, token_s_early=0.00157
    )
    row |= dict(token_s_late=0.02037, late_over_early=12.94, batch_first_byte_s=13.6, batch_bytes_per_s=7800)
    alone = {**row, "batch_bytes_per_s": None}  # (the longer contexts decode one sample)
    result = dict(preset="small", device="cpu", batch=8, caches=[{**row, "batch_speedup": 4.6}, alone])
    console = Console(width=80, record=True)
    console.print(cache_table(result))
    text = console.export_text()
    assert "…" not in text and "7800 (4.6x)" in text and " 15.46 s " in text
