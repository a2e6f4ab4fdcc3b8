#!/usr/bin/env bash
# Builds everything the test cluster runs, without a registry:
#   - Kubernetes (control plane, kubelet, kube-proxy, kubectl) and CoreDNS
#     from the Go module proxy at the versions in versions.env;
#   - the CSI sidecars at the image tags deploy/kubernetes pins, and the
#     snapshot-controller with its CRDs from the same external-snapshotter;
#   - images, as OCI archives that `ctr images import` loads: the sidecars,
#     CoreDNS and the pause container (one static binary each) and Ballast
#     (a Debian root filesystem made by debootstrap, plus the release
#     binaries), named as the manifests name them.
# Everything lands under .cache/k8s (gitignored); a second run rebuilds
# only what changed and takes seconds.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$ROOT/tests/k8s
# shellcheck source=versions.env
source "$HERE/versions.env"
CACHE=${K8S_CACHE:-$ROOT/.cache/k8s}
BIN=$CACHE/bin
IMAGES=$CACHE/images
export GOMODCACHE=$CACHE/go/mod GOCACHE=$CACHE/go/build GOBUILD_WORK=$CACHE/go/work GOFLAGS=-modcacherw
mkdir -p "$BIN" "$IMAGES"

log() { echo "== build: $*" >&2; }
die() {
  echo "build.sh: $*" >&2
  exit 1
}
gobuild() { "$HERE/gobuild.sh" "$@"; }

# The directory a module version was unpacked to in the module cache.
module_dir() {
  go mod download -json "$1@$2" | python3 -c '
import json, sys
info = json.load(sys.stdin)
if "Error" in info:
    sys.exit("build.sh: " + info["Error"])
print(info["Dir"])'
}

# image NAME:TAG OUT.tar [oci_image.py args]: writes the archive if its
# inputs changed (the writer is reproducible, so compare and keep).
image() {
  local ref=$1 out=$IMAGES/$2
  shift 2
  python3 "$HERE/oci_image.py" --ref "$ref" --out "$out.new" "$@"
  if cmp -s "$out.new" "$out"; then rm "$out.new"; else mv "$out.new" "$out"; fi
}

# An image of one static binary run as its entrypoint.
binary_image() {
  local ref=$1 binary=$2
  image "$ref" "$(basename "$binary").tar" --add "$binary=/$(basename "$binary")" \
    --entrypoint "[\"/$(basename "$binary")\"]"
}

kubernetes() {
  log "Kubernetes $KUBERNETES_VERSION"
  local cmd packages=()
  for cmd in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl; do
    packages+=("k8s.io/kubernetes/cmd/$cmd")
  done
  # The version the binaries report (the release build stamps the same).
  local minor=${KUBERNETES_VERSION#v1.} stamp="" pkg
  minor=${minor%%.*}
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    stamp+=" -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    stamp+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  GOBUILD_LDFLAGS=$stamp gobuild "$BIN" k8s.io/kubernetes "$KUBERNETES_VERSION" "${packages[@]}" -- -tags providerless
}

# The pause container every pod's sandbox runs: Kubernetes' own pause.c.
pause_image() {
  log "pause $PAUSE_VERSION"
  local src
  src=$(module_dir k8s.io/kubernetes "$KUBERNETES_VERSION")/build/pause/linux/pause.c
  if [[ ! -x $BIN/pause || $src -nt $BIN/pause ]]; then
    gcc -Os -static -DVERSION="$PAUSE_VERSION" -o "$BIN/pause" "$src"
  fi
  binary_image "registry.k8s.io/pause:$PAUSE_VERSION" "$BIN/pause"
}

coredns() {
  log "CoreDNS $COREDNS_VERSION"
  GOBUILD_MAIN=$HERE/coredns gobuild "$BIN" github.com/coredns/coredns "$COREDNS_VERSION" .
  image "registry.k8s.io/coredns/coredns:$COREDNS_VERSION" coredns.tar \
    --add "$BIN/coredns=/coredns" --entrypoint '["/coredns"]'
}

# The sidecar images the manifests name: registry.k8s.io/sig-storage/NAME:TAG.
sidecar_refs() {
  grep -rhoE 'registry\.k8s\.io/sig-storage/[a-z-]+:v[0-9.]+' "$ROOT/deploy/kubernetes" | sort -u
}

# A sidecar's Go module at a tag: github.com/kubernetes-csi/REPO, with /vN
# from v2 on.
sidecar_module() {
  local repo=$1 tag=$2 major
  major=${tag%%.*}
  major=${major#v}
  if ((major >= 2)); then echo "github.com/kubernetes-csi/$repo/v$major"; else echo "github.com/kubernetes-csi/$repo"; fi
}

# Builds cmd/NAME of REPO at TAG and its image REF.
sidecar() {
  local ref=$1 repo=$2 name tag module
  name=${ref#registry.k8s.io/sig-storage/}
  tag=${name#*:}
  name=${name%%:*}
  module=$(sidecar_module "$repo" "$tag")
  log "$name $tag ($module)"
  gobuild "$BIN" "$module" "$tag" "$module/cmd/$name"
  binary_image "$ref" "$BIN/$name"
}

sidecars() {
  local ref repo
  for ref in $(sidecar_refs); do
    case $ref in
      */csi-provisioner:*) repo=external-provisioner ;;
      */csi-attacher:*) repo=external-attacher ;;
      */csi-resizer:*) repo=external-resizer ;;
      */csi-snapshotter:*) repo=external-snapshotter ;;
      *) die "no Go module known for the image $ref" ;;
    esac
    sidecar "$ref" "$repo"
  done
}

# The snapshot CRDs and the snapshot-controller, installed as upstream says
# (its client/config/crd and deploy/kubernetes/snapshot-controller), from
# the external-snapshotter of the csi-snapshotter deploy/kubernetes pins.
snapshot_controller() {
  local tag module dir client version
  tag=$(sidecar_refs | sed -n 's|.*/csi-snapshotter:||p')
  module=$(sidecar_module external-snapshotter "$tag")
  dir=$(module_dir "$module" "$tag")
  client=${module/external-snapshotter/external-snapshotter\/client}
  version=$(awk -v m="$client" '$1 == m { print $2 }' "$dir/go.mod")
  rm -rf "$CACHE/snapshot-controller"
  mkdir -p "$CACHE/snapshot-controller/crds"
  cp "$(module_dir "$client" "$version")"/config/crd/snapshot.storage.k8s.io_*.yaml "$CACHE/snapshot-controller/crds/"
  cp "$dir"/deploy/kubernetes/snapshot-controller/*.yaml "$CACHE/snapshot-controller/"
  chmod -R u+w "$CACHE/snapshot-controller"
  # The controller from the same release as the CRDs and the sidecar (the
  # release's own manifest may name an older image).
  sed -i -E "s|(registry\.k8s\.io/sig-storage/snapshot-controller):v[0-9.]+|\1:$tag|" "$CACHE"/snapshot-controller/setup-*.yaml
  sidecar "registry.k8s.io/sig-storage/snapshot-controller:$tag" external-snapshotter
}

# A Debian root filesystem holding PACKAGES (comma-separated) as one layer
# tar, cached by the package list; prints its path.
debian_layer() {
  local packages=$1 layer
  layer=$CACHE/rootfs/$DEBIAN_SUITE-$(echo "$packages" | md5sum | cut -c1-12).tar
  if [[ ! -f $layer ]]; then
    log "Debian $DEBIAN_SUITE root filesystem with $packages"
    local dir=$CACHE/rootfs/tree mirror
    mirror=$(sed -n 's/^URIs: //p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
    rm -rf "$dir"
    mkdir -p "$dir"
    debootstrap --variant=minbase --include="$packages" "$DEBIAN_SUITE" "$dir" ${mirror:+"$mirror"} >&2
    rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
    python3 "$HERE/oci_image.py" --layer-from-dir "$dir" --out "$layer.new"
    mv "$layer.new" "$layer"
    rm -rf "$dir"
  fi
  echo "$layer"
}

# What the node plugin runs besides Ballast (deploy/Dockerfile installs the same).
BALLAST_PACKAGES=e2fsprogs,xfsprogs,util-linux,mount,fuse3,kmod,cryptsetup-bin,ca-certificates

# Ballast's image, named as deploy/kubernetes/kustomization.yaml names it,
# holding what deploy/Dockerfile puts in it.
ballast_image() {
  local ref args=() binary
  ref=$(python3 - "$ROOT/deploy/kubernetes/kustomization.yaml" <<'PY'
import sys, yaml
for image in yaml.safe_load(open(sys.argv[1]))["images"]:
    if image["name"] == "ballast":
        print(f'{image["newName"]}:{image["newTag"]}')
PY
)
  log "Ballast image $ref"
  (cd "$ROOT" && cargo build --release --workspace --bins >&2)
  # Without debug information: a fifth of the size to import on every node.
  mkdir -p "$CACHE/stripped"
  for binary in $(sed -n 's|^COPY --from=build /src/target/release/\([a-z-]*\) .*|\1|p' "$ROOT/deploy/Dockerfile"); do
    objcopy --strip-debug "$ROOT/target/release/$binary" "$CACHE/stripped/$binary"
    args+=(--add "$CACHE/stripped/$binary=/usr/local/bin/$binary")
  done
  image "$ref" ballast.tar --layer "$(debian_layer "$BALLAST_PACKAGES")" "${args[@]}"
}

# What the suite's pods run: a shell, coreutils and fio (tests/k8s/kube.py
# names it).
workload_image() {
  local ref
  ref=$(python3 -c 'import sys; sys.path.insert(0, sys.argv[1]); import kube; print(kube.WORKLOAD_IMAGE)' "$HERE")
  log "workload image $ref"
  image "$ref" workload.tar --layer "$(debian_layer fio,e2fsprogs)"
}

STEPS=(kubernetes pause_image coredns sidecars snapshot_controller ballast_image workload_image)

# build.sh [STEP...]: all steps, or only those named.
main() {
  local step
  for step in "${@:-${STEPS[@]}}"; do
    [[ " ${STEPS[*]} " == *" $step "* ]] || die "unknown step $step (steps: ${STEPS[*]})"
    "$step"
  done
  if [[ ${K8S_DROP_GO_CACHES:-0} == 1 ]]; then
    log "dropping the Go build and module caches ($(du -sh "$CACHE/go" 2>/dev/null | cut -f1))"
    go clean -cache -modcache
  fi
}

main "$@"
