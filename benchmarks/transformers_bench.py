#!/usr/bin/env python3
"""Times Hugging Face transformers (PyTorch, CPU) on a DeepSeek model directory.

The peer measurement of benchmarks/run.sh, on the same weights as the other peers: prefill of a
512-token prompt, and greedy decode at batch 1 after 128 and 2048 cached positions, in f32 with
a fixed number of CPU threads. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache


def cache_kwarg(model) -> str:
    """transformers 5.x renames `past_key_values` to `cache` (the old name warns until 5.40)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def prompt_tokens(n: int, vocab: int) -> torch.Tensor:
    """The same synthetic prompt `latentserve-worker bench` uses."""
    return torch.tensor([[(i * 7919 + 13) % vocab for i in range(n)]])


@torch.inference_mode()
def prefill_rate(model, n: int, vocab: int, repeats: int) -> float:
    ids = prompt_tokens(n, vocab)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        model(ids, use_cache=True, **{cache_kwarg(model): DynamicCache(config=model.config)})
        best = min(best, time.perf_counter() - started)
    return n / best


@torch.inference_mode()
def decode_rate(model, depth: int, steps: int, vocab: int) -> float:
    """Greedy decode tokens/s at batch 1 after `depth` cached positions (the prefill is untimed)."""
    cache = {cache_kwarg(model): DynamicCache(config=model.config)}
    logits = model(prompt_tokens(depth, vocab), use_cache=True, **cache).logits
    next_id = logits[:, -1:].argmax(-1)
    # One untimed step warms the decode path.
    logits = model(next_id, use_cache=True, **cache).logits
    next_id = logits[:, -1:].argmax(-1)
    started = time.perf_counter()
    for _ in range(steps):
        logits = model(next_id, use_cache=True, **cache).logits
        next_id = logits[:, -1:].argmax(-1)
    return steps / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="model directory (config.json + safetensors)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--depths", default="128,2048", help="comma-separated cache depths")
    parser.add_argument("--decode-tokens", type=int, default=16, help="timed decode steps per depth")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    load_seconds = time.perf_counter() - started
    vocab = model.config.vocab_size
    context = model.config.max_position_embeddings

    prefill_n = min(args.prefill_tokens, context)
    prefill_rate(model, 16, vocab, 1)  # warm-up
    prefill = prefill_rate(model, prefill_n, vocab, repeats=2)
    print(f"transformers prefill {prefill_n}: {prefill:.1f} tokens/s", file=sys.stderr)
    decode = []
    for depth in (int(d) for d in args.depths.split(",") if d):
        depth = min(depth, context - args.decode_tokens - 1)
        rate = decode_rate(model, depth, args.decode_tokens, vocab)
        print(f"transformers decode at depth {depth}: {rate:.2f} tokens/s", file=sys.stderr)
        decode.append({"depth": depth, "tokens_per_second": rate})

    report = {
        "peer": "transformers",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "dtype": "f32",
        "threads": args.threads,
        "attention": model.config._attn_implementation,
        "load_seconds": load_seconds,
        "prefill": {"tokens": prefill_n, "tokens_per_second": prefill},
        "decode": decode,
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
