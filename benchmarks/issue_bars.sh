#!/usr/bin/env bash
# Every performance bar of the issues, measured in one go on a quiet machine (2 threads,
# B=1, H=8, D=64, float32 unless a line says otherwise). Each script times the mechanism and
# dense SDPA in the same run and prints the ratio; the logs land in results/bars/<time>/.
#
#     bash benchmarks/issue_bars.sh            # about 15 minutes on 2 cores
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=results/bars/$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
export OMP_NUM_THREADS=2
run() {  # run NAME CMD...: tee the output into $OUT/NAME.txt
    local name=$1; shift
    echo "== $name: $*" | tee "$OUT/$name.txt"
    "$@" 2>&1 | tee -a "$OUT/$name.txt"
}
run linear "$PY" benchmarks/linear_speed.py --length 16384 --threads 2
run combiner "$PY" benchmarks/combiner_speed.py --lengths 4096 16384 --variants fixed axial
run hip "$PY" benchmarks/hip_speed.py --lengths 16384 32768 --threads 2 --repeats 3
run scout "$PY" benchmarks/scout_speed.py --length 16384 --segment 16 --threads 2 --skip-decode
run scan_2threads "$PY" benchmarks/scan_speed.py --length 16384 --threads 2
run scan_1thread "$PY" benchmarks/scan_speed.py --length 16384 --threads 1
run scale_dit "$PY" benchmarks/scale_dit_speed.py --image 2048 --heads 8 --dim 64 --threads 2
echo "logs in $OUT"
