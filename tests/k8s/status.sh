#!/usr/bin/env bash
# Exit status 0 when the test control plane of up.sh runs and answers, 1 otherwise.
here=$(cd "$(dirname "$0")" && pwd)
source "$here/env.sh"
D=$K8S_DIR
[ -f "$D/kubeconfig" ] && [ -f "$D/kcm.pid" ] && kill -0 "$(cat "$D/kcm.pid")" 2>/dev/null &&
  curl -fs --max-time 2 --cacert "$D/ca.crt" -H "Authorization: Bearer $ADMIN_TOKEN" \
    "https://127.0.0.1:$K8S_PORT/readyz" >/dev/null 2>&1
