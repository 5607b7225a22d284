#!/usr/bin/env bash
# The full SYSU-30k on one GPU node: shard -> split -> train (paper-faithful settings) -> evaluate.
# Usage: bash pipelines/gpu-node.sh RAW OUT [GPUS] [IMAGENET_WEIGHTS]
#   RAW: the release folder as downloaded (train/*.tar, test/*.tar, the lists, optional bag JSON) or extracted
#   GPUS: default, every GPU torch sees on this machine
#   IMAGENET_WEIGHTS: a torchvision resnet50 state_dict file (the released models start from ImageNet)
# Disk under OUT: ~85 GB of shards (29.6 M images at 144 px, the release's own bytes) + manifests (~3 GB) +
# checkpoints (~0.2 GB per run) + the test features eval caches (1,000 + 479,730 x 2048 float32: ~4 GB per
# run); 100 GB free is required and checked. The download itself (82 GB of archives) is read, never copied.
set -euo pipefail
RAW=$1 OUT=$2 WEIGHTS=${4:-}
GPUS=${3:-$(python -c 'import torch; print(torch.cuda.device_count())')}
[ "$GPUS" -ge 1 ] || { echo "gpu-node.sh: no GPU visible to torch (give GPUS or use pipelines/train-cpu.sh)" >&2; exit 2; }
PRETRAINED=(); [ -n "$WEIGHTS" ] && PRETRAINED=(--pretrained "$WEIGHTS")
# From random weights the paper settings collapsed the features in BENCHMARKS.md's check; say so up front.
[ -n "$WEIGHTS" ] || echo "gpu-node.sh: no IMAGENET_WEIGHTS: training starts from random weights, where the paper settings collapsed (BENCHMARKS.md)" >&2
CPUS=$(nproc)
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
FREE_GB=$(( $(df -Pk "$OUT" | awk 'NR==2 {print $4}') / 1048576 ))
[ "$FREE_GB" -ge 100 ] || { echo "gpu-node.sh: $OUT has $FREE_GB GB free, 100 GB needed" >&2; exit 2; }

# The decoder that really runs here: doctor decodes one image with each (DALI mixed only if it ran on a GPU).
DECODER=$(sysu30k doctor --json | python -c 'import json, sys; print(next(c["value"] for c in json.load(sys.stdin) if c["name"] == "decoder"))')
WORKERS=$(( CPUS / GPUS > 1 ? CPUS / GPUS : 1 ))          # loader processes per rank
echo "gpu-node.sh: $GPUS GPU(s), decoder $DECODER, $WORKERS loader workers per GPU, $FREE_GB GB free"

# 29.6 M images -> ~400 shards of 256 MB; long side 144 px as the release; resumable.
sysu30k shard "$RAW" "$OUT/data" --resize 144 --workers "$CPUS"
# The official test split (must read 1,000 / 479,730) and a val split of 100 held-out folders.
sysu30k split "$OUT/data" --val-folders 100 --strict

# The released SYSU-30k recipe (SYSU30K.md §4.3, gpu-unary.toml): ResNet-50, 12 bags x 15, balanced
# pseudo-labels + cross-entropy, Nesterov SGD, lr 1e-4 backbone / 1e-3 head, 8 epochs.
torchrun --nproc-per-node "$GPUS" -m sysu30k train-weak "$OUT/data" --out "$OUT/runs/unary" \
  --config "$HERE/gpu-unary.toml" --decoder "$DECODER" --workers "$WORKERS" "${PRETRAINED[@]}"

# The full DGL model (SYSU30K.md §4.4, gpu-dgl.toml): unary + 2 x pairwise + 2 x weak triplet, AMSGrad Adam 2e-4.
torchrun --nproc-per-node "$GPUS" -m sysu30k train-weak "$OUT/data" --out "$OUT/runs/dgl" \
  --config "$HERE/gpu-dgl.toml" --decoder "$DECODER" --workers "$WORKERS" "${PRETRAINED[@]}"

# The official protocol on the full gallery (best checkpoint chosen on val, never on test), every GPU
# embedding its share of the gallery, every CPU decoding.
for run in unary dgl; do
  torchrun --nproc-per-node "$GPUS" -m sysu30k eval "$OUT/data" --checkpoint "$OUT/runs/$run/best.pt" --split test \
    --out "$OUT/runs/$run/eval-test" --workers "$WORKERS" --decoder "$DECODER"
done
sysu30k eval --compare "$OUT/runs/unary/eval-test" "$OUT/runs/dgl/eval-test"
