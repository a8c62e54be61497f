#!/usr/bin/env bash
# Serving against llama.cpp in the same window: the standard model served by latentserve-worker
# and loaded by bench-serve (concurrency 1 and 16, 128-token prompts, 64 new tokens), the offline
# `bench` decode rate, and llama-batched-bench (-npl 1,16) on the same weights as GGUF f32.
# Engines alternate ROUNDS times so that a noisy neighbour hits both; every figure is printed.
#
# Usage: benchmarks/serving.sh [BIN]
#   BIN defaults to target/release/latentserve-worker. Needs benchmarks/run.sh to have made the
#   model and its GGUF once (under ~/.cache/latentserve/bench-standard) and built llama.cpp.
#   Env: ROUNDS (2), REQUESTS_C16 (64), THREADS (2), CACHE (~/.cache/latentserve), LLAMA_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/latentserve-worker}
ROUNDS=${ROUNDS:-2}
REQUESTS_C16=${REQUESTS_C16:-64}
THREADS=${THREADS:-2}
CACHE=${CACHE:-$HOME/.cache/latentserve}
MODEL=$CACHE/bench-standard/model
GGUF=$CACHE/bench-standard/model-f32.gguf
LLAMA_DIR=${LLAMA_DIR:-$(ls -d "$CACHE"/llama.cpp-* 2>/dev/null | tail -1)}
BATCHED=$LLAMA_DIR/build/bin/llama-batched-bench
for need in "$BIN" "$MODEL/config.json" "$GGUF" "$BATCHED"; do
  [ -e "$need" ] || { echo "missing $need: run benchmarks/run.sh once first" >&2; exit 1; }
done
GRPC=127.0.0.1:53101
METRICS=127.0.0.1:53102
OPENAI=127.0.0.1:53103
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true' EXIT

echo "# $(date -u +%FT%TZ) $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
for round in $(seq 1 "$ROUNDS"); do
  offline=$(RAYON_NUM_THREADS=$THREADS "$BIN" bench --model "$MODEL" --depths 128 --decode-tokens 32 --json 2>/dev/null)
  echo "{\"round\": $round, \"engine\": \"latentserve\", \"offline\": $offline}" | python3 -c '
import json, sys
d = json.load(sys.stdin)
print(json.dumps({"round": d["round"], "what": "offline decode t/s, batch 1, depth 128",
                  "value": round(d["offline"]["decode"][0]["tokens_per_second"], 1)}))'

  RUST_LOG=warn RAYON_NUM_THREADS=$THREADS "$BIN" serve --model "$MODEL" --kv-cache-memory 1Gi \
    --grpc-addr $GRPC --metrics-addr $METRICS --openai-addr $OPENAI &
  pid=$!
  for _ in $(seq 1 600); do curl -sf "http://$METRICS/readyz" >/dev/null && break; sleep 0.5; done
  for c in 1 16; do
    n=$([ "$c" = 1 ] && echo 8 || echo "$REQUESTS_C16")
    "$BIN" bench-serve --target $GRPC --concurrency $c --requests "$n" --input-len 128 \
      --output-len 64 --seed "$round$c" --json | python3 -c '
import json, sys
d = json.load(sys.stdin)
c = d["concurrency"]
print(json.dumps({"round": '"$round"', "what": f"latentserve concurrency {c}",
                  "output_tps": round(d["output_tokens_per_second"], 1),
                  "decode_tps": round(c / d["itl_seconds"]["p50"], 1),
                  "itl_p50_ms": round(1000 * d["itl_seconds"]["p50"], 1),
                  "ttft_p50_s": round(d["ttft_seconds"]["p50"], 3)}))'
  done
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=

  "$BATCHED" -m "$GGUF" -c 4096 -b 2048 -ub 512 -npp 128 -ntg 64 -npl 1,16 -t "$THREADS" \
    --output-format jsonl 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    if not line.startswith("{"):
        continue
    r = json.loads(line)
    b = r["pl"]
    print(json.dumps({"round": '"$round"', "what": f"llama.cpp {b} sequences",
                      "output_tps": round(b * r["tg"] / r["t"], 1),
                      "decode_tps": round(r["speed_tg"], 1)}))'
done
echo "# output_tps: new tokens over the whole run (prompts included); decode_tps: decode alone"
echo "# (ours: concurrency / median inter-token latency; llama.cpp: S_TG)."
