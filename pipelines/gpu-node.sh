#!/usr/bin/env bash
# The full SYSU-30k on one GPU node: shard -> split -> train (paper-faithful settings) -> evaluate.
# Usage: bash pipelines/gpu-node.sh RAW OUT [GPUS] [IMAGENET_WEIGHTS]
#   RAW: the extracted release (sysu_train_set_all/, sysu_test_set_all/, meta/)
#   IMAGENET_WEIGHTS: a torchvision resnet50 state_dict file (the released models start from ImageNet)
set -euo pipefail
RAW=$1 OUT=$2 GPUS=${3:-8} WEIGHTS=${4:-}
PRETRAINED=(); [ -n "$WEIGHTS" ] && PRETRAINED=(--pretrained "$WEIGHTS")
CPUS=$(nproc)
HERE=$(cd "$(dirname "$0")" && pwd)

# 29.6 M images -> ~400 shards of 256 MB; long side 144 px as the release; resumable.
sysu30k shard "$RAW" "$OUT/data" --resize 144 --workers "$CPUS"
# The official test split (must read 1,000 / 479,730) and a val split of 100 held-out folders.
sysu30k split "$OUT/data" --val-folders 100 --strict

# The released SYSU-30k recipe (SYSU30K.md §4.3, gpu-unary.toml): ResNet-50, 12 bags x 15, balanced
# pseudo-labels + cross-entropy, Nesterov SGD, lr 1e-4 backbone / 1e-3 head, 8 epochs.
torchrun --nproc-per-node "$GPUS" -m sysu30k train-weak "$OUT/data" --out "$OUT/runs/unary" \
  --config "$HERE/gpu-unary.toml" "${PRETRAINED[@]}"

# The full DGL model (SYSU30K.md §4.4, gpu-dgl.toml): unary + 2 x pairwise + 2 x weak triplet, AMSGrad Adam 2e-4.
torchrun --nproc-per-node "$GPUS" -m sysu30k train-weak "$OUT/data" --out "$OUT/runs/dgl" \
  --config "$HERE/gpu-dgl.toml" "${PRETRAINED[@]}"

# The official protocol on the full gallery (best checkpoint chosen on val, never on test).
for run in unary dgl; do
  sysu30k eval "$OUT/data" --checkpoint "$OUT/runs/$run/best.pt" --split test --out "$OUT/runs/$run/eval-test"
done
sysu30k eval --compare "$OUT/runs/unary/eval-test" "$OUT/runs/dgl/eval-test"
