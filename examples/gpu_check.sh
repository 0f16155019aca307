#!/usr/bin/env bash
# On a machine with a CUDA GPU, in order of what matters most: the CUDA tests, the bench tables
# (attention and training step, SDPA beside, the step compiled too), every command (train with bf16
# autocast and resume, --compile, sample with and without the decode cache, eval) with Triton,
# bench --decode, a profile of both models' training steps (step_profile.py), then
# the kernels' errors beside eager's and whether they repeat their bits (triton_precision.py), a
# tile/warp sweep of the Triton kernels (its fastest setting is used for the rest), profiles of the
# attention at 8k with and without CUDA graphs and of the decode step, and the same with eager.
# Usage: bash examples/gpu_check.sh [WORKDIR]; PYTHON=interpreter overrides; GPU_CHECK_SECONDS=N
# skips the steps that would start past N seconds and cuts the others short (a device lease).
# Goes on past a failing step and exits non-zero if any failed or was skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WORK=${1:-$(mktemp -d)}
BUDGET=${GPU_CHECK_SECONDS:-100000}
if ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
    echo "error: gpu_check.sh needs a CUDA GPU, and torch ($PYTHON) sees none (or $PYTHON has no torch: give" \
        "PYTHON=.venv/bin/python): run it on a GPU machine" >&2
    exit 1  # (it ran every step to its failure, the test suite on 8 workers first)
fi
STDLIB=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # htcli from this checkout, installed or not
failed=()
started=$SECONDS
step() {  # step LIMIT_SECONDS COMMAND...
    local limit=$1 left=$((BUDGET - (SECONDS - started)))
    shift
    if ((left < 20)); then
        echo "== SKIPPED (budget spent): $*"
        failed+=("skipped: $*")
        return
    fi
    ((limit > left)) && limit=$left
    echo "== [$((SECONDS - started)) s] $*"
    timeout -k 5 "$limit" "$@" || failed+=("$*")
}
HT=("$PYTHON" -m htcli)
bench() { step "$1" "${HT[@]}" bench --device cuda --dtype bf16 --batch-size 4 "${@:2}"; }
commands() {  # the CLI's commands on CUDA under one implementation (name for the run directory)
    local run="$WORK/small-$1"
    step 120 "${HT[@]}" train "$STDLIB/*.py" --out "$run" --preset small --steps 40 --eval-every 20 \
        --save-every 20 --sample-every 0 --device cuda
    step 60 "${HT[@]}" train --out "$run" --resume --steps 60
    step 60 "${HT[@]}" sample "$run" --prompt "def " --max-new-tokens 200 --seed 1
    step 60 "${HT[@]}" sample "$run" --prompt "def " --max-new-tokens 50 --seed 1 --no-cache
    step 60 "${HT[@]}" sample "$run" --prompt "def " --max-new-tokens 200 --num-samples 8 --json
    step 60 "${HT[@]}" eval "$run" "$STDLIB/json/*.py" --by-position --plot "$WORK/by-position-$1.png"
    step 150 "${HT[@]}" train "$STDLIB/*.py" --out "$WORK/compiled-$1" --preset tiny --steps 30 \
        --eval-every 0 --sample-every 0 --compile --device cuda
}

nvidia-smi -L
"$PYTHON" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
xdist=()
"$PYTHON" -c 'import xdist' 2>/dev/null && xdist=(-n 8)
step 180 "$PYTHON" -m pytest -q "${xdist[@]}" tests/test_cuda.py tests/test_attention_triton.py
# what one call of a 15-minute lease holds (GPU_CHECK_SECONDS=470: about 7 minutes on an H200): about the
# issue's tables and the training step compiled (the target still missed: the step is bound by the host's
# launches, 2026-11-29); the commands with Triton (CUDA's default) and the decode bench after them ran on
# 2026-11-29 and are likely skipped (each measurement in a fresh process: ~40-60 s on an H200 VM with
# Triton's cache empty)
bench 100 --heads 8 --seq-len 8192 --repeats 10 --impl triton
bench 100 --model --preset small --seq-len 8192 --repeats 10 --impl triton
bench 200 --model --preset small --seq-len 8192 --repeats 10 --impl triton --compile --max-seconds 180
step 200 "$PYTHON" examples/step_profile.py --preset small --seq-len 8192 --rows 0 --compile reduce-overhead
bench 100 --model --preset base --seq-len 8192 --repeats 5 --impl triton
bench 200 --model --preset base --seq-len 8192 --repeats 5 --impl triton --compile --max-seconds 180
HTCLI_ATTENTION=triton commands triton
step 120 "${HT[@]}" bench --decode --device cuda
step 100 "$PYTHON" examples/step_profile.py --preset small --seq-len 8192 --rows 25  # the missed step
bench 120 --heads 8 --seq-len 65536 --repeats 3 --impl triton
# then the kernels' numerics, a tuning sweep (its fastest setting is used for the rest), profiles
step 120 "$PYTHON" examples/triton_precision.py --lengths 2048,65536 --dtypes bf16
step 150 "$PYTHON" examples/triton_sweep.py --seq-len 8192 --max-seconds 120 --out "$WORK/tuning.json"
if [[ -s $WORK/tuning.json ]]; then
    export HTCLI_TRITON_TUNING=$(cat "$WORK/tuning.json")
    echo "HTCLI_TRITON_TUNING=$HTCLI_TRITON_TUNING"
fi
for causal in --no-causal --causal; do  # launch-bound at 8k: CUDA graphs on and off, side by side
    step 60 "$PYTHON" examples/attention_profile.py $causal --rows 15
    HTCLI_ATTENTION_GRAPHS=0 step 60 "$PYTHON" examples/attention_profile.py $causal --rows 0
done
step 60 "$PYTHON" examples/decode_profile.py --device cuda
HTCLI_DECODE_GRAPH=0 step 120 "${HT[@]}" bench --decode --device cuda
bench 150 --heads 8 --seq-len 8192,65536 --repeats 5 --impl eager
bench 100 --model --preset small --seq-len 8192 --repeats 5 --impl eager
bench 80 --heads 8 --seq-len 8192 --block-size 64 --repeats 5 --impl triton
bench 80 --heads 8 --seq-len 8192 --dim-head 128 --repeats 5 --impl triton
bench 120 --heads 8 --seq-len 8192 --dim-head 256 --repeats 5 --impl triton  # (not yet measured)
HTCLI_ATTENTION=eager commands eager
echo "== [$((SECONDS - started)) s] done"
if ((${#failed[@]})); then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "all GPU checks passed"
