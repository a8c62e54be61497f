#!/usr/bin/env bash
# Builds kube-apiserver and kube-controller-manager v$K8S_VERSION (env.sh) for the integration
# tests from Debian's `kubernetes` source package of that version, which vendors every Go
# dependency, so the build is offline. Debian 12 (bookworm) ships it; later releases package only
# kubectl (a newer version, without vendor/), so on them the source package comes from bookworm's
# suites of the same mirror.
#
# The binaries go to a cache directory outside the checkout, keyed by version ($K8S_BIN); when
# they are already there this script does nothing, so only a fresh machine pays the ~10 minutes.
# The system's apt configuration is left as it is: the source package is found and fetched
# through a private apt configuration under $WORK. What is missing is named in one line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/env.sh"
OUT=$K8S_BIN
WORK=${LATENTSERVE_K8S_SRC:-/var/tmp/latentserve-k8s-src}
GOCODE=/usr/share/gocode/src/github.com

die() { echo "tests/k8s/build.sh: $*" >&2; exit 1; }

if [ -x "$OUT/kube-apiserver" ] && [ -x "$OUT/kube-controller-manager" ]; then
  echo "k8s v$K8S_VERSION binaries cached in $OUT"
  exit 0
fi

for tool in go rsync make apt-get apt-cache dpkg-source; do
  command -v "$tool" >/dev/null || die "$tool is missing: run scripts/install-deps"
done
for lib in modern-go/reflect2 json-iterator/go; do
  [ -d "$GOCODE/$lib" ] || die "$GOCODE/$lib is missing: run scripts/install-deps"
done
codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[ -n "$codename" ] || die "no VERSION_CODENAME in /etc/os-release: this script needs Debian 12 or later"

# A private apt configuration with the source (deb-src) counterparts of the system's Debian
# archives, for the running release and for bookworm.
apt_dir=$WORK/apt
mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$apt_dir/sources"
apt_opts=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$apt_dir/sources"
  -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir" -o "Dir::Cache::pkgcache="
  -o "Dir::Cache::srcpkgcache=" -o "Dir::Cache::Archives=$apt_dir/archives"
  -o "APT::Sandbox::User=root")
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
sources=$apt_dir/sources/kubernetes-src.sources
: > "$sources"
# "URI release" for every configured binary archive of this release (main, -updates, -security).
while read -r uri release; do
  suites=$release
  [ "$codename" = bookworm ] || suites="$release ${release/#$codename/bookworm}"
  printf 'Types: deb-src\nURIs: %s\nSuites: %s\nComponents: main\nSigned-By: %s\n\n' \
    "$uri" "$suites" "$keyring" >> "$sources"
done < <(apt-get indextargets --format '$(REPO_URI) $(RELEASE)' 'Identifier: Packages' 2>/dev/null |
  awk -v c="$codename" '$2 == c || $2 == c "-updates" || $2 == c "-security"' | sort -u)
[ -s "$sources" ] || die "no Debian archive for $codename in the apt sources: add Debian's mirror for $codename"
apt-get "${apt_opts[@]}" update -qq ||
  die "cannot read Debian's source package lists (apt-get update with $sources)"

# The newest `kubernetes` source package whose upstream version is $K8S_VERSION (Debian names
# bookworm's "1.20.5+really1.20.2").
version=""
for candidate in $(apt-cache "${apt_opts[@]}" showsrc kubernetes 2>/dev/null | sed -n 's/^Version: //p'); do
  upstream=${candidate#*:}
  upstream=${upstream%-*}
  upstream=${upstream##*really}
  [ "${upstream%%+*}" = "$K8S_VERSION" ] || continue
  if [ -z "$version" ] || dpkg --compare-versions "$candidate" gt "$version"; then
    version=$candidate
  fi
done
[ -n "$version" ] || die "Debian has no kubernetes $K8S_VERSION source package for $codename or bookworm"
src_dir=kubernetes-$(v=${version#*:}; echo "${v%-*}")
echo "kubernetes source package $version, built with $(go version)"

mkdir -p "$OUT"
cd "$WORK"
[ -d "$src_dir" ] || apt-get "${apt_opts[@]}" source -qq "kubernetes=$version" ||
  die "apt-get source kubernetes=$version failed"
cd "$src_dir"

# The vendored reflect2 v1.0.1 and json-iterator v1.1.10 segfault under Go >= 1.18 on the first
# custom-resource request; Debian's newer packaged copies are API-compatible.
for lib in modern-go/reflect2 json-iterator/go; do
  rm -rf "vendor/github.com/$lib"
  mkdir -p "vendor/github.com/$lib"
  find "$GOCODE/$lib" -maxdepth 1 \( -name '*.go' -o -name '*.s' \) ! -name '*_test.go' \
    -exec cp {} "vendor/github.com/$lib/" \;
done

mkdir -p .go/src/k8s.io
[ -L .go/src/k8s.io/kubernetes ] || ln -s ../../.. .go/src/k8s.io/kubernetes
env GOPATH="$PWD/.go" CGO_ENABLED=0 GOPROXY=off HOME="$WORK/home" \
  make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" ||
  die "building kube-apiserver $K8S_VERSION failed with $(go version) (known to work: Debian 12's Go 1.19); output above"
install -m755 _output/bin/kube-apiserver _output/bin/kube-controller-manager "$OUT/"
"$OUT/kube-apiserver" --version
# The source tree and Go build cache take ~2 GB; the binaries are all the tests need.
cd / && rm -rf "$WORK"
