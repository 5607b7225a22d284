#!/usr/bin/env bash
# The CPU-sized DGL training recipe (what `make demo` trains): ResNet-18 at 64x32, bags of 3 x 16, Adam, the
# settings that bench_learning.py measured (BENCHMARKS.md, "Does it learn?"): pseudo-labels from the folders
# for the first 10 epochs, weak triplet 0.5 x (margin 0.3), pairwise kernel at the batch-median bandwidth.
# Usage: bash pipelines/train-cpu.sh DST RUN [extra train-weak options]
set -euo pipefail
DST=$1 RUN=$2; shift 2
exec sysu30k train-weak "$DST" --out "$RUN" --method dgl \
  --arch resnet18 --embedding 256 --height 64 --width 32 \
  --bags 3 --per-bag 16 --optimizer adam --lr 1e-3 --head-lr-mult 1 --weight-decay 5e-4 \
  --epochs 20 --warmup-epochs 10 --pairwise-weight 2 --triplet-weight 0.5 --sigma 0 --margin 0.3 --erase-p 0 \
  --decoder pil --workers 2 "$@"
