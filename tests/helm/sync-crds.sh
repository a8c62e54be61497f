#!/usr/bin/env bash
# Copies the generated CRDs from crds/ into the chart (charts/latentserve/crds/), replacing what
# is there, so that tests/helm/check-crds.sh passes. Run it after regenerating crds/.
set -euo pipefail
cd "$(dirname "$0")/../.."

mkdir -p charts/latentserve/crds
rm -f charts/latentserve/crds/*.yaml
cp crds/*.yaml charts/latentserve/crds/
ls charts/latentserve/crds/
