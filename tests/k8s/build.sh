#!/usr/bin/env bash
# Builds kube-apiserver and kube-controller-manager v1.20.2 for the integration tests from Debian
# bookworm's `kubernetes` source package (it vendors every Go dependency, so the build is offline).
# The binaries go to a cache directory outside the checkout, keyed by version; when they are
# already there this script does nothing, so only a fresh machine pays the ~10 minutes.
set -euo pipefail

K8S_VERSION=1.20.2
DEB_VERSION=1.20.5+really1.20.2-1.1+deb12u1
SRC_DIR=kubernetes-1.20.5+really1.20.2
CACHE=${LATENTSERVE_CACHE:-$HOME/.cache/latentserve}
OUT=${LATENTSERVE_K8S_BIN:-$CACHE/k8s-v$K8S_VERSION}
WORK=${LATENTSERVE_K8S_SRC:-/var/tmp/latentserve-k8s-src}

if [ -x "$OUT/kube-apiserver" ] && [ -x "$OUT/kube-controller-manager" ]; then
  echo "k8s v$K8S_VERSION binaries cached in $OUT"
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
if ! grep -rqs '^Types: deb-src' /etc/apt/sources.list.d/; then
  # The same mirror as the binary packages, as source packages.
  sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
    > /etc/apt/sources.list.d/debian-src.sources
  apt-get update -qq
fi
for tool in go rsync; do
  command -v "$tool" >/dev/null || { echo "$tool missing: run scripts/install-deps" >&2; exit 1; }
done

mkdir -p "$WORK" "$OUT"
cd "$WORK"
[ -d "$SRC_DIR" ] || apt-get source -qq "kubernetes=$DEB_VERSION"
cd "$SRC_DIR"

# The vendored reflect2 v1.0.1 and json-iterator v1.1.10 segfault under Go >= 1.18 on the first
# custom-resource request; Debian's newer packaged copies are API-compatible.
for lib in modern-go/reflect2 json-iterator/go; do
  rm -rf "vendor/github.com/$lib"
  mkdir -p "vendor/github.com/$lib"
  cp /usr/share/gocode/src/github.com/$lib/*.go "vendor/github.com/$lib/"
  rm -f "vendor/github.com/$lib/"*_test.go
done
cp /usr/share/gocode/src/github.com/modern-go/reflect2/*.s vendor/github.com/modern-go/reflect2/

mkdir -p .go/src/k8s.io
[ -L .go/src/k8s.io/kubernetes ] || ln -s ../../.. .go/src/k8s.io/kubernetes
env GOPATH="$PWD/.go" CGO_ENABLED=0 GOPROXY=off HOME="$WORK/home" \
  make WHAT="cmd/kube-apiserver cmd/kube-controller-manager"
install -m755 _output/bin/kube-apiserver _output/bin/kube-controller-manager "$OUT/"
"$OUT/kube-apiserver" --version
# The source tree and Go build cache take ~2 GB; the binaries are all the tests need.
cd / && rm -rf "$WORK"
