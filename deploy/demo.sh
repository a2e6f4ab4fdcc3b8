#!/usr/bin/env bash
# Brings a local Ballast cluster up (or down) under $DEMO_DIR with release
# binaries: 3 metadata members, 3 chunk servers, a 3-replica volume served
# over NBD, and a short fio verify job through it.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO_DIR=${DEMO_DIR:-$PWD/.dev/demo}
BIN=$PWD/target/release

case "${1:-up}" in
  up)
    command -v fio >/dev/null || { echo "fio is needed for the demo: make deps installs it" >&2; exit 1; }
    "$BIN/ballast" dev up --dir "$DEMO_DIR"
    # BALLAST_META and BALLAST_TLS_DIR (the cluster's admin certificate).
    set -a
    # shellcheck disable=SC1091
    . "$DEMO_DIR/cluster.env"
    set +a
    "$BIN/ballast" volume get demo >/dev/null 2>&1 ||
      "$BIN/ballast" volume create demo --size 256MiB --replicas 3 >/dev/null
    sock="$DEMO_DIR/demo.sock"
    pidfile="$DEMO_DIR/nbd-serve.pid"
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      echo "== volume 'demo' is already served (pid $(cat "$pidfile"))"
    else
      rm -f "$sock"
      setsid "$BIN/nbd-client" serve demo --listen "unix:$sock" </dev/null >/dev/null 2>>"$DEMO_DIR/logs/nbd-serve.log" &
      echo $! >"$pidfile"
      for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
    fi
    echo "== volume 'demo' served at nbd+unix:///?socket=$sock; fio verify through it:"
    fio --name=demo-verify --ioengine=nbd --uri="nbd+unix:///?socket=$sock" --rw=randwrite --bs=4k \
      --iodepth=16 --size=64M --verify=crc32c --verify_fatal=1 --verify_state_save=0 \
      --output-format=normal | grep -E 'IOPS|err=|verify' || true
    echo
    "$BIN/ballast" status
    echo
    echo "The volume stays served at nbd+unix:///?socket=$sock (try: nbdinfo nbd+unix:///?socket=$sock)."
    echo "Tear down with: make demo-down"
    ;;
  down)
    if [ -f "$DEMO_DIR/nbd-serve.pid" ]; then
      kill "$(cat "$DEMO_DIR/nbd-serve.pid")" 2>/dev/null || true
      rm -f "$DEMO_DIR/nbd-serve.pid"
    fi
    "$BIN/ballast" dev down --dir "$DEMO_DIR"
    ;;
  *)
    echo "usage: $0 up|down" >&2
    exit 2
    ;;
esac
