#!/usr/bin/env bash
# The embedded demo, end to end on the synthetic default, on 2 CPU cores in a few minutes:
# synth (packaged as the download) -> shard -> split -> train-weak (the CPU recipe) -> eval, trained model next to
# an untrained one.
# Usage: bash pipelines/demo.sh [OUT]   (default demo-out/; `make demo` runs it with the venv on PATH)
set -euo pipefail
OUT=${1:-demo-out}
WORKERS=${WORKERS:-2}
HERE=$(cd "$(dirname "$0")" && pwd)

# 1. A SYSU-30k-shaped dataset packaged as the download (train/…_partN.tar, test/…tar, lists at the root):
#    100 folders x ~16 images (20% show a neighbour), 50 test ids, 200 distractors.
[ -f "$OUT/download/synth.json" ] || sysu30k synth "$OUT/download" --folders 100 --images-per-folder 16 \
  --test-ids 50 --distractors 200 --height 288 --seed 0 --release --parts 3 --workers "$WORKERS"

# 2. Shard the download as it is, reading the tars: long side 144 px, small shards so the loader has several
#    per worker.
sysu30k shard "$OUT/download" "$OUT/data" --resize 144 --shard-size 2MB --workers "$WORKERS"

# 3. The official-shaped test split, and a val split of 10 held-out folders, 10 queries from each of its 5 query
#    folders: 50 queries, enough for rank-1 to choose the checkpoint.
sysu30k split "$OUT/data" --val-folders 10 --val-block 5 --val-queries 10

# 4. What the trainer is fed, then train (resumes if interrupted) and an untrained copy for comparison.
sysu30k peek "$OUT/data" --out "$OUT/batch.png" --bags 6 --per-bag 8 --height 128 --width 64 --decoder pil
bash "$HERE/train-cpu.sh" "$OUT/data" "$OUT/runs/dgl"
bash "$HERE/train-cpu.sh" "$OUT/data" "$OUT/runs/untrained" --epochs 0

# 5. The official protocol on the test split, side by side.
for run in untrained dgl; do
  sysu30k -q eval "$OUT/data" --checkpoint "$OUT/runs/$run/best.pt" --split test --out "$OUT/runs/$run/eval-test" \
    --device cpu > /dev/null
done
echo
sysu30k eval --compare "$OUT/runs/untrained/eval-test" "$OUT/runs/dgl/eval-test"
echo
echo "plots:   $OUT/runs/dgl/eval-test/cmc.png, $OUT/runs/dgl/eval-test/ranked.png, $OUT/batch.png"
echo "metrics: $OUT/runs/dgl/metrics.jsonl (per epoch), $OUT/runs/dgl/eval-test/metrics.json"
