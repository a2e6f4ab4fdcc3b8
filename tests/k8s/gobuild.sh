#!/usr/bin/env bash
# Builds commands of a Go module at a pinned version, from the Go module
# proxy, into a directory:
#
#   tests/k8s/gobuild.sh OUT_DIR MODULE VERSION PACKAGE... [-- GO_BUILD_FLAGS...]
#
# `go install MODULE/cmd@VERSION` refuses modules whose go.mod has `replace`
# lines (Kubernetes has one per staging module), so this writes a small
# module of its own under $GOBUILD_WORK that requires MODULE and carries
# its replace lines:
#   - a replace by another module version is copied as it is;
#   - a replace by a directory of the module (`./staging/src/k8s.io/api`)
#     becomes that module at the matching release: k8s.io/* staging modules
#     of Kubernetes vX.Y.Z are published as v0.Y.Z; any other is dropped,
#     leaving the version MODULE requires.
# GOBUILD_LDFLAGS adds linker flags (version stamps).
# With GOBUILD_MAIN=DIR and the package ".", DIR's .go files (a main package
# of ours importing MODULE's packages) are built instead.
# The Go build cache (GOCACHE) makes a second build of the same pins fast.
set -euo pipefail

out=$1 module=$2 version=$3
shift 3
packages=()
while (($#)) && [[ $1 != -- ]]; do
  packages+=("$1")
  shift
done
[[ ${1:-} == -- ]] && shift
flags=("$@")

# One scratch module per module version and set of packages: each resolves
# exactly what its packages need.
work=${GOBUILD_WORK:?set GOBUILD_WORK to a scratch directory}/$(echo "$module@$version" | tr '/@' '__')-$(echo "${packages[*]}" | md5sum | cut -c1-8)
mkdir -p "$work" "$out"
cd "$work"

staging_version=""
if [[ $module == k8s.io/kubernetes ]]; then
  staging_version="v0.${version#v1.}"
fi

# The module's own go.mod, from the proxy.
upstream_mod=$(go mod download -json "$module@$version" | python3 -c '
import json, sys
info = json.load(sys.stdin)
if "Error" in info:
    sys.exit("gobuild.sh: " + info["Error"])
print(info["GoMod"])')

{
  echo "module ballast.test/$(basename "${GOBUILD_MAIN:-build}")"
  echo
  sed -n 's/^go \([0-9.]*\)$/go \1/p' "$upstream_mod" | head -1
  echo
  echo "require $module $version"
  echo
  python3 - "$upstream_mod" "$staging_version" <<'PY'
import re, sys
path, staging = sys.argv[1], sys.argv[2]
text = open(path).read()
lines = []
for block in re.findall(r'^replace \(\n(.*?)^\)', text, re.S | re.M):
    lines += block.splitlines()
lines += re.findall(r'^replace (.*)$', text, re.M)
for line in lines:
    line = line.split("//")[0].strip()
    if not line or line.startswith("("):
        continue
    left, right = [s.strip() for s in line.split("=>")]
    target = right.split()
    if target[0].startswith("."):
        name = left.split()[0]
        if staging and name.startswith("k8s.io/"):
            print(f"replace {name} => {name} {staging}")
        continue
    print(f"replace {left} => {right}")
PY
} >go.mod.in.new
# go.mod.in is what was generated last time: when the pins are the same, the
# resolved go.mod and go.sum are reused and nothing is asked of the network.
if ! cmp -s go.mod.in.new go.mod.in 2>/dev/null; then
  cp go.mod.in.new go.mod
  rm -f go.sum ./*.go
  if [[ -n ${GOBUILD_MAIN:-} ]]; then
    # A main package of ours that imports the module's packages.
    cp "$GOBUILD_MAIN"/*.go .
    go get "$module@$version"
    go mod tidy
  else
    # Resolves the requirements of exactly the packages built, and their sums.
    go get "${packages[@]/%/@$version}"
  fi
  mv go.mod.in.new go.mod.in
else
  rm go.mod.in.new
fi

CGO_ENABLED=${CGO_ENABLED:-0} go build -trimpath -ldflags="-s -w ${GOBUILD_LDFLAGS:-}" "${flags[@]}" -o "$out/" "${packages[@]}"
