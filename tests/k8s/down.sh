#!/usr/bin/env bash
# Stops the test control plane that up.sh started and deletes its data (certificates are kept).
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/env.sh"
D=$K8S_DIR
for p in kcm apiserver etcd; do
  [ -f "$D/$p.pid" ] || continue
  pid=$(cat "$D/$p.pid")
  kill "$pid" 2>/dev/null
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null
  rm -f "$D/$p.pid"
done
rm -rf "$D/etcd-data"
echo "test control plane stopped"
