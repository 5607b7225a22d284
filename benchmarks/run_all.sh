#!/usr/bin/env bash
# Every benchmark at its default size (what `make bench` runs, with the venv on PATH).
# Scratch data and raw JSON timings go to bench-out/ (git-ignored). About 20 minutes on the 2-core box:
# bench_shard ~6 min (plus ~? min to generate the two synthetic trees the first time),
# bench_plan_memory ~14 min (three 29.6 M-entry planning runs of ~4 min each).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
echo "== machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -I)"
$PY -c 'import sys, PIL; print("== Python", sys.version.split()[0], "Pillow", PIL.__version__)'
echo "== bench_shard"
$PY benchmarks/bench_shard.py --images 20000 --reps 3 --out bench-out/shard
echo "== bench_plan_memory"
$PY benchmarks/bench_plan_memory.py --reps 3 --out bench-out/plan_memory
