#!/usr/bin/env python3
"""Prints the table of benchmarks/run.sh from the raw result files of one run.

Usage: python3 benchmarks/report.py RESULTS_DIR   (standard library only)

Every rate is tokens/s; a ratio is ours / peer (> 1: we are faster). Missing measurements (a
skipped or failed peer) show as "-".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def last_json_object(path: Path):
    """The last line of `path` that parses as a JSON object (tools print logs around it)."""
    if not path.is_file():
        return None
    for line in reversed(path.read_text(errors="replace").splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def llama_bench_tests(path: Path) -> list[dict]:
    """llama-bench -o json: an array of tests with n_prompt, n_gen, n_depth, avg_ts, stddev_ts."""
    if not path.is_file():
        return []
    text = path.read_text(errors="replace")
    start = text.find("[")
    try:
        return json.loads(text[start:]) if start >= 0 else []
    except json.JSONDecodeError:
        return []


def llama_rate(results: Path, dtype: str, *, prompt: int, gen: int, depth: int):
    files = [results / f"llama-{dtype}-bench.json", results / f"llama-{dtype}-bench-d{depth}.json"]
    for path in files:
        for test in llama_bench_tests(path):
            if (test.get("n_prompt"), test.get("n_gen"), test.get("n_depth", 0)) == (prompt, gen, depth):
                return test["avg_ts"], test.get("stddev_ts")
    return None


def batched_rates(results: Path, dtype: str) -> dict[int, float]:
    path = results / f"llama-{dtype}-batched.jsonl"
    rates = {}
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith('{"n_kv_max"'):
                row = json.loads(line)
                rates[row["pl"]] = row["speed_tg"]
    return rates


def ours_decode(report, depth: int):
    if not report:
        return None
    for row in report.get("decode", []):
        if row["depth"] == depth:
            return row["tokens_per_second"]
    return None


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, tuple):
        rate, stddev = value
        return f"{rate:.{digits}f}" + (f" ±{stddev:.{digits}f}" if stddev is not None else "")
    return f"{value:.{digits}f}"


def ratio(ours, peer) -> str:
    if ours is None or peer is None:
        return "-"
    peer_rate = peer[0] if isinstance(peer, tuple) else peer
    return f"{ours / peer_rate:.2f}x" if peer_rate else "-"


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    results = Path(sys.argv[1])
    ours = {d: last_json_object(results / f"ours-{d}.json") for d in ("f32", "f16")}
    hf = last_json_object(results / "transformers.json")

    def hf_decode(depth):
        return next((r["tokens_per_second"] for r in (hf or {}).get("decode", []) if r["depth"] == depth), None)

    rows = [
        (
            "prefill 512 tokens",
            {d: (ours[d] or {}).get("prefill", {}).get("tokens_per_second") for d in ours},
            {d: llama_rate(results, d, prompt=512, gen=0, depth=0) for d in ours},
            (hf or {}).get("prefill", {}).get("tokens_per_second"),
        ),
        (
            "decode b1 (ours/hf: depth 128; llama: tg128)",
            {d: ours_decode(ours[d], 128) for d in ours},
            {d: llama_rate(results, d, prompt=0, gen=128, depth=0) for d in ours},
            hf_decode(128),
        ),
        (
            "decode b1 at depth 2048",
            {d: ours_decode(ours[d], 2048) for d in ours},
            {d: llama_rate(results, d, prompt=0, gen=128, depth=2048) for d in ours},
            hf_decode(2048),
        ),
        (
            "decode b1 at depth 4000",
            {d: ours_decode(ours[d], 4000) for d in ours},
            {d: llama_rate(results, d, prompt=0, gen=96, depth=4000) for d in ours},
            None,
        ),
    ]

    header = (
        f"{'tokens/s':50} | {'ours f32':>9} {'llama f32':>15} {'ratio':>7} | "
        f"{'ours f16':>9} {'llama f16':>15} {'ratio':>7} | {'hf f32':>8} {'ours/hf':>8}"
    )
    print(header)
    print("-" * len(header))
    for name, our, llama, hf_rate in rows:
        print(
            f"{name:50} | {fmt(our['f32']):>9} {fmt(llama['f32']):>15} {ratio(our['f32'], llama['f32']):>7} | "
            f"{fmt(our['f16']):>9} {fmt(llama['f16']):>15} {ratio(our['f16'], llama['f16']):>7} | "
            f"{fmt(hf_rate, 2):>8} {ratio(our['f32'], hf_rate):>8}"
        )
    for pl in (1, 4, 8, 16):
        batched = {d: batched_rates(results, d).get(pl) for d in ours}
        print(
            f"{f'decode throughput, {pl} parallel seqs (llama only)':50} | {'-':>9} {fmt(batched['f32']):>15} {'-':>7} | "
            f"{'-':>9} {fmt(batched['f16']):>15} {'-':>7} | {'-':>8} {'-':>8}"
        )

    print()
    for d in ("f32", "f16"):
        report = ours[d]
        if not report:
            print(f"ours {d}: no result")
            continue
        bandwidth = report.get("read_bandwidth_bytes_per_second")
        weights = report.get("weight_bytes_per_decode_token")
        deep = report.get("decode_at_depth", {})
        kv = report.get("kv_bytes_per_token", {})
        line = [f"ours {d}:"]
        if bandwidth and weights:
            llama_b1 = llama_rate(results, d, prompt=0, gen=128, depth=0)
            llama_fraction = f"{weights * llama_b1[0] / bandwidth:.0%}" if llama_b1 else "-"
            line.append(
                f"{weights / 1e6:.0f} MB weights read per decoded token; 2-thread read "
                f"{bandwidth / 1e9:.1f} GB/s; batch-1 decode at "
                f"{report.get('bandwidth_fraction_at_first_depth', 0):.0%} of that limit "
                f"(llama.cpp: {llama_fraction})"
            )
        if deep:
            line.append(
                f"depth {deep.get('depth')}: absorbed {fmt(deep.get('absorbed_tokens_per_second'))} vs "
                f"decompressed per-head {fmt(deep.get('decompressed_tokens_per_second'))} t/s "
                f"({fmt(deep.get('speedup'), 2)}x)"
            )
        if kv:
            line.append(
                f"KV bytes/token {kv.get('latent_f32')} (latent) vs {kv.get('decompressed_f32')} "
                f"(per-head), {fmt(kv.get('ratio'), 1)}x smaller"
            )
        if report.get("peak_rss_bytes"):
            line.append(f"peak RSS {report['peak_rss_bytes'] / 2**20:.0f} MiB")
        print("\n  ".join(line))
    if hf:
        print(f"transformers {hf.get('transformers_version')}, torch {hf.get('torch_version')}, "
              f"attention {hf.get('attention')}, {hf.get('threads')} threads")
    return 0


if __name__ == "__main__":
    sys.exit(main())
