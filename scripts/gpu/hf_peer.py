#!/usr/bin/env python3
"""The transformers peer of scripts/gpu-check: a DeepseekV2/V3ForCausalLM built from a config with
random weights (made on the device, no file), eager attention, in one dtype, timing what
`latentserve-worker bench` times: greedy decode at batch B after --depth cached positions
(prefill untimed, one untimed warm-up step), and a prefill of --prefill-tokens.

The prompt tokens are the ones the worker's bench uses (benchmarks/transformers_bench.py). One JSON
line per measurement, flushed at once, so what was measured survives if the caller stops this
process at its time limit.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))


def emit(out, record: dict) -> None:
    out.write(json.dumps(record) + "\n")
    out.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="a config.json")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="bf16", choices=["f32", "f16", "bf16"])
    parser.add_argument("--batches", default="1,64")
    parser.add_argument("--depth", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--prefill-tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="JSON lines are appended here")
    args = parser.parse_args()

    out = open(args.out, "a", encoding="utf-8")
    started = time.perf_counter()
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache
    from transformers_bench import cache_kwarg, prompt_tokens  # the worker bench's prompt

    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(args.seed)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    config_path = pathlib.Path(args.config)
    config = AutoConfig.from_pretrained(config_path.parent if config_path.is_file() else config_path)
    config._attn_implementation = "eager"
    t0 = time.perf_counter()
    # Made in the dtype on the device: no f32 copy, no host memory for a 30 GB model.
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=dtype)
    model = model.to(device=device, dtype=dtype).eval()
    sync()
    params = sum(p.numel() for p in model.parameters())
    info = {
        "kind": "model",
        "class": type(model).__name__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": args.device,
        "dtype": args.dtype,
        "attention": model.config._attn_implementation,
        "parameters": params,
        "import_seconds": t0 - started,
        "init_seconds": time.perf_counter() - t0,
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["memory_allocated_bytes"] = torch.cuda.memory_allocated(device)
    emit(out, info)
    vocab = config.vocab_size
    key = cache_kwarg(model)

    @torch.inference_mode()
    def decode(batch: int) -> dict:
        prompt = prompt_tokens(args.depth, vocab).to(device).repeat(batch, 1)
        cache = {key: DynamicCache(config=model.config)}
        logits = model(prompt, use_cache=True, **cache).logits
        next_ids = logits[:, -1:].argmax(-1)
        logits = model(next_ids, use_cache=True, **cache).logits  # untimed warm-up step
        next_ids = logits[:, -1:].argmax(-1)
        sync()
        t = time.perf_counter()
        for _ in range(args.decode_steps):
            logits = model(next_ids, use_cache=True, **cache).logits
            next_ids = logits[:, -1:].argmax(-1)
        sync()
        seconds = time.perf_counter() - t
        return {
            "kind": "decode",
            "batch": batch,
            "depth": args.depth,
            "steps": args.decode_steps,
            "tokens_per_second": batch * args.decode_steps / seconds,
            "step_seconds": seconds / args.decode_steps,
        }

    @torch.inference_mode()
    def prefill() -> dict:
        n = min(args.prefill_tokens, config.max_position_embeddings)
        warm = prompt_tokens(16, vocab).to(device)
        model(warm, use_cache=True, **{key: DynamicCache(config=model.config)})
        ids = prompt_tokens(n, vocab).to(device)
        sync()
        t = time.perf_counter()
        model(ids, use_cache=True, **{key: DynamicCache(config=model.config)})
        sync()
        seconds = time.perf_counter() - t
        return {"kind": "prefill", "tokens": n, "tokens_per_second": n / seconds, "seconds": seconds}

    for batch in [int(b) for b in args.batches.split(",") if b]:
        try:
            emit(out, decode(batch))
        except Exception as err:  # noqa: BLE001 - e.g. out of memory at a large batch
            emit(out, {"kind": "decode", "batch": batch, "error": f"{type(err).__name__}: {err}"[:500]})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if args.prefill_tokens:
        try:
            emit(out, prefill())
        except Exception as err:  # noqa: BLE001
            emit(out, {"kind": "prefill", "error": f"{type(err).__name__}: {err}"[:500]})
    if device.type == "cuda":
        emit(out, {"kind": "memory", "max_memory_allocated_bytes": torch.cuda.max_memory_allocated(device)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
