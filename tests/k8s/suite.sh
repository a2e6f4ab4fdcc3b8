#!/usr/bin/env bash
# Installs Ballast on the running test cluster exactly as the README tells
# users to (the authority's Secret, kubectl apply -k deploy/kubernetes),
# waits until it serves, runs
# the suite (test_kubernetes.py, through kubectl only) and uninstalls it.
# On a failure it prints what an operator would look at: pods, events and
# the Ballast pods' logs.
#
#   tests/k8s/suite.sh [PYTEST_ARGS...]     e.g. -k snapshot
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$ROOT/tests/k8s
CACHE=${K8S_CACHE:-$ROOT/.cache/k8s}
export KUBECONFIG=${KUBECONFIG:-/var/lib/ballast-k8s/admin.kubeconfig}
export PATH=$CACHE/bin:$PATH

log() { echo "== k8s-test: $*" >&2; }

report() {
  log "failed: the cluster as it is now"
  kubectl get pods -A -o wide || true
  kubectl get events -A --sort-by=.lastTimestamp | tail -40 || true
  local pod
  for pod in $(kubectl get pods -n ballast-system -o name 2>/dev/null); do
    echo "--- logs of $pod"
    kubectl logs -n ballast-system "$pod" --all-containers --tail=60 2>&1 || true
  done
}

install() {
  log "install: the authority's Secret, then kubectl apply -k deploy/kubernetes"
  # `|| return`: set -e does not apply inside a function called with ||.
  local ca
  ca=$(mktemp -d)
  "$ROOT/target/release/ballast" pki init --dir "$ca/ballast-ca" || return
  kubectl get namespace ballast-system >/dev/null 2>&1 || kubectl create namespace ballast-system || return
  kubectl -n ballast-system create secret generic ballast-ca \
    --from-file="$ca/ballast-ca/ca.crt" --from-file="$ca/ballast-ca/ca.key" || return
  rm -rf "$ca"
  kubectl apply -k "$ROOT/deploy/kubernetes" || return
  local workload
  for workload in statefulset/ballast-meta daemonset/ballast-storage deployment/ballast-csi-controller \
    daemonset/ballast-csi-node; do
    kubectl -n ballast-system rollout status "$workload" --timeout=300s || return
  done
  # Every node's kubelet has registered the driver.
  local deadline=$((SECONDS + 120))
  until [[ $(kubectl get csinodes -o jsonpath='{range .items[*]}{.spec.drivers[*].name}{"\n"}{end}' | grep -c csi.ballast.io) == \
    $(kubectl get nodes --no-headers | wc -l) ]]; do
    ((SECONDS < deadline)) || { log "the kubelets did not register csi.ballast.io"; return 1; }
    sleep 2
  done
}

uninstall() {
  log "uninstall: kubectl delete -k deploy/kubernetes"
  kubectl delete -k "$ROOT/deploy/kubernetes" --ignore-not-found --wait=true --timeout=300s
  # The metadata members' claims outlive the StatefulSet, as they should.
  kubectl delete pvc -n ballast-system -l app.kubernetes.io/name=ballast-meta --ignore-not-found
}

status=0
install || status=$?
if ((status == 0)); then
  (cd "$HERE" && "$("$ROOT/scripts/deps.sh" --python)" -m pytest -v -p no:cacheprovider "$@" test_kubernetes.py test_operations.py) || status=$?
fi
((status == 0)) || report
uninstall || status=1
exit $status
