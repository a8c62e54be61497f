#!/usr/bin/env bash
# Benchmarks latentserve-worker against its peers on the standard model, in one run, on the
# same weights (issue 3, item 8):
#   - our `latentserve-worker bench --json` (release build), f32 and f16 weights;
#   - llama.cpp's llama-bench and llama-batched-bench on the same directory converted to GGUF
#     f32 and f16 (llama.cpp is built once into a cache directory, none of its code is kept here);
#   - Hugging Face transformers on the CPU (benchmarks/transformers_bench.py), f32.
# All with 2 threads. Prints every rate, our ratio to each peer and the fraction of the memory
# bandwidth limit. A peer that fails is skipped with a message; the others still run.
#
# Usage: benchmarks/run.sh [--skip-ours] [--skip-llama] [--skip-transformers] [--fresh-model]
#                          [--prepare-only]
# Environment:
#   LATENTSERVE_CACHE         cache root (default ~/.cache/latentserve): llama.cpp build, model, GGUFs
#   LATENTSERVE_BENCH_PYTHON  a Python with torch, transformers, safetensors, tokenizers, numpy
#                             and pyyaml (default python3); used by transformers and the converter
# Needs: cmake and a C++ compiler (apt-get install -y cmake g++), cargo, pip (to fetch the
# llama-cpp-python sdist, which carries llama.cpp).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CONFIG=$ROOT/benchmarks/standard-model.json
THREADS=2
SEED=0
LLAMA_CPP_PYTHON_VERSION=0.3.36
CACHE=${LATENTSERVE_CACHE:-$HOME/.cache/latentserve}
LLAMA_DIR=$CACHE/llama.cpp-$LLAMA_CPP_PYTHON_VERSION
WORK=$CACHE/bench-standard
MODEL=$WORK/model
PYTHON=${LATENTSERVE_BENCH_PYTHON:-python3}
RESULTS=$WORK/results-$(date -u +%Y%m%dT%H%M%SZ)

RUN_OURS=1 RUN_LLAMA=1 RUN_TRANSFORMERS=1 FRESH_MODEL=0 PREPARE_ONLY=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --skip-ours) RUN_OURS=0 ;;
    --skip-llama) RUN_LLAMA=0 ;;
    --skip-transformers) RUN_TRANSFORMERS=0 ;;
    --fresh-model) FRESH_MODEL=1 ;;
    --prepare-only) PREPARE_ONLY=1 ;;
    -h | --help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done

log() { printf '[bench %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
skip() { printf '[bench %s] SKIPPED: %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { printf '[bench] ERROR: %s\n' "$*" >&2; exit 1; }

mkdir -p "$WORK" "$RESULTS"
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS

# --- llama.cpp: the PyPI sdist of llama-cpp-python carries it under vendor/llama.cpp ---------
build_llama_cpp() {
  local bins=("$LLAMA_DIR/build/bin/llama-bench" "$LLAMA_DIR/build/bin/llama-batched-bench")
  if [[ -x ${bins[0]} && -x ${bins[1]} ]]; then return 0; fi
  command -v cmake >/dev/null || { echo "cmake not found: apt-get install -y cmake" >&2; return 1; }
  if [[ ! -f $LLAMA_DIR/CMakeLists.txt ]]; then
    local tmp
    tmp=$(mktemp -d)
    log "fetching llama-cpp-python $LLAMA_CPP_PYTHON_VERSION (sdist) for its llama.cpp"
    "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: \
      "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$tmp" || { rm -rf "$tmp"; return 1; }
    tar -xzf "$tmp/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz" -C "$tmp"
    rm -rf "$LLAMA_DIR"
    mv "$tmp/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp" "$LLAMA_DIR"
    rm -rf "$tmp" "$LLAMA_DIR/.git" # a dangling gitlink file in the sdist
  fi
  log "building llama.cpp in $LLAMA_DIR (-j2, a few minutes; log: $LLAMA_DIR/build.log)"
  (
    cd "$LLAMA_DIR"
    cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_OPENSSL=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF
    cmake --build build -j2 --target llama-bench llama-batched-bench llama-simple
  ) >"$LLAMA_DIR/build.log" 2>&1 || { tail -20 "$LLAMA_DIR/build.log" >&2; return 1; }
}

# --- ours -------------------------------------------------------------------------------------
OURS=""
if [[ $RUN_OURS == 1 ]]; then
  log "building latentserve-worker (release)"
  if (cd "$ROOT" && cargo build --release -p latentserve-worker 2>"$RESULTS/cargo-build.log"); then
    OURS=${CARGO_TARGET_DIR:-$ROOT/target}/release/latentserve-worker
  else
    tail -20 "$RESULTS/cargo-build.log" >&2
    skip "latentserve-worker did not build (log: $RESULTS/cargo-build.log)"
  fi
fi

# --- the model directory: init-random of the standard config, shared by every peer -----------
config_sum=$(sha256sum "$CONFIG" | cut -d' ' -f1)
# GGUFs made by an earlier recipe (before the f32 MLA matrices) are made again.
GGUF_RECIPE=2
if [[ "$(cat "$WORK/gguf-recipe" 2>/dev/null)" != "$GGUF_RECIPE" ]]; then
  rm -f "$WORK"/model-*.gguf
  echo "$GGUF_RECIPE" >"$WORK/gguf-recipe"
fi
if [[ $FRESH_MODEL == 1 || ! -f $MODEL/model.safetensors || "$(cat "$WORK/model.config-sha256" 2>/dev/null)" != "$config_sum" ]]; then
  rm -rf "$MODEL" "$WORK"/model-*.gguf "$WORK/model.config-sha256" "$WORK/model.made-by"
  if [[ -n $OURS ]] && "$OURS" init-random --config "$CONFIG" --out "$MODEL" --seed "$SEED"; then
    echo "latentserve-worker init-random --seed $SEED" >"$WORK/model.made-by"
  else
    [[ -n $OURS ]] && log "init-random failed; making the model with transformers instead"
    rm -rf "$MODEL"
    log "making the model with transformers (benchmarks/make_model.py)"
    "$PYTHON" "$ROOT/benchmarks/make_model.py" --config "$CONFIG" --out "$MODEL" --seed "$SEED" ||
      die "could not make the model directory $MODEL"
    echo "benchmarks/make_model.py --seed $SEED" >"$WORK/model.made-by"
  fi
  echo "$config_sum" >"$WORK/model.config-sha256"
fi
log "model: $MODEL (made by $(cat "$WORK/model.made-by"))"

# --- GGUF conversion ----------------------------------------------------------------------------
# A copy of the converter in which the benchmark tokenizer's pre-tokenizer hash (GPT-2 style
# byte-level, unknown to llama.cpp) maps to "gpt-2".
convert_gguf() { # $1 = f32 | f16
  local out=$WORK/model-$1.gguf converter=$WORK/converter
  [[ -f $out ]] && return 0
  rm -rf "$converter" && mkdir -p "$converter"
  cp -r "$LLAMA_DIR/convert_hf_to_gguf.py" "$LLAMA_DIR/conversion" "$converter/"
  # transformers' AutoTokenizer wants tokenizer_config.json next to tokenizer.json; the converter
  # reads a view of the model directory that adds one, the model directory stays as made.
  local view=$WORK/hf-view
  rm -rf "$view" && mkdir -p "$view"
  ln -s "$MODEL"/* "$view/"
  [[ -f $MODEL/tokenizer_config.json ]] ||
    echo '{"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>"}' >"$view/tokenizer_config.json"
  # llama.cpp refuses a BPE vocabulary without merges ("cannot find tokenizer merges"); the
  # benchmark tokenizer has none, so the view's copy gets one (token speed does not depend on it).
  rm "$view/tokenizer.json"
  python3 - "$MODEL/tokenizer.json" "$view/tokenizer.json" <<'EOF'
import json, sys
tok = json.load(open(sys.argv[1]))
bpe = tok["model"]
if not bpe.get("merges"):
    vocab = bpe["vocab"]
    ids = set(vocab.values()) | {t["id"] for t in tok.get("added_tokens", [])}
    vocab["Ġt"] = next(i for i in range(len(ids) + 1) if i not in ids)
    bpe["merges"] = ["Ġ t"]
json.dump(tok, open(sys.argv[2], "w"), ensure_ascii=False)
EOF
  # llama.cpp's CPU backend has no f16 kernel for the absorbed MLA products (attn_k_b with a
  # permuted f32 query): an f16 GGUF aborts at its first graph. Those two small matrices (1% of
  # the weights) stay f32, as norms and the router do; everything else is f16.
  sed -i 's/^\( *\)gguf\.MODEL_TENSOR\.INDEXER_PROJ,$/&\n\1gguf.MODEL_TENSOR.ATTN_K_B,\n\1gguf.MODEL_TENSOR.ATTN_V_B,/' \
    "$converter/conversion/base.py"
  grep -q 'MODEL_TENSOR.ATTN_K_B,$' "$converter/conversion/base.py" ||
    { echo "the converter's list of f32 tensors has moved; update run.sh" >&2; return 1; }
  local attempt
  for attempt in 1 2; do
    if PYTHONPATH=$LLAMA_DIR/gguf-py "$PYTHON" "$converter/convert_hf_to_gguf.py" "$view" \
      --outtype "$1" --outfile "$out.partial" >"$RESULTS/convert-$1.log" 2>&1; then
      mv "$out.partial" "$out"
      return 0
    fi
    local hash
    hash=$(grep -o 'chkhsh: *[0-9a-f]\{64\}' "$RESULTS/convert-$1.log" | head -1 | grep -o '[0-9a-f]\{64\}' || true)
    [[ $attempt == 1 && -n $hash ]] || break
    log "mapping the tokenizer's pre-tokenizer hash $hash to gpt-2 in the converter copy"
    sed -i "0,/^        if res is None:/s//        if chkhsh == \"$hash\":\n            res = \"gpt-2\"\n\n        if res is None:/" \
      "$converter/conversion/base.py"
  done
  rm -f "$out.partial"
  tail -20 "$RESULTS/convert-$1.log" >&2
  return 1
}

LLAMA_OK=0
if [[ $RUN_LLAMA == 1 ]]; then
  if ! build_llama_cpp; then
    skip "llama.cpp did not build"
  elif ! convert_gguf f32 || ! convert_gguf f16; then
    skip "llama.cpp: GGUF conversion failed (logs: $RESULTS/convert-*.log)"
  else
    LLAMA_OK=1
  fi
fi

if [[ $PREPARE_ONLY == 1 ]]; then
  log "prepared: $MODEL, $(ls "$WORK"/model-*.gguf 2>/dev/null | tr '\n' ' ')"
  exit 0
fi

# --- measurements -------------------------------------------------------------------------------
if [[ -n $OURS ]]; then
  for dtype in f32 f16; do
    log "ours: latentserve-worker bench --dtype $dtype"
    "$OURS" bench --model "$MODEL" --dtype "$dtype" --json >"$RESULTS/ours-$dtype.json" \
      2>"$RESULTS/ours-$dtype.log" || { rm -f "$RESULTS/ours-$dtype.json"; skip "ours ($dtype) failed: $(tail -3 "$RESULTS/ours-$dtype.log")"; }
  done
fi

if [[ $LLAMA_OK == 1 ]]; then
  bench=$LLAMA_DIR/build/bin/llama-bench
  batched=$LLAMA_DIR/build/bin/llama-batched-bench
  for dtype in f32 f16; do
    gguf=$WORK/model-$dtype.gguf
    log "llama.cpp $dtype: llama-bench pp512 + tg128"
    "$bench" -m "$gguf" -t $THREADS -p 512 -n 128 -o json >"$RESULTS/llama-$dtype-bench.json" \
      2>"$RESULTS/llama-$dtype-bench.log" || skip "llama-bench $dtype failed (see $RESULTS/llama-$dtype-bench.log)"
    # Decode deep in the context; -d 4000 with 96 new tokens ends at the model's 4096 positions.
    for depth_gen in 2048:128 4000:96; do
      depth=${depth_gen%:*} gen=${depth_gen#*:}
      log "llama.cpp $dtype: llama-bench tg$gen at depth $depth"
      "$bench" -m "$gguf" -t $THREADS -p 0 -n "$gen" -d "$depth" -r 3 -o json \
        >"$RESULTS/llama-$dtype-bench-d$depth.json" 2>"$RESULTS/llama-$dtype-bench-d$depth.log" ||
        skip "llama-bench $dtype -d $depth failed (see $RESULTS/llama-$dtype-bench-d$depth.log)"
    done
    log "llama.cpp $dtype: llama-batched-bench -npl 1,4,8,16"
    "$batched" -m "$gguf" -c 16384 -b 2048 -ub 512 -npp 128 -ntg 64 -npl 1,4,8,16 -t $THREADS \
      --output-format jsonl >"$RESULTS/llama-$dtype-batched.jsonl" 2>&1 ||
      skip "llama-batched-bench $dtype failed (see $RESULTS/llama-$dtype-batched.jsonl)"
  done
fi

if [[ $RUN_TRANSFORMERS == 1 ]]; then
  log "transformers (f32, $THREADS threads): prefill 512, decode at depth 128 and 2048"
  "$PYTHON" "$ROOT/benchmarks/transformers_bench.py" --model "$MODEL" --threads $THREADS \
    >"$RESULTS/transformers.json" 2>"$RESULTS/transformers.log" ||
    { rm -f "$RESULTS/transformers.json"; skip "transformers failed: $(tail -3 "$RESULTS/transformers.log")"; }
fi

python3 "$ROOT/benchmarks/report.py" "$RESULTS" | tee "$RESULTS/report.txt"
log "raw results: $RESULTS"
