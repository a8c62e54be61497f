#!/usr/bin/env bash
# What the OpenAI HTTP path costs against gRPC: one worker serving the standard benchmark model
# (random weights of benchmarks/standard-model.json), loaded by bench-serve at the same
# concurrency through streamed gRPC Generate and through streamed /v1/completions, alternating
# (and swapping the order each round) so that a noisy neighbour hits both. Prints one JSON line per
# run and, at the end, the ratio of the median output rates (OpenAI / gRPC).
#
# Usage: benchmarks/openai-vs-grpc.sh [BIN]
#   BIN defaults to target/release/latentserve-worker.
#   Env: ROUNDS (3), CONCURRENCY (16), REQUESTS (64), THREADS (2), CACHE (~/.cache/latentserve).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/latentserve-worker}
ROUNDS=${ROUNDS:-3}
CONCURRENCY=${CONCURRENCY:-16}
REQUESTS=${REQUESTS:-64}
THREADS=${THREADS:-2}
CACHE=${CACHE:-$HOME/.cache/latentserve}
CONFIG=benchmarks/standard-model.json
MODEL=$CACHE/bench-standard/model
[ -x "$BIN" ] || { echo "missing $BIN: cargo build --release -p latentserve-worker" >&2; exit 1; }
if [ ! -f "$MODEL/model.safetensors" ]; then
  echo "# making the standard model (init-random of $CONFIG) in $MODEL" >&2
  "$BIN" init-random --config "$CONFIG" --out "$MODEL" --seed 0
fi
GRPC=127.0.0.1:53111
METRICS=127.0.0.1:53112
OPENAI=127.0.0.1:53113
pid=
trap '[ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true' EXIT

echo "# $(date -u +%FT%TZ) $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
RUST_LOG=warn RAYON_NUM_THREADS=$THREADS "$BIN" serve --model "$MODEL" --kv-cache-memory 1Gi \
  --grpc-addr $GRPC --metrics-addr $METRICS --openai-addr $OPENAI &
pid=$!
for _ in $(seq 1 600); do curl -sf "http://$METRICS/readyz" >/dev/null && break; sleep 0.5; done
curl -sf "http://$METRICS/readyz" >/dev/null || { echo "the worker did not become ready" >&2; exit 1; }

results=$(mktemp)
run() { # api round
  "$BIN" bench-serve --api "$1" --target $GRPC --openai-target $OPENAI \
    --concurrency "$CONCURRENCY" --requests "$REQUESTS" --input-len 128 --output-len 64 \
    --seed "$2$([ "$1" = grpc ] && echo 1 || echo 2)" --json | python3 -c '
import json, sys
d = json.load(sys.stdin)
print(json.dumps({"round": '"$2"', "api": d["api"], "concurrency": d["concurrency"],
                  "output_tps": round(d["output_tokens_per_second"], 1),
                  "itl_p50_ms": round(1000 * d["itl_seconds"]["p50"], 2),
                  "ttft_p50_s": round(d["ttft_seconds"]["p50"], 3)}))' | tee -a "$results"
}
for round in $(seq 1 "$ROUNDS"); do
  if [ $((round % 2)) = 1 ]; then run grpc "$round"; run openai "$round"; else run openai "$round"; run grpc "$round"; fi
done
python3 - "$results" <<'EOF'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1])]
median = {api: round(statistics.median(r["output_tps"] for r in runs if r["api"] == api), 1)
          for api in ("grpc", "openai")}
print(json.dumps({"what": "median output t/s", **median,
                  "openai_over_grpc": round(median["openai"] / median["grpc"], 3)}))
EOF
rm -f "$results"
