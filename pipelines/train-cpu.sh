#!/usr/bin/env bash
# The CPU-sized DGL training recipe (what `make demo` trains): ResNet-18 at 128x64, small bags, Adam.
# Usage: bash pipelines/train-cpu.sh DST RUN [extra train-weak options]
set -euo pipefail
DST=$1 RUN=$2; shift 2
exec sysu30k train-weak "$DST" --out "$RUN" --method dgl \
  --arch resnet18 --embedding 256 --height 128 --width 64 \
  --bags 6 --per-bag 8 --optimizer adam --lr 3e-4 --head-lr-mult 10 --weight-decay 5e-4 \
  --epochs 8 --pairwise-weight 2 --triplet-weight 2 --sigma 0 --margin 1.2 \
  --decoder pil --workers 2 "$@"
