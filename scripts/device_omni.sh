#!/usr/bin/env bash
# The Qwen3-Omni benchmark for a lent GPU machine (the device tool), in one call of under 5 minutes.
#
# Here, once: bash scripts/device_prepare (the wheels the machine lacks: msgspec, which s2s
# imports, and transformers 5.24, which the engine is written against; and the tiny
# checkpoint's tokenizer). Then through the device tool:
#   run(command="bash scripts/device_omni.sh", carry=[".whl", "models/tiny-qwen3-omni"],
#       timeout_s=300)
#
# Unless carried, it builds the tiny Qwen3-Omni checkpoint's tokenizer and preprocessors into
# models/ (the random model's prompts: about 20 s on the CPU); then Qwen3-Omni-30B-A3B-Instruct
# at its real sizes with random weights directly in GPU memory (about 35 B parameters, 66 GiB in
# bf16, no download), and times the streaming engine at 1, 4, 8 and 16 calls, each with a 2 s
# clip and a 640x480 picture, every reply exactly 20 text tokens and 30 frames (2.4 s of
# speech).
# Output also goes to $OUT/bench_omni.txt. On a CPU, to check the script itself:
#   SIZE=shrunk DEVICE=cpu CALLS=1,2 PATH=/work/main/.venv/bin:$PATH bash scripts/device_omni.sh
#
# Budget (estimates; nothing of this has run on a GPU yet): wheel install 10 s, tiny build 20 s,
# model build on the GPU 10-60 s (the unknown: transformers' per-module init of 35 B parameters
# plus a finiteness scan of every tensor), warm-up 5 s, then 29 prefills of ~370 tokens (0.3-1 s
# each) and 4 x 29 steps (0.1-0.5 s each): about 2-3 minutes in all. The bench is cut at 240 s
# so what it printed comes back; drop `16` from --calls if it is. On a GPU it prints an eager
# and a graphed row per batch size (GRAPHS=on: graphed only, for time); each graphed batch runs
# twice, the first to capture its shapes, and the largest first captures every shape up front as
# a worker does at load (16 calls of 8,192 positions: 5 batch sizes x (10 + 13) spans = 115
# graphs, its time and memory printed). Graphs add to the estimate above: perhaps 1-2 minutes
# more, so CALLS=1,4,8 GRAPHS=on is the fallback if the first try is cut. Then it checks graph
# replay against the eager step (the tiny-shaped scenario of tests/omni_graphs_check.py on the
# real-size model); last, it times a call's next turn after a ~4,500-token spoken conversation
# with its caches and media kept, with its caches alone and from nothing (--next-turn;
# NEXT_TURN=0 skips it).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/device_wheels.sh
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
log=${OUT:-/tmp}/bench_omni.txt
(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "no nvidia-smi") |
    tee "$log"
if [ ! -f models/tiny-qwen3-omni/config.json ]; then
    start=$SECONDS
    python3 -c 'import sys; from pathlib import Path; sys.path.insert(0, "scripts")
from make_tiny_models import build_qwen3_omni; build_qwen3_omni(Path("models"))' 2>&1 |
        grep --line-buffered -v 'Loading weights' | tee -a "$log"
    echo "tiny tokenizer built in $((SECONDS - start)) s" | tee -a "$log"
fi
graphs=()
[ "${DEVICE:-cuda}" = cpu ] || graphs=(--graphs "${GRAPHS:-both}" --check-graphs)
timeout 240 python3 scripts/bench_omni.py --random-size "${SIZE:-qwen3-omni}" \
    --device "${DEVICE:-cuda}" --calls "${CALLS:-1,4,8,16}" --max-text 20 --max-frames 30 \
    --next-turn "${NEXT_TURN:-2000}" "${graphs[@]}" 2>&1 |
    grep --line-buffered -v 'Unrecognized keys in `rope_parameters`' | tee -a "$log"
