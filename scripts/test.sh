#!/usr/bin/env bash
# The whole test suite: every Rust test (unit, multi-process clusters, end
# to end through FUSE, loop devices, mkfs and real NBD clients), the
# Kubernetes manifest checks and the benchmark at a tiny size. `make test`
# runs it after `scripts/deps.sh`.
#
# A test that lacks something from the machine (root, a device, a tool)
# fails, so a green run has tested everything. SKIP_SYSTEM_TESTS=1 asks for
# a partial run instead: such tests are skipped, and the summary at the end
# counts them and says what they lacked.
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
CARGO=${CARGO:-cargo}

if [ "${SKIP_SYSTEM_TESTS:-0}" = 1 ]; then
  export BALLAST_SYSTEM_TESTS=optional
else
  export BALLAST_SYSTEM_TESTS=required
  lacking=()
  [ "$(id -u)" = 0 ] || lacking+=("root (mounts, loop devices, FUSE)")
  for dev in /dev/fuse /dev/loop-control; do [ -e "$dev" ] || lacking+=("$dev"); done
  if ! deps=$("$ROOT/scripts/deps.sh" --check); then
    mapfile -t -O "${#lacking[@]}" lacking <<<"$deps"
  fi
  if ((${#lacking[@]})); then
    echo "make test: this machine lacks what the system tests need:" >&2
    printf '  - %s\n' "${lacking[@]}" >&2
    echo "Run 'make deps' as root, or 'SKIP_SYSTEM_TESTS=1 make test' for a partial run." >&2
    exit 1
  fi
fi

BALLAST_SKIP_LOG=$(mktemp -t ballast-skips.XXXXXX)
export BALLAST_SKIP_LOG
trap 'rm -f "$BALLAST_SKIP_LOG"' EXIT

status=0
if "$CARGO" nextest --version >/dev/null 2>&1; then
  "$CARGO" nextest run --workspace --no-fail-fast || status=1
else
  "$CARGO" test --workspace --no-fail-fast || status=1
fi
python=$("$ROOT/scripts/deps.sh" --python)
[ -x "$python" ] || python=python3
"$python" deploy/check.py || status=1
# `make bench` end to end at a tiny size: fio, qemu-nbd and a local cluster.
if [ "$BALLAST_SYSTEM_TESTS" = required ] || { command -v fio && command -v qemu-nbd; } >/dev/null; then
  python3 bench/smoke_test.py || status=1
else
  printf 'bench/smoke_test.py\tfio and qemu-nbd\n' >>"$BALLAST_SKIP_LOG"
fi

echo
skipped=$(grep -c . "$BALLAST_SKIP_LOG" || true)
if [ "$skipped" = 0 ]; then
  echo "summary: no test skipped"
else
  echo "summary: $skipped tests skipped (SKIP_SYSTEM_TESTS=1):"
  awk -F'\t' '{ n[$2]++; tests[$2] = tests[$2] "\n    " $1 }
    END { for (k in n) printf "  %d lacked %s:%s\n", n[k], k, tests[k] }' "$BALLAST_SKIP_LOG"
fi
[ "$status" = 0 ] && echo "summary: passed" || echo "summary: FAILED"
exit "$status"
