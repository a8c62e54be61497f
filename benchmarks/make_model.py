#!/usr/bin/env python3
"""A random-weight model directory for a DeepSeek config.json, made with transformers.

benchmarks/run.sh uses `latentserve-worker init-random`; this is its stand-in when the worker
cannot be built, so the peers can still be measured. It writes what init-random writes: the
config, f32 weights in hub naming (transformers' own `save_pretrained`) and a byte-level
tokenizer.json without merges (ids 0/1 = BOS/EOS, then one token per byte).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM


def byte_level_tokenizer(bos: int, eos: int) -> Tokenizer:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|bos|>": bos, "<|eos|>": eos}
    ids = (i for i in range(len(alphabet) + 2) if i not in (bos, eos))
    vocab.update({ch: i for ch, i in zip(alphabet, ids)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.add_special_tokens(["<|bos|>", "<|eos|>"])
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(args.config, Path(tmp) / "config.json")
        config = AutoConfig.from_pretrained(tmp)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, max_shard_size="100GB")
    # Keep the hub-style config the benchmark defines, not transformers' rewrite of it.
    shutil.copy(args.config, args.out / "config.json")
    hub = json.loads(args.config.read_text())
    eos = hub.get("eos_token_id", 1)
    eos = eos[0] if isinstance(eos, list) else eos
    byte_level_tokenizer(hub.get("bos_token_id", 0), eos).save(str(args.out / "tokenizer.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
