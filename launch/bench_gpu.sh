#!/usr/bin/env bash
# EfficientNet-B0 at 224 on one GPU, synthetic data, batch 256: the trainer eager vs compiled,
# fp16 vs bf16, channels_last off and on; images/s after warm-up (`python -m trainer bench train`).
# Compare with NVIDIA's published 2,489 images/s for B0 on one A100 80GB with AMP (DeepLearningExamples).
#
#   launch/bench_gpu.sh                 # about 10 minutes on an H100: four compiles of about a minute
#   STEPS=40 launch/bench_gpu.sh        # shorter
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
STEPS=${STEPS:-100}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
for precision in bf16 fp16; do
    for layout in "" "--channels-last"; do
        # shellcheck disable=SC2086  # $layout is one flag or nothing
        "$PY" -m trainer bench train --image-size 224 --batch 256 --steps "$STEPS" --window 10 \
            --precision "$precision" $layout --modes bare,eager,compiled
        echo
    done
done
