#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time: scripts/fuzz.sh [SECONDS] [TARGET...]
# (default 60 seconds each, all targets). Needs the nightly toolchain and cargo-fuzz
# (`rustup toolchain install nightly`, `cargo install cargo-fuzz`). Seeds come from the test
# fixtures; the corpus grows in fuzz/corpus/TARGET (not checked in). A crash leaves its input in
# fuzz/artifacts/TARGET and fails the script: turn it into a unit test, fix it, run again.
# Built without AddressSanitizer (safe Rust; what we look for is panics, overflows and
# unbounded allocations) and with debug assertions, so integer overflow is a crash too.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

SECONDS_EACH="${1:-60}"
shift || true
TARGETS=("$@")
if [ "${#TARGETS[@]}" -eq 0 ]; then
  TARGETS=(config_json safetensors_header openai_request run_experts)
fi
FIXTURES=../worker/tests/fixtures

seed() {
  local target="$1" dir="corpus/$1"
  mkdir -p "$dir"
  case "$target" in
    config_json)
      for f in "$FIXTURES"/*/config.json; do cp "$f" "$dir/$(basename "$(dirname "$f")").json"; done ;;
    safetensors_header)
      # Header and the first KiB of each fixture's weights: enough to reach the tensor loads.
      for f in "$FIXTURES"/*/*.safetensors; do
        head -c 65536 "$f" > "$dir/$(basename "$(dirname "$f")")-$(basename "$f")"
      done ;;
    openai_request)
      printf '\000{"model":"fuzz","prompt":"hello","max_tokens":4,"stop":["x"],"temperature":0.5}' > "$dir/completion"
      printf '\001{"model":"fuzz","messages":[{"role":"user","content":"hi"}],"max_tokens":3,"n":2,"logprobs":true,"top_logprobs":2}' > "$dir/chat" ;;
    run_experts) : ;;
  esac
}

failed=()
for target in "${TARGETS[@]}"; do
  seed "$target"
  echo "--- $target: ${SECONDS_EACH}s"
  if ! cargo +nightly fuzz run --sanitizer none --debug-assertions "$target" "corpus/$target" -- \
      -max_total_time="$SECONDS_EACH" -max_len=65536 -rss_limit_mb=4096 -timeout=10 -print_final_stats=1; then
    failed+=("$target")
  fi
done
if [ "${#failed[@]}" -gt 0 ]; then
  echo "crashes in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
echo "no crash in ${TARGETS[*]}"
