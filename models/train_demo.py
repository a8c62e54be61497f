#!/usr/bin/env python3
"""Trains latentserve's demo model: a tiny DeepSeek-V3-architecture model that does two-digit
addition and subtraction asked in short English sentences ("What is 37 plus 48?" -> " 85").

Every feature the worker supports is switched on: MLA with q_lora, YaRN RoPE (factor 4 over an
original context of 16; its frequencies and mscale apply at every position), a dense first layer, 8 routed experts with
group-limited sigmoid routing (noaux_tc) and an auxiliary-loss-free correction bias updated as
DeepSeek-V3 does, and a shared expert. Fixed seed; the documented run is on the CPU (19 min on
2 cores); `--device cuda` is for quicker experiments (other random streams, so other weights).

    python models/train_demo.py --out models/demo
"""

import argparse
import json
import math
import random
import re
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

SEED = 20261129
BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPACE = "\u2581"  # Metaspace marker: a word-initial space, as in SentencePiece vocabularies

# Question templates: (template, operation). Answers are a + b or a - b (a >= b for subtraction).
TEMPLATES = [
    ("What is {a} plus {b}?", "+"),
    ("What is {a} + {b}?", "+"),
    ("How much is {a} plus {b}?", "+"),
    ("Add {a} and {b}.", "+"),
    ("What is the sum of {a} and {b}?", "+"),
    ("What is {a} minus {b}?", "-"),
    ("What is {a} - {b}?", "-"),
    ("How much is {a} minus {b}?", "-"),
    ("Subtract {b} from {a}.", "-"),
    ("What is the difference between {a} and {b}?", "-"),
]


def build_tokenizer() -> Tokenizer:
    """A small BPE: every template word is one token, numbers are spelled digit by digit (so the
    model can carry), and a Metaspace pre-tokenizer/decoder restores the spaces. BOS is prepended."""
    words = sorted({w for template, _ in TEMPLATES for w in re.findall(r"[A-Za-z]+", template)})
    alphabet = sorted(set("".join(words)) | set("0123456789?.+-") | {SPACE})
    vocab = {BOS: 0, EOS: 1, PAD: 2}
    merges = []

    def add(token):
        if token not in vocab:
            vocab[token] = len(vocab)

    for ch in alphabet:
        add(ch)
    # Words are built left to right; a word-initial space joins last, once the word is whole.
    for word in words:
        for end in range(2, len(word) + 1):
            if word[:end] not in vocab:
                merges.append((word[: end - 1], word[end - 1]))
                add(word[:end])
    for piece in words + list("0123456789+-"):
        merges.append((SPACE, piece))
        add(SPACE + piece)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False))
    tok.add_special_tokens([BOS, EOS, PAD])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never")
    tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="never")
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    return tok


def problems():
    """Every (op, a, b) pair the task covers."""
    for a in range(100):
        for b in range(100):
            yield ("+", a, b)
            if a >= b:
                yield ("-", a, b)


def render(op: str, a: int, b: int, rng: random.Random) -> tuple[str, str]:
    template = rng.choice([t for t, o in TEMPLATES if o == op])
    answer = a + b if op == "+" else a - b
    return template.format(a=a, b=b), f" {answer}"


def model_config(vocab_size: int, hidden: int = 128) -> DeepseekV3Config:
    return DeepseekV3Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        moe_intermediate_size=3 * hidden // 4,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_shared_experts=1,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=4,
        topk_group=2,
        routed_scaling_factor=1.5,
        norm_topk_prob=True,
        first_k_dense_replace=1,
        q_lora_rank=64,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        max_position_embeddings=64,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 16,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        rope_interleave=True,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
        initializer_range=0.02,
    )


def encode_batch(tok: Tokenizer, pairs, device="cpu"):
    """Input ids and labels; the loss covers the answer and EOS only."""
    seqs, labels = [], []
    for question, answer in pairs:
        q = tok.encode(question).ids  # BOS + question
        a = tok.encode(answer, add_special_tokens=False).ids + [1]
        seqs.append(q + a)
        labels.append([-100] * len(q) + a)
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), 2, dtype=torch.long)
    lab = torch.full((len(seqs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        lab[i, : len(l)] = torch.tensor(l)
        mask[i, : len(s)] = 1
    return ids.to(device), lab.to(device), mask.to(device)


@torch.no_grad()
def evaluate(model, tok, examples, batch=250, device="cpu"):
    """Greedy exact-match accuracy on (question, answer) pairs, decoding until EOS."""
    model.eval()
    correct = 0
    for start in range(0, len(examples), batch):
        chunk = examples[start : start + batch]
        prompts = [tok.encode(q).ids for q, _ in chunk]
        width = max(len(p) for p in prompts)
        # Left padding so that every prompt ends at the same position.
        ids = torch.full((len(chunk), width), 2, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        out = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=6, do_sample=False, eos_token_id=1, pad_token_id=2
        )
        for i, (_, answer) in enumerate(chunk):
            text = tok.decode(out[i, width:].cpu().tolist(), skip_special_tokens=True)
            correct += text == answer
    model.train()
    return correct / len(examples)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--heldout", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--time-limit-min", type=float, default=28.0)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=600)
    parser.add_argument("--device", default="cpu", help="cpu (the documented run) or cuda (quicker experiments)")
    args = parser.parse_args()

    torch.manual_seed(SEED)
    torch.set_num_threads(args.threads)
    rng = random.Random(SEED)

    tok = build_tokenizer()
    vocab_size = 8 * math.ceil(tok.get_vocab_size() / 8)
    all_problems = list(problems())
    rng.shuffle(all_problems)
    heldout_problems = all_problems[: args.heldout]
    train_problems = all_problems[args.heldout :]
    heldout = [render(op, a, b, rng) for op, a, b in heldout_problems]

    config = model_config(vocab_size, args.hidden)
    model = DeepseekV3ForCausalLM(config).to(args.device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params:,}; train problems: {len(train_problems)}; held out: {len(heldout)}", flush=True)

    # Auxiliary-loss-free balancing (DeepSeek-V3): after each step, nudge each expert's selection
    # bias towards the mean load. The bias only affects which experts are chosen, not the weights.
    loads = {}

    def track(name):
        def hook(_module, _inputs, output):
            indices = output[2]
            loads[name] = loads.get(name, 0) + torch.bincount(indices.flatten(), minlength=config.n_routed_experts)

        return hook

    routers = {name: m for name, m in model.named_modules() if name.endswith("mlp.gate")}
    for name, router in routers.items():
        router.register_forward_hook(track(name))

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = args.warmup
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    started = time.time()
    for step in range(args.steps):
        batch = [render(op, a, b, rng) for op, a, b in rng.sample(train_problems, args.batch)]
        ids, labels, mask = encode_batch(tok, batch, args.device)
        loads.clear()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        with torch.no_grad():
            for name, router in routers.items():
                load = loads[name].float()
                router.e_score_correction_bias += 1e-3 * torch.sign(load.mean() - load)
        elapsed = time.time() - started
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step} loss {loss.item():.4f} lr {schedule.get_last_lr()[0]:.2e} {elapsed:.0f}s", flush=True)
        if step % args.eval_every == args.eval_every - 1:
            print(f"  held-out accuracy (200): {evaluate(model, tok, heldout[:200], device=args.device):.3f}", flush=True)
        if elapsed > args.time_limit_min * 60:
            print(f"time limit reached at step {step}", flush=True)
            break

    accuracy = evaluate(model, tok, heldout, device=args.device)
    print(f"held-out exact-match accuracy: {accuracy:.4f} over {len(heldout)}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.to("cpu")
    model.save_pretrained(args.out, safe_serialization=True)
    tok.save(str(args.out / "tokenizer.json"))
    (args.out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 0, "eos_token_id": [1], "pad_token_id": 2, "do_sample": False}, indent=2) + "\n"
    )
    with open(args.out / "heldout.jsonl", "w") as f:
        for question, answer in heldout:
            f.write(json.dumps({"prompt": question, "answer": answer}) + "\n")
    summary = {
        "seed": SEED,
        "steps": step + 1,
        "batch": args.batch,
        "train_seconds": round(time.time() - started),
        "parameters": n_params,
        "heldout_examples": len(heldout),
        "heldout_accuracy": accuracy,
        "torch": torch.__version__,
    }
    (args.out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
