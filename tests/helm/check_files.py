#!/usr/bin/env python3
"""Checks the examples and the image Dockerfiles without a cluster or a container engine.

examples/: every file parses; each ModelDeployment names exactly one model source and the shape
docs/install.md describes (the demo on a hostPath, V2-Lite on a PVC with 2 shards and a GPU each,
V3 with 8 shards). The server-side dry run against the real CRD is in cluster-check.sh.

images/: every Dockerfile is multi-stage, builds its crate with --locked, and its final stage
runs as a numeric non-root user; the CUDA worker builds with --features cuda on the plain Rust
image (CUDA is loaded at run time, so the build needs no toolkit) and runs on the CUDA runtime
image.
"""

import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("hostPath", "pvc", "image")
failures = []


def expect(condition, message):
    if not condition:
        failures.append(message)
    return condition


def model_deployments(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    expect(all("kind" in d and "apiVersion" in d for d in docs), f"{path.name}: a document lacks kind/apiVersion")
    found = {d["metadata"]["name"]: d for d in docs if d.get("kind") == "ModelDeployment"}
    for name, d in found.items():
        expect(d["apiVersion"] == "latentserve.io/v1alpha1", f"{path.name}: {name} has apiVersion {d['apiVersion']}")
        sources = [s for s in SOURCES if s in d["spec"].get("model", {})]
        expect(len(sources) == 1, f"{path.name}: {name} has model sources {sources}, expected exactly one")
        expect("namespace" not in d["metadata"], f"{path.name}: {name} pins a namespace; examples are applied with -n")
    return found


def check_examples():
    examples = REPO / "examples"
    for path in sorted(examples.glob("*.yaml")):
        yaml.safe_load_all(path.read_text())
    demo = model_deployments(examples / "demo-hostpath.yaml").get("demo")
    if expect(demo, "demo-hostpath.yaml has no ModelDeployment named demo"):
        expect(demo["spec"]["model"].get("hostPath", {}).get("path") == "/srv/models/latentserve-demo",
               "the demo example does not read /srv/models/latentserve-demo")
        expect(demo["spec"]["expertShards"] == 2, "the demo example does not shard its experts over 2 pods")
    lite = model_deployments(examples / "deepseek-v2-lite-pvc.yaml").get("deepseek-v2-lite")
    if expect(lite, "deepseek-v2-lite-pvc.yaml has no ModelDeployment named deepseek-v2-lite"):
        claim = lite["spec"]["model"].get("pvc", {}).get("claimName")
        pvcs = [d for d in yaml.safe_load_all((examples / "deepseek-v2-lite-pvc.yaml").read_text())
                if d and d["kind"] == "PersistentVolumeClaim"]
        expect([p["metadata"]["name"] for p in pvcs] == [claim], f"V2-Lite reads PVC {claim} that the file does not create")
        expect(lite["spec"]["expertShards"] == 2, "V2-Lite does not use 2 expert shards")
        expect(lite["spec"]["resources"].get("gpus") == 1, "V2-Lite does not ask for one GPU per pod")
    v3 = model_deployments(examples / "deepseek-v3-fp8.yaml").get("deepseek-v3")
    if expect(v3, "deepseek-v3-fp8.yaml has no ModelDeployment named deepseek-v3"):
        expect(v3["spec"]["expertShards"] == 8, "V3 does not use 8 expert shards")
        expect(v3["spec"]["resources"].get("gpus", 0) >= 1, "V3 asks for no GPU")
        expect(v3["spec"].get("nodeSelector"), "V3 has no node selector")


def stages(dockerfile):
    """[(base image, [instructions])] per FROM, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        words = line.split()
        if not words:
            continue
        if words[0].upper() == "FROM":
            out.append((words[1], []))
        elif out:
            out[-1][1].append(line.strip())
    return out


def check_dockerfile(name, crate, features=None, build_base=None, run_base=None):
    path = REPO / "images" / name
    if not expect(path.exists(), f"images/{name} is missing"):
        return
    found = stages(path)
    expect(len(found) >= 2, f"{name}: not multi-stage")
    builds = [i for _, instrs in found for i in instrs if "cargo build" in i]
    expect(any(f"-p {crate}" in b and "--locked" in b and "--release" in b for b in builds),
           f"{name}: no `cargo build --release --locked -p {crate}`")
    if features:
        expect(any(f"--features {features}" in b for b in builds), f"{name}: does not build with --features {features}")
    build_stage = next((base for base, instrs in found if any("cargo build" in i for i in instrs)), "")
    if build_base:
        expect(build_base in build_stage, f"{name}: builds on {build_stage}, expected {build_base}")
    final_base, final = found[-1]
    if run_base:
        expect(run_base in final_base, f"{name}: runs on {final_base}, expected {run_base}")
    users = [i.split()[1] for i in final if i.upper().startswith("USER ")]
    expect(users and re.fullmatch(r"[1-9][0-9]*(:[1-9][0-9]*)?", users[-1]),
           f"{name}: the final stage does not run as a numeric non-root user ({users})")
    expect(any(i.upper().startswith("ENTRYPOINT") and crate in i for i in final), f"{name}: no ENTRYPOINT for {crate}")
    expect((REPO / "images" / f"{name}.dockerignore").exists(), f"{name}: no {name}.dockerignore keeping target/ out")


def main():
    check_examples()
    check_dockerfile("operator.Dockerfile", "latentserve-operator")
    check_dockerfile("worker.Dockerfile", "latentserve-worker")
    check_dockerfile("router.Dockerfile", "latentserve-router")
    check_dockerfile("worker-cuda.Dockerfile", "latentserve-worker", features="cuda",
                     build_base="rust:${RUST_VERSION}", run_base="nvidia/cuda:${CUDA_VERSION}-runtime")
    if failures:
        for f in failures:
            print(f, file=sys.stderr)
        sys.exit(1)
    print("examples and Dockerfiles as expected")


if __name__ == "__main__":
    main()
