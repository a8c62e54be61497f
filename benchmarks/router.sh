#!/usr/bin/env bash
# What the request router gives: WORKERS worker processes on 127.0.0.1 serving the standard
# benchmark model, and one workload of many users over a few long shared system prompts (PREFIXES
# prompts of PREFIX_LEN tokens, REQUESTS requests of INPUT_LEN tokens at CONCURRENCY), sent in one
# run, each time with fresh prefixes (another seed), through:
#   prefix-aware  latentserve-router --policy prefix-aware (the default)
#   round-robin   latentserve-router --policy round-robin (per-request balancing without affinity)
#   pinned        no router: each client keeps one connection to one worker (what a ClusterIP
#                 Service does to gRPC), clients spread evenly
# then the router's own cost (one worker, concurrency 1, short prompts: directly and through the
# router), and a prefix-aware run during which one worker is killed (SIGKILL) mid-run.
# Prints one JSON line per run and a summary with the ratios the issue asks for.
#
# Usage: benchmarks/router.sh [BIN_DIR]
#   BIN_DIR defaults to target/release (latentserve-worker and latentserve-router).
#   Env: WORKERS (4), PREFIXES (32), PREFIX_LEN (512), INPUT_LEN (576), OUTPUT_LEN (16),
#        REQUESTS (512), CONCURRENCY (16), THREADS (threads per worker, 1), KV_CACHE (latent
#        cache per worker, 1Gi: room for every prefix everywhere; 96Mi with PREFIXES=32: each
#        worker holds about a third of them),
#        CACHE (~/.cache/latentserve), SKIP_KILL (unset), ONLY_PREFIX_AWARE (unset: set, only the
#        first run, for trying a policy change).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN_DIR=${1:-target/release}
WORKER=$BIN_DIR/latentserve-worker
ROUTER=$BIN_DIR/latentserve-router
WORKERS=${WORKERS:-4}
PREFIXES=${PREFIXES:-32}
PREFIX_LEN=${PREFIX_LEN:-512}
INPUT_LEN=${INPUT_LEN:-576}
OUTPUT_LEN=${OUTPUT_LEN:-16}
REQUESTS=${REQUESTS:-512}
CONCURRENCY=${CONCURRENCY:-16}
THREADS=${THREADS:-1}
KV_CACHE=${KV_CACHE:-1Gi}
CACHE=${CACHE:-$HOME/.cache/latentserve}
CONFIG=benchmarks/standard-model.json
MODEL=$CACHE/bench-standard/model
for bin in "$WORKER" "$ROUTER"; do
  [ -x "$bin" ] || { echo "missing $bin: cargo build --release -p latentserve-worker -p latentserve-router" >&2; exit 1; }
done
if [ ! -f "$MODEL/model.safetensors" ]; then
  echo "# making the standard model (init-random of $CONFIG) in $MODEL" >&2
  "$WORKER" init-random --config "$CONFIG" --out "$MODEL" --seed 0
fi

declare -a worker_pids=()
router_pid=
cleanup() {
  for pid in "${worker_pids[@]}" $router_pid; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
logs=$(mktemp -d)
results=$logs/results.jsonl

wait_ready() { # metrics-address what
  for _ in $(seq 1 600); do curl -sf "http://$1/readyz" >/dev/null && return 0; sleep 0.5; done
  echo "$2 did not become ready (logs in $logs)" >&2; exit 1
}

grpc_of() { echo "127.0.0.1:$((54100 + 10 * $1))"; }
openai_of() { echo "127.0.0.1:$((54101 + 10 * $1))"; }
metrics_of() { echo "127.0.0.1:$((54102 + 10 * $1))"; }
start_worker() { # index
  # KV_CACHE=1Gi leaves room for every prefix on every worker (the comparison is about where
  # requests go, not eviction); a smaller one makes the workers' caches together hold what one
  # cannot, the case routing by prefix is for.
  RUST_LOG=warn RAYON_NUM_THREADS=$THREADS "$WORKER" serve --model "$MODEL" --kv-cache-memory "$KV_CACHE" \
    --grpc-addr "$(grpc_of "$1")" --openai-addr "$(openai_of "$1")" --metrics-addr "$(metrics_of "$1")" \
    >"$logs/worker-$1.log" 2>&1 &
  worker_pids[$1]=$!
}
ROUTER_GRPC=127.0.0.1:54000
ROUTER_OPENAI=127.0.0.1:54001
ROUTER_METRICS=127.0.0.1:54002
start_router() { # policy workers...
  local policy=$1; shift
  local grpc="" openai=""
  for i in "$@"; do grpc+="${grpc:+,}$(grpc_of "$i")"; openai+="${openai:+,}$(openai_of "$i")"; done
  RUST_LOG=warn "$ROUTER" --endpoints "$grpc" --openai-endpoints "$openai" --policy "$policy" \
    --grpc-addr $ROUTER_GRPC --openai-addr $ROUTER_OPENAI --metrics-addr $ROUTER_METRICS \
    >"$logs/router-$policy.log" 2>&1 &
  router_pid=$!
  wait_ready $ROUTER_METRICS "the router"
  # Until every worker reports (or 10 s): the first requests then already see the caches.
  for _ in $(seq 1 100); do
    curl -sf "http://$ROUTER_METRICS/metrics" | grep -q "latentserve_router_endpoints{state=\"reporting\"} $#" && break
    sleep 0.1
  done
}
stop_router() { # [label]: keeps the router's metrics, and prints why it sent requests where it did
  if [ -n "${1:-}" ]; then
    curl -sf "http://$ROUTER_METRICS/metrics" >"$logs/router-metrics-$1.txt" || true
    python3 -c '
import json, re, sys
reasons = {}
for line in open(sys.argv[2]):
    m = re.match(r"latentserve_router_requests_total\{(.*)\} (\S+)", line)
    if m:
        reason = re.search(r"reason=\"([^\"]*)\"", m.group(1)).group(1)
        reasons[reason] = reasons.get(reason, 0) + int(float(m.group(2)))
print(json.dumps({"run": sys.argv[1], "routed_by_reason": reasons}))' "$1" "$logs/router-metrics-$1.txt" >&2 || true
  fi
  kill "$router_pid"; wait "$router_pid" 2>/dev/null || true; router_pid=
}

summarize() { # label
  python3 -c '
import json, sys
d = json.load(sys.stdin)
print(json.dumps({"run": sys.argv[1], "output_tps": round(d["output_tokens_per_second"], 1),
                  "ttft_p50_s": round(d["ttft_seconds"]["p50"], 4), "ttft_p90_s": round(d["ttft_seconds"]["p90"], 4),
                  "e2e_p50_s": round(d["e2e_seconds"]["p50"], 3),
                  "prefix_hit_rate": d["prefix_hit_rate"] and round(d["prefix_hit_rate"], 3),
                  "cached_prompt_tokens": d["cached_prompt_tokens"], "ideal_cached_prompt_tokens": d["ideal_cached_prompt_tokens"],
                  "completed": d["requests"] - d["failed_before_first_token"] - d["failed_mid_stream"],
                  "failed_before_first_token": d["failed_before_first_token"], "failed_mid_stream": d["failed_mid_stream"]}))' "$1" | tee -a "$results"
}
load() { # label seed target [extra bench-serve flags]
  local label=$1 seed=$2 target=$3; shift 3
  "$WORKER" bench-serve --target "$target" --concurrency "$CONCURRENCY" --requests "$REQUESTS" \
    --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --shared-prefix "$PREFIX_LEN" \
    --prefixes "$PREFIXES" --seed "$seed" --json "$@" 2>>"$logs/bench-$label.log" | summarize "$label"
}

echo "# $(date -u +%FT%TZ) $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); $WORKERS workers x $THREADS threads, $KV_CACHE latent cache each"
all=$(seq 0 $((WORKERS - 1)))
for i in $all; do start_worker "$i"; done
for i in $all; do wait_ready "$(metrics_of "$i")" "worker $i"; done

start_router prefix-aware $all
load prefix-aware 101 $ROUTER_GRPC
stop_router prefix-aware
if [ -n "${ONLY_PREFIX_AWARE:-}" ]; then exit 0; fi
start_router round-robin $all
load round-robin 102 $ROUTER_GRPC
stop_router round-robin
pinned=""
for i in $all; do pinned+="${pinned:+,}$(grpc_of "$i")"; done
load pinned 103 "$pinned" --pin

# The router's own cost: one worker, one request at a time, 16-token prompts, 1 new token.
overhead() { # label target
  "$WORKER" bench-serve --target "$2" --concurrency 1 --requests 200 --input-len 16 --output-len 1 \
    --seed 7 --json 2>>"$logs/bench-overhead.log" | python3 -c '
import json, sys
d = json.load(sys.stdin)
print(json.dumps({"run": sys.argv[1], "ttft_p50_ms": round(1000 * d["ttft_seconds"]["p50"], 3)}))' "$1" | tee -a "$results"
}
start_router prefix-aware 0
overhead direct-1 "$(grpc_of 0)"
overhead router-1 $ROUTER_GRPC
overhead direct-2 "$(grpc_of 0)"
overhead router-2 $ROUTER_GRPC
stop_router

if [ -z "${SKIP_KILL:-}" ]; then
  start_router prefix-aware $all
  victim=$((WORKERS - 1))
  ( sleep 20; kill -9 "${worker_pids[$victim]}"; echo "# killed worker $victim" >&2 ) &
  load prefix-aware-kill 104 $ROUTER_GRPC --keep-going
  stop_router
fi

python3 - "$results" <<'EOF'
import json, statistics, sys
runs = {r["run"]: r for r in map(json.loads, open(sys.argv[1]))}
aware, rr, pinned = runs["prefix-aware"], runs["round-robin"], runs["pinned"]
overhead = statistics.median([runs["router-1"]["ttft_p50_ms"] - runs["direct-1"]["ttft_p50_ms"],
                              runs["router-2"]["ttft_p50_ms"] - runs["direct-2"]["ttft_p50_ms"]])
summary = {
    "prefix_hit_rate": {k: runs[k]["prefix_hit_rate"] for k in ("prefix-aware", "round-robin", "pinned")},
    "ttft_p50_over_round_robin": round(aware["ttft_p50_s"] / rr["ttft_p50_s"], 3),
    "ttft_p50_over_pinned": round(aware["ttft_p50_s"] / pinned["ttft_p50_s"], 3),
    "output_tps_over_round_robin": round(aware["output_tps"] / rr["output_tps"], 3),
    "router_overhead_p50_ms": round(overhead, 3),
}
if "prefix-aware-kill" in runs:
    kill = runs["prefix-aware-kill"]
    summary["kill_run"] = {k: kill[k] for k in ("completed", "failed_before_first_token", "failed_mid_stream")}
print(json.dumps(summary))
EOF
echo "# logs: $logs" >&2
