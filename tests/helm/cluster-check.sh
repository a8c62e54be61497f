#!/usr/bin/env bash
# Checks the Helm chart against a real API server: the manifests of every documented values
# combination pass a server-side dry run; `helm install` creates the release and the CRD, and the
# operator's ServiceAccount can do exactly what the operator needs (RBAC evaluated by the server);
# the examples pass a server-side dry run against the installed CRD; `helm upgrade` to two
# replicas turns on leader election and a PodDisruptionBudget in the API version the server
# serves; `helm upgrade` to one watched namespace swaps the ClusterRole for a Role; `helm
# uninstall` removes every object of the release and keeps the CRD.
#
# Runs against the test control plane of tests/k8s/up.sh (its admin kubeconfig, from
# LATENTSERVE_TEST_KUBECONFIG, default /tmp/latentserve-k8s/kubeconfig; never $KUBECONFIG, so
# that it cannot touch a real cluster). No scheduler or kubelet is needed: nothing waits for
# pods. It uses its own release and namespaces (helm-check*), so it can share the control plane
# with other tests. Needs what fetch-helm.sh needs; where no kubectl is installed, fetch-helm.sh
# provides one. Takes ~45 s (mostly the ~80 `kubectl auth can-i` calls).
set -euo pipefail
cd "$(dirname "$0")/../.."

export KUBECONFIG=${LATENTSERVE_TEST_KUBECONFIG:-/tmp/latentserve-k8s/kubeconfig}
# Without a running test control plane these checks cannot run: under CI that is a failure,
# elsewhere a visible notice (start one with tests/k8s/build.sh && tests/k8s/up.sh).
if ! LATENTSERVE_K8S_DIR=$(dirname "$KUBECONFIG") tests/k8s/status.sh; then
  if [ "${CI:-}" = true ]; then
    echo "cluster-check: FAILED: no test control plane answers at $KUBECONFIG (CI=true)" >&2
    exit 1
  fi
  echo "cluster-check: SKIPPED the Helm cluster checks: no test control plane answers at $KUBECONFIG (run tests/k8s/up.sh)" >&2
  exit 0
fi
HELM=$(tests/helm/fetch-helm.sh)
if ! command -v kubectl >/dev/null; then
  PATH=$(dirname "$(tests/helm/fetch-helm.sh kubectl)"):$PATH
fi
CHART=charts/latentserve
RELEASE=helm-check
NS=helm-check
WATCHED=helm-check-models
FULLNAME=$RELEASE-latentserve
SA=system:serviceaccount:$NS:$FULLNAME
CRD=modeldeployments.latentserve.io
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

fail() { echo "cluster-check: $*" >&2; exit 1; }
step() { echo "--- $*"; }
kubectl version >/dev/null || fail "no API server reachable through $KUBECONFIG"

# can SA VERB RESOURCE [kubectl auth can-i flags]: the server must allow it.
can() {
  local verb=$1 resource=$2; shift 2
  [ "$(kubectl auth can-i "$verb" "$resource" --as="$SA" "$@" 2>/dev/null || true)" = yes ] ||
    fail "the operator's ServiceAccount cannot $verb $resource $* (it needs to)"
}
# cannot SA VERB RESOURCE [flags]: the server must refuse it (least privilege).
cannot() {
  local verb=$1 resource=$2; shift 2
  [ "$(kubectl auth can-i "$verb" "$resource" --as="$SA" "$@" 2>/dev/null || true)" = no ] ||
    fail "the operator's ServiceAccount can $verb $resource $* (it must not)"
}
release_objects() { # everything labelled with the release, in its namespaces and cluster-wide
  kubectl get deployments,services,serviceaccounts,configmaps,roles,rolebindings,poddisruptionbudgets \
    -n "$1" -l "app.kubernetes.io/instance=$RELEASE" -o name
  kubectl get clusterroles,clusterrolebindings -l "app.kubernetes.io/instance=$RELEASE" -o name
}

if "$HELM" status "$RELEASE" -n "$NS" >/dev/null 2>&1; then
  step "removing the release left by an earlier run"
  "$HELM" uninstall "$RELEASE" -n "$NS" --wait >/dev/null
fi
for ns in "$NS" "$WATCHED" monitoring; do
  kubectl get namespace "$ns" >/dev/null 2>&1 || kubectl create namespace "$ns" >/dev/null
done
has_crd=""
ls "$CHART"/crds/*.yaml >/dev/null 2>&1 && has_crd=yes

step "server-side dry run of the CRD and of every values combination"
if [ -n "$has_crd" ]; then
  # Apart from the templates, as a plain create without client-side validation: before 1.25
  # neither kubectl's validation nor server-side apply knows CEL rules (x-kubernetes-validations)
  # and both reject them, while a create (what `helm install` does with crds/) has the server
  # drop them. A create of the installed CRD would only answer AlreadyExists (and other tests
  # may be using it), so the dry run creates the same definition under a group of its own:
  # the server validates every part of it (names, versions, schema, printer columns) all the same.
  mkdir "$work/crds"
  python3 - "$CHART/crds" "$work/crds" <<'PY' || fail "cannot rewrite the CRDs for the dry run"
import pathlib, sys, yaml
for source in sorted(pathlib.Path(sys.argv[1]).glob("*.yaml")):
    crd = yaml.safe_load(source.read_text())
    crd["spec"]["group"] = "helm-check-dry-run." + crd["spec"]["group"]
    crd["metadata"]["name"] = crd["spec"]["names"]["plural"] + "." + crd["spec"]["group"]
    (pathlib.Path(sys.argv[2]) / source.name).write_text(yaml.safe_dump(crd))
PY
  kubectl create --dry-run=server --validate=false -f "$work/crds/" > "$work/dry-run.log" 2>&1 ||
    fail "the API server rejected the CRD: $(cat "$work/dry-run.log")"
  grep -q "created (server dry run)" "$work/dry-run.log" ||
    fail "no CRD was created in the dry run: $(cat "$work/dry-run.log")"
  echo "crds: $(tr '\n' ' ' < "$work/dry-run.log")"
fi
for values in default tests/helm/values/*.yaml; do
  args=()
  [ "$values" = default ] || args=(-f "$values")
  [ "$(basename "$values")" = watch-namespace.yaml ] && args+=(--set "watchNamespace=$WATCHED")
  # --validate renders with the server's API versions (policy/v1beta1 PDBs on 1.20, no
  # prometheus-operator kinds where that API is absent), as `helm install` would.
  "$HELM" template "$RELEASE" "$CHART" -n "$NS" --validate "${args[@]}" > "$work/manifest.yaml"
  kubectl apply --server-side --dry-run=server --field-manager=helm-check -f "$work/manifest.yaml" > "$work/dry-run.log" ||
    fail "the API server rejected the manifests for $values: $(cat "$work/dry-run.log")"
  echo "$(basename "$values" .yaml): $(grep -c . "$work/dry-run.log") objects accepted"
done

step "helm install"
"$HELM" install "$RELEASE" "$CHART" -n "$NS" > "$work/install.log" || fail "helm install failed: $(cat "$work/install.log")"
grep -q "kubectl -n $NS rollout status deployment/$FULLNAME" "$work/install.log" || fail "NOTES.txt did not render the next steps"
kubectl get -n "$NS" "deployment/$FULLNAME" "serviceaccount/$FULLNAME" "service/$FULLNAME-metrics" >/dev/null
kubectl get "clusterrole/$FULLNAME" "clusterrolebinding/$FULLNAME" >/dev/null
if [ -n "$has_crd" ]; then
  kubectl wait --for condition=established --timeout=60s "crd/$CRD" >/dev/null || fail "$CRD is not Established"
else
  echo "no CRD in $CHART/crds/ yet: CRD and example checks skipped"
fi

step "the operator's RBAC, as the API server evaluates it"
# Every grant the operator needs (operator/rbac/clusterrole.yaml, else the issue's list), as
# "group resource verb" lines; the Lease is checked with leader election below.
needed=$(python3 -c 'import sys; sys.path.insert(0, "tests/helm"); import assert_rendered as a
for (group, resource), verbs in sorted(a.OPERATOR_RULES.items()):
    for verb in sorted(verbs):
        print(group or "core", resource, verb)')
# Cluster-wide grants: the release's namespace and one other stand for all.
for ns in "$NS" default; do
  while read -r group resource verb; do
    name=${resource%%/*}
    [ "$group" = core ] || name=$name.$group
    if [ "$resource" != "${resource#*/}" ]; then
      can "$verb" "$name" --subresource="${resource#*/}" -n "$ns"
    else
      can "$verb" "$name" -n "$ns"
    fi
  done <<< "$needed"
  # Least privilege: what the operator must never be able to do.
  # Pods: deleted when their group moves to a new expert placement; never created or changed.
  cannot create pods -n "$ns"
  cannot patch pods -n "$ns"
  cannot update pods -n "$ns"
  # Secrets: read, create and patch for the expert exchange's token; never delete or update.
  cannot delete secrets -n "$ns"
  cannot update secrets -n "$ns"
  cannot create "$CRD" -n "$ns"
  cannot delete "$CRD" -n "$ns"
  cannot create leases.coordination.k8s.io -n "$ns"
  # It holds endpointslices read access only to grant it to the routers.
  cannot create endpointslices.discovery.k8s.io -n "$ns"
  cannot escalate roles.rbac.authorization.k8s.io -n "$ns"
  cannot bind roles.rbac.authorization.k8s.io -n "$ns"
done
cannot create clusterroles.rbac.authorization.k8s.io
cannot list nodes
echo "$(grep -c . <<< "$needed") grants checked in 2 namespaces"

if [ -n "$has_crd" ]; then
  step "server-side dry run of the examples against the installed CRD"
  for example in examples/*.yaml; do
    [ "$(basename "$example")" = kind-cluster.yaml ] && continue
    kubectl apply --dry-run=server -n "$WATCHED" -f "$example" -o json > "$work/example.json" 2> "$work/example.log" ||
      fail "$example is rejected by the API server: $(cat "$work/example.log")"
    # The schema prunes unknown fields silently: every field an example sets must come back.
    python3 - "$example" "$work/example.json" <<'PY' || fail "$example sets fields the CRD does not know"
import json, sys, yaml
sent = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
back = json.load(open(sys.argv[2]))
back = {(o["kind"], o["metadata"]["name"]): o for o in back.get("items", [back])}
def missing(a, b, path):
    if isinstance(a, dict):
        return [m for k, v in a.items() for m in
                (missing(v, b.get(k), f"{path}.{k}") if isinstance(b, dict) else [f"{path}.{k}"])]
    return [] if a == b or (isinstance(a, (int, float)) and str(a) == str(b)) else [path]
lost = [m for d in sent if d["kind"] == "ModelDeployment"
        for m in missing(d["spec"], back[(d["kind"], d["metadata"]["name"])]["spec"], f"{d['metadata']['name']}: spec")]
for m in lost:
    print(f"dropped or changed by the API server: {m}", file=sys.stderr)
sys.exit(1 if lost else 0)
PY
    echo "$(basename "$example"): accepted, every field kept"
  done
fi

step "helm upgrade to two replicas: leader election and a PodDisruptionBudget"
"$HELM" upgrade "$RELEASE" "$CHART" -n "$NS" -f tests/helm/values/high-availability.yaml >/dev/null
[ "$(kubectl get -n "$NS" "deployment/$FULLNAME" -o jsonpath='{.spec.replicas}')" = 2 ] || fail "replicas did not become 2"
kubectl get -n "$NS" "deployment/$FULLNAME" -o jsonpath='{.spec.template.spec.containers[0].args}' | grep -q -- --leader-election ||
  fail "--leader-election is not set after the upgrade"
for verb in get create update; do can "$verb" leases.coordination.k8s.io -n "$NS"; done
cannot delete leases.coordination.k8s.io -n "$NS"
cannot create leases.coordination.k8s.io -n default
pdb_version=$("$HELM" get manifest "$RELEASE" -n "$NS" | grep -B1 '^kind: PodDisruptionBudget' | sed -n 's/^apiVersion: //p')
served=$(kubectl api-versions | grep -qx policy/v1 && echo policy/v1 || echo policy/v1beta1)
[ "$pdb_version" = "$served" ] || fail "the PDB is $pdb_version but the server's newest is $served"
kubectl get -n "$NS" "poddisruptionbudget/$FULLNAME" >/dev/null
echo "PodDisruptionBudget as $pdb_version"

step "helm upgrade to one watched namespace: Role + RoleBinding instead of the ClusterRole"
"$HELM" upgrade "$RELEASE" "$CHART" -n "$NS" --set "watchNamespace=$WATCHED" >/dev/null
kubectl get "clusterrolebinding/$FULLNAME" >/dev/null 2>&1 && fail "the ClusterRoleBinding survived the switch to a watched namespace"
kubectl get -n "$WATCHED" "role/$FULLNAME" "rolebinding/$FULLNAME" >/dev/null
can list "$CRD" -n "$WATCHED"
can create statefulsets.apps -n "$WATCHED"
cannot list "$CRD" -n default
cannot create statefulsets.apps -n default
cannot list "$CRD" --all-namespaces
kubectl get -n "$NS" "deployment/$FULLNAME" -o jsonpath='{.spec.template.spec.containers[0].args}' | grep -q -- "--namespace=$WATCHED" ||
  fail "--namespace=$WATCHED is not set after the upgrade"

step "helm uninstall"
"$HELM" uninstall "$RELEASE" -n "$NS" --wait >/dev/null
left=$( { release_objects "$NS"; release_objects "$WATCHED"; } | sort -u)
[ -z "$left" ] || fail "objects left after helm uninstall: $left"
if [ -n "$has_crd" ]; then
  # Helm never deletes CRDs (that would delete every ModelDeployment); see docs/install.md.
  kubectl get "crd/$CRD" >/dev/null || fail "helm uninstall removed the CRD"
fi
echo "helm cluster checks passed"
