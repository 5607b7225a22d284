#!/usr/bin/env bash
# The full SYSU-30k on one GPU node: shard -> split -> train (paper-faithful settings) -> evaluate.
# Usage: bash pipelines/gpu-node.sh RAW OUT [GPUS] [IMAGENET_WEIGHTS]
#   RAW: the extracted release (sysu_train_set_all/, sysu_test_set_all/, meta/)
#   IMAGENET_WEIGHTS: a torchvision resnet50 state_dict file (the released models start from ImageNet)
set -euo pipefail
RAW=$1 OUT=$2 GPUS=${3:-8} WEIGHTS=${4:-}
PRETRAINED=(); [ -n "$WEIGHTS" ] && PRETRAINED=(--pretrained "$WEIGHTS")
CPUS=$(nproc)

# 29.6 M images -> ~400 shards of 256 MB; long side 144 px as the release; resumable.
sysu30k shard "$RAW" "$OUT/data" --resize 144 --workers "$CPUS"
# The official test split (must read 1,000 / 479,730) and a val split of 100 held-out folders.
sysu30k split "$OUT/data" --val-folders 100 --strict

# The released SYSU-30k recipe (SYSU30K.md §4.3): ResNet-50, 12 bags x 15 images (1/3/5-folder bags),
# balanced pseudo-labels + cross-entropy, SGD (Nesterov, momentum 0.9, wd 5e-4), lr 1e-4 backbone /
# 1e-3 head, 8 epochs with no decay (StepLR(8) over 8 epochs).
torchrun --nproc-per-node "$GPUS" -m sysu30k train-weak "$OUT/data" --out "$OUT/runs/unary" \
  --method unary --arch resnet50 --embedding 2048 "${PRETRAINED[@]}" --height 256 --width 128 \
  --bags 12 --per-bag 15 --optimizer sgd --lr 1e-4 --head-lr-mult 10 --weight-decay 5e-4 --epochs 8 \
  --decoder auto --workers 8

# The full DGL model (SYSU30K.md §4.4): unary + 2 x pairwise (sigma 1, layer-1 appearance) + 2 x weak
# triplet (median positive, margin 1.2), Adam (AMSGrad) lr 2e-4, wd 5e-4.
torchrun --nproc-per-node "$GPUS" -m sysu30k train-weak "$OUT/data" --out "$OUT/runs/dgl" \
  --method dgl --arch resnet50 --embedding 2048 "${PRETRAINED[@]}" --height 256 --width 128 \
  --bags 12 --per-bag 15 --optimizer adam --lr 2e-4 --head-lr-mult 1 --weight-decay 5e-4 --epochs 8 \
  --pairwise-weight 2 --triplet-weight 2 --sigma 1 --margin 1.2 --decoder auto --workers 8

# The official protocol on the full gallery (best checkpoint chosen on val, never on test).
for run in unary dgl; do
  sysu30k eval "$OUT/data" --checkpoint "$OUT/runs/$run/best.pt" --split test --out "$OUT/runs/$run/eval-test"
done
sysu30k eval --compare "$OUT/runs/unary/eval-test" "$OUT/runs/dgl/eval-test"
