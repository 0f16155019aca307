#!/usr/bin/env bash
# The htcli demo: train a small byte-level model on the Python standard library's own source files
# (every machine with Python has them) for a few minutes on a CPU, then sample from it and measure it
# on a part of the library it never saw (the json package).
# Usage: bash examples/demo.sh [extra `htcli train` options]; OUT=dir (default runs/demo: a run there is
# replaced; a folder holding anything else is refused) and PYTHON=interpreter override.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/demo}
STDLIB=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
htcli() { "$PYTHON" -m htcli "$@"; }

echo "== htcli train: the standard library's top-level modules ($STDLIB/*.py)"
if [[ -e $OUT && ! -f $OUT/config.json ]]; then  # (it starts anew: only an htcli run is removed)
    echo "error: $OUT exists and holds no htcli run: give another OUT=dir" >&2
    exit 1
fi
rm -rf "$OUT"
htcli train "$STDLIB/*.py" --out "$OUT" --preset tiny --steps 1200 --batch-size 16 --warmup 50 \
    --eval-every 200 --save-every 400 --sample-every 400 --device cpu "$@"

echo "== htcli sample"
htcli sample "$OUT" --prompt "def " --max-new-tokens 300 --temperature 0.7 --seed 0 --device cpu

echo "== htcli eval: the json package, held out from training"
htcli eval "$OUT" "$STDLIB/json/*.py" --device cpu

echo "== next: htcli sample $OUT --prompt 'import ' (more text), htcli plot $OUT (its curves, with"
echo "   pip install 'htcli[plot]'), htcli train DATA --out runs/mine --preset tiny (your own corpus)"
