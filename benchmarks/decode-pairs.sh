#!/usr/bin/env bash
# Batch-1 decode against llama.cpp in alternating pairs: ours (`bench --depths 128
# --decode-tokens 128`) then llama-bench tg128 (mean of 3), f32 and f16, PAIRS times, each pair
# within a few seconds. On a shared machine whose memory bandwidth moves from minute to minute,
# the ratio of a pair is steadier than the ratio of two figures taken minutes apart, as in one
# run.sh. Prints every pair and the median ratio per dtype.
#
# Usage: benchmarks/decode-pairs.sh [BIN]
#   BIN defaults to target/release/latentserve-worker. Needs benchmarks/run.sh to have made the
#   model and its GGUFs once and built llama.cpp. Env: PAIRS (6), THREADS (2), CACHE, LLAMA_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/latentserve-worker}
PAIRS=${PAIRS:-6}
THREADS=${THREADS:-2}
CACHE=${CACHE:-$HOME/.cache/latentserve}
WORK=$CACHE/bench-standard
LLAMA_DIR=${LLAMA_DIR:-$(ls -d "$CACHE"/llama.cpp-* 2>/dev/null | tail -1)}
LLAMA_BENCH=$LLAMA_DIR/build/bin/llama-bench
for need in "$BIN" "$WORK/model/config.json" "$WORK/model-f32.gguf" "$WORK/model-f16.gguf" "$LLAMA_BENCH"; do
  [ -e "$need" ] || { echo "missing $need: run benchmarks/run.sh once first" >&2; exit 1; }
done
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS

echo "# $(date -u +%FT%TZ) $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
results=$(mktemp)
trap 'rm -f "$results"' EXIT
for pair in $(seq 1 "$PAIRS"); do
  for dtype in f32 f16; do
    ours=$("$BIN" bench --model "$WORK/model" --dtype "$dtype" --prefill-tokens 16 \
      --prefill-repeats 1 --depths 128 --decode-tokens 128 --json 2>/dev/null |
      python3 -c 'import json, sys; print(json.load(sys.stdin)["decode"][0]["tokens_per_second"])')
    llama=$("$LLAMA_BENCH" -m "$WORK/model-$dtype.gguf" -p 0 -n 128 -t "$THREADS" -r 3 -o json \
      2>/dev/null | python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["avg_ts"])')
    echo "$pair $dtype $ours $llama" | tee -a "$results" |
      awk '{printf "pair %s %s: ours %.1f, llama.cpp %.1f tokens/s, ratio %.3f\n", $1, $2, $3, $4, $3 / $4}' >&2
  done
done
python3 - "$results" <<'EOF'
import statistics, sys
rows = [line.split() for line in open(sys.argv[1])]
for dtype in ("f32", "f16"):
    ratios = sorted(float(r[2]) / float(r[3]) for r in rows if r[1] == dtype)
    print(f"{dtype}: median ratio {statistics.median(ratios):.3f} over {len(ratios)} pairs "
          f"(range {ratios[0]:.3f}-{ratios[-1]:.3f})")
EOF
