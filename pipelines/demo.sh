#!/usr/bin/env bash
# The embedded demo, end to end on the synthetic default: synth -> shard -> summary.
# Usage: bash pipelines/demo.sh [OUT]   (default demo-out/; `make demo` runs it with the venv on PATH)
set -euo pipefail
OUT=${1:-demo-out}
WORKERS=${WORKERS:-2}

# 1. A SYSU-30k-shaped tree: 100 folders x ~16 images (20% impure), 50 test ids, 200 distractors, 288 px high.
if [ ! -f "$OUT/raw/synth.json" ]; then
  sysu30k synth "$OUT/raw" --folders 100 --images-per-folder 16 --test-ids 50 --distractors 200 \
    --height 288 --seed 0 --workers "$WORKERS"
fi

# 2. Pack it as the release would be: long side 144 px, small shards so the demo shows several.
sysu30k shard "$OUT/raw" "$OUT/data" --resize 144 --shard-size 2MB --workers "$WORKERS"

# 3. What was written.
echo
echo "shards:    $OUT/data/shards/   (tar + DALI .idx)"
echo "manifests: $OUT/data/manifests/ (images, bags, shards, rejects .parquet + summary.json)"
