#!/usr/bin/env bash
# Expert parallelism on loopback, on the standard benchmark model (16 routed experts in 4 groups,
# 7 MoE layers), in one run and on the same weights. Three parts (PARTS, all by default):
#
#   scale  N = 1, 2 and 4 worker processes (routed experts split across them), loaded with
#          bench-serve at concurrency 16 against rank 0. Prints bench-serve's JSON per N and the
#          expert bytes each rank sent per token per MoE layer (latentserve_expert_dispatch_bytes_total).
#   skew   N = SKEW_SHARDS (4) under a workload whose expert load is skewed (bench-serve --token-pool: every
#          prompt token drawn from a few token ids, a narrow-topic workload), before and after one
#          rebalance: the expert counters of every rank (latentserve_expert_tokens_total) give the
#          imbalance (per MoE layer the busiest rank's tokens over the mean rank's, summed over
#          layers: sum of maxes / sum of means); `latentserve-worker plan-placement` turns the
#          counters of the first run into a placement file; as many ranks again start with
#          --expert-placement, and the two groups (both up, one loaded at a time) take turns for
#          ROUNDS runs each, seed r in round r (same token pool, other prompts: no prefix-cache
#          hits), alternating which goes first. Imbalance over all rounds, median output tok/s.
#   kill   N = 4 with --redundant-experts 4 (every expert on two ranks); rank 2 is SIGKILLed in the
#          middle of a bench-serve run against rank 0 (--keep-going): failed requests, throughput,
#          and whether rank 0 stayed ready (/readyz) from the kill to the end.
#
# A summary table ends the run.
#
# Usage: benchmarks/expert-parallel.sh [BIN] [MODEL_DIR]
#   BIN defaults to target/release/latentserve-worker; MODEL_DIR to a fresh init-random of
#   benchmarks/standard-model.json (seed 1).
#   Env: PARTS ("scale skew kill"), REQUESTS (64), CONCURRENCY (16), INPUT_LEN (128),
#   OUTPUT_LEN (64), SHARDS ("1 2 4", scale part), WIRE (f32), TOKEN_POOL (8, skew part),
#   SKEW_SEED (first seed, 0), ROUNDS (3), REBALANCE_REDUNDANT (--redundant-experts of
#   plan-placement, 2), SKEW_SHARDS (ranks of the skew part, 4), PIN (1: each rank pinned to
#   one core with one compute thread, as with a device per shard; 0), SPREAD (1: the skew part's
#   clients spread over every rank with bench-serve --pin, as behind the group's Service; 0:
#   all to rank 0),
#   KILL_AFTER (seconds into the kill run, 20), KILL_RANK (2), READY_TIMEOUT (seconds a group
#   may take to become ready, 300), RUN_TIMEOUT (seconds one bench-serve may take, 900).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/latentserve-worker}
MODEL=${2:-}
PARTS=${PARTS:-"scale skew kill"}
REQUESTS=${REQUESTS:-64}
CONCURRENCY=${CONCURRENCY:-16}
INPUT_LEN=${INPUT_LEN:-128}
OUTPUT_LEN=${OUTPUT_LEN:-64}
SHARDS=${SHARDS:-"1 2 4"}
WIRE=${WIRE:-f32}
TOKEN_POOL=${TOKEN_POOL:-8}
SKEW_SEED=${SKEW_SEED:-0}
ROUNDS=${ROUNDS:-3}
REBALANCE_REDUNDANT=${REBALANCE_REDUNDANT:-2}
SKEW_SHARDS=${SKEW_SHARDS:-4}
PIN=${PIN:-0}
SPREAD=${SPREAD:-0}
KILL_AFTER=${KILL_AFTER:-20}
KILL_RANK=${KILL_RANK:-2}
READY_TIMEOUT=${READY_TIMEOUT:-300}
RUN_TIMEOUT=${RUN_TIMEOUT:-900}
[ -x "$BIN" ] || { echo "no worker binary at $BIN: cargo build --release -p latentserve-worker --locked" >&2; exit 1; }
for tool in curl python3 timeout; do
  command -v "$tool" >/dev/null || { echo "$tool is needed" >&2; exit 1; }
done
has_part() { [[ " $PARTS " == *" $1 "* ]]; }
for part in $PARTS; do
  case $part in scale | skew | kill) ;; *) echo "PARTS: unknown part '$part' (scale, skew, kill)" >&2; exit 1 ;; esac
done

work=$(mktemp -d)
pids=()  # every worker and load process started, for the cleanup
group=() # the ranks of the group start_group started last
cleanup() {
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
if [ -z "$MODEL" ]; then
  MODEL="$work/model"
  "$BIN" init-random --config benchmarks/standard-model.json --out "$MODEL" --seed 1 >&2
fi
echo "load average at the start: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) cores" >&2

# Waits until every rank of the group answers /readyz; fails, with the logs, when one exits or
# READY_TIMEOUT passes.
wait_group() { # tag n base
  local tag=$1 n=$2 base=$3 deadline=$((SECONDS + READY_TIMEOUT)) ready rank
  while [ $SECONDS -lt $deadline ]; do
    ready=0
    for rank in $(seq 0 $((n - 1))); do
      if ! kill -0 "${group[$rank]}" 2>/dev/null; then
        echo "rank $rank ($tag) exited before the group became ready; its log:" >&2
        cat "$work/$tag-$rank.log" >&2
        return 1
      fi
      if curl -sf --max-time 2 "http://127.0.0.1:$((base + 5 + rank))/readyz" >/dev/null 2>&1; then
        ready=$((ready + 1))
      fi
    done
    [ "$ready" -eq "$n" ] && return 0
    sleep 0.5
  done
  echo "group $tag not ready after ${READY_TIMEOUT}s; the logs:" >&2
  for rank in $(seq 0 $((n - 1))); do echo "-- rank $rank" >&2; cat "$work/$tag-$rank.log" >&2; done
  return 1
}

# Ports are below Linux's ephemeral range (32768-60999), where any outgoing connection on the
# machine could be holding them. Starts N ranks: grpc ports BASE+rank, metrics BASE+5+rank, experts EXPERTS_BASE+rank; extra
# serve arguments follow. Leaves their pids in `group` and waits until all are ready.
start_group() { # tag n base experts_base [serve args...]
  local tag=$1 n=$2 base=$3 experts_base=$4
  shift 4
  local peers
  peers=$(seq -s, -f "127.0.0.1:%g" "$experts_base" $((experts_base + n - 1)))
  group=()
  for rank in $(seq 0 $((n - 1))); do
    local args=(serve --model "$MODEL" --grpc-addr "127.0.0.1:$((base + rank))"
      --metrics-addr "127.0.0.1:$((base + 5 + rank))" --openai-addr '' --experts-addr "127.0.0.1:$((experts_base + rank))"
      --shard-rank "$rank" --shard-count "$n"
      --kv-cache-memory 512Mi --expert-wire-dtype "$WIRE" "$@")
    [ "$n" -gt 1 ] && args+=(--peers "$peers")
    if [ "$PIN" = 1 ]; then
      # One core per rank, one compute thread: a rank's speed is its own, as with a GPU per
      # shard, so the busiest rank paces the group.
      RUST_LOG=warn RAYON_NUM_THREADS=1 taskset -c $((rank % $(nproc))) "$BIN" "${args[@]}" 2>"$work/$tag-$rank.log" &
    else
      RUST_LOG=warn "$BIN" "${args[@]}" 2>"$work/$tag-$rank.log" &
    fi
    pids+=($!)
    group+=($!)
  done
  wait_group "$tag" "$n" "$base"
}

stop_pids() { # pid...: SIGTERM (drain), bounded, then SIGKILL
  local pid deadline=$((SECONDS + 60))
  for pid in "$@"; do kill "$pid" 2>/dev/null || true; done
  for pid in "$@"; do
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  forget_pids "$@"
}

# Drops waited-for pids from `pids`, so that the cleanup never signals a reused pid.
forget_pids() { # pid...
  local pid kept=() gone=" $* "
  for pid in "${pids[@]}"; do [[ "$gone" == *" $pid "* ]] || kept+=("$pid"); done
  pids=("${kept[@]}")
}

# The metrics of every rank of a group into DIR/rank{r}.txt.
scrape() { # dir base n
  mkdir -p "$1"
  for rank in $(seq 0 $(($3 - 1))); do
    curl -sf --max-time 10 "http://127.0.0.1:$(($2 + 5 + rank))/metrics" >"$1/rank$rank.txt" ||
      { echo "scraping the metrics of rank $rank failed" >&2; return 1; }
  done
}

bench() { # target, output json, extra bench-serve args...
  local target=$1 out=$2
  shift 2
  timeout "$RUN_TIMEOUT" "$BIN" bench-serve --target "$target" --concurrency "$CONCURRENCY" \
    --requests "$REQUESTS" --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" --json "$@" >"$out"
}

json_field() { python3 -c "import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }

# Imbalance of the expert tokens counted between scrapes (dirs of rank{r}.txt files; one or more
# START:END windows, summed): per MoE layer the busiest rank's tokens over the mean rank's, summed
# over layers (sum of maxes / sum of means). Prints the figure on the first line, then each rank's
# share of the tokens per layer.
cat >"$work/imbalance.py" <<'EOF'
import re, sys
n, windows = int(sys.argv[1]), [w.split(":") for w in sys.argv[2:]]
sample = re.compile(r'^latentserve_expert_tokens_total\{([^}]*)\}\s+(\S+)')
def counts(path):
    out = {}
    for line in open(path):
        m = sample.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        key = (int(labels["layer"]), int(labels["expert"]))
        out[key] = out.get(key, 0.0) + float(m.group(2))
    return out
loads = {}  # layer -> tokens per rank
for start, end in windows:
    for rank in range(n):
        before, after = counts(f"{start}/rank{rank}.txt"), counts(f"{end}/rank{rank}.txt")
        for (layer, expert), value in after.items():
            delta = value - before.get((layer, expert), 0.0)
            loads.setdefault(layer, [0.0] * n)[rank] += delta if delta >= 0 else value
maxes = sum(max(l) for l in loads.values())
means = sum(sum(l) / n for l in loads.values())
print(f"{maxes / means:.3f}" if means > 0 else "nan")
for layer, l in sorted(loads.items()):
    total = sum(l) or 1.0
    print(f"  layer {layer}: max/mean {max(l) / (total / n):.2f}; rank shares "
          + " ".join(f"{x / total:.2f}" for x in l) + f" of {int(sum(l))} tokens")
EOF

summary_imb_uniform=- summary_imb_before=- summary_imb_after=- summary_pred=- summary_tps_before=- summary_tps_after=-
summary_tps_rounds=-
summary_kill_failed=- summary_kill_tps=- summary_kill_completed=- summary_kill_ready=-

# ---- scale: N = 1, 2, 4 ----
if has_part scale; then
  layers=$(python3 -c "import json; c = json.load(open('$MODEL/config.json')); print(c['num_hidden_layers'] - c['first_k_dense_replace'])")
  hidden=$(python3 -c "import json; print(json.load(open('$MODEL/config.json'))['hidden_size'])")
  for n in $SHARDS; do
    base=$((27000 + n * 10))
    experts_base=$((28000 + n * 10))
    start_group "scale$n" "$n" "$base" "$experts_base"
    rss=$(for pid in "${group[@]}"; do awk '/VmRSS/ {printf "%d ", $2/1024}' "/proc/$pid/status"; done)
    echo "== N = $n (RSS MiB per rank: $rss)"
    scrape "$work/scale$n-start" "$base" "$n"
    bench "127.0.0.1:$base" "$work/scale$n.json"
    scrape "$work/scale$n-end" "$base" "$n"
    cat "$work/scale$n.json"
    if [ "$n" -gt 1 ]; then
      python3 "$work/imbalance.py" "$n" "$work/scale$n-start:$work/scale$n-end" >"$work/imb-scale$n.txt"
      echo "expert load imbalance of these random prompts over the $n ranks: $(head -1 "$work/imb-scale$n.txt")"
      if [ "$n" -eq 4 ]; then summary_imb_uniform=$(head -1 "$work/imb-scale$n.txt"); fi
    fi
    metrics=$(curl -sf "http://127.0.0.1:$((base + 5))/metrics")
    sent=$(echo "$metrics" | awk '/^latentserve_expert_dispatch_bytes_total/ {s += $2} END {print s + 0}')
    tokens=$(echo "$metrics" | awk '/^latentserve_(prompt|generation)_tokens_total/ {s += $2} END {print s + 0}')
    echo "rank 0 sent $sent expert bytes for $tokens tokens over $layers MoE layers:" \
      "$(python3 -c "print(round($sent / max($tokens, 1) / $layers, 1))") bytes per token per MoE layer" \
      "(one destination shard = $((hidden * 4)) bytes of f32 hidden state)"
    stop_pids "${group[@]}"
  done
fi

# ---- skew: N = SKEW_SHARDS, a skewed workload before and after one rebalance ----
# One run of the skewed workload on the group at BASE, seed SKEW_SEED + ROUND, between two scrapes
# ($work/LABEL-rROUND-{start,end}); prints its output tok/s and the run's imbalance.
skew_run() { # label base round
  local label=$1 base=$2 round=$3 run="$work/$1-r$3"
  scrape "$run-start" "$base" "$SKEW_SHARDS"
  if [ "$SPREAD" = 1 ]; then
    # Every rank takes requests, as behind the group's Service: client i sends to rank i mod N.
    bench "$(seq -s, -f "127.0.0.1:%g" "$base" $((base + SKEW_SHARDS - 1)))" "$run.json" --pin \
      --token-pool "$TOKEN_POOL" --seed $((SKEW_SEED + round))
  else
    bench "127.0.0.1:$base" "$run.json" --token-pool "$TOKEN_POOL" --seed $((SKEW_SEED + round))
  fi
  scrape "$run-end" "$base" "$SKEW_SHARDS"
  python3 "$work/imbalance.py" "$SKEW_SHARDS" "$run-start:$run-end" >"$run-imb.txt"
  echo "round $round, $label: $(json_field "$run.json" output_tokens_per_second | xargs printf '%.1f') output tok/s," \
    "imbalance $(head -1 "$run-imb.txt"), rank 0 sent $(sent_per_token "$run-start/rank0.txt" "$run-end/rank0.txt")" \
    "expert bytes per token per MoE layer, load $(cut -d' ' -f1-3 /proc/loadavg)"
  windows[$label]+=" $run-start:$run-end"
  tps[$label]+=" $(json_field "$run.json" output_tokens_per_second)"
}
# Expert request bytes a rank sent per token it served per MoE layer, between two scrapes.
sent_per_token() { # start.txt end.txt
  python3 - "$1" "$2" "$MODEL/config.json" <<'EOF'
import json, re, sys
def total(path, pattern):
    return sum(float(l.split()[-1]) for l in open(path) if re.match(pattern, l))
def delta(pattern):
    return total(sys.argv[2], pattern) - total(sys.argv[1], pattern)
c = json.load(open(sys.argv[3]))
layers = c["num_hidden_layers"] - c["first_k_dense_replace"]
tokens = delta(r"latentserve_(prompt|generation)_tokens_total[{ ]")
print(round(delta(r"latentserve_expert_dispatch_bytes_total[{ ]") / max(tokens, 1) / layers))
EOF
}
median() { python3 -c "import statistics, sys; print(f'{statistics.median(map(float, sys.argv[1:])):.1f}')" "$@"; }

if has_part skew; then
  declare -A windows=([before]="" [after]="") tps=([before]="" [after]="")
  base_before=27100 base_after=27150
  start_group skew-before "$SKEW_SHARDS" "$base_before" 28100
  before_group=("${group[@]}")
  echo "== skewed workload (bench-serve --token-pool $TOKEN_POOL), N = $SKEW_SHARDS (PIN=$PIN, SPREAD=$SPREAD): default placement (before) against a placement planned from round 0 (after)"
  skew_run before "$base_before" 0
  cat "$work/before-r0.json"
  echo "imbalance of round 0 under the default placement: $(head -1 "$work/before-r0-imb.txt")"
  tail -n +2 "$work/before-r0-imb.txt"
  ranks=$(seq 0 $((SKEW_SHARDS - 1)))
  # shellcheck disable=SC2046 # one file per rank
  "$BIN" plan-placement --model "$MODEL" --shard-count "$SKEW_SHARDS" --redundant-experts "$REBALANCE_REDUNDANT" \
    --version skew-rebalanced $(for r in $ranks; do echo "$work/before-r0-end/rank$r.txt"; done) \
    --since "$(for r in $ranks; do printf '%s,' "$work/before-r0-start/rank$r.txt"; done | sed 's/,$//')" \
    --output "$work/placement.json" 2>"$work/plan.log" || { cat "$work/plan.log" >&2; exit 1; }
  cat "$work/plan.log"
  summary_pred=$(sed -n 's/.*predicted with this placement: \([0-9.]*\).*/\1/p' "$work/plan.log")
  echo "placement (plan-placement --redundant-experts $REBALANCE_REDUNDANT): $(python3 -c "import json, sys; print(json.dumps(json.load(open(sys.argv[1])), separators=(',', ':'))[:300])" "$work/placement.json")..."
  start_group skew-after "$SKEW_SHARDS" "$base_after" 28150 --expert-placement "$work/placement.json"
  after_group=("${group[@]}")
  skew_run after "$base_after" 0
  cat "$work/after-r0.json"
  echo "imbalance of round 0 under the planned placement: $(head -1 "$work/after-r0-imb.txt")"
  tail -n +2 "$work/after-r0-imb.txt"
  for round in $(seq 1 $((ROUNDS - 1))); do
    if [ $((round % 2)) -eq 1 ]; then
      skew_run after "$base_after" "$round"
      skew_run before "$base_before" "$round"
    else
      skew_run before "$base_before" "$round"
      skew_run after "$base_after" "$round"
    fi
  done
  # shellcheck disable=SC2086 # lists of words
  {
    python3 "$work/imbalance.py" "$SKEW_SHARDS" ${windows[before]} >"$work/imb-before-all.txt"
    python3 "$work/imbalance.py" "$SKEW_SHARDS" ${windows[after]} >"$work/imb-after-all.txt"
    summary_imb_before=$(head -1 "$work/imb-before-all.txt")
    summary_imb_after=$(head -1 "$work/imb-after-all.txt")
    summary_tps_before=$(median ${tps[before]})
    summary_tps_after=$(median ${tps[after]})
    summary_tps_rounds=$(python3 -c "import sys; b, a = sys.argv[1].split(), sys.argv[2].split(); print(', '.join(f'{float(x):.1f}/{float(y):.1f}' for x, y in zip(b, a)))" "${tps[before]}" "${tps[after]}")
  }
  echo "over $ROUNDS rounds: imbalance $summary_imb_before before, $summary_imb_after after;" \
    "median output tok/s $summary_tps_before before, $summary_tps_after after (per round: $summary_tps_rounds)"
  stop_pids "${before_group[@]}" "${after_group[@]}"
fi

# ---- kill: N = 4 with every expert on two ranks, rank KILL_RANK SIGKILLed under load ----
if has_part kill; then
  base=27200 experts_base=28200
  start_group kill 4 "$base" "$experts_base" --redundant-experts 4
  echo "== N = 4, --redundant-experts 4, rank $KILL_RANK SIGKILLed ${KILL_AFTER}s into the run (load $(cut -d' ' -f1-3 /proc/loadavg))"
  bench "127.0.0.1:$base" "$work/kill.json" --keep-going 2>"$work/kill-bench.log" &
  bench_pid=$!
  pids+=("$bench_pid")
  sleep "$KILL_AFTER"
  if ! kill -0 "$bench_pid" 2>/dev/null; then
    echo "bench-serve ended before ${KILL_AFTER}s: lower KILL_AFTER" >&2; cat "$work/kill-bench.log" >&2; exit 1
  fi
  kill -9 "${group[$KILL_RANK]}"
  echo "killed rank $KILL_RANK (pid ${group[$KILL_RANK]}) at $(date -u +%H:%M:%S)"
  # Rank 0 must answer /readyz from the kill to the end of the run.
  not_ready=0 probes=0
  while kill -0 "$bench_pid" 2>/dev/null; do
    probes=$((probes + 1))
    curl -sf --max-time 2 "http://127.0.0.1:$((base + 5))/readyz" >/dev/null 2>&1 || not_ready=$((not_ready + 1))
    sleep 0.5
  done
  bench_rc=0
  wait "$bench_pid" || bench_rc=$?
  forget_pids "$bench_pid"
  [ "$bench_rc" -eq 0 ] || { echo "bench-serve failed ($bench_rc):" >&2; cat "$work/kill-bench.log" >&2; exit 1; }
  cat "$work/kill.json"
  if [ -s "$work/kill-bench.log" ]; then echo "bench-serve's errors:"; cat "$work/kill-bench.log"; fi
  ready_end=no
  curl -sf --max-time 2 "http://127.0.0.1:$((base + 5))/readyz" >/dev/null 2>&1 && ready_end=yes
  metrics=$(curl -sf --max-time 10 "http://127.0.0.1:$((base + 5))/metrics" || true)
  echo "rank 0 after the run: /readyz failed $not_ready of $probes probes after the kill, ready at the end: $ready_end"
  echo "$metrics" | grep -E '^latentserve_expert_(retries_total|group_degraded|peers_usable)' || true
  summary_kill_failed=$(python3 -c "import json, sys; r = json.load(open(sys.argv[1])); print(f\"{r['failed_before_first_token']} + {r['failed_mid_stream']}\")" "$work/kill.json")
  summary_kill_tps=$(json_field "$work/kill.json" output_tokens_per_second)
  summary_kill_completed=$(python3 -c "import json, sys; r = json.load(open(sys.argv[1])); print(round(r['requests_per_second'] * r['duration_seconds']))" "$work/kill.json")
  summary_kill_ready="$((probes - not_ready))/$probes probes, at the end: $ready_end"
  stop_pids "${group[@]}"
fi

fmt() { [ "$1" = - ] && echo - || python3 -c "print(f'{float(\"$1\"):.${2:-1}f}')"; }
echo
echo "== summary (load average at the end: $(cut -d' ' -f1-3 /proc/loadavg))"
printf '%-44s %-14s %-14s\n' "" before after
printf '%-44s %-14s %-14s\n' "skew: imbalance (sum max / sum mean)" "$(fmt "$summary_imb_before" 3)" "$(fmt "$summary_imb_after" 3)"
printf '%-44s %-14s\n' "random prompts, N = 4: imbalance" "$(fmt "$summary_imb_uniform" 3)"
printf '%-44s %-14s %-14s\n' "skew: imbalance predicted by plan-placement" "" "$(fmt "$summary_pred" 3)"
printf '%-44s %-14s %-14s\n' "skew: output tok/s (median of $ROUNDS)" "$(fmt "$summary_tps_before")" "$(fmt "$summary_tps_after")"
printf '%-44s %s\n' "skew: output tok/s per round (before/after)" "$summary_tps_rounds"
printf '%-44s %s\n' "kill: failed requests (before + mid-stream)" "$summary_kill_failed"
printf '%-44s %s\n' "kill: completed requests" "$summary_kill_completed of $REQUESTS"
printf '%-44s %s\n' "kill: output tok/s" "$(fmt "$summary_kill_tps")"
printf '%-44s %s\n' "kill: rank 0 ready after the kill" "$summary_kill_ready"
