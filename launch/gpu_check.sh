#!/usr/bin/env bash
# Everything worth measuring in one short GPU session (under 8 minutes on one H100/H200), every
# result under OUT_DIR:
#
#   launch/gpu_check.sh OUT_DIR              # on the GPU machine
#   launch/gpu_check.sh OUT_DIR --dry-run    # print the commands it would run, one a line; runs nothing
#   CIFAR10_DIR=/data/cifar10-train PY=python3 launch/gpu_check.sh OUT_DIR
#
# Stages, one after another, each under `timeout` (seconds overridable) so the whole ends in time:
#   speed   SPEED_TIMEOUT=170   launch/bench_gpu.sh's table at 40 steps: B0 224 px batch 256,
#                               bf16 and fp16, trainer eager and compiled   -> OUT_DIR/speed.txt
#   proxy   PROXY_TIMEOUT=250   the CIFAR-10 proxy's rows 1 (baseline), 5 and 23 (fp16), 37 (fp32 in the
#                               protocol), both seeds, full proxy length, all at once -> OUT_DIR/proxy/, proxy.log
#   report  REPORT_TIMEOUT=30   the ablation tables of those runs          -> OUT_DIR/report/, report.log
# A stage that fails or times out keeps what it wrote and the next stage still runs. OUT_DIR/summary.txt
# gets one line per stage (ok / failed / timed out, seconds); the exit status is 1 if any stage was not ok.
set -euo pipefail

usage="usage: launch/gpu_check.sh OUT_DIR [--dry-run]"
OUT="" DRY_RUN=""
for arg in "$@"; do
    case $arg in
        --dry-run) DRY_RUN=1 ;;
        -*) echo "error: unknown option $arg ($usage)" >&2; exit 2 ;;
        *) [[ -z $OUT ]] || { echo "error: one OUT_DIR, got '$OUT' and '$arg' ($usage)" >&2; exit 2; }
           OUT=$arg ;;
    esac
done
[[ -n $OUT ]] || { echo "error: no OUT_DIR ($usage)" >&2; exit 2; }
OUT=$(realpath -m "$OUT")  # absolute before the cd below: OUT_DIR is relative to where the script was called from
cd "$(dirname "$0")/.."

SPEED_TIMEOUT=${SPEED_TIMEOUT:-170}
PROXY_TIMEOUT=${PROXY_TIMEOUT:-250}
REPORT_TIMEOUT=${REPORT_TIMEOUT:-30}
GRACE=5  # timeout's SIGTERM goes to the stage's whole process group (the sweep's runs checkpoint on it);
         # SIGKILL after GRACE seconds, so a stage can overrun its budget by this much at most
# the repository's venv when it came along to this machine, else whatever python3 has the trainer
if [[ -z ${PY:-} ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PY
# a stage killed at its timeout would lose what Python still held in its stdout buffer
export PYTHONUNBUFFERED=1

# The proxy's own data.path (../shared/data/cifar10-train) is relative to the repository root; on a
# machine the repository was copied to, shared/ may sit inside the copy or be missing altogether.
if [[ -n ${CIFAR10_DIR:-} ]]; then
    candidates=("$CIFAR10_DIR")
else
    candidates=(../shared/data/cifar10-train shared/data/cifar10-train)
fi
DATA=""
for dir in "${candidates[@]}"; do
    if [[ -d $dir ]]; then DATA=$(cd "$dir" && pwd); break; fi
done
if [[ -z $DATA ]]; then
    echo "error: no CIFAR-10 JPEG folder at ${candidates[*]} (from $PWD): set CIFAR10_DIR to the cifar10-train class folders" >&2
    exit 2
fi
mkdir -p "$OUT"

quote() {  # a command as one line that a shell reads back the same (plain words left unquoted)
    local words=() word
    for word in "$@"; do
        if [[ $word =~ ^[A-Za-z0-9_./,=:@%+-]+$ ]]; then words+=("$word"); else words+=("'${word//\'/\'\\\'\'}'"); fi
    done
    echo "${words[*]}"
}

failed=0
[[ -n $DRY_RUN ]] || : >"$OUT/summary.txt"

stage() {  # stage NAME SECONDS LOG COMMAND...: run COMMAND under timeout, its output on the screen and in LOG
    local name=$1 seconds=$2 log=$3 rc=0 started=$SECONDS outcome
    shift 3
    echo "# $name: at most $seconds s, output in $log"
    quote timeout -k "$GRACE" "$seconds" "$@"
    [[ -z $DRY_RUN ]] || return 0
    # rc is timeout's status (tee's is 0): 124 when it stopped the stage, 137 when it had to kill it
    timeout -k "$GRACE" "$seconds" "$@" 2>&1 | tee "$log" || rc=$?
    case $rc in
        0) outcome="ok" ;;
        124 | 137) outcome="timed out" ;;
        *) outcome="failed (exit $rc)" ;;
    esac
    [[ $rc == 0 ]] || failed=1
    echo "$name: $outcome, $((SECONDS - started)) s" | tee -a "$OUT/summary.txt"
}

# 1. speed: bench_gpu.sh itself at fewer steps and one layout (channels_last off, the trainer's default):
#    both layouts would be four compiles of a minute or so, more than the whole stage's budget. 40 steps = 3 timed windows of 10 after the first.
bench_env=(STEPS=40 MODES=eager,compiled "PRECISIONS=bf16 fp16" LAYOUTS=off)
stage speed "$SPEED_TIMEOUT" "$OUT/speed.txt" env "${bench_env[@]}" bash launch/bench_gpu.sh
if [[ -n $DRY_RUN ]]; then  # what bench_gpu.sh runs, indented under it
    env "${bench_env[@]}" DRY_RUN=1 bash launch/bench_gpu.sh | sed 's/^/    /'
fi

# 2. proxy: plain `python -m trainer` runs (sweep starts one process per run), not the deepspeed
#    launcher: the proxy's one process stands in for the notes' 8 GPUs (its global batch is theirs / 8).
#    Both seeds of the four rows (8 runs) at once: row 1's 1,400 steps set the time, and at 32 px
#    each run keeps a CPU core busy (decoding) while leaving the GPU mostly idle.
#    engine.allow_cpu_fp16 (the proxy's, for rows 5 and 23) does nothing on a GPU: they run real fp16.
stage proxy "$PROXY_TIMEOUT" "$OUT/proxy.log" \
    "$PY" -m trainer sweep --proxy cifar10 --variants "${PROXY_VARIANTS:-notes/1,notes/5,notes/23,notes/37}" \
    --sweep-dir "$OUT/proxy" --jobs "${PROXY_JOBS:-8}" "data.path=$DATA"

# 3. report: runs whatever the proxy left (an interrupted run too); fails in a second without sweep.json
stage report "$REPORT_TIMEOUT" "$OUT/report.log" \
    "$PY" -m trainer report --sweep "$OUT/proxy" --out "$OUT/report"

[[ -n $DRY_RUN ]] || echo "summary: $OUT/summary.txt"
exit "$failed"
