#!/usr/bin/env bash
# SSG end to end on synthetic data: a labelled source domain, an unlabelled target domain in another style
# with other people, the source stage, the adaptation, and both checkpoints scored on the target test split.
# CPU-sized (ResNet-18 at 64x32; the settings of benchmarks/bench_ssg.py, about 3 min on 2 cores); on a GPU
# node drop the size options to get the released settings.
# Usage: bash pipelines/ssg-adapt.sh OUT
set -euo pipefail
OUT=${1:-ssg-out}
HERE=$(cd "$(dirname "$0")" && pwd)
sysu30k synth "$OUT/src-raw" --folders 48 --images-per-folder 12 --test-ids 96 --distractors 200 --impurity 0 --style 0 --seed 0
sysu30k synth "$OUT/tgt-raw" --folders 48 --images-per-folder 12 --test-ids 96 --distractors 200 --impurity 0 --style 1 \
  --id-offset 100000 --seed 1000
sysu30k shard "$OUT/src-raw" "$OUT/src" --shard-size 2MB --workers 2
sysu30k shard "$OUT/tgt-raw" "$OUT/tgt" --shard-size 2MB --workers 2
sysu30k split "$OUT/tgt" --expect none
sysu30k train-ssg "$OUT/src" --out "$OUT/run-src" --config "$HERE/ssg-source-cpu.toml"
sysu30k train-ssg "$OUT/tgt" --init "$OUT/run-src/last.pt" --source "$OUT/src" --truth "$OUT/tgt-raw/truth.csv" \
  --out "$OUT/run-ssg" --config "$HERE/ssg-adapt-cpu.toml"
sysu30k eval "$OUT/tgt" --checkpoint "$OUT/run-src/last.pt" --out "$OUT/eval-source-only"
sysu30k eval "$OUT/tgt" --checkpoint "$OUT/run-ssg/last.pt" --out "$OUT/eval-ssg"
sysu30k eval --compare "$OUT/eval-source-only" "$OUT/eval-ssg"
