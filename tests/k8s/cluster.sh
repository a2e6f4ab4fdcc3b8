#!/usr/bin/env bash
# A real Kubernetes cluster on this machine, from what tests/k8s/build.sh
# built: etcd (Debian), kube-apiserver, controller-manager and scheduler on
# a bridge of our own, and K8S_NODES worker nodes (default 3: the metadata
# service wants three members on three hosts, replicas want three servers).
#
# A node is a network namespace and a mount namespace of its own, holding
# its own containerd (Debian), kubelet and kube-proxy: its /var/lib/kubelet,
# containerd state, CNI configuration and Ballast directories are private to
# it, so three nodes on one machine do not see each other's mounts, pods or
# chunk files, and talk to each other over the bridge only.
#
#   tests/k8s/cluster.sh up      start (idempotent: a running cluster is kept)
#   tests/k8s/cluster.sh down    stop everything and remove its state
#   tests/k8s/cluster.sh env     print the KUBECONFIG export for a shell
#
# Addresses: bridge bk8s0 10.250.0.1/24 (the API server, :6443), node N at
# 10.250.0.(10+N) with pods in 10.251.N.0/24, Services in 10.96.0.0/16,
# cluster DNS at 10.96.0.10. State and logs under K8S_DIR
# (default /var/lib/ballast-k8s). Needs root.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$ROOT/tests/k8s
CACHE=${K8S_CACHE:-$ROOT/.cache/k8s}
BIN=$CACHE/bin
DIR=${K8S_DIR:-/var/lib/ballast-k8s}
NODES=${K8S_NODES:-3}
BRIDGE=bk8s0
API_IP=10.250.0.1
SERVICE_CIDR=10.96.0.0/16
API_SERVICE_IP=10.96.0.1
DNS_IP=10.96.0.10
POD_CIDR=10.251.0.0/16
CGROUP=ballast-k8s
export KUBECONFIG=$DIR/admin.kubeconfig

log() { echo "== k8s: $*" >&2; }
die() {
  echo "cluster.sh: $*" >&2
  exit 1
}

node_name() { echo "node$1"; }
node_ip() { echo "10.250.0.$((10 + $1))"; }
node_pod_cidr() { echo "10.251.$1.0/24"; }
node_dir() { echo "$DIR/nodes/node$1"; }
node_netns() { echo "bk8s-node$1"; }

# ---- processes -------------------------------------------------------------

cgroup_controllers() {
  local d
  for d in /sys/fs/cgroup/*/; do
    d=${d%/}
    [[ -f $d/cgroup.procs ]] && echo "$d"
  done
}

# A cgroup in every hierarchy; cpuset ones start with their parent's CPUs.
make_cgroup() {
  local path=$1 c parent
  for c in $(cgroup_controllers); do
    mkdir -p "$c/$path"
    if [[ -f $c/$path/cpuset.cpus ]]; then
      parent=$c
      for part in ${path//\// }; do
        [[ -s $parent/$part/cpuset.cpus && -n $(cat "$parent/$part/cpuset.cpus") ]] ||
          cat "$parent/cpuset.cpus" >"$parent/$part/cpuset.cpus"
        [[ -n $(cat "$parent/$part/cpuset.mems") ]] || cat "$parent/cpuset.mems" >"$parent/$part/cpuset.mems"
        parent=$parent/$part
      done
    fi
  done
}

# daemon NAME [--node N] -- COMMAND...: runs COMMAND in the background with
# its log in $DIR/logs/NAME.log, inside node N's namespaces, and in the
# cluster's cgroup so that `down` finds everything it started (containers
# included).
daemon() {
  local name=$1 node="" enter=()
  shift
  if [[ $1 == --node ]]; then
    node=$2
    shift 2
    enter=(nsenter -t "$(cat "$(node_dir "$node")/holder.pid")" -m -n --)
  fi
  [[ $1 == -- ]] && shift
  local group=$CGROUP/${node:+node$node/}daemons
  make_cgroup "$group"
  (
    for c in $(cgroup_controllers); do echo "$BASHPID" >"$c/$group/cgroup.procs"; done
    exec "${enter[@]}" "$@"
  ) >>"$DIR/logs/$name.log" 2>&1 </dev/null &
  echo $! >"$DIR/pids/$name.pid"
}

running() { [[ -f $DIR/pids/$1.pid ]] && kill -0 "$(cat "$DIR/pids/$1.pid")" 2>/dev/null; }

# wait_for WHAT SECONDS COMMAND...
wait_for() {
  local what=$1 seconds=$2
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "$what not ready after ${seconds}s (logs: $DIR/logs)"
    sleep 1
  done
}

kubectl() { "$BIN/kubectl" "$@"; }

# ---- certificates ------------------------------------------------------------

# cert NAME SUBJECT [SANS]: a key and a certificate signed by the cluster CA.
cert() {
  local name=$1 subject=$2 sans=${3:-} pki=$DIR/pki
  [[ -f $pki/$name.crt ]] && return
  openssl req -new -newkey rsa:2048 -nodes -keyout "$pki/$name.key" -subj "$subject" -out "$pki/$name.csr" 2>/dev/null
  local ext=$pki/$name.ext
  printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n' >"$ext"
  [[ -n $sans ]] && echo "subjectAltName=$sans" >>"$ext"
  openssl x509 -req -in "$pki/$name.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 365 -extfile "$ext" -out "$pki/$name.crt" 2>/dev/null
}

# kubeconfig NAME CERT: a kubeconfig for the API server as CERT's subject.
kubeconfig() {
  local pki=$DIR/pki
  cat >"$DIR/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
  - name: ballast-test
    cluster:
      server: https://$API_IP:6443
      certificate-authority: $pki/ca.crt
users:
  - name: $2
    user:
      client-certificate: $pki/$2.crt
      client-key: $pki/$2.key
contexts:
  - name: ballast-test
    context: {cluster: ballast-test, user: $2}
current-context: ballast-test
EOF
}

pki() {
  local pki=$DIR/pki n
  mkdir -p "$pki"
  if [[ ! -f $pki/ca.crt ]]; then
    openssl req -x509 -newkey rsa:2048 -nodes -keyout "$pki/ca.key" -out "$pki/ca.crt" \
      -days 365 -subj "/CN=ballast-test-ca" 2>/dev/null
    openssl genrsa -out "$pki/service-account.key" 2048 2>/dev/null
    openssl rsa -in "$pki/service-account.key" -pubout -out "$pki/service-account.pub" 2>/dev/null
  fi
  cert apiserver "/CN=kube-apiserver" \
    "IP:$API_IP,IP:$API_SERVICE_IP,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  cert admin "/O=system:masters/CN=admin"
  cert controller-manager "/CN=system:kube-controller-manager"
  cert scheduler "/CN=system:kube-scheduler"
  cert kube-proxy "/CN=system:kube-proxy"
  kubeconfig admin admin
  kubeconfig controller-manager controller-manager
  kubeconfig scheduler scheduler
  kubeconfig kube-proxy kube-proxy
  for ((n = 1; n <= NODES; n++)); do
    cert "$(node_name $n)" "/O=system:nodes/CN=system:node:$(node_name $n)" "IP:$(node_ip $n)"
    kubeconfig "$(node_name $n)" "$(node_name $n)"
  done
}

# ---- network -----------------------------------------------------------------

network() {
  local n ns ip m
  if ! ip link show $BRIDGE >/dev/null 2>&1; then
    ip link add $BRIDGE type bridge
    ip addr add $API_IP/24 dev $BRIDGE
    ip link set $BRIDGE up
  fi
  for ((n = 1; n <= NODES; n++)); do
    ns=$(node_netns $n)
    ip=$(node_ip $n)
    ip netns list | grep -qw "$ns" && continue
    ip netns add "$ns"
    ip link add "bk8s-n$n" type veth peer name eth0 netns "$ns"
    ip link set "bk8s-n$n" master $BRIDGE up
    ip -n "$ns" addr add "$ip/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    ip netns exec "$ns" sysctl -qw net.ipv4.ip_forward=1
    # Pods of other nodes are behind those nodes.
    for ((m = 1; m <= NODES; m++)); do
      ((m == n)) || ip -n "$ns" route add "$(node_pod_cidr $m)" via "$(node_ip $m)"
    done
    # The API server's address is the default route: Service traffic is
    # rewritten by kube-proxy before routing, the rest goes nowhere else.
    ip -n "$ns" route add default via $API_IP
  done
  # The control plane reaches pods (webhooks, logs) through their node.
  for ((n = 1; n <= NODES; n++)); do
    ip route replace "$(node_pod_cidr $n)" via "$(node_ip $n)"
  done
}

# ---- control plane -------------------------------------------------------------

control_plane() {
  local pki=$DIR/pki
  if ! running etcd; then
    log "etcd"
    daemon etcd -- etcd --name ballast-test --data-dir "$DIR/etcd" \
      --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
      --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
      --initial-cluster ballast-test=http://127.0.0.1:2380
  fi
  if ! running kube-apiserver; then
    log "kube-apiserver"
    daemon kube-apiserver -- "$BIN/kube-apiserver" \
      --etcd-servers=http://127.0.0.1:2379 \
      --bind-address=$API_IP --advertise-address=$API_IP --secure-port=6443 \
      --service-cluster-ip-range=$SERVICE_CIDR \
      --client-ca-file="$pki/ca.crt" \
      --tls-cert-file="$pki/apiserver.crt" --tls-private-key-file="$pki/apiserver.key" \
      --kubelet-client-certificate="$pki/admin.crt" --kubelet-client-key="$pki/admin.key" \
      --kubelet-preferred-address-types=InternalIP \
      --service-account-issuer=https://kubernetes.default.svc.cluster.local \
      --service-account-key-file="$pki/service-account.pub" \
      --service-account-signing-key-file="$pki/service-account.key" \
      --authorization-mode=Node,RBAC --allow-privileged=true \
      --enable-admission-plugins=NodeRestriction
  fi
  wait_for "kube-apiserver" 90 kubectl get --raw /readyz
  if ! running kube-controller-manager; then
    log "kube-controller-manager"
    daemon kube-controller-manager -- "$BIN/kube-controller-manager" \
      --kubeconfig="$DIR/controller-manager.kubeconfig" \
      --bind-address=127.0.0.1 --leader-elect=false \
      --service-account-private-key-file="$pki/service-account.key" \
      --root-ca-file="$pki/ca.crt" --use-service-account-credentials \
      --cluster-signing-cert-file="$pki/ca.crt" --cluster-signing-key-file="$pki/ca.key"
  fi
  if ! running kube-scheduler; then
    log "kube-scheduler"
    daemon kube-scheduler -- "$BIN/kube-scheduler" \
      --kubeconfig="$DIR/scheduler.kubeconfig" --bind-address=127.0.0.1 --leader-elect=false
  fi
}

# ---- nodes -----------------------------------------------------------------------

# Directories a node keeps to itself: bind-mounted over the machine's in the
# node's mount namespace.
PRIVATE_DIRS=(/var/lib/kubelet /var/lib/containerd /run/containerd /etc/cni/net.d /var/lib/cni
  /run/ballast /var/lib/ballast /var/log/pods /var/log/containers /etc/kubernetes)

# A process that holds node N's namespaces: the network namespace, and a
# mount namespace that sees the machine's mounts but whose own (pod
# volumes, containers) stay inside it and its containers.
holder() {
  local n=$1 dir d
  dir=$(node_dir "$n")
  running "holder$n" && return
  for d in "${PRIVATE_DIRS[@]}"; do mkdir -p "$d" "$dir/root$d"; done
  local binds=""
  for d in "${PRIVATE_DIRS[@]}"; do binds+="mount --bind '$dir/root$d' '$d'; "; done
  # (Not `ip netns exec`: it remounts /sys, hiding the cgroup hierarchies
  # the kubelet and runc need.)
  daemon "holder$n" -- nsenter --net="/run/netns/$(node_netns "$n")" unshare --mount --propagation slave -- \
    sh -c "mount --make-rshared / && $binds exec sleep infinity"
  # The recorded pid becomes sleep's by exec: wait until the namespaces and
  # bind mounts are in place.
  local pid
  pid=$(cat "$DIR/pids/holder$n.pid")
  wait_for "node $n namespaces" 10 bash -c "[[ \$(readlink /proc/$pid/exe) == */sleep ]]"
  echo "$pid" >"$dir/holder.pid"
}

node_configs() {
  local n=$1 dir name ip
  dir=$(node_dir "$n")
  name=$(node_name "$n")
  ip=$(node_ip "$n")
  mkdir -p "$dir/root/etc/cni/net.d"
  cat >"$dir/containerd.toml" <<EOF
version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
[grpc]
  address = "/run/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:$PAUSE_VERSION"
  # No registry is reachable: every image is imported beforehand.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "/etc/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
      SystemdCgroup = false
EOF
  cat >"$dir/root/etc/cni/net.d/10-bridge.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "ballast-test",
  "plugins": [
    {
      "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
      "ipam": {"type": "host-local", "ranges": [[{"subnet": "$(node_pod_cidr "$n")"}]],
               "routes": [{"dst": "0.0.0.0/0"}]}
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
  cat >"$dir/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $ip
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $DIR/pki/ca.crt}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
cgroupRoot: /$CGROUP/node$n
failCgroupV1: false
containerRuntimeEndpoint: unix:///run/containerd/containerd.sock
clusterDNS: [$DNS_IP]
clusterDomain: cluster.local
resolvConf: ""
failSwapOn: false
healthzBindAddress: 127.0.0.1
readOnlyPort: 0
serializeImagePulls: false
# Three nodes share one disk: only a nearly full disk evicts.
evictionHard: {memory.available: 100Mi, nodefs.available: 2%, imagefs.available: 2%, nodefs.inodesFree: 2%}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
EOF
  cat >"$dir/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $DIR/kube-proxy.kubeconfig}
mode: iptables
clusterCIDR: $POD_CIDR
hostnameOverride: $name
bindAddress: $ip
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# Pods of one node share a bridge: without masquerading, a reply from a
# Service's pod to a client on the same bridge would skip the rewrite back.
iptables: {masqueradeAll: true}
# conntrack limits are the machine's, not a namespace's.
conntrack: {maxPerCore: 0}
EOF
}

node_up() {
  local n=$1 name ip dir
  name=$(node_name "$n")
  ip=$(node_ip "$n")
  dir=$(node_dir "$n")
  mkdir -p "$dir"
  holder "$n"
  node_configs "$n"
  if ! running "containerd$n"; then
    log "$name: containerd"
    daemon "containerd$n" --node "$n" -- containerd --config "$dir/containerd.toml"
  fi
  wait_for "$name containerd" 30 nsenter -t "$(cat "$dir/holder.pid")" -m -n -- ctr version
  log "$name: images"
  local image
  for image in "$CACHE"/images/*.tar; do
    nsenter -t "$(cat "$dir/holder.pid")" -m -n -- ctr -n k8s.io images import "$image" >/dev/null
  done
  make_cgroup "$CGROUP/node$n"
  if ! running "kubelet$n"; then
    log "$name: kubelet"
    daemon "kubelet$n" --node "$n" -- "$BIN/kubelet" --config="$dir/kubelet.yaml" \
      --kubeconfig="$DIR/$name.kubeconfig" --hostname-override="$name" --node-ip="$ip" -v=1
  fi
  if ! running "kube-proxy$n"; then
    daemon "kube-proxy$n" --node "$n" -- "$BIN/kube-proxy" --config="$dir/kube-proxy.yaml"
  fi
}

# ---- add-ons -----------------------------------------------------------------------

addons() {
  log "add-ons: CoreDNS, local volumes for the metadata service, snapshot CRDs and controller"
  sed -e "s/@COREDNS_VERSION@/$COREDNS_VERSION/" -e "s/@DNS_IP@/$DNS_IP/" "$HERE/addons/coredns.yaml" | kubectl apply -f - >/dev/null
  kubectl apply -f "$HERE/addons/local-storage.yaml" >/dev/null
  local n volume pv
  for ((n = 1; n <= NODES; n++)); do
    volume=$(node_dir "$n")/root/var/lib/ballast/meta-volume
    pv=local-meta-$(node_name "$n")
    # Released by an uninstall: wiped and offered again, as the local
    # volume provisioner does, so the next install starts empty. The
    # node's chunks went with that metadata: chunk servers rightly refuse
    # to join another cluster with them.
    if [[ $(kubectl get pv "$pv" -o jsonpath='{.status.phase}' 2>/dev/null) == Released ]]; then
      kubectl delete pv "$pv" --wait=true >/dev/null
      rm -rf "$volume" "$(node_dir "$n")/root/var/lib/ballast/storage"
    fi
    mkdir -p "$volume"
    sed -e "s/@NODE@/$(node_name "$n")/g" -e "s|@PATH@|/var/lib/ballast/meta-volume|" \
      "$HERE/addons/local-pv.yaml" | kubectl apply -f - >/dev/null
  done
  kubectl apply -f "$CACHE/snapshot-controller/crds" >/dev/null
  kubectl apply -k "$CACHE/snapshot-controller" >/dev/null
}

# ---- up / down -----------------------------------------------------------------------

up() {
  [[ $(id -u) == 0 ]] || die "needs root"
  [[ -x $BIN/kubelet && -d $CACHE/images ]] || die "nothing built: run tests/k8s/build.sh first"
  # shellcheck source=versions.env
  source "$HERE/versions.env"
  mkdir -p "$DIR/logs" "$DIR/pids"
  pki
  network
  control_plane
  local n
  for ((n = 1; n <= NODES; n++)); do node_up "$n"; done
  wait_for "$NODES Ready nodes" 120 bash -c "[[ \$('$BIN/kubectl' get nodes --no-headers 2>/dev/null | grep -cw Ready) == $NODES ]]"
  for ((n = 1; n <= NODES; n++)); do
    kubectl label node "$(node_name "$n")" ballast.io/storage=true --overwrite >/dev/null
  done
  addons
  wait_for "CoreDNS" 120 kubectl -n kube-system rollout status deployment/coredns --timeout=5s
  log "up: export KUBECONFIG=$KUBECONFIG"
}

kill_cgroup_tree() {
  local c=/sys/fs/cgroup/pids/$CGROUP pids round
  [[ -d $c ]] || return 0
  for round in 1 2 3 4 5 6 7 8 9 10; do
    pids=$(find "$c" -name cgroup.procs -exec cat {} + 2>/dev/null | sort -u)
    [[ -z $pids ]] && return 0
    # shellcheck disable=SC2086
    kill -9 $pids 2>/dev/null || true
    sleep 0.5
  done
  echo "cluster.sh: processes left in $c" >&2
}

remove_cgroups() {
  local c
  for c in $(cgroup_controllers); do
    [[ -d $c/$CGROUP ]] && find "$c/$CGROUP" -depth -type d -exec rmdir {} + 2>/dev/null
  done
  return 0
}

down() {
  [[ $(id -u) == 0 ]] || die "needs root"
  log "down"
  kill_cgroup_tree
  # Loop devices of Ballast volumes whose serving processes are gone.
  local dev back
  while read -r dev back; do
    [[ $back == *ballast* || $back == "$DIR"* ]] && losetup -d "$dev" 2>/dev/null
  done < <(losetup -n -O NAME,BACK-FILE 2>/dev/null || true)
  remove_cgroups
  local n
  for ((n = 1; n <= 9; n++)); do
    ip netns del "$(node_netns "$n")" 2>/dev/null || true
    ip route del "$(node_pod_cidr "$n")" 2>/dev/null || true
  done
  ip link del $BRIDGE 2>/dev/null || true
  # Network namespaces of pods that containerd had no chance to remove.
  local netns
  for netns in /run/netns/cni-*; do
    [[ -e $netns ]] && { umount "$netns" 2>/dev/null || true; rm -f "$netns"; }
  done
  rm -rf "$DIR"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  env) echo "export KUBECONFIG=$KUBECONFIG" ;;
  *)
    echo "usage: $0 up|down|env" >&2
    exit 2
    ;;
esac
