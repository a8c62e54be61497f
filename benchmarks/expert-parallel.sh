#!/usr/bin/env bash
# Expert parallelism on loopback: the standard benchmark model served by N = 1, 2 and 4 worker
# processes (routed experts split across them), loaded with bench-serve at concurrency 16 against
# rank 0, in the same run and on the same weights. Prints bench-serve's JSON per N and the
# expert bytes each rank sent per token per MoE layer (from latentserve_expert_dispatch_bytes_total).
#
# Usage: benchmarks/expert-parallel.sh [BIN] [MODEL_DIR]
#   BIN defaults to target/release/latentserve-worker; MODEL_DIR to a fresh init-random of
#   benchmarks/standard-model.json. Env: REQUESTS (64), CONCURRENCY (16), INPUT_LEN (128),
#   OUTPUT_LEN (64), SHARDS ("1 2 4"), WIRE (f32).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/latentserve-worker}
MODEL=${2:-}
REQUESTS=${REQUESTS:-64}
CONCURRENCY=${CONCURRENCY:-16}
INPUT_LEN=${INPUT_LEN:-128}
OUTPUT_LEN=${OUTPUT_LEN:-64}
SHARDS=${SHARDS:-"1 2 4"}
WIRE=${WIRE:-f32}
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
if [ -z "$MODEL" ]; then
  MODEL="$work/model"
  "$BIN" init-random --config benchmarks/standard-model.json --out "$MODEL" --seed 1 >&2
fi

wait_serving() { # grpc port, metrics port, log
  for _ in $(seq 1 600); do
    if curl -sf "http://127.0.0.1:$2/readyz" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  echo "worker on $1 never became ready; its log:" >&2; cat "$3" >&2; return 1
}

for n in $SHARDS; do
  base=$((52000 + n * 10))
  experts_base=$((53000 + n * 10))
  peers=$(seq -s, -f "127.0.0.1:%g" $experts_base $((experts_base + n - 1)))
  pids=()
  for rank in $(seq 0 $((n - 1))); do
    args=(serve --model "$MODEL" --grpc-addr "127.0.0.1:$((base + rank))"
          --metrics-addr "127.0.0.1:$((base + 5 + rank))" --openai-addr '' --experts-addr "127.0.0.1:$((experts_base + rank))"
          --shard-rank "$rank" --shard-count "$n"
          --kv-cache-memory 512Mi --expert-wire-dtype "$WIRE")
    [ "$n" -gt 1 ] && args+=(--peers "$peers")
    RUST_LOG=warn "$BIN" "${args[@]}" 2>"$work/rank-$n-$rank.log" &
    pids+=($!)
  done
  for rank in $(seq 0 $((n - 1))); do
    wait_serving $((base + rank)) $((base + 5 + rank)) "$work/rank-$n-$rank.log"
  done
  rss=$(for pid in "${pids[@]}"; do awk '/VmRSS/ {printf "%d ", $2/1024}' "/proc/$pid/status"; done)
  echo "== N = $n (RSS MiB per rank: $rss)"
  "$BIN" bench-serve --target "127.0.0.1:$base" --concurrency "$CONCURRENCY" --requests "$REQUESTS" \
    --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --json
  metrics=$(curl -sf "http://127.0.0.1:$((base + 5))/metrics")
  sent=$(echo "$metrics" | awk '/^latentserve_expert_dispatch_bytes_total/ {s += $2} END {print s + 0}')
  tokens=$(echo "$metrics" | awk '/^latentserve_(prompt|generation)_tokens_total/ {s += $2} END {print s + 0}')
  layers=$(python3 -c "import json; c = json.load(open('$MODEL/config.json')); print(c['num_hidden_layers'] - c['first_k_dense_replace'])")
  hidden=$(python3 -c "import json; print(json.load(open('$MODEL/config.json'))['hidden_size'])")
  echo "rank 0 sent $sent expert bytes for $tokens tokens over $layers MoE layers:" \
    "$(python3 -c "print(round($sent / max($tokens, 1) / $layers, 1))") bytes per token per MoE layer" \
    "(one destination shard = $((hidden * 4)) bytes of f32 hidden state)"
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
done
