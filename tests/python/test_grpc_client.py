#!/usr/bin/env python3
"""A client that is not ours: Python grpcio stubs generated from proto/latentserve/v1/inference.proto
at test time (grpcio-tools), talking to a running latentserve worker.

Usage: test_grpc_client.py --target HOST:PORT --reference PATH/TO/reference.json

Checks streaming Generate (greedy tokens equal the fixture's transformers reference), the unary
calls, errors as status codes, grpc.health.v1 and listing services through reflection. Exits
non-zero with a message naming the failed check.
"""

import argparse
import importlib
import json
import pathlib
import sys
import tempfile

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_tools import protoc

REPO = pathlib.Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "proto"


def generate_stubs(out_dir):
    """Compiles our .proto into Python modules under out_dir and imports them."""
    status = protoc.main(
        [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            str(PROTO_ROOT / "latentserve/v1/inference.proto"),
        ]
    )
    if status != 0:
        raise SystemExit(f"protoc failed with status {status}")
    sys.path.insert(0, str(out_dir))
    pb2 = importlib.import_module("latentserve.v1.inference_pb2")
    pb2_grpc = importlib.import_module("latentserve.v1.inference_pb2_grpc")
    return pb2, pb2_grpc


def check(condition, message):
    if not condition:
        raise SystemExit(f"FAILED: {message}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--reference", required=True)
    args = parser.parse_args()
    reference = json.loads(pathlib.Path(args.reference).read_text())

    with tempfile.TemporaryDirectory() as out_dir:
        pb2, pb2_grpc = generate_stubs(pathlib.Path(out_dir))
        with grpc.insecure_channel(args.target) as channel:
            grpc.channel_ready_future(channel).result(timeout=30)

            health = health_pb2_grpc.HealthStub(channel)
            for service in ["", "latentserve.v1.Inference"]:
                reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                check(
                    reply.status == health_pb2.HealthCheckResponse.SERVING,
                    f"health of {service!r} is {reply.status}, expected SERVING",
                )

            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
            )
            services = {s.name for r in replies for s in r.list_services_response.service}
            for expected in ["latentserve.v1.Inference", "grpc.health.v1.Health"]:
                check(expected in services, f"reflection lists {sorted(services)}, not {expected}")
            check("latentserve.v1.Experts" not in services,
                  f"reflection lists the expert exchange to clients: {sorted(services)}")

            stub = pb2_grpc.InferenceStub(channel)
            info = stub.GetModelInfo(pb2.GetModelInfoRequest(), timeout=10)
            check(info.vocab_size > 0 and info.num_layers > 0, f"model info incomplete: {info}")
            check(info.kv_cache_bytes_per_token > 0, "kv_cache_bytes_per_token is 0")

            ids = stub.Tokenize(
                pb2.TokenizeRequest(text=reference["prompt_text"], add_special_tokens=True),
                timeout=10,
            ).ids
            check(list(ids) == reference["prompt_ids"], "Tokenize differs from the reference ids")
            text = stub.Detokenize(
                pb2.DetokenizeRequest(ids=reference["prompt_ids"], skip_special_tokens=True),
                timeout=10,
            ).text
            check(text.strip() == reference["prompt_text"].strip(), f"Detokenize gave {text!r}")

            greedy = reference["greedy_ids"]
            request = pb2.GenerateRequest(
                request_id="python-client",
                token_ids=pb2.TokenIds(ids=reference["prompt_ids"]),
                sampling=pb2.SamplingParams(temperature=0.0),
                stopping=pb2.StoppingCriteria(max_tokens=len(greedy), ignore_eos=True),
                logprobs=2,
            )
            tokens, messages, last = [], 0, None
            for message in stub.Generate(request, timeout=120):
                messages += 1
                check(message.request_id == "python-client", "request_id not echoed")
                check(
                    len(message.logprobs) == len(message.token_ids),
                    "one logprobs entry per token expected",
                )
                tokens.extend(message.token_ids)
                last = message
            check(tokens == greedy, f"greedy tokens {tokens} differ from the reference {greedy}")
            check(messages >= len(greedy), f"tokens were not streamed ({messages} messages)")
            check(last.finish_reason == pb2.FINISH_REASON_LENGTH, "finish reason is not LENGTH")
            check(last.usage.completion_tokens == len(greedy), f"usage: {last.usage}")
            check(last.usage.prompt_tokens == len(reference["prompt_ids"]), f"usage: {last.usage}")
            check(last.timings.time_to_first_token_seconds > 0, f"timings: {last.timings}")

            try:
                list(stub.Generate(pb2.GenerateRequest(text=""), timeout=10))
                check(False, "an empty prompt was accepted")
            except grpc.RpcError as error:
                check(
                    error.code() == grpc.StatusCode.INVALID_ARGUMENT,
                    f"empty prompt gave {error.code()}",
                )
                check("prompt" in error.details(), f"error does not name the field: {error.details()}")

    print("python grpcio client: all checks passed")


if __name__ == "__main__":
    main()
