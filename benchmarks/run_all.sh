#!/usr/bin/env bash
# Every benchmark (what `make bench` runs, with the venv on PATH); the sizes are those quoted in BENCHMARKS.md.
# Scratch data and raw JSON timings go to bench-out/ (git-ignored); results are written up in BENCHMARKS.md.
# Time on the 2-core box: well over an hour in all (bench_learning alone trains 12 models).
#   bench_shard: 3 reps of 12 configurations on two 21k-image synthetic trees (about 7 min idle, 15 min under
#     load), then 5 reps of the six 2-worker configurations on two 102k-image trees (about 9 min), plus about
#     4 min the first time to generate the trees. The trees live on tmpfs (/dev/shm, or $BENCH_TMPFS): this VM
#     hands page cache back to its host within a minute, so trees on disk are read partly from disk. They stay
#     there for the next run (about 1.7 GB of memory): remove $BENCH_TMPFS/sysu30k-bench to free it.
#   bench_plan_memory: 3 interleaved reps at 1.48 M and 2.96 M entries. The 29.6 M-entry run is ONE rep
#     (--full-reps 1), because each takes 5–10 min; its figure is peak RSS, which varies by about 2% between reps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
echo "== machine: nproc $(nproc), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg)"
$PY -c 'import sys, PIL; print("== Python", sys.version.split()[0], "Pillow", PIL.__version__)'
echo "== bench_shard"
TMPFS=${BENCH_TMPFS:-/dev/shm}/sysu30k-bench
$PY benchmarks/bench_shard.py --images 20000 --reps 3 --out "$TMPFS/shard"
$PY benchmarks/bench_shard.py --images 100000 --reps 5 --out "$TMPFS/shard100k" \
  --configs base-wds,ours-full-w2-s16,ours-head-w2-s16,bare-copy,base-pil,ours-resize-w2-s16
echo "== bench_plan_memory"
$PY benchmarks/bench_plan_memory.py --reps 3 --full-reps 1 --out bench-out/plan_memory
echo "== bench_remote (issue 3: local/S3 and 1/2 Dask workers)"
$PY benchmarks/bench_remote.py --reps 3
echo "== bench_split (issue 4)"
$PY benchmarks/bench_split.py --reps 3 --out bench-out/split
echo "== bench_loader (issue 5)"
$PY benchmarks/bench_loader.py --images 6000 --reps 3
echo "== bench_scoring (issue 7; needs ~14 GB of memory for the dense baseline at full size)"
$PY benchmarks/bench_scoring.py
echo "== bench_learning (issue 6; long on a CPU: see BENCHMARKS.md for the sizes used)"
$PY benchmarks/bench_learning.py
