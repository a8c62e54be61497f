#!/usr/bin/env bash
# The chart ships the CRD in charts/latentserve/crds/ (Helm installs that folder before the
# templates). It must be byte-identical to the generated top-level crds/ (which the operator's own
# test keeps equal to `latentserve-operator crd`). Fix a difference with tests/helm/sync-crds.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."

top=$(cd crds 2>/dev/null && ls -1 -- *.yaml 2>/dev/null || true)
chart=$(cd charts/latentserve/crds 2>/dev/null && ls -1 -- *.yaml 2>/dev/null || true)
if [ "$top" != "$chart" ]; then
  echo "check-crds: crds/ has [$(echo $top)] but charts/latentserve/crds/ has [$(echo $chart)]; run tests/helm/sync-crds.sh" >&2
  exit 1
fi
for file in $top; do
  if ! cmp -s "crds/$file" "charts/latentserve/crds/$file"; then
    echo "check-crds: charts/latentserve/crds/$file differs from crds/$file; run tests/helm/sync-crds.sh" >&2
    diff -u "crds/$file" "charts/latentserve/crds/$file" | head -20 >&2
    exit 1
  fi
done
if [ -z "$top" ]; then
  echo "no CRDs in crds/ yet (the operator generates them): nothing to compare"
else
  echo "identical: $(echo $top)"
fi
