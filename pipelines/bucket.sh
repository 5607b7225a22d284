#!/usr/bin/env bash
# The release in an S3-compatible bucket: shard bucket -> bucket, then train streaming whole shards
# from the bucket (prefetched, cached on local disk), never one request per image.
# Usage: AWS_ENDPOINT_URL=... AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... \
#        bash pipelines/bucket.sh s3://BUCKET/SYSU-30k-released s3://BUCKET/sysu30k RUN [GPUS]
set -euo pipefail
RAW=$1 DST=$2 RUN=$3 GPUS=${4:-1}
HERE=$(cd "$(dirname "$0")" && pwd)
sysu30k shard "$RAW" "$DST" --resize 144 --workers "$(nproc)" --retries 8
sysu30k split "$DST" --val-folders 100
torchrun --nproc-per-node "$GPUS" -m sysu30k train-weak "$DST" --out "$RUN" --config "$HERE/gpu-dgl.toml"
sysu30k eval "$DST" --checkpoint "$RUN/best.pt" --split test --out "$RUN/eval-test"
