"""Stage (c) of scripts/gpu-check: `latentserve-worker bench --random-weights` on the standard
benchmark model and a DeepSeek-V2-Lite-shaped model, against transformers eager (hf_peer.py) on
the same device with the same shapes, random weights and dtype; ratios and the batch-1 HBM
roofline fraction.

--quick substitutes tiny models of the same structure (same routing, same layer kinds, YaRN as
in the originals; hidden 64, 3 layers) so a CPU debug build gets through; the JSON says so.
"""

from __future__ import annotations

import copy
import json
import re

from check_common import REPO, last_json, run, rust_log_env, tail

STAGE = "bench"
MODELS = {
    "v2-lite": REPO / "scripts" / "gpu" / "v2-lite" / "config.json",
    "standard": REPO / "benchmarks" / "standard-model.json",
}
# The targets (one H200, V2-Lite shape, bf16).
ROOFLINE_TARGET = 0.35
PEER_TARGET = 5.0
BATCH64_TARGET = 20.0


def tiny(config: dict) -> dict:
    """The same architecture at toy size: what a CPU debug build can bench in seconds."""
    c = copy.deepcopy(config)
    c.update({
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "kv_lora_rank": 32,
        "qk_nope_head_dim": 16,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "intermediate_size": 128,
        "moe_intermediate_size": 32,
        "num_hidden_layers": 3,
        "vocab_size": 512,
    })
    if c.get("q_lora_rank"):
        c["q_lora_rank"] = 32
    c["first_k_dense_replace"] = min(c.get("first_k_dense_replace", 0), 1)
    return c


def weight_elements_per_token(config: dict) -> dict:
    """Weights one decoded token reads at batch 1, in elements, from the config alone: per layer
    attention (q or q_a + q_b, kv_a, kv_b, o, norms) and either the dense MLP or the router +
    shared experts + the top-k routed experts; plus one embedding row, the final norm and lm_head."""
    h = config["hidden_size"]
    heads = config["num_attention_heads"]
    nope, rope, v = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
    kv = config["kv_lora_rank"]
    q_lora = config.get("q_lora_rank")
    qk = nope + rope
    q = (h * q_lora + q_lora + q_lora * heads * qk) if q_lora else h * heads * qk
    attention = q + h * (kv + rope) + kv + heads * (nope + v) * kv + heads * v * h + 2 * h
    experts = config.get("n_routed_experts") or 0
    dense_layers = config.get("first_k_dense_replace", 0) if experts else config["num_hidden_layers"]
    freq = config.get("moe_layer_freq", 1) or 1
    layers = config["num_hidden_layers"]
    dense_count = sum(1 for i in range(layers) if not (experts and i >= dense_layers and i % freq == 0))
    moe_count = layers - dense_count
    dense = 3 * h * config["intermediate_size"]
    mi = config.get("moe_intermediate_size", 0)
    moe = h * experts + (config.get("n_shared_experts") or 0) * 3 * h * mi + config.get("num_experts_per_tok", 0) * 3 * h * mi
    lm_head = config["vocab_size"] * h
    total = layers * attention + dense_count * dense + moe_count * moe + h + h + lm_head
    return {"total": total, "attention_per_layer": attention, "dense_layers": dense_count,
            "dense_per_layer": dense, "moe_layers": moe_count, "moe_per_layer_read": moe,
            "embedding_row": h, "lm_head": lm_head}


def _stderr_figures(stderr: str) -> dict:
    """What a bench that did not finish logged before it stopped (prefill, batched decode)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", stderr)
    found: dict = {"batch_decode": []}
    for line in text.splitlines():
        rate = re.search(r'tokens_per_s="?([0-9.]+)', line)
        if not rate:
            continue
        if " batched decode" in line:
            batch = re.search(r"\bbatch=(\d+)", line)
            if batch:
                found["batch_decode"].append({"batch": int(batch.group(1)), "tokens_per_second": float(rate.group(1)),
                                              "from": "log"})
        elif line.rstrip().endswith("prefill"):
            found["prefill"] = {"tokens_per_second": float(rate.group(1)), "from": "log"}
    return found


def run_stage(ctx, clock) -> dict:
    args, log, results, worker = ctx.args, ctx.log, ctx.results, ctx.worker
    out: dict = {"quick": args.quick, "hbm_bytes_per_second": args.hbm_bytes_per_s, "models": {}}
    if not worker.has_flag("bench", "--random-weights"):
        results.check(STAGE, "bench --random-weights exists", "correctness", False, "offered by the worker", False)
        return out
    offered = worker.dtypes("bench")
    dtype = args.bench_dtype if args.bench_dtype in offered else ("f16" if "f16" in offered else offered[0])
    if dtype != args.bench_dtype:
        ctx.substitutions.append(f"bench: the worker offers --dtype {', '.join(offered)}; ours ran in {dtype} instead of {args.bench_dtype}")
    elem_bytes = {"f32": 4, "f16": 2, "bf16": 2}[dtype]
    batches = [int(b) for b in args.batch_sizes.split(",") if b]
    prefill = 128 if args.quick else args.prefill_tokens
    depth = 32 if args.quick else args.batch_depth
    steps = 4 if args.quick else args.decode_steps
    peer_steps = 3 if args.quick else args.peer_decode_steps
    peer_batches = [b for b in (1, 64) if b in batches] or batches[:1]
    out.update({"ours_dtype": dtype, "peer_dtype": args.peer_dtype, "batches": batches, "peer_batches": peer_batches,
                "prefill_tokens": prefill, "batch_depth": depth, "decode_steps": steps, "peer_decode_steps": peer_steps})
    if args.quick:
        ctx.substitutions.append("bench: --quick benches tiny models of the same structure (hidden 64, 3 layers, "
                                 "vocab 512), not V2-Lite / the standard model; figures are rehearsal only")

    configs_dir = ctx.out_dir / "configs"
    configs_dir.mkdir(exist_ok=True)
    # Items in priority order: (model, who, cap seconds, seconds to keep for it).
    plan = [("v2-lite", "ours", 300, 60), ("v2-lite", "peer", 200, 45),
            ("standard", "ours", 120, 20), ("standard", "peer", 90, 20)]
    if args.skip_transformers:
        plan = [p for p in plan if p[1] == "ours"]
        results.skip(STAGE, "transformers peer", "--skip-transformers")
    for name in MODELS:
        config = json.loads(MODELS[name].read_text())
        if args.quick:
            config = tiny(config)
        folder = configs_dir / (name + ("-tiny" if args.quick else ""))
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        elements = weight_elements_per_token(config)
        bytes_per_token = elements["total"] * elem_bytes
        out["models"][name] = {
            "config": str(folder / "config.json"),
            "source_config": str(MODELS[name].relative_to(REPO)),
            "weight_elements_per_decode_token": elements,
            "weight_bytes_per_decode_token": bytes_per_token,
            "roofline_tokens_per_second": args.hbm_bytes_per_s / bytes_per_token,
        }

    for index, (name, who, cap, keep) in enumerate(plan):
        # Later items keep their minimum while there is room; when there is not, the earlier
        # (more important) item takes the time.
        later = sum(p[3] for p in plan[index + 1:])
        limit = min(cap, clock.left() - later)
        if limit < keep:
            limit = min(cap, clock.left())
        model = out["models"][name]
        if limit < keep:
            results.skip(STAGE, f"{who} {name}", f"out of time ({max(0, limit):.0f} s left for it)")
            continue
        if who == "ours":
            cmd = [worker.binary, "bench", "--random-weights", "--config", model["config"], "--dtype", dtype,
                   "--prefill-tokens", str(prefill), "--depths", str(depth), "--decode-tokens", str(steps),
                   "--batch-sizes", ",".join(map(str, batches)), "--batch-depth", str(depth), "--json"
                   ] + worker.device_args("bench")
            env = rust_log_env()
            env["NO_COLOR"] = "1"
            res = run(cmd, limit, log, f"bench-{name}", ctx.logs_dir, env=env)
            report = last_json(res["stdout"]) if res["rc"] == 0 else None
            if report is None:
                partial = _stderr_figures(res["stderr"])
                why = "timed out" if res["timed_out"] else f"exit {res['rc']}: {tail(res['stderr'], 3)}"
                model["ours"] = {"error": why, "partial_from_log": partial}
                if res["timed_out"]:
                    results.skip(STAGE, f"ours {name} (finished part kept from its log)", "out of time")
                else:
                    results.check(STAGE, f"{name}: bench --random-weights completes", "correctness", None,
                                  "exit 0 with a JSON report", False, why)
            else:
                report["seconds"] = round(res["seconds"], 1)
                model["ours"] = report
                log(f"  ours {name}: prefill {report['prefill']['tokens_per_second']:.1f} t/s; batched "
                    + ", ".join(f"b{b['batch']} {b['tokens_per_second']:.1f}" for b in report.get("batch_decode", [])))
        else:
            jsonl = ctx.out_dir / f"transformers-{name}.jsonl"
            jsonl.write_text("")
            cmd = [args.python, str(REPO / "scripts" / "gpu" / "hf_peer.py"), "--config", model["config"],
                   "--device", ctx.torch_device, "--dtype", args.peer_dtype,
                   "--batches", ",".join(map(str, peer_batches)), "--depth", str(depth),
                   "--decode-steps", str(peer_steps), "--prefill-tokens", str(prefill), "--out", str(jsonl)]
            if ctx.torch_device == "cpu" and args.cpu_threads:
                cmd += ["--threads", str(args.cpu_threads)]
            res = run(cmd, limit, log, f"peer-{name}", ctx.logs_dir)
            records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
            peer = {"records": records, "seconds": round(res["seconds"], 1)}
            if res["timed_out"]:
                peer["note"] = "stopped at its time limit; the figures it had measured are kept"
                results.skip(STAGE, f"peer {name} (part)", "out of time")
            elif res["rc"] != 0:
                peer["error"] = f"exit {res['rc']}: {tail(res['stderr'], 3)}"
            model["peer"] = peer
            log(f"  peer {name}: " + "; ".join(
                f"{r['kind']} b{r.get('batch', '-')} {r['tokens_per_second']:.2f} t/s"
                for r in records if "tokens_per_second" in r))

    _figures(ctx, out)
    return out


def _figures(ctx, out: dict) -> None:
    """Ratios, roofline fractions and the checks against the issue's targets."""
    results, quick = ctx.results, ctx.args.quick
    note = "quick mode: tiny shapes, not judged" if quick else ""
    if not quick and ctx.torch_device == "cpu":
        note = "measured on the CPU: the targets are for one H200, not judged"
    judged = not note
    for name, model in out["models"].items():
        ours = model.get("ours") or {}
        batch = {b["batch"]: b for b in ours.get("batch_decode", [])}
        if not batch:
            batch = {b["batch"]: b for b in (ours.get("partial_from_log") or {}).get("batch_decode", [])}
        peer_decode = {r["batch"]: r for r in (model.get("peer") or {}).get("records", [])
                       if r.get("kind") == "decode" and "tokens_per_second" in r}
        peer_prefill = next((r for r in (model.get("peer") or {}).get("records", [])
                             if r.get("kind") == "prefill" and "tokens_per_second" in r), None)
        ours_prefill = (ours.get("prefill") or (ours.get("partial_from_log") or {}).get("prefill") or {})
        figures: dict = {}
        b1 = batch.get(1, {}).get("tokens_per_second")
        if b1:
            figures["batch1_tokens_per_second"] = b1
            figures["roofline_fraction_batch1"] = b1 / model["roofline_tokens_per_second"]
        for b, row in sorted(batch.items()):
            figures[f"batch{b}_tokens_per_second"] = row["tokens_per_second"]
            if b1 and b != 1:
                figures[f"batch{b}_over_batch1"] = row["tokens_per_second"] / b1
            if b in peer_decode:
                figures[f"batch{b}_vs_transformers"] = row["tokens_per_second"] / peer_decode[b]["tokens_per_second"]
        if ours_prefill.get("tokens_per_second"):
            figures["prefill_tokens_per_second"] = ours_prefill["tokens_per_second"]
            if peer_prefill:
                figures["prefill_vs_transformers"] = ours_prefill["tokens_per_second"] / peer_prefill["tokens_per_second"]
        for b, r in peer_decode.items():
            figures[f"transformers_batch{b}_tokens_per_second"] = r["tokens_per_second"]
        if peer_prefill:
            figures["transformers_prefill_tokens_per_second"] = peer_prefill["tokens_per_second"]
        model["figures"] = figures
        if name != "v2-lite":
            continue

        def target(check, key, threshold, label):
            value = figures.get(key)
            passed = (value >= threshold if value is not None else False) if judged else None
            results.check(STAGE, check, "performance", value, f">= {threshold:g} ({label})", passed,
                          note or ("" if value is not None else "not measured"))

        label = f"V2-Lite {out.get('ours_dtype')}" + (" (tiny)" if quick else "")
        target(f"{label}: batch-1 decode / HBM roofline", "roofline_fraction_batch1", ROOFLINE_TARGET,
               f"weights per token / {ctx.args.hbm_bytes_per_s:.3g} B/s")
        target(f"{label}: batch-1 decode vs transformers eager {out.get('peer_dtype')}", "batch1_vs_transformers",
               PEER_TARGET, "ratio")
        target(f"{label}: batch-64 throughput / batch-1", "batch64_over_batch1", BATCH64_TARGET, "ratio")
