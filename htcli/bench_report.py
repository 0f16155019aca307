"""Tables, JSON and plots of benchmark results (formatting only: measuring is in htcli.bench)."""

from __future__ import annotations

from pathlib import Path

from rich import box
from rich.table import Table

from htcli.bench import METHODS, BenchConfig, Row, scaling_exponent
from htcli.device import resolve_device
from htcli.display import human
from htcli.plots import pyplot, save_figure

LABELS = {"h": "H-attn", "sdpa": "SDPA"}


def _seconds(result: dict, key: str) -> str:
    status = result.get("status")
    if status == "ok":
        value = result[key]
        return f"{value * 1e3:.1f}ms" if value < 1 else f"{value:.2f}s" if value < 100 else f"{value:.0f}s"
    return {"timeout": "timeout", "oom": "OOM"}.get(status, "error")


def _memory(result: dict) -> str:
    if result.get("status") != "ok":
        return "-"
    mib = result["peak_bytes"] / 2**20
    if mib < 10:  # (small lengths on a CPU: "0MiB" beside a ratio of two such)
        return f"{mib:.2f}MiB"
    return f"{mib:.0f}MiB" if mib < 1000 else f"{mib / 1024:.2f}GiB"


def _tokens_per_s(result: dict, row: Row, config: BenchConfig) -> str:
    if result.get("status") != "ok":
        return "-"
    tokens = row.n * config.batch_size
    return human(tokens / result["forward_backward_s"])


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def measured_shape(config: BenchConfig) -> dict:
    """The attention's heads, dim_head and block_size that were measured: with --model, the preset's (not
    the attention bench's options, which --model does not take)."""
    shape = {"heads": config.heads, "dim_head": config.dim_head, "block_size": config.block_size}
    if config.model:
        from htcli.presets import model_config

        model = model_config(config.preset)
        shape = {name: getattr(model, name) for name in shape}
    return shape


def bench_title(config: BenchConfig, device: str) -> str:
    """What was measured, where."""
    if config.model:  # the preset's own block size, not the attention bench's
        what = f"training step, {config.preset} preset, block {measured_shape(config)['block_size']}"
        what += ", compiled" if config.compile else ""
    else:
        what = f"batch {config.batch_size}, {config.heads} heads, dim_head {config.dim_head}"
        what += f", block {config.block_size}"
    return f"{what}, {config.dtype}, {device}, {config.impl} H-attn"


def bench_table(rows: list[Row], config: BenchConfig, title: str) -> Table:
    """One line per (length, mode, method), with the SDPA/H ratios on the H-attention line."""
    step = "step" if config.model else "fwd+bwd"
    caption = [f"speedup: SDPA {step} time / H-attn's; mem: H-attn peak / SDPA's", _timing_line(rows)]
    caption += [_slower_line(rows, config), _coarse_memory_line(rows, config)]
    table = Table(
        title=title,
        title_justify="left",
        caption="\n".join(line for line in caption if line),
        caption_justify="left",
        box=box.SIMPLE_HEAD,  # no vertical rules: the table fits 80 columns
        show_edge=False,
        collapse_padding=True,
    )
    for name in ("n", "mode", "method", "fwd", step, "tok/s", "peak", "speedup", "mem"):
        table.add_column(name, justify="left" if name in ("mode", "method") else "right", overflow="fold")
    for row in rows:
        for method in METHODS:
            result = row.results[method]
            is_h = method == "h"
            table.add_row(
                f"{row.n:,}",
                "causal" if row.causal else "non-c.",
                LABELS[method],
                _seconds(result, "forward_s"),
                _seconds(result, "forward_backward_s"),
                _tokens_per_s(result, row, config),
                _memory(result),
                _ratio(row.ratio("forward_backward_s")) if is_h else "",
                _ratio(_memory_ratio(row, config)) if is_h else "",
                end_section=not is_h,
            )
    return table


# on a CPU a peak is the process's resident memory, counted in pages and moved by the allocator's caching:
# two peaks under this differed 1.6x-9x between runs of one command (review), so their ratio is not shown
COARSE_CPU_PEAK = 8 * 2**20


def _coarse(row: Row, config: BenchConfig) -> bool:
    """Whether a CPU row's peaks are too small to compare (one is under COARSE_CPU_PEAK)."""
    peaks = [result.get("peak_bytes") or 0 for result in row.results.values()]
    return resolve_device(config.device).type == "cpu" and min(peaks) < COARSE_CPU_PEAK


def _memory_ratio(row: Row, config: BenchConfig) -> float | None:
    """The mem column: H-attention's peak over SDPA's, None where the peaks are too coarse to compare."""
    return None if _coarse(row, config) else row.memory_ratio()


def _coarse_memory_line(rows: list[Row], config: BenchConfig) -> str:
    """Why some mem cells say "-" ("" where none does for that reason)."""
    coarse = [f"{row.n:,}" for row in rows if _coarse(row, config) and row.memory_ratio() is not None]
    if not coarse:
        return ""
    return (
        f"mem at {', '.join(dict.fromkeys(coarse))}: not compared, a peak under "
        f"{COARSE_CPU_PEAK // 2**20} MiB of a CPU process's memory is too coarse (--json has the figures)"
    )


WAYS = {  # bench.Timing's ways
    "one by one": "the median of calls timed one by one",
    "back to back": "the mean of calls queued back to back",
    "alone": "one call timed alone",
}


def _slower_line(rows: list[Row], config: BenchConfig) -> str:
    """Where H-attention was slower than SDPA, why that is no surprise at short lengths ("" where it never
    was): a newcomer's `bench --seq-len 1024` showed 0.80x without a word. The advice of a longer length
    only where the longest asked for was slower (not past a win, nor where a Ctrl-C cut the sweep short)."""
    slower = sorted({row.n for row in rows if (ratio := row.ratio("forward_backward_s")) and ratio < 1})
    if not slower:
        return ""
    lengths, longest = ", ".join(f"{n:,}" for n in slower), max(config.seq_lens)
    advice = f" (try --seq-len {max(8192, 4 * longest)})" if longest in slower else ""
    return (
        f"H-attn is slower at {lengths}: SDPA's cost grows as n², H-attn's as n, so H-attn wins at longer "
        f"sequences{advice}"
    )


def _timing_line(rows: list[Row]) -> str:
    """How the times were taken (bench.timed), every way some result was."""
    results = [result for row in rows for result in row.results.values()]
    ways = {way for result in results for way in result.get("timing", {}).values()}
    return "times: " + "; some ".join(WAYS[way] for way in WAYS if way in ways) if ways else ""


def error_lines(rows: list[Row]) -> list[str]:
    """Why each "error" cell of the table failed (the last line its worker wrote: --json had it alone)."""
    return [
        f"{LABELS[method]} at {row.n:,}, {'causal' if row.causal else 'non-causal'}: {result.get('error')}"
        for row in rows
        for method, result in row.results.items()
        if result.get("status") not in ("ok", "timeout", "oom")
    ]


def exponent_lines(rows: list[Row], config: BenchConfig) -> list[str]:
    """'time ~ n^a' per method and mode, when the sweep has two lengths or more."""
    lines = []
    for causal in config.modes:
        for method in METHODS:
            a = scaling_exponent(rows, method, causal)
            if a is not None:
                mode = "causal" if causal else "non-causal"
                lines.append(f"{LABELS[method]:13s} {mode:10s} time ~ n^{a:.2f}")
    return lines


def to_json(rows: list[Row], config: BenchConfig, max_error: float, device: str) -> dict:
    from dataclasses import asdict

    return {
        "config": {**asdict(config), **measured_shape(config)},
        "device": device,
        "oracle_max_error": max_error,
        "rows": [
            {
                "n": r.n,
                "causal": r.causal,
                "results": r.results,
                "speedup": r.ratio("forward_backward_s"),
                "memory_ratio_h_over_sdpa": r.memory_ratio(),
            }
            for r in rows
        ],
        "exponents": {
            f"{method}/{'causal' if causal else 'non-causal'}": scaling_exponent(rows, method, causal)
            for causal in config.modes
            for method in METHODS
        },
    }


def plot(rows: list[Row], config: BenchConfig, path: Path) -> None:
    """Time and memory against length, log-log, one line per method and mode."""
    plt = pyplot()
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(11, 4))
    for causal in config.modes:
        for method in METHODS:
            points = [
                (r.n, r.results[method])
                for r in rows
                if r.causal == causal and r.results[method].get("status") == "ok"
            ]
            if not points:
                continue
            label = f"{LABELS[method]}, {'causal' if causal else 'non-causal'}"
            ns = [n for n, _ in points]
            ax_time.plot(ns, [res["forward_backward_s"] for _, res in points], marker="o", label=label)
            ax_mem.plot(ns, [res["peak_bytes"] / 2**20 for _, res in points], marker="o", label=label)
    for ax, ylabel in ((ax_time, "forward+backward (s)"), (ax_mem, "peak memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_lines():  # (nothing measured in time: empty axes, no legend to warn about)
            ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
