#!/usr/bin/env bash
# Starts a test control plane on 127.0.0.1: etcd, kube-apiserver (TLS, token auth, RBAC) and
# kube-controller-manager (StatefulSet controller, garbage collector, service-account tokens).
# No scheduler and no kubelet: pods stay Pending unless a test plays the kubelet's part.
# Idempotent: a healthy running control plane is reused. Writes $K8S_DIR/kubeconfig.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/env.sh"
D=$K8S_DIR

if "$here/status.sh"; then
  echo "test control plane already running; export KUBECONFIG=$D/kubeconfig"
  exit 0
fi
for bin in kube-apiserver kube-controller-manager; do
  [ -x "$K8S_BIN/$bin" ] || { echo "$K8S_BIN/$bin missing: run tests/k8s/build.sh" >&2; exit 1; }
done
command -v etcd >/dev/null || { echo "etcd missing: run scripts/install-deps" >&2; exit 1; }
"$here/down.sh" >/dev/null

mkdir -p "$D"
cd "$D"
if [ ! -f ca.crt ]; then
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj /CN=latentserve-test-ca \
    -keyout ca.key -out ca.crt 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj /CN=kube-apiserver -keyout apiserver.key -out apiserver.csr 2>/dev/null
  echo "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc,IP:10.0.0.1" > san.ext
  openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
    -extfile san.ext -out apiserver.crt 2>/dev/null
  openssl genrsa -out sa.key 2048 2>/dev/null
  openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
fi
echo "$ADMIN_TOKEN,admin,admin-uid,system:masters" > tokens.csv
cat > kubeconfig <<K
apiVersion: v1
kind: Config
clusters: [{name: test, cluster: {server: "https://127.0.0.1:$K8S_PORT", certificate-authority: "$D/ca.crt"}}]
users: [{name: admin, user: {token: $ADMIN_TOKEN}}]
contexts: [{name: test, context: {cluster: test, user: admin, namespace: default}}]
current-context: test
K

setsid etcd --name latentserve-test --data-dir "$D/etcd-data" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
  --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT + 1))" \
  --initial-cluster "latentserve-test=http://127.0.0.1:$((ETCD_PORT + 1))" > etcd.log 2>&1 < /dev/null &
echo $! > etcd.pid
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$ETCD_PORT/health" >/dev/null 2>&1 && break; sleep 0.1; done

setsid "$K8S_BIN/kube-apiserver" --etcd-servers="http://127.0.0.1:$ETCD_PORT" \
  --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$K8S_PORT" --insecure-port=0 \
  --tls-cert-file=apiserver.crt --tls-private-key-file=apiserver.key --client-ca-file=ca.crt \
  --token-auth-file=tokens.csv --authorization-mode=RBAC \
  --service-account-issuer=https://kubernetes.default.svc --service-account-key-file=sa.pub \
  --service-account-signing-key-file=sa.key --service-cluster-ip-range=10.0.0.0/24 \
  --disable-admission-plugins=ServiceAccount > apiserver.log 2>&1 < /dev/null &
echo $! > apiserver.pid
ready=
for _ in $(seq 600); do
  if curl -fs --cacert ca.crt -H "Authorization: Bearer $ADMIN_TOKEN" \
    "https://127.0.0.1:$K8S_PORT/readyz" >/dev/null 2>&1; then ready=1; break; fi
  kill -0 "$(cat apiserver.pid)" 2>/dev/null || break
  sleep 0.1
done
if [ -z "$ready" ]; then
  echo "kube-apiserver failed to start:" >&2; tail -30 apiserver.log >&2; exit 1
fi

# Secure and insecure serving off: nothing listens, so no port can collide.
setsid "$K8S_BIN/kube-controller-manager" --kubeconfig="$D/kubeconfig" \
  --secure-port=0 --port=0 --leader-elect=false --use-service-account-credentials=false \
  --service-account-private-key-file="$D/sa.key" --root-ca-file="$D/ca.crt" \
  --controllers='*,-nodeipam,-nodelifecycle,-service,-route,-cloud-node-lifecycle,-attachdetach,-persistentvolume-binder,-persistentvolume-expander,-pvc-protection,-pv-protection,-ttl' \
  > kcm.log 2>&1 < /dev/null &
echo $! > kcm.pid
sleep 1
kill -0 "$(cat kcm.pid)" 2>/dev/null || { echo "kube-controller-manager failed:" >&2; tail -30 kcm.log >&2; exit 1; }
echo "test control plane (v$K8S_VERSION) ready; export KUBECONFIG=$D/kubeconfig"
