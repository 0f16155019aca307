"""How fast `htcli train` starts on a corpus, and what it holds: seconds from launch to the first step,
peak RSS and the most descriptors open at once, under a descriptor limit (default 1024, as
`ulimit -n 1024`). Trains the tiny preset for 20 steps on the CPU into OUT.

    python examples/measure_start.py CORPUS OUT [NOFILE]
"""

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def main(corpus: str, out: str, nofile: int = 1024) -> None:
    log = Path(out) / "log.jsonl"
    command = [sys.executable, "-m", "htcli", "train", corpus, "--out", out, "--preset", "tiny"]
    command += [
        "--steps",
        "20",
        "--device",
        "cpu",
        "--eval-every",
        "0",
        "--sample-every",
        "0",
        "--save-every",
        "0",
    ]

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    started = time.time()
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=limit
    )
    most_open, peak_kb, first_step = 0, 0, None
    while process.poll() is None:
        try:
            most_open = max(most_open, len(os.listdir(f"/proc/{process.pid}/fd")))
            status = Path(f"/proc/{process.pid}/status").read_text()
            peak_kb = max(peak_kb, int(status.split("VmHWM:")[1].split()[0]))
        except (OSError, IndexError):
            pass  # the process is ending
        if first_step is None and log.exists():
            steps = [json.loads(line) for line in log.read_text().splitlines() if '"event": "step"' in line]
            first_step = steps[0]["time"] - started if steps else None
        time.sleep(0.02)
    if process.returncode != 0 or first_step is None:
        sys.exit(f"htcli train failed (exit {process.returncode}): {process.stderr.read().strip()}")
    print(f"first step {first_step:.1f} s after launch; peak RSS {peak_kb / 1024:.0f} MiB; "
          f"at most {most_open} descriptors open (limit {nofile})")  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1:2] in (["-h"], ["--help"]):
        sys.exit(print(__doc__))
    if len(sys.argv) not in (3, 4) or not all(arg.isdigit() for arg in sys.argv[3:]):
        sys.exit(f"usage: python {__doc__.split('python ')[1].splitlines()[0]}")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]  # (a soft limit above it is refused by the system)
    if sys.argv[3:] and int(sys.argv[3]) < 64:  # (under it, Python cannot even load its libraries)
        sys.exit("error: NOFILE must be 64 or more")
    if sys.argv[3:] and hard != resource.RLIM_INFINITY and int(sys.argv[3]) > hard:
        sys.exit(f"error: NOFILE must be at most the hard limit, {hard} (ulimit -Hn)")
    main(sys.argv[1], sys.argv[2], *map(int, sys.argv[3:4]))
