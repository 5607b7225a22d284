#!/usr/bin/env bash
# Brings DALI to a lent GPU machine that reaches no package registry: downloads the nvidia-dali-cuda130 wheel and
# its dependencies for the machine's Python, splits them into parts under a transfer limit, and prints the calls.
#
#   benchmarks/dali_parts.sh [PYVER] [PART_MiB]      # e.g. 3.12 60 (the device's `python3 -V`; 60 MiB parts)
#
# Writes .dali/parts/ (git-ignored). Each device call carries one part and copies it outside the working tree,
# because a later call's carry replaces the folder; the last call joins the parts and installs with --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${1:-$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}
MIB=${2:-60}
rm -rf .dali && mkdir -p .dali/wheels .dali/parts
pip download -q --only-binary=:all: --python-version "$PYVER" --platform manylinux_2_28_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .dali/wheels nvidia-dali-cuda130==2.4.0
rm -f .dali/wheels/numpy-*.whl          # the machine's own numpy stays (its torch was built against it)
(cd .dali/wheels && tar cf ../dali.tar ./*.whl)
sum=$(sha256sum .dali/dali.tar | cut -d' ' -f1)
split -b "${MIB}M" -d .dali/dali.tar .dali/parts/dali.tar.
rm -rf .dali/wheels .dali/dali.tar
n=$(ls .dali/parts/dali.tar.* | wc -l)
echo "$n parts in .dali/parts ($(du -sh .dali/parts | cut -f1)); one device call each, in order:"
for p in .dali/parts/dali.tar.*; do
    echo "  carry [\"$p\"]: mkdir -p /tmp/dali && cp $p /tmp/dali/"
done
echo "  then (same warm machine): cat /tmp/dali/dali.tar.* > /tmp/dali.tar && echo '$sum  /tmp/dali.tar' \\"
echo "    | sha256sum -c && mkdir -p /tmp/dw && tar xf /tmp/dali.tar -C /tmp/dw && pip install --no-deps /tmp/dw/*.whl"
