#!/usr/bin/env python3
"""Checks the YAML that the docs ask users to apply, without a cluster.

Every ```yaml block in docs/*.md parses. The Gateway API Inference Extension setup in
docs/metrics.md is also checked for consistency with the operator and with itself: the
InferencePool selects the labels the operator puts on worker pods and targets the workers' OpenAI
port; its endpointPickerRef names the picker's Service and port; the picker's Deployment reads
the ConfigMap it mounts and names the pool; the EndpointPickerConfig scrapes the workers' metrics
port, uses only the engineConfigs fields the picker knows (it decodes plugin parameters strictly)
and refers only to plugins it declares; the HTTPRoute sends to the pool.
"""

import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
failures = []

# The engineConfigs fields of llm-d-router's core-metrics-extractor (v0.10.0,
# pkg/epp/framework/plugins/datalayer/extractor/metrics/factories.go).
ENGINE_CONFIG_FIELDS = {
    "name", "queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "loraSpec", "cacheInfoSpec",
    "cacheBlockSizeLabelName", "cacheNumBlocksLabelName", "cacheBlockSizeSpec", "cacheNumBlocksSpec",
    "customMetrics",
}


def expect(condition, message):
    if not condition:
        failures.append(message)
    return condition


def yaml_blocks(path):
    return re.findall(r"^```yaml\n(.*?)^```", path.read_text(), flags=re.S | re.M)


def operator_constant(name):
    """A port constant of operator/src/resources/mod.rs, the operator's one source of them."""
    text = (REPO / "operator/src/resources/mod.rs").read_text()
    return int(re.search(rf"pub const {name}: i32 = (\d+);", text).group(1))


def worker_pod_labels(instance):
    text = (REPO / "operator/src/resources/mod.rs").read_text()
    app = re.search(r'pub const APP_NAME: &str = "([^"]+)";', text).group(1)
    return {
        "app.kubernetes.io/name": app,
        "app.kubernetes.io/instance": instance,
        "app.kubernetes.io/component": "worker",
    }


def only(docs, kind):
    found = [d for d in docs if d.get("kind") == kind]
    expect(len(found) == 1, f"docs/metrics.md: expected one {kind}, found {len(found)}")
    return found[0] if found else None


def check_gateway(docs):
    http_port = operator_constant("HTTP_PORT")
    metrics_port = operator_constant("METRICS_PORT")
    pool = only(docs, "InferencePool")
    service = only(docs, "Service")
    deployment = only(docs, "Deployment")
    config_map = only(docs, "ConfigMap")
    route = only(docs, "HTTPRoute")
    role = only(docs, "Role")
    if not all([pool, service, deployment, config_map, route, role]):
        return
    name, namespace = pool["metadata"]["name"], pool["metadata"]["namespace"]

    expect(pool["apiVersion"] == "inference.networking.k8s.io/v1", f"InferencePool apiVersion {pool['apiVersion']}")
    spec = pool["spec"]
    expect(spec["selector"]["matchLabels"] == worker_pod_labels(name),
           f"InferencePool selector {spec['selector']['matchLabels']} is not the worker pods' labels")
    expect(spec["targetPorts"] == [{"number": http_port}],
           f"InferencePool targets {spec['targetPorts']}, not the OpenAI port {http_port}")
    picker = spec["endpointPickerRef"]
    expect(picker["name"] == service["metadata"]["name"], "endpointPickerRef does not name the picker's Service")
    expect(picker["port"]["number"] in [p["port"] for p in service["spec"]["ports"]],
           "endpointPickerRef's port is not a port of the picker's Service")

    pod = deployment["spec"]["template"]
    expect(service["spec"]["selector"].items() <= pod["metadata"]["labels"].items(),
           "the picker's Service does not select its Deployment's pods")
    container = pod["spec"]["containers"][0]
    args = dict(a.removeprefix("--").split("=", 1) for a in container["args"])
    expect(args.get("pool-name") == name and args.get("pool-namespace") == namespace,
           f"the picker's --pool-name/--pool-namespace {args} do not name the pool")
    mount = container["volumeMounts"][0]
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    expect(volume["configMap"]["name"] == config_map["metadata"]["name"], "the picker does not mount its ConfigMap")
    config_file = args.get("config-file", "")
    key = config_file.removeprefix(mount["mountPath"].rstrip("/") + "/")
    expect(key in config_map["data"], f"--config-file {config_file} is not a key of the mounted ConfigMap")
    expect(pod["spec"]["serviceAccountName"] == role["metadata"]["name"], "the picker's ServiceAccount is not the Role's")

    config = yaml.safe_load(config_map["data"].get(key, "{}"))
    expect(config.get("kind") == "EndpointPickerConfig" and config.get("apiVersion") == "llm-d.ai/v1alpha1",
           f"picker config is {config.get('apiVersion')}/{config.get('kind')}")
    plugins = {p.get("name", p["type"]): p for p in config.get("plugins", [])}
    source = plugins.get("metrics-data-source", {}).get("parameters", {})
    expect(source.get("port") == metrics_port, f"the metrics data source scrapes port {source.get('port')}, not {metrics_port}")
    extractor = plugins.get("core-metrics-extractor", {}).get("parameters", {})
    engines = extractor.get("engineConfigs", [])
    expect(extractor.get("defaultEngine") in [e["name"] for e in engines], "defaultEngine is not among engineConfigs")
    for engine in engines:
        unknown = set(engine) - ENGINE_CONFIG_FIELDS
        expect(not unknown, f"engineConfigs fields the picker does not know: {sorted(unknown)}")
        for field in ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "cacheInfoSpec"):
            expect(str(engine.get(field, "")).startswith("latentserve_"), f"engineConfigs {field} is not a latentserve metric")
    refs = [p["pluginRef"] for profile in config.get("schedulingProfiles", []) for p in profile["plugins"]]
    for source_ref in config.get("dataLayer", {}).get("sources", []):
        refs.append(source_ref["pluginRef"])
        refs += [e["pluginRef"] for e in source_ref["extractors"]]
    for ref in refs:
        expect(ref in plugins, f"picker config refers to plugin {ref!r}, which it does not declare")

    backends = [b for rule in route["spec"]["rules"] for b in rule["backendRefs"]]
    expect(backends == [{"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": name}],
           f"the HTTPRoute's backends {backends} are not the pool")
    granted = {(g, r) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]}
    for needed in (("", "pods"), ("inference.networking.k8s.io", "inferencepools")):
        expect(needed in granted, f"the picker's Role does not grant {needed}")


def main():
    for path in sorted((REPO / "docs").glob("*.md")):
        for i, block in enumerate(yaml_blocks(path)):
            try:
                list(yaml.safe_load_all(block))
            except yaml.YAMLError as error:
                failures.append(f"{path.name}: yaml block {i + 1} does not parse: {error}")
    metrics_docs = [d for block in yaml_blocks(REPO / "docs/metrics.md") for d in yaml.safe_load_all(block) if d]
    check_gateway(metrics_docs)
    for failure in failures:
        print(f"check_docs_yaml.py: {failure}", file=sys.stderr)
    if failures:
        sys.exit(1)
    print("docs yaml blocks parse; the Gateway API Inference Extension setup is consistent")


if __name__ == "__main__":
    main()
