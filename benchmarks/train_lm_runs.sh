#!/usr/bin/env bash
# The training ground's first LM runs (docs/training.md): the small preset on Python's
# documentation, one process per mixer, one thread each, the same budget and seed for all.
# Resumable in chunks: each call trains every run for at most CHUNK seconds, then writes the
# curves to docs/; call it again to go on (finished runs are skipped by the trainer).
#
#     bash benchmarks/train_lm_runs.sh                 # CHUNK=2400 s per call
#     MIXERS="dense local" STEPS=2000 bash benchmarks/train_lm_runs.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MIXERS=${MIXERS:-"dense local mamba"}
STEPS=${STEPS:-2000}
BATCH=${BATCH:-8}
SEQ=${SEQ:-256}
CHUNK=${CHUNK:-2400}
SEED=${SEED:-0}
export OMP_NUM_THREADS=1
runs=()
for mixer in $MIXERS; do
    out=runs/lm/$mixer-small-L$SEQ-s$SEED
    runs+=("$out")
    mkdir -p "$out"
    "$PY" -m subq train lm --mixer "$mixer" --preset small --seq-len "$SEQ" --batch "$BATCH" \
        --steps "$STEPS" --seed "$SEED" --eval-every 250 --checkpoint-every 50 \
        --log-every 10 --time-limit "$CHUNK" --no-progress --resume --out "$out" \
        > "$out/stdout.txt" 2>&1 &
done
wait
"$PY" benchmarks/training_curves.py "${runs[@]}" --png docs/img/training_lm.png \
    --json docs/data/training_lm.json
