#!/usr/bin/env bash
# Brings a local Ballast cluster up (or down) under $DEMO_DIR with release
# binaries, and shows it working.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_DIR=${DEMO_DIR:-$PWD/.dev/demo}
BIN=target/release

case "${1:-up}" in
  up)
    "$BIN/ballast" dev up --dir "$DEMO_DIR"
    # shellcheck disable=SC1091
    . "$DEMO_DIR/cluster.env"
    export BALLAST_META
    "$BIN/ballast" volume create demo --size 256MiB --replicas 3 >/dev/null
    "$BIN/ballast" status
    echo
    echo "Tear down with: make demo-down   (or: $BIN/ballast dev down --dir $DEMO_DIR)"
    ;;
  down)
    "$BIN/ballast" dev down --dir "$DEMO_DIR"
    ;;
  *)
    echo "usage: $0 up|down" >&2
    exit 2
    ;;
esac
