#!/usr/bin/env bash
# The one list of what Ballast's demo and tests need from the machine, and
# the way to get it: Debian/Ubuntu packages (apt-get, as root) and the
# Python packages deploy/check.py imports (a virtualenv under .cache/python,
# no root needed).
#
#   scripts/deps.sh           install what is missing; not root and packages
#                             missing: print the apt-get command, exit 1
#   scripts/deps.sh --check   print what is missing, exit 1 if anything is
#   scripts/deps.sh --python  print the virtualenv's python (after install)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$ROOT/.cache/python

# What each package is for.
PACKAGES=(
  fio          # the demo's verify job, NBD and raw-block tests
  qemu-utils   # qemu-io and qemu-nbd: an independent NBD client and the bench baseline
  libnbd-bin   # nbdinfo, nbdcopy: NBD handshake and export listing checks
  nbdkit       # a reference NBD server for protocol tests
  e2fsprogs    # mkfs.ext4, resize2fs, e2fsck: the CSI node formats and grows ext4
  xfsprogs     # mkfs.xfs, xfs_growfs
  fuse3        # the FUSE + loop attach path (fusermount3)
  util-linux   # losetup, blkid, mount
  libfaketime  # steps the daemons' wall clock in the clock-jump test
  iproute2     # ip: network namespaces and a bridge for the partition tests
  python3-venv # the virtualenv below
  containerd   # the Kubernetes test cluster's container runtime (tests/k8s/)
  runc         # ... and its OCI runtime
  etcd-server  # ... its API server's store
  containernetworking-plugins # ... pod networking (bridge, host-local)
  iptables     # ... kube-proxy's Service rules
  conntrack    # ... kube-proxy clears stale connections with it
  debootstrap  # ... the Debian root filesystem of its images
)
# Pinned: deploy/check.py validates the manifests against this schema
# release; pytest runs the Kubernetes suite (tests/k8s/); grpcio is the
# gRPC C-core client the CSI socket is tested with.
PYTHON_PACKAGES=(pyyaml==6.0.2 kubernetes-validate==1.34.1 pytest==8.3.4 grpcio==1.68.1)

packages() { sed -n '/^PACKAGES=(/,/^)/p' "${BASH_SOURCE[0]}" | sed -n 's/^  \([a-z0-9.+-]*\) .*/\1/p'; }
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
missing_packages() {
  local p
  for p in $(packages); do installed "$p" || echo "$p"; done
}
python_ready() { "$VENV/bin/python" -c 'import yaml, kubernetes_validate, pytest, grpc' 2>/dev/null; }

case "${1:-}" in
  --python)
    echo "$VENV/bin/python"
    exit 0
    ;;
  --check)
    mapfile -t missing < <(missing_packages)
    python_ready || missing+=("python: ${PYTHON_PACKAGES[*]} in $VENV")
    if ((${#missing[@]})); then
      printf 'missing: %s\n' "${missing[@]}"
      exit 1
    fi
    exit 0
    ;;
  "") ;;
  *)
    echo "usage: $0 [--check|--python]" >&2
    exit 2
    ;;
esac

command -v dpkg-query >/dev/null || {
  echo "deps: Ballast's scripts install system packages with apt-get (Debian or Ubuntu); install these by hand: $(packages | tr '\n' ' ')" >&2
  exit 1
}
mapfile -t missing < <(missing_packages)
if ((${#missing[@]})); then
  if [ "$(id -u)" != 0 ]; then
    echo "deps: missing system packages; install them as root:" >&2
    echo "  sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
    exit 1
  fi
  echo "deps: apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
if ! python_ready; then
  echo "deps: python virtualenv $VENV (${PYTHON_PACKAGES[*]})"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${PYTHON_PACKAGES[@]}"
fi
