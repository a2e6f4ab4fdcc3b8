#!/usr/bin/env bash
# csi-sanity, the CSI conformance suite, against a local Ballast cluster:
#   - built from the github.com/kubernetes-csi/csi-test Go module at the
#     version pinned below (the Go module proxy; cached under .cache/csi-sanity);
#   - run twice against `ballast dev up`: in all mode (one plugin process
#     serving controller and node on one socket) and in split mode (a
#     controller and a node plugin on sockets of their own, each with its
#     own role's certificate, as Kubernetes deploys them);
#   - with every optional feature on (expansion, attach limits, mutable
#     parameters); each run must pass at least CSI_SANITY_MIN_PASSED specs
#     and fail none.
# Needs root (mounts, loop devices, FUSE). CSI_SANITY_FOCUS=regex runs a subset.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$ROOT/tests/csi-sanity
CSI_TEST_MODULE=github.com/kubernetes-csi/csi-test/v5
CSI_TEST_VERSION=v5.6.0
MIN_PASSED=${CSI_SANITY_MIN_PASSED:-95}
CACHE=${CSI_SANITY_CACHE:-$ROOT/.cache/csi-sanity}
CARGO=${CARGO:-cargo}
export GOMODCACHE=$CACHE/go/mod GOCACHE=$CACHE/go/build GOBUILD_WORK=$CACHE/go/work GOFLAGS=-modcacherw

log() { echo "== csi-sanity: $*" >&2; }

sanity=$CACHE/bin/csi-sanity-$CSI_TEST_VERSION
if [[ ! -x $sanity ]]; then
  log "building csi-sanity $CSI_TEST_VERSION from the Go module proxy"
  "$ROOT/tests/k8s/gobuild.sh" "$CACHE/build" "$CSI_TEST_MODULE" "$CSI_TEST_VERSION" "$CSI_TEST_MODULE/cmd/csi-sanity"
  mkdir -p "$CACHE/bin"
  mv "$CACHE/build/csi-sanity" "$sanity"
  # Each build leaves a few hundred MB of compiler output behind.
  go clean -cache
fi

(cd "$ROOT" && $CARGO build --workspace --bins >&2)
BIN=$ROOT/target/debug
WORK=$(mktemp -d /tmp/ballast-csi-sanity.XXXXXX)
pids=()
cleanup() {
  local status=$?
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  "$BIN/ballast" dev down --dir "$WORK/cluster" >/dev/null 2>&1 || true
  # Whatever a failed spec left mounted or attached under the work dir.
  findmnt -rn -o TARGET | grep "^$WORK/" | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  pkill -f -- "--state-dir $WORK/" 2>/dev/null || true
  rm -rf "$WORK"
  exit $status
}
trap cleanup EXIT

log "local cluster in $WORK/cluster"
"$BIN/ballast" dev up --dir "$WORK/cluster" --bin-dir "$BIN" >&2
# shellcheck disable=SC1091
source "$WORK/cluster/cluster.env"

# A plugin process of our own: plugin NAME MODE ROLE ARGS...
plugin() {
  local name=$1 mode=$2 role=$3
  shift 3
  "$BIN/ballast" pki issue --ca "$WORK/cluster/tls/ca" --role "$role" --name "$name" --out "$WORK/$name/tls" >&2
  "$BIN/csi-plugin" --mode "$mode" --endpoint "unix://$WORK/$name/csi.sock" --meta "$BALLAST_META" \
    --tls-dir "$WORK/$name/tls" --state-dir "$WORK/$name/state" --nbd-state-dir "$WORK/$name/nbd" \
    --nbd-client-bin "$BIN/nbd-client" "$@" >"$WORK/$name/log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do
    [[ -S $WORK/$name/csi.sock ]] && return
    sleep 0.1
  done
  cat "$WORK/$name/log" >&2
  log "$name did not create its socket"
  return 1
}

results=()
# run MODE ENDPOINT_FLAGS...: one csi-sanity run, checked.
run() {
  local mode=$1 out=$WORK/sanity-$1.log summary passed failed
  shift
  log "$mode mode"
  mkdir -p "$WORK/$mode"
  "$sanity" "$@" \
    --csi.mountdir "$WORK/$mode/target" --csi.stagingdir "$WORK/$mode/staging" \
    --csi.testvolumesize $((64 << 20)) --csi.testvolumeexpandsize $((128 << 20)) \
    --csi.testnodevolumeattachlimit \
    --csi.testvolumemutableparameters "$HERE/mutable-parameters.yaml" \
    ${CSI_SANITY_FOCUS:+--ginkgo.focus "$CSI_SANITY_FOCUS"} \
    --ginkgo.no-color --ginkgo.timeout 30m 2>&1 | tee "$out" >&2 || true
  summary=$(grep -E '[0-9]+ Passed \| [0-9]+ Failed' "$out" | tail -1)
  passed=$(sed -nE 's/.* ([0-9]+) Passed.*/\1/p' <<<"$summary")
  failed=$(sed -nE 's/.* ([0-9]+) Failed.*/\1/p' <<<"$summary")
  results+=("$mode: ${summary:-no summary}")
  if [[ -z $passed || $failed != 0 || ( -z ${CSI_SANITY_FOCUS:-} && $passed -lt $MIN_PASSED ) ]]; then
    log "$mode mode: ${summary:-csi-sanity printed no summary} (wanted at least $MIN_PASSED passed, 0 failed)"
    return 1
  fi
}

status=0
run all --csi.endpoint "$BALLAST_CSI_SOCKET" || status=1

# Split: the controller and the node with their own roles' certificates,
# the node reporting an attach limit.
plugin sanity-controller controller controller
plugin sanity-node node node --node-id sanity-node --max-volumes 4
run split --csi.endpoint "$WORK/sanity-node/csi.sock" \
  --csi.controllerendpoint "$WORK/sanity-controller/csi.sock" || status=1

printf '%s\n' "${results[@]}" >&2
exit $status
