"""Stage (b) of scripts/gpu-check: serve the demo model on the device and measure its held-out
accuracy through gRPC, against the CPU figure in models/demo/evaluation.json.

Reuses models/evaluate_demo.py (ports, readiness, the metrics parser, and the stubs our Python
client test builds with grpcio-tools); where those stubs cannot be built (no grpcio-tools or
protobuf on the machine) it falls back to grpc_raw.py, which needs grpcio only.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import pathlib
import subprocess
import sys
import tempfile
import time
import urllib.request

from check_common import REPO, kill_group, tail

sys.path.insert(0, str(REPO / "tests" / "python"))
from worker_process import free_port, wait_ready  # noqa: E402  (shared with evaluate_demo.py)

DEMO = REPO / "models" / "demo"
STAGE = "demo"


def _helpers(log):
    """evaluate_demo's module, or None with the reason it cannot be imported here."""
    sys.path.insert(0, str(REPO / "models"))
    try:
        import evaluate_demo  # noqa: PLC0415

        return evaluate_demo, ""
    except Exception as err:  # noqa: BLE001 - e.g. grpc_tools missing on the GPU image
        log(f"  models/evaluate_demo.py cannot be imported here ({type(err).__name__}: {err}); using grpc_raw")
        return None, f"{type(err).__name__}: {err}"


def run(ctx, clock) -> dict:
    args, log, results, worker = ctx.args, ctx.log, ctx.results, ctx.worker
    out: dict = {}
    examples = [json.loads(line) for line in (DEMO / "heldout.jsonl").read_text().splitlines() if line.strip()]
    limit = args.demo_limit if args.demo_limit else (100 if args.quick else 0)
    if limit:
        examples = examples[:limit]
    expected = json.loads((DEMO / "evaluation.json").read_text())["worker_heldout_accuracy"]
    out["cpu_figure"] = {"source": "models/demo/evaluation.json", "worker_heldout_accuracy": expected}

    evaluate_demo, import_error = _helpers(log)
    client_kind = args.grpc_client
    if client_kind == "auto":
        client_kind = "stubs" if evaluate_demo is not None else "raw"
    if client_kind == "stubs" and evaluate_demo is None:
        raise RuntimeError(f"--grpc-client stubs, but models/evaluate_demo.py cannot be imported: {import_error}")
    grpc_port, metrics_port = free_port(), free_port()

    cmd = [
        worker.binary, "serve", "--model", str(DEMO),
        "--grpc-addr", f"127.0.0.1:{grpc_port}",
        "--metrics-addr", f"127.0.0.1:{metrics_port}",
        "--kv-cache-memory", "64Mi",
    ] + worker.device_args("serve")
    if worker.has_flag("serve", "--openai-addr"):
        cmd.append("--openai-addr=")  # no third port needed
    if args.demo_dtype:
        cmd += ["--dtype", args.demo_dtype]
    out["command"] = " ".join(cmd)
    out["client"] = client_kind
    log(f"$ {out['command']}")
    err_path = ctx.logs_dir / "demo-serve.err"
    started = time.monotonic()
    with open(err_path, "w") as err_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err_file, cwd=REPO, start_new_session=True)
    try:
        ready_limit = clock.timeout(args.ready_timeout)
        wait_ready(
            f"http://127.0.0.1:{metrics_port}/readyz", proc, ready_limit
        )
        out["ready_seconds"] = round(time.monotonic() - started, 2)
        log(f"  ready in {out['ready_seconds']} s; {len(examples)} questions through gRPC ({client_kind} client)")
        import grpc  # noqa: PLC0415

        with tempfile.TemporaryDirectory() as stubs_dir:
            if client_kind == "stubs":
                pb2, pb2_grpc = evaluate_demo.generate_stubs(pathlib.Path(stubs_dir))
            channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")

            def answer(example):
                # Questions not started before the stage's end are left unanswered (None).
                if clock.left() < 2:
                    return None
                timeout = max(1.0, min(60.0, clock.left()))
                if client_kind == "stubs":
                    request = pb2.GenerateRequest(
                        request_id=example["prompt"],
                        text=example["prompt"],
                        sampling=pb2.SamplingParams(temperature=0.0),
                        stopping=pb2.StoppingCriteria(max_tokens=8),
                    )
                    stub = pb2_grpc.InferenceStub(channel)
                    text = "".join(m.text for m in stub.Generate(request, timeout=timeout))
                else:
                    import grpc_raw  # noqa: PLC0415

                    text = grpc_raw.generate_text(channel, example["prompt"], 8, timeout)
                return text.strip() == example["answer"].strip(), text

            t0 = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(16) as pool:
                answers = list(pool.map(answer, examples))
            out["answer_seconds"] = round(time.monotonic() - t0, 2)
            channel.close()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
                metrics = response.read().decode()
            if evaluate_demo:
                load = evaluate_demo.expert_load(metrics)
                out["expert_tokens_layers"] = len(load)
            out["metrics_bytes"] = len(metrics)
        except OSError as err:
            out["metrics_error"] = str(err)
    finally:
        kill_group(proc)
    out["worker_stderr_tail"] = tail(err_path.read_text(errors="replace"), 5)

    answered = [a for a in answers if a is not None]
    if len(answered) < len(examples):
        results.skip(STAGE, f"{len(examples) - len(answered)} of {len(examples)} questions", "out of time")
    if not answered:
        results.check(STAGE, "demo held-out accuracy", "correctness", None, f"within 0.01 of {expected}", None,
                      "no question answered in time")
        return out
    correct = sum(ok for ok, _ in answered)
    accuracy = correct / len(answered)
    out.update({"questions": len(examples), "answered": len(answered), "exact_answers": correct,
                "heldout_accuracy": round(accuracy, 4)})
    out["first_wrong"] = [(e["prompt"], e["answer"].strip(), a[1].strip())
                          for e, a in zip(examples, answers) if a is not None and not a[0]][:10]
    tolerance, note = 0.01, ""
    if len(answered) < 1000:
        # A subset's accuracy scatters around the full set's: allow 3 standard errors.
        tolerance = max(0.01, 3 * math.sqrt(expected * (1 - expected) / len(answered)))
        note = (f"{len(answered)} of the 1000 questions: tolerance widened to 3 standard errors "
                f"({tolerance:.3f}); the target (one point) applies to the full set")
    diff = accuracy - expected
    results.check(STAGE, "demo held-out accuracy vs CPU figure", "correctness",
                  {"accuracy": round(accuracy, 4), "cpu": expected, "difference": round(diff, 4)},
                  f"|difference| <= {tolerance:.3f}", abs(diff) <= tolerance + 1e-9, note)
    log(f"  accuracy {accuracy:.4f} ({correct}/{len(answered)}) vs CPU {expected}")
    return out
