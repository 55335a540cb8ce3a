#!/usr/bin/env bash
# The Moshi checks for a lent GPU machine (the device tool), in one call of under 5 minutes.
#
# Here, once: bash scripts/device_prepare (wheels the machine lacks: msgspec, transformers
# 5.24). Then through the device tool, with `.whl` carried:
#   run(command="bash scripts/device_moshi.sh", carry=[".whl"], timeout_s=330)
#
# It builds a moshiko-sized Moshi with random weights on the GPU (no download, under a second
# after ~15 s of imports) and times the engine, most wanted first, each stage under its own
# time limit and none stopping the others: eager steps at 1 and 64 calls (no graphs: what runs
# if capture fails); the captured steps at 1, 16 and 64 calls with the profiler's operator,
# sync and allocation counts; every call's window full (2,900 frames) at 1..96 calls, with GPU
# memory and the largest N within 80 ms; last, graph replay checked against the eager step
# (300 steps through joins, a leave, a reset and a span change). Output also goes to
# $OUT/bench_moshi.txt. Estimates (nothing of it has run on a GPU yet): 30 + 60 + 90 + 90 s;
# the stages are cut at 40 + 70 + 90 + 90 s, which with the wheels' install fits timeout_s=330.
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/device_wheels.sh
log=${OUT:-/tmp}/bench_moshi.txt
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$log"

stage() {  # stage SECONDS ARGS...: one bench run, cut at SECONDS; its failure is reported
    local limit=$1 started=$SECONDS
    shift
    echo "== bench_moshi $*" | tee -a "$log"
    timeout "$limit" python3 scripts/bench_moshi.py --random-size moshiko --device cuda "$@" \
        2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "== rc=$rc after $((SECONDS - started)) s" | tee -a "$log"
}

stage 40 --calls 1,64 --steps 10 --eager
stage 70 --calls 1,16,64 --steps 10 --profile
stage 90 --calls 1,16,32,64,80,96 --steps 20 --context 2900
stage 90 --calls 1 --steps 1 --check-graphs
