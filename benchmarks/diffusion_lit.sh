#!/usr/bin/env bash
# LiT's ablation on Fashion-MNIST (docs/diffusion.md): a softmax DiT teacher, then three linear
# students of the same size trained for the same steps and data: from scratch, inheriting the
# teacher's weights outside attention, and inheriting + hybrid distillation. Every run is one
# process with one thread, the same seed, batch and schedule; FID-FMNIST is scored at every
# evaluation by a CNN the script trains first.
#
# Resumable in chunks: each call trains every unfinished run of the current stage for at most
# CHUNK seconds (finished runs are skipped by the trainer's --resume), then, when all are
# finished, writes the report to docs/. Call it again to go on.
#
#     DOCS=docs bash benchmarks/diffusion_lit.sh          # CHUNK=2400 s per call
#     TEACHER_STEPS=1000 STUDENT_STEPS=500 OUT=results/diffusion-short bash benchmarks/diffusion_lit.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-results/diffusion}
PRESET=${PRESET:-mini}
TEACHER_STEPS=${TEACHER_STEPS:-4000}
STUDENT_STEPS=${STUDENT_STEPS:-2000}
BATCH=${BATCH:-64}
EVAL_EVERY=${EVAL_EVERY:-500}
FID_SAMPLES=${FID_SAMPLES:-500}
SAMPLE_STEPS=${SAMPLE_STEPS:-25}
CHUNK=${CHUNK:-2400}
SEED=${SEED:-0}
CNN_STEPS=${CNN_STEPS:-2000}
DATA_ARGS=()
[[ -n "${DATA:-}" ]] && DATA_ARGS=(--data "$DATA")  # a folder of the idx files
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

finished() {  # run folder, steps: whether its last evaluation is at the final step
    "$PY" - "$1" "$2" <<'EOF'
import sys
from subq.recipes.trainer import read_metrics
run, steps = sys.argv[1], int(sys.argv[2])
sys.exit(0 if any(m.get("split") and m["step"] == steps for m in read_metrics(run)) else 1)
EOF
}

train() {  # recipe, out, steps, extra arguments...
    local recipe=$1 out=$2 steps=$3
    shift 3
    mkdir -p "$out"
    "$PY" -m subq train "$recipe" --preset "$PRESET" --steps "$steps" --batch "$BATCH" \
        --seed "$SEED" --eval-every "$EVAL_EVERY" --fid-classifier "$OUT/fid-cnn" \
        --fid-samples "$FID_SAMPLES" --sample-steps "$SAMPLE_STEPS" --time-limit "$CHUNK" \
        --checkpoint-every 100 --no-progress --resume --out "$out" "${DATA_ARGS[@]}" "$@" >> "$out/stdout.txt" 2>&1
}

# 1. FID-FMNIST's feature network: a small CNN classifier.
if ! finished "$OUT/fid-cnn" "$CNN_STEPS"; then
    mkdir -p "$OUT/fid-cnn"
    "$PY" -m subq train vision --backbone cnn --preset micro --steps "$CNN_STEPS" \
        --seed "$SEED" --no-progress --resume --out "$OUT/fid-cnn" "${DATA_ARGS[@]}" \
        >> "$OUT/fid-cnn/stdout.txt" 2>&1
fi

# 2. The softmax teacher.
teacher=$OUT/teacher-softmax
if ! finished "$teacher" "$TEACHER_STEPS"; then
    train dit "$teacher" "$TEACHER_STEPS" --attention softmax
    finished "$teacher" "$TEACHER_STEPS" || { echo "teacher unfinished: call again"; exit 0; }
fi

# 3. The linear students (LiT's layer, 2 heads), in parallel.
declare -A students=(
    [lit-scratch]="--init scratch --distill none"
    [lit-inherit]="--init inherit --distill none"
    [lit-inherit-hybrid]="--init inherit --distill hybrid"
)
for name in "${!students[@]}"; do
    # shellcheck disable=SC2086
    finished "$OUT/$name" "$STUDENT_STEPS" || \
        train lit "$OUT/$name" "$STUDENT_STEPS" --teacher "$teacher" ${students[$name]} &
done
wait
for name in "${!students[@]}"; do
    finished "$OUT/$name" "$STUDENT_STEPS" || { echo "$name unfinished: call again"; exit 0; }
done

# 4. The report: table, curves and sample grids in docs/.
"$PY" benchmarks/diffusion_report.py "$OUT" --teacher teacher-softmax \
    --students lit-scratch lit-inherit lit-inherit-hybrid ${DOCS:+--docs "$DOCS"} "${DATA_ARGS[@]}"
