#!/usr/bin/env bash
# On a machine with a CUDA GPU: the CUDA tests, the GPU bench tables that README quotes, and every
# command (train with bf16 autocast and resume, --compile, sample with and without the decode
# cache, eval) on the GPU with the Triton H-attention kernels, then with the eager one.
# Usage: bash examples/gpu_check.sh [WORKDIR]; PYTHON=interpreter overrides. Goes on past a
# failing step and exits non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WORK=${1:-$(mktemp -d)}
STDLIB=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
failed=()
step() {
    echo "== $*"
    "$@" || failed+=("$*")
}
htcli() { "$PYTHON" -m htcli "$@"; }
bench() { htcli bench --device cuda --dtype bf16 --batch-size 4 "$@"; }

step "$PYTHON" -m pytest -q tests/test_cuda.py tests/test_attention_triton.py
for impl in triton eager; do
    step bench --heads 8 --seq-len 8192,65536 --repeats 5 --impl "$impl"
    step bench --model --preset small --seq-len 8192 --repeats 5 --impl "$impl"
    step bench --model --preset base --seq-len 8192 --repeats 5 --impl "$impl"
done
for impl in triton eager; do
    export HTCLI_ATTENTION=$impl
    run="$WORK/small-$impl"
    step htcli train "$STDLIB/*.py" --out "$run" --preset small --steps 40 --eval-every 20 --save-every 20 \
        --sample-every 0 --device cuda
    step htcli train --out "$run" --resume --steps 60
    step htcli sample "$run" --prompt "def " --max-new-tokens 200 --seed 1
    step htcli sample "$run" --prompt "def " --max-new-tokens 50 --seed 1 --no-cache
    step htcli eval "$run" "$STDLIB/json/*.py"
    step htcli train "$STDLIB/*.py" --out "$WORK/compiled-$impl" --preset tiny --steps 30 --eval-every 0 \
        --sample-every 0 --compile --device cuda
done
step htcli bench --decode --device cuda
if ((${#failed[@]})); then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "all GPU checks passed"
