#!/usr/bin/env bash
# EfficientNet-B0 at 224 on one GPU, synthetic data, batch 256: the trainer eager vs compiled,
# fp16 vs bf16, channels_last off and on; images/s after warm-up (`python -m trainer bench train`).
# Compare with NVIDIA's published 2,489 images/s for B0 on one A100 80GB with AMP (DeepLearningExamples).
#
#   launch/bench_gpu.sh                 # about 10 minutes on an H100: four compiles of about a minute
#   STEPS=40 launch/bench_gpu.sh        # shorter
#   STEPS=40 MODES=eager,compiled LAYOUTS=off launch/bench_gpu.sh   # what launch/gpu_check.sh runs
#   DRY_RUN=1 launch/bench_gpu.sh       # print the commands instead of running them (no GPU needed)
#
# One `bench train` per (precision, layout): each prints its table when its rows are done, so a
# run stopped part-way keeps the tables of the settings it finished.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-100}
MODES=${MODES:-bare,eager,compiled}   # rows of each table, in order
PRECISIONS=${PRECISIONS:-bf16 fp16}
LAYOUTS=${LAYOUTS:-off on}            # channels_last
DRY_RUN=${DRY_RUN:-}

run() {
    if [[ -n $DRY_RUN ]]; then
        echo "$*"
    else
        "$@"
    fi
}

run nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
for precision in $PRECISIONS; do
    for layout in $LAYOUTS; do
        case $layout in
            off) flags=() ;;
            on) flags=(--channels-last) ;;
            *) echo "error: LAYOUTS: off and/or on, got '$layout'" >&2; exit 2 ;;
        esac
        run "$PY" -m trainer bench train --image-size 224 --batch 256 --steps "$STEPS" --window 10 \
            --precision "$precision" "${flags[@]}" --modes "$MODES"
        [[ -n $DRY_RUN ]] || echo
    done
done
