#!/usr/bin/env python3
"""Checks the manifests that `helm template` rendered for one documented values combination.

Usage: assert_rendered.py SCENARIO RENDERED.yaml

SCENARIO is `default`, the name of a file in tests/helm/values/ without `.yaml`, or
`monitoring-without-api` (monitoring values on a cluster without the prometheus-operator API).
Every scenario also runs the checks that hold for any values (security defaults, RBAC contract,
selectors). Exits non-zero with one line per failed expectation.
"""

import json
import re
import sys
from pathlib import Path

import yaml

RELEASE = "latentserve"
NAMESPACE = "latentserve-system"
REPO = Path(__file__).resolve().parents[2]

# The API access the operator uses. operator/rbac/clusterrole.yaml (the role the operator's
# integration tests run with) is the authoritative list: when it exists, the chart must grant
# exactly what it grants; this copy of it (as of the operator's first commit) is the fallback. The Lease rule is separate: the chart grants it in the
# operator's own namespace only, and only with leader election.
CONTRACT_RULES = {
    ("latentserve.io", "modeldeployments"): {"get", "list", "watch"},
    ("latentserve.io", "modeldeployments/status"): {"get", "patch"},
    ("apps", "statefulsets"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "services"): {"get", "list", "watch", "create", "patch"},
    ("", "configmaps"): {"get", "list", "watch", "create", "patch"},
    ("", "pods"): {"get", "list", "watch", "delete"},
    ("policy", "poddisruptionbudgets"): {"get", "create", "patch", "delete"},
    ("networking.k8s.io", "networkpolicies"): {"get", "create", "patch"},
    ("events.k8s.io", "events"): {"create", "patch"},
}
LEASE_RULES = {("coordination.k8s.io", "leases"): {"get", "create", "update"}}

# Metric names the workers and the operator export (issue 7); the dashboard and the alerts may
# use only these (histograms also as _bucket/_count/_sum).
WORKER_METRICS = {
    "requests_running", "requests_waiting", "kv_cache_usage_ratio", "kv_cache_blocks",
    "kv_cache_bytes_per_token", "prefix_cache_queries_total", "prefix_cache_hits_total",
    "preemptions_total", "prompt_tokens_total", "generation_tokens_total",
    "request_success_total", "time_to_first_token_seconds", "inter_token_latency_seconds",
    "e2e_request_latency_seconds", "request_queue_time_seconds", "batch_size",
    "step_duration_seconds", "expert_tokens_total", "expert_rpc_seconds",
    "expert_rpc_errors_total", "expert_dispatch_bytes_total",
    # Expert placement and redundancy (issue 20).
    "expert_retries_total", "expert_peers_usable", "expert_group_degraded",
    "expert_placement_info",
}
OPERATOR_METRICS = {
    "operator_reconciles_total", "operator_reconcile_errors_total",
    "operator_reconcile_duration_seconds", "operator_deployments", "operator_leader",
    # The autoscaler's (issue 19).
    "operator_autoscaler_desired_groups", "operator_autoscaler_current_groups",
    "operator_autoscaler_signal_value", "operator_autoscaler_decisions_total",
    "operator_autoscaler_signal_errors_total",
    # The expert placement loop (issue 20).
    "operator_expert_placement_version", "operator_expert_imbalance",
    "operator_expert_rebalances_total", "operator_degraded_groups",
}
# The request router's families (issue 16; router/src/metrics.rs, docs/metrics.md).
ROUTER_METRICS = {
    "router_requests_total", "router_retries_total", "router_prefix_match_tokens",
    "router_queue_seconds", "router_upstream_seconds", "router_endpoints",
    "router_in_flight_requests",
    # Holding at zero and the per-group signal (issue 19).
    "router_held_requests", "router_hold_rejected_total", "router_cold_start_seconds",
    "router_group_in_flight_requests", "router_group_queued_prompt_tokens",
    "router_group_cache_utilization",
}
KNOWN_METRICS = {"latentserve_" + m for m in WORKER_METRICS | OPERATOR_METRICS | ROUTER_METRICS}
EXPECTED_ALERTS = {
    "LatentServeModelDeploymentNotAvailable", "LatentServeModelDeploymentDegraded",
    "LatentServeReconcileErrors", "LatentServeOperatorDown", "LatentServeOperatorNoLeader",
    "LatentServeQueueGrowing", "LatentServeExpertGroupDegraded",
    "LatentServeKVCacheFull", "LatentServeExpertRPCErrors",
    "LatentServeRequestsHeld", "LatentServeAutoscalerBlind",
}
CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding"}
# The labels the operator puts on every worker pod (operator/src/resources/mod.rs), and on every
# router pod.
WORKER_POD_LABELS = {
    "app.kubernetes.io/name": "latentserve-worker",
    "app.kubernetes.io/component": "worker",
    "app.kubernetes.io/managed-by": "latentserve-operator",
}
ROUTER_POD_LABELS = {**WORKER_POD_LABELS, "app.kubernetes.io/component": "router"}

failures = []


def expect(condition, message):
    if not condition:
        failures.append(message)
    return condition


def objects_of(docs, kind, name=None):
    return [
        d for d in docs
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def one(docs, kind, name):
    found = objects_of(docs, kind, name)
    expect(len(found) == 1, f"expected exactly one {kind}/{name}, found {len(found)}")
    return found[0] if found else None


def rules_as_map(rules):
    """(apiGroup, resource) -> verbs, so that equal grants compare equal however they are grouped."""
    out = {}
    for rule in rules:
        expect(not rule.get("resourceNames"), f"unexpected resourceNames in rule {rule}")
        for group in rule.get("apiGroups", []):
            for resource in rule.get("resources", []):
                out.setdefault((group, resource), set()).update(rule.get("verbs", []))
    return out


def rules_diff(granted, wanted):
    """The grants one side has and the other lacks, as readable 'group/resource verb' strings."""
    def flat(rules):
        return {f"{g or 'core'}/{r} {v}" for (g, r), verbs in rules.items() for v in verbs}
    extra, missing = sorted(flat(granted) - flat(wanted)), sorted(flat(wanted) - flat(granted))
    return f"grants too much: {extra}; lacks: {missing}"


def operator_container(deployment):
    containers = deployment["spec"]["template"]["spec"]["containers"]
    expect(len(containers) == 1, f"operator pod has {len(containers)} containers, expected 1")
    return containers[0]


def check_common(docs):
    """Expectations that hold for every values combination."""
    names = set()
    for d in docs:
        key = (d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"])
        expect(key not in names, f"duplicate object {key}")
        names.add(key)
        if d["kind"] in CLUSTER_SCOPED:
            expect("namespace" not in d["metadata"], f"cluster-scoped {key} has a namespace")
        else:
            expect(d["metadata"].get("namespace"), f"namespaced {key} has no explicit namespace")
        labels = d["metadata"].get("labels", {})
        expect(labels.get("app.kubernetes.io/instance") == RELEASE, f"{key} lacks the instance label")
        expect(labels.get("app.kubernetes.io/managed-by") == "Helm", f"{key} lacks managed-by: Helm")

    deployments = objects_of(docs, "Deployment")
    if not expect(len(deployments) == 1, f"expected one Deployment, found {len(deployments)}"):
        return
    deployment = deployments[0]
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    expect(selector.items() <= pod_labels.items(), "Deployment selector does not match its pods")
    for svc in objects_of(docs, "Service"):
        expect(svc["spec"]["selector"].items() <= pod_labels.items(),
               f"Service {svc['metadata']['name']} does not select the operator pods")
    for pdb in objects_of(docs, "PodDisruptionBudget"):
        expect(pdb["spec"]["selector"]["matchLabels"] == selector, "PDB selector differs from the Deployment's")

    spec = pod["spec"]
    psc = spec.get("securityContext", {})
    expect(psc.get("runAsNonRoot") is True, "pod securityContext.runAsNonRoot is not true")
    expect(psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", "pod seccompProfile is not RuntimeDefault")
    container = operator_container(deployment)
    csc = container.get("securityContext", {})
    expect(csc.get("readOnlyRootFilesystem") is True, "container root filesystem is writable")
    expect(csc.get("allowPrivilegeEscalation") is False, "container allows privilege escalation")
    expect(csc.get("capabilities", {}).get("drop") == ["ALL"], "container does not drop ALL capabilities")
    expect("add" not in csc.get("capabilities", {}), "container adds capabilities")
    expect(container.get("resources", {}).get("requests"), "container has no resource requests")
    expect(container.get("resources", {}).get("limits", {}).get("memory"), "container has no memory limit")

    args = container["args"]
    expect(args[0] == "run", f"operator args do not start with the run subcommand: {args}")
    port = container["ports"][0]["containerPort"]
    expect(f"--metrics-addr=0.0.0.0:{port}" in args, f"--metrics-addr does not match the container port {port}")
    expect(container["livenessProbe"]["httpGet"]["path"] == "/healthz", "liveness probe is not /healthz")
    expect(container["readinessProbe"]["httpGet"]["path"] == "/readyz", "readiness probe is not /readyz")
    env = {e["name"]: e for e in container.get("env", [])}
    expect(env.get("POD_NAMESPACE", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace",
           "POD_NAMESPACE is not the downward-API namespace")

    leader = "--leader-election" in args
    strategy = deployment["spec"]["strategy"]["type"]
    expect(strategy == ("RollingUpdate" if leader else "Recreate"),
           f"strategy {strategy} with leader election {'on' if leader else 'off'}")
    lease_roles = [r for r in objects_of(docs, "Role") if rules_as_map(r["rules"]).keys() & LEASE_RULES.keys()]
    if leader:
        if expect(len(lease_roles) == 1, "leader election without a Lease Role"):
            role = lease_roles[0]
            expect(role["metadata"]["namespace"] == NAMESPACE, "the Lease Role is not in the operator's namespace")
            lease = rules_as_map(role["rules"])
            expect(lease == LEASE_RULES, f"Lease Role: {rules_diff(lease, LEASE_RULES)}")
            check_binding(docs, "RoleBinding", role, spec["serviceAccountName"])
    else:
        expect(not lease_roles, "Lease access granted without leader election")

    # Operator RBAC: the same rules whether cluster-wide or in the watched namespace.
    watch = next((a.split("=", 1)[1] for a in args if a.startswith("--namespace=")), None)
    operator_roles = [
        r for r in objects_of(docs, "ClusterRole") + objects_of(docs, "Role")
        if ("apps", "statefulsets") in rules_as_map(r["rules"])
    ]
    if expect(len(operator_roles) == 1, f"expected one operator (Cluster)Role, found {len(operator_roles)}"):
        role = operator_roles[0]
        granted = rules_as_map(role["rules"])
        expect(granted == OPERATOR_RULES,
               f"operator rules differ from {OPERATOR_RULES_SOURCE}: {rules_diff(granted, OPERATOR_RULES)}")
        if watch:
            expect(role["kind"] == "Role" and role["metadata"]["namespace"] == watch,
                   f"with --namespace={watch} the operator should get a Role in {watch}, got {role['kind']}")
            check_binding(docs, "RoleBinding", role, spec["serviceAccountName"])
        else:
            expect(role["kind"] == "ClusterRole", "without a watch namespace the operator needs a ClusterRole")
            check_binding(docs, "ClusterRoleBinding", role, spec["serviceAccountName"])

    sa_objects = objects_of(docs, "ServiceAccount")
    if sa_objects:
        expect([s["metadata"]["name"] for s in sa_objects] == [spec["serviceAccountName"]],
               "the ServiceAccount created is not the one the pods use")


def check_binding(docs, kind, role, service_account):
    bindings = [
        b for b in objects_of(docs, kind)
        if b["roleRef"]["name"] == role["metadata"]["name"] and b["roleRef"]["kind"] == role["kind"]
    ]
    if not expect(len(bindings) == 1, f"{role['kind']}/{role['metadata']['name']} has {len(bindings)} {kind}s"):
        return
    binding = bindings[0]
    if kind == "RoleBinding":
        expect(binding["metadata"]["namespace"] == role["metadata"]["namespace"],
               f"RoleBinding for {role['metadata']['name']} is not in the Role's namespace")
    expect(binding["subjects"] == [{"kind": "ServiceAccount", "name": service_account, "namespace": NAMESPACE}],
           f"{kind} {binding['metadata']['name']} binds {binding['subjects']}")


def expected_operator_rules():
    """(rules, where they come from): the operator's own RBAC file without the Lease, else the contract."""
    path = REPO / "operator" / "rbac" / "clusterrole.yaml"
    if not path.exists():
        return CONTRACT_RULES, "the issue's contract"
    wanted = {}
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") in ("ClusterRole", "Role"):
            for key, verbs in rules_as_map(doc["rules"]).items():
                if key not in LEASE_RULES:
                    wanted.setdefault(key, set()).update(verbs)
    return wanted, str(path.relative_to(REPO))


OPERATOR_RULES, OPERATOR_RULES_SOURCE = expected_operator_rules()


def args_of(docs):
    return operator_container(objects_of(docs, "Deployment")[0])["args"]


def kinds(docs):
    return sorted(d["kind"] for d in docs)


def metric_names(text):
    names = set(re.findall(r"\blatentserve_[a-z0-9_]+", text))
    return {re.sub(r"_(bucket|count|sum)$", "", n) for n in names}


def scenario_default(docs):
    expect(kinds(docs) == sorted(["ServiceAccount", "ClusterRole", "ClusterRole", "ClusterRole",
                                  "ClusterRoleBinding", "Service", "Deployment"]),
           f"default install renders {kinds(docs)}")
    deployment = one(docs, "Deployment", RELEASE)
    if deployment:
        expect(deployment["spec"]["replicas"] == 1, "default replicas is not 1")
        args = args_of(docs)
        expect(args == ["run", "--metrics-addr=0.0.0.0:8080", "--log-format=json",
                        "--worker-image=latentserve-worker:0.1.0",
                        "--router-image=latentserve-router:0.1.0",
                        "--allowed-host-path-prefixes=/srv/models/",
                        "--allowed-images=latentserve-worker"], f"default args {args}")
        container = operator_container(deployment)
        expect(container["image"] == "latentserve-operator:0.1.0", f"default image {container['image']}")
        expect("imagePullSecrets" not in deployment["spec"]["template"]["spec"], "pull secrets without values")
    for name in (f"{RELEASE}-edit", f"{RELEASE}-view"):
        role = one(docs, "ClusterRole", name)
        if role:
            expect(any(k.startswith("rbac.authorization.k8s.io/aggregate-to-") for k in role["metadata"]["labels"]),
                   f"{name} is not aggregated into the built-in roles")
    one(docs, "Service", f"{RELEASE}-metrics")


def scenario_policy(docs):
    args = args_of(docs)
    for wanted in ("--allowed-host-path-prefixes=/srv/models/,/data/weights/",
                   "--allowed-images=latentserve-worker,registry.example/ml/",
                   "--metrics-namespace-selector=kubernetes.io/metadata.name=monitoring,team=observability"):
        expect(wanted in args, f"{wanted} missing from {args}")


def scenario_watch_namespace(docs):
    expect("--namespace=models" in args_of(docs), "--namespace=models missing")
    expect(not objects_of(docs, "ClusterRoleBinding"), "a ClusterRoleBinding is rendered for a single watched namespace")
    one(docs, "Role", RELEASE)
    one(docs, "RoleBinding", RELEASE)


def scenario_high_availability(docs):
    deployment = one(docs, "Deployment", RELEASE)
    if deployment:
        expect(deployment["spec"]["replicas"] == 2, "replicas is not 2")
        expect(deployment["spec"]["strategy"].get("rollingUpdate") == {"maxSurge": 1, "maxUnavailable": 0},
               f"rolling update {deployment['spec']['strategy']}")
        expect("topologySpreadConstraints" in deployment["spec"]["template"]["spec"], "topology spread not passed through")
    expect("--leader-election" in args_of(docs), "--leader-election missing with 2 replicas")
    pdb = one(docs, "PodDisruptionBudget", RELEASE)
    if pdb:
        expect(pdb["apiVersion"] == "policy/v1", f"PDB apiVersion {pdb['apiVersion']} where policy/v1 is served")
        expect(pdb["spec"].get("maxUnavailable") == 1 and "minAvailable" not in pdb["spec"],
               f"PDB spec {pdb['spec']}")


def scenario_leader_election_single(docs):
    deployment = one(docs, "Deployment", RELEASE)
    if deployment:
        expect(deployment["spec"]["replicas"] == 1, "replicas is not 1")
    expect("--leader-election" in args_of(docs), "leaderElection.enabled did not turn on --leader-election")
    pdb = one(docs, "PodDisruptionBudget", RELEASE)
    if pdb:
        expect(pdb["spec"].get("minAvailable") == 1 and "maxUnavailable" not in pdb["spec"], f"PDB spec {pdb['spec']}")


def scenario_monitoring(docs):
    monitor = one(docs, "ServiceMonitor", RELEASE)
    service = one(docs, "Service", f"{RELEASE}-metrics")
    if monitor and service:
        expect(monitor["metadata"]["labels"].get("release") == "kube-prometheus-stack", "ServiceMonitor labels not passed")
        expect(monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items(),
               "ServiceMonitor does not select the metrics Service")
        expect(monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"],
               "ServiceMonitor scrapes a port the Service does not have")
    pod_monitor = one(docs, "PodMonitor", f"{RELEASE}-workers")
    if pod_monitor:
        expect(pod_monitor["spec"]["namespaceSelector"] == {"any": True}, "PodMonitor does not look in every namespace")
        expect(pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics", "PodMonitor port")
        expect(pod_monitor["spec"]["selector"]["matchLabels"] == WORKER_POD_LABELS,
               f"PodMonitor selects {pod_monitor['spec']['selector']['matchLabels']}")
    router_monitor = one(docs, "PodMonitor", f"{RELEASE}-routers")
    if router_monitor:
        expect(router_monitor["spec"]["namespaceSelector"] == {"any": True},
               "router PodMonitor does not look in every namespace")
        expect(router_monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics", "router PodMonitor port")
        expect(router_monitor["spec"]["selector"]["matchLabels"] == ROUTER_POD_LABELS,
               f"router PodMonitor selects {router_monitor['spec']['selector']['matchLabels']}")

    rule = one(docs, "PrometheusRule", RELEASE)
    used = set()
    if rule:
        alerts = {}
        for group in rule["spec"]["groups"]:
            for r in group["rules"]:
                alerts[r["alert"]] = r
        expect(set(alerts) == EXPECTED_ALERTS, f"alerts {sorted(alerts)}")
        for name, r in alerts.items():
            expect(r["labels"].get("severity") in ("critical", "warning"), f"{name} has no severity")
            expect(r["labels"].get("team") == "ml-platform", f"{name} lacks the configured alertLabels")
            expect(r["annotations"].get("summary") and r["annotations"].get("description"), f"{name} lacks text")
            expect("{{ $labels" in r["annotations"]["description"] or "{{ $value" in r["annotations"]["description"]
                   or name in ("LatentServeOperatorDown", "LatentServeOperatorNoLeader"),
                   f"{name}: description does not name what fired")
            used |= metric_names(r["expr"])
        down = alerts.get("LatentServeOperatorDown", {}).get("expr", "")
        expect(f'job="{RELEASE}-metrics"' in down and f'namespace="{NAMESPACE}"' in down,
               f"OperatorDown does not match the ServiceMonitor's job: {down}")

    dashboard_cm = one(docs, "ConfigMap", f"{RELEASE}-dashboard")
    if dashboard_cm:
        meta = dashboard_cm["metadata"]
        expect(meta["namespace"] == "monitoring", "dashboard.namespace not honoured")
        expect(meta["labels"].get("grafana_dashboard") == "1", "dashboard lacks grafana_dashboard: \"1\"")
        expect(meta.get("annotations", {}).get("grafana_folder") == "LLM", "dashboard annotations not passed")
        dashboard = json.loads(dashboard_cm["data"]["latentserve.json"])
        titles = {p["title"] for p in dashboard["panels"]}
        for wanted in ("Time to first token", "Inter-token latency", "Token throughput", "Queue time",
                       "KV cache usage", "Preemptions", "Expert load in layer $layer",
                       "Expert RPC latency by peer", "Routed to a cached prefix",
                       "Router overhead and upstream latency", "Serving groups: wanted and serving",
                       "Held requests and cold starts"):
            expect(wanted in titles, f"dashboard lacks the panel {wanted!r}")
        ids = [p["id"] for p in dashboard["panels"]]
        expect(len(ids) == len(set(ids)), "dashboard panel ids are not unique")
        for p in dashboard["panels"]:
            for t in p.get("targets", []):
                used |= metric_names(t["expr"])
        for var in dashboard["templating"]["list"]:
            used |= metric_names(json.dumps(var.get("query", "")))
    unknown = used - KNOWN_METRICS
    expect(not unknown, f"dashboard/alerts use metrics nobody exports: {sorted(unknown)}")
    expect(KNOWN_METRICS <= used, f"exported metrics that no panel or alert shows: {sorted(KNOWN_METRICS - used)}")


def scenario_monitoring_without_api(docs):
    for kind in ("ServiceMonitor", "PodMonitor", "PrometheusRule"):
        expect(not objects_of(docs, kind), f"{kind} rendered where monitoring.coreos.com/v1 is not served")
    one(docs, "ConfigMap", f"{RELEASE}-dashboard")


def scenario_customized(docs):
    deployment = one(docs, "Deployment", RELEASE)
    if not deployment:
        return
    spec = deployment["spec"]["template"]["spec"]
    container = operator_container(deployment)
    expect(container["image"] == "registry.example/latentserve/latentserve-operator:0.1.0-rc1", f"image {container['image']}")
    expect(container["imagePullPolicy"] == "Always", "pullPolicy not passed")
    expect(spec.get("imagePullSecrets") == [{"name": "registry-credentials"}], f"pull secrets {spec.get('imagePullSecrets')}")
    expect(spec["serviceAccountName"] == "platform-operator", "existing ServiceAccount not used")
    expect(not objects_of(docs, "ServiceAccount"), "a ServiceAccount is created although serviceAccount.create is false")
    args = container["args"]
    for arg in ("--log-format=text", "--example-flag=1", "--metrics-addr=0.0.0.0:9090",
                "--worker-image=registry.example/latentserve/latentserve-worker-cuda:0.1.0-rc1",
                "--router-image=registry.example/latentserve/latentserve-router:0.1.0-rc1"):
        expect(arg in args, f"{arg} missing from {args}")
    expect(args[-1] == "--example-flag=1", "extraArgs do not come last (so they can override)")
    env = {e["name"]: e for e in container["env"]}
    expect(env.get("HTTPS_PROXY", {}).get("value") == "http://proxy.internal:3128", "extraEnv value not passed")
    expect(env.get("TOKEN_FROM_SECRET", {}).get("valueFrom", {}).get("secretKeyRef", {}).get("name") == "some-secret",
           "extraEnv valueFrom not passed")
    expect(env.get("RUST_LOG", {}).get("value") == "latentserve_operator=debug,kube=info", "logLevel not passed")
    expect(spec.get("nodeSelector") == {"node-role.kubernetes.io/control-plane-workloads": "true"}, "nodeSelector")
    expect(spec.get("tolerations", [{}])[0].get("key") == "dedicated", "tolerations")
    expect(spec.get("priorityClassName") == "system-cluster-critical", "priorityClassName")
    meta = deployment["spec"]["template"]["metadata"]
    expect(meta.get("annotations", {}).get("example.com/owner") == "ml-platform", "podAnnotations")
    expect(meta["labels"].get("team") == "ml-platform", "podLabels")
    expect(not objects_of(docs, "ClusterRole", f"{RELEASE}-edit"), "aggregated roles rendered although disabled")
    service = one(docs, "Service", f"{RELEASE}-metrics")
    if service:
        expect(service["spec"]["ports"][0]["port"] == 9090, "metrics Service port does not follow metrics.port")


SCENARIOS = {
    "default": scenario_default,
    "watch-namespace": scenario_watch_namespace,
    "policy": scenario_policy,
    "high-availability": scenario_high_availability,
    "leader-election-single": scenario_leader_election_single,
    "monitoring": scenario_monitoring,
    "monitoring-without-api": scenario_monitoring_without_api,
    "customized": scenario_customized,
}


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in SCENARIOS:
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(SCENARIOS)}}} RENDERED.yaml")
    scenario, path = sys.argv[1], sys.argv[2]
    docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    check_common(docs)
    SCENARIOS[scenario](docs)
    if failures:
        for f in failures:
            print(f"{scenario}: {f}", file=sys.stderr)
        sys.exit(1)
    print(f"{scenario}: {len(docs)} objects as expected")


if __name__ == "__main__":
    main()
