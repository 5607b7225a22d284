#!/usr/bin/env bash
# Sharding and splitting on an existing Dask cluster: one task per shard, workers read the sources and
# write the shards straight to DST (image bytes never pass through the scheduler).
# Usage: bash pipelines/dask-cluster.sh tcp://SCHEDULER:8786 RAW DST
#   RAW and DST must be reachable from every worker (a shared filesystem or s3://...), and every
#   worker needs this package installed.
set -euo pipefail
SCHED=$1 RAW=$2 DST=$3
sysu30k shard "$RAW" "$DST" --resize 144 --scheduler "$SCHED"
sysu30k split "$DST" --val-folders 100 --scheduler "$SCHED"
