#!/usr/bin/env bash
# Scale-DiT's sampling at 2x and 4x the training size (docs/diffusion.md, "Scale-DiT"), on the
# softmax teacher and the FID-FMNIST CNN of benchmarks/diffusion_lit.sh (run that first):
#   1. one LoRA bridge per resolution (`subq train scale-dit`, the teacher frozen);
#   2. samples at each resolution with hierarchical local attention and with dense attention
#      (the same bridge, seeds and steps), FID-FMNIST of FID_SAMPLES samples downsampled to 28;
#      at 56 also the ablations without the bridge and without the low-resolution guide;
#   3. the time and peak memory of one high-resolution denoising step per attention and size
#      (benchmarks/scale_dit_steps.py), then the report in docs/.
# Every process runs one thread. Resumable: finished bridges and samples are skipped.
#
#     DOCS=docs bash benchmarks/diffusion_scale.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-results/diffusion}
SCALE=$OUT/scale
BRIDGE_STEPS=${BRIDGE_STEPS:-300}
BRIDGE_BATCH=${BRIDGE_BATCH:-32}
FID_SAMPLES=${FID_SAMPLES:-500}
SAMPLE_STEPS=${SAMPLE_STEPS:-25}
CHUNK=${CHUNK:-2400}
DATA_ARGS=()
[[ -n "${DATA:-}" ]] && DATA_ARGS=(--data "$DATA")
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
teacher=$OUT/teacher-softmax
[[ -f $teacher/checkpoint.pt && -f $OUT/fid-cnn/checkpoint.pt ]] || {
    echo "no teacher or FID CNN in $OUT: run benchmarks/diffusion_lit.sh first"; exit 1; }
mkdir -p "$SCALE"

finished() {  # run folder, steps
    "$PY" - "$1" "$2" <<'EOF'
import sys
from subq.recipes.trainer import read_metrics
run, steps = sys.argv[1], int(sys.argv[2])
sys.exit(0 if any(m.get("split") and m["step"] == steps for m in read_metrics(run)) else 1)
EOF
}

# 1. The bridges, in parallel.
for size in 56 112; do
    bridge=$SCALE/bridge-$size
    finished "$bridge" "$BRIDGE_STEPS" || {
        mkdir -p "$bridge"
        "$PY" -m subq train scale-dit --base "$teacher" --resolution "$size" \
            --steps "$BRIDGE_STEPS" --batch "$BRIDGE_BATCH" --time-limit "$CHUNK" --resume \
            --no-progress --out "$bridge" "${DATA_ARGS[@]}" >> "$bridge/stdout.txt" 2>&1 &
    }
done
wait
for size in 56 112; do
    finished "$SCALE/bridge-$size" "$BRIDGE_STEPS" || { echo "bridge-$size unfinished: call again"; exit 0; }
done

# 2. Samples and FID-FMNIST.
draw() {  # name, size, arguments...
    local name=$1 size=$2
    shift 2
    [[ -f $SCALE/$name.json ]] && return 0
    "$PY" -m subq sample dit --checkpoint "$teacher" --resolution "$size" --steps "$SAMPLE_STEPS" \
        --fid-classifier "$OUT/fid-cnn" --fid-samples "$FID_SAMPLES" --out "$SCALE/$name.png" \
        "${DATA_ARGS[@]}" "$@"
}
for size in 56 112; do
    draw "$size-hierarchical_local" "$size" --attention hierarchical_local --bridge "$SCALE/bridge-$size" &
    draw "$size-softmax" "$size" --attention softmax --bridge "$SCALE/bridge-$size" &
    wait
done
draw 56-hierarchical_local-no-bridge 56 --attention hierarchical_local &
draw 56-softmax-no-guidance 56 --attention softmax --no-guidance &
wait

# 3. Per-step cost, then the report.
[[ -f $SCALE/steps.json ]] || "$PY" benchmarks/scale_dit_steps.py "$teacher" --out "$SCALE/steps.json"
"$PY" benchmarks/diffusion_scale_report.py "$SCALE" ${DOCS:+--docs "$DOCS"}
