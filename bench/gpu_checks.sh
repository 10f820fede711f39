#!/usr/bin/env bash
# The GPU checks of the [infer] and [train] issues in one run, for a session that is lent a GPU machine:
#   bash bench/gpu_checks.sh          (figures and logs under $OUT, else ./gpu-results; about 8-11 minutes on an H100)
# It uses the machine's own python3 and torch; gemmalab is imported from this checkout. Record what it prints in
# bench/RESULTS.md with the card's name.
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep its log, never stop the others
    local name=$1 limit=$2; shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    echo "   exit $? ; last line: $(tail -n 1 "$OUT/$name.log")"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# [infer]: batch-1 bf16 decode of gemma-2b-shaped random weights against the card's copy bandwidth (target >= 70%)
step decode_bandwidth 150 "$PY" bench/decode_bandwidth.py --preset gemma-2b --device cuda --dtype bfloat16
step decode_bandwidth_compile 200 "$PY" bench/decode_bandwidth.py --preset gemma-2b --device cuda --dtype bfloat16 --compile
# [train]: gemma-2b, bf16, seq 2048, FSDP2 with one rank, compile on: tokens/s and MFU (goal >= 50%)
step train_mfu 300 "$PY" bench/train_mfu.py --preset gemma-2b --seq 2048 --batch 2 --steps 12 --warmup 4 --device cuda
# the same with the whole [4096, 256000] fp32 logits in one loss chunk (3 output-projection matmuls, not 4; ~10 GB
# more at the loss): last, so that a time limit cuts only this one
step train_mfu_one_loss_chunk 300 "$PY" bench/train_mfu.py --preset gemma-2b --seq 2048 --batch 2 --steps 12 --warmup 4 --device cuda --loss-chunk-mb 4096
