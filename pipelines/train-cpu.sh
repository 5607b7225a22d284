#!/usr/bin/env bash
# The CPU-sized DGL training recipe (what `make demo` trains): the settings are in train-cpu.toml beside this file.
# Usage: bash pipelines/train-cpu.sh DST RUN [extra train-weak options, which override the file]
set -euo pipefail
DST=$1 RUN=$2; shift 2
HERE=$(cd "$(dirname "$0")" && pwd)
exec sysu30k train-weak "$DST" --out "$RUN" --config "$HERE/train-cpu.toml" "$@"
