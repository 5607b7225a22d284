#!/usr/bin/env bash
# Every benchmark at its default size (what `make bench` runs, with the venv on PATH).
# Scratch data and raw JSON timings go to bench-out/ (git-ignored); results are written up in BENCHMARKS.md.
# Time on the 2-core box: about 20 minutes when idle, and up to twice that under load.
#   bench_shard: 3 reps of 12 configurations on two 21k-image synthetic trees. About 7 min idle and 15 min
#     under load, plus about 1.5 min the first time to generate the trees.
#   bench_plan_memory: 3 interleaved reps at 1.48 M and 2.96 M entries. The 29.6 M-entry run is ONE rep
#     (--full-reps 1), because each takes 5–10 min; its figure is peak RSS, which varies by about 2% between reps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
echo "== machine: nproc $(nproc), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg)"
$PY -c 'import sys, PIL; print("== Python", sys.version.split()[0], "Pillow", PIL.__version__)'
echo "== bench_shard"
$PY benchmarks/bench_shard.py --images 20000 --reps 3 --out bench-out/shard
echo "== bench_plan_memory"
$PY benchmarks/bench_plan_memory.py --reps 3 --full-reps 1 --out bench-out/plan_memory
