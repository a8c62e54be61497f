#!/usr/bin/env python3
"""Measures the demo model as the worker serves it: exact-match accuracy on the whole held-out set,
and a heatmap of the expert load per MoE layer made from the worker's own
`latentserve_expert_tokens_total{layer,expert}` counters.

    python3 models/evaluate_demo.py --worker target/release/latentserve-worker \
        --heatmap models/demo/expert-load.png

Starts `latentserve-worker serve` on the demo model (127.0.0.1, free ports), sends every held-out
question through gRPC (greedy), reads /metrics once all have answered, stops the worker and
prints one JSON object (--write keeps it: models/demo/evaluation.json is the model card's source,
which worker/tests/demo_model.rs checks the worker against). Needs the Python packages of
the client test (scripts/install-deps: grpcio, grpcio-tools, grpcio-health-checking,
grpcio-reflection) and, for --heatmap, matplotlib.
"""

import argparse
import concurrent.futures
import json
import pathlib
import re
import subprocess
import sys
import tempfile
import time
import urllib.request

import grpc

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = REPO / "models" / "demo"
sys.path.insert(0, str(REPO / "tests" / "python"))
from test_grpc_client import generate_stubs  # noqa: E402  (the stubs our client test builds)
from worker_process import free_port, wait_ready  # noqa: E402


def expert_load(metrics_text: str) -> dict[int, dict[int, float]]:
    """layer -> expert -> tokens, from latentserve_expert_tokens_total."""
    pattern = re.compile(r'^latentserve_expert_tokens_total\{([^}]*)\} (\S+)$')
    load: dict[int, dict[int, float]] = {}
    for line in metrics_text.splitlines():
        match = pattern.match(line)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        load.setdefault(int(labels["layer"]), {})[int(labels["expert"])] = float(match.group(2))
    return load


def plot(load: dict[int, dict[int, float]], path: pathlib.Path, questions: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(load)
    experts = sorted({e for per_layer in load.values() for e in per_layer})
    # Share of the layer's routed token slots that went to each expert.
    shares = []
    for layer in layers:
        total = sum(load[layer].values()) or 1.0
        shares.append([load[layer].get(e, 0.0) / total for e in experts])
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(experts), 1.2 + 0.6 * len(layers)), dpi=120)
    image = ax.imshow(shares, cmap="viridis", vmin=0.0, aspect="auto")
    ax.set_xticks(range(len(experts)), [str(e) for e in experts])
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("routed expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(f"Demo model: share of routed tokens per expert\n({questions} held-out questions, worker's expert_tokens_total)", fontsize=9)
    for i, row in enumerate(shares):
        for j, share in enumerate(row):
            ax.text(j, i, f"{100 * share:.0f}", ha="center", va="center", fontsize=7, color="white" if share < 0.6 * max(row) else "black")
    fig.colorbar(image, ax=ax, label="share of the layer's token slots")
    fig.tight_layout()
    fig.savefig(path)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", required=True, help="path of the latentserve-worker binary")
    parser.add_argument("--heldout", type=pathlib.Path, default=DEMO / "heldout.jsonl")
    parser.add_argument("--limit", type=int, default=0, help="only the first N questions (0: all)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--heatmap", type=pathlib.Path, help="write the expert-load heatmap PNG here")
    parser.add_argument("--write", type=pathlib.Path, help="also write the JSON object to this file (models/demo/evaluation.json)")
    args = parser.parse_args()

    examples = [json.loads(line) for line in args.heldout.read_text().splitlines() if line.strip()]
    if args.limit:
        examples = examples[: args.limit]

    grpc_port, metrics_port = free_port(), free_port()
    worker = subprocess.Popen(
        [
            args.worker,
            "serve",
            "--grpc-addr",
            f"127.0.0.1:{grpc_port}",
            "--metrics-addr",
            f"127.0.0.1:{metrics_port}",
            "--openai-addr",
            "",
            "--kv-cache-memory",
            "64Mi",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_ready(f"http://127.0.0.1:{metrics_port}/readyz", worker)
        with tempfile.TemporaryDirectory() as out_dir:
            pb2, pb2_grpc = generate_stubs(pathlib.Path(out_dir))
            channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
            client = pb2_grpc.InferenceStub(channel)

            def answer(example):
                request = pb2.GenerateRequest(
                    request_id=example["prompt"],
                    text=example["prompt"],
                    sampling=pb2.SamplingParams(temperature=0.0),
                    stopping=pb2.StoppingCriteria(max_tokens=8),
                )
                text = "".join(message.text for message in client.Generate(request, timeout=60))
                return text.strip() == example["answer"].strip(), text

            started = time.time()
            with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
                results = list(pool.map(answer, examples))
            seconds = time.time() - started
            channel.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            load = expert_load(response.read().decode())
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()

    if not load:
        raise SystemExit("the worker's /metrics has no latentserve_expert_tokens_total samples")
    correct = sum(ok for ok, _ in results)
    wrong = [(e["prompt"], e["answer"].strip(), text.strip()) for e, (ok, text) in zip(examples, results) if not ok]
    if args.heatmap:
        plot(load, args.heatmap, len(examples))
    summary = {
        "questions": len(examples),
        "exact_answers": correct,
        "worker_heldout_accuracy": round(correct / len(examples), 4),
        "seconds": round(seconds, 1),
        "first_wrong": wrong[:10],
        "expert_tokens": {str(layer): [load[layer][e] for e in sorted(load[layer])] for layer in sorted(load)},
    }
    text = json.dumps(summary, indent=2) + "\n"
    if args.write:
        args.write.write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
