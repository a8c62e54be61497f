# Shared settings of the test control plane scripts (sourced, not run).
K8S_VERSION=1.20.2
LATENTSERVE_CACHE=${LATENTSERVE_CACHE:-$HOME/.cache/latentserve}
K8S_BIN=${LATENTSERVE_K8S_BIN:-$LATENTSERVE_CACHE/k8s-v$K8S_VERSION}
# Runtime state: certificates, logs, pid files and the kubeconfig the tests read.
K8S_DIR=${LATENTSERVE_K8S_DIR:-/tmp/latentserve-k8s}
# Ports away from the usual 6443/2379 so that another control plane on the machine is not disturbed.
K8S_PORT=${LATENTSERVE_K8S_PORT:-16443}
ETCD_PORT=${LATENTSERVE_ETCD_PORT:-12379}
ADMIN_TOKEN=latentserve-test-admin
