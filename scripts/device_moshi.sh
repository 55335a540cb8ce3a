#!/usr/bin/env bash
# The Moshi checks for a lent GPU machine (the device tool), in one call of under 5 minutes.
#
# That machine has torch and transformers but not msgspec (s2s imports it); bring it, and
# transformers 5.24 (pure Python) to match this machine's, as wheels. Once, here:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl msgspec==0.23.0 transformers==5.24.0
# then run this script there with `.whl` carried:  bash scripts/device_moshi.sh
#
# It builds a moshiko-sized Moshi with random weights on the GPU (no download), then times the
# engine at 1..96 calls (CUDA graphs checked against the eager step, then timed with and
# without them), first fresh, then with every call's window full (2,900 frames), with
# the profiler's operator, sync and allocation counts. Output also goes to $OUT/bench_moshi.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/device_wheels.sh
log=${OUT:-/tmp}/bench_moshi.txt
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$log"
python3 scripts/bench_moshi.py --random-size moshiko --device cuda --calls 1,16,64 \
    --steps 10 --profile --check-graphs 2>&1 | tee -a "$log"
python3 scripts/bench_moshi.py --random-size moshiko --device cuda --calls 1,64 \
    --steps 10 --eager 2>&1 | tee -a "$log"
python3 scripts/bench_moshi.py --random-size moshiko --device cuda --calls 1,16,32,64,80,96 \
    --steps 20 --context 2900 2>&1 | tee -a "$log"
