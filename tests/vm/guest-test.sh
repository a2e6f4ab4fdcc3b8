#!/bin/sh
# Runs inside the VM (busybox sh), started by /init. A whole Ballast cluster
# on the guest's loopback, real /dev/nbdN devices attached by our
# nbd-client, ext4 on top. Prints one line per scenario:
#   RESULT <scenario> PASS|FAIL|SKIP <details>
# and exits non-zero if any scenario failed.
#
# Kernel command line knobs: vmtest.only=a,b,c (scenario names, default all),
# vmtest.load_secs=N (load after a restart, default 6), vmtest.max_pause_ms=N
# (fail a disruption whose longest I/O pause is longer; default: report only).

set -u
ONLY=all
LOAD_SECS=6
MAX_PAUSE_MS=
for a in $(cat /proc/cmdline); do
    case "$a" in
        vmtest.only=*) ONLY=${a#*=} ;;
        vmtest.load_secs=*) LOAD_SECS=${a#*=} ;;
        vmtest.max_pause_ms=*) MAX_PAUSE_MS=${a#*=} ;;
    esac
done

C=/tmp/c                # `ballast dev up` directory
STATE=/run/ballast/nbd  # nbd-client's default state directory
MNT=/mnt/v1
FAILED=0
META=

ts() { cut -d' ' -f1 /proc/uptime; }
log() { echo "[vm $(ts)] $*"; }
# elapsed START [END]: seconds between two ts values, 3 decimals.
elapsed() { awk -v a="$1" -v b="${2:-$(ts)}" 'BEGIN{printf "%.3f", b-a}'; }
result() {
    name=$1; verdict=$2; shift 2
    echo "RESULT $name $verdict $*"
    [ "$verdict" != FAIL ] || FAILED=1
}
wanted() { [ "$ONLY" = all ] || echo ",$ONLY," | grep -q ",$1,"; }
# kmsg_mark NAME: a marker in the kernel log; kmsg_since NAME prints what followed it.
kmsg_mark() { echo "vmtest: mark $1" > /dev/kmsg; }
# (Everything if the marker is gone: nothing is missed when the ring buffer wrapped.)
kmsg_since() {
    dmesg > /tmp/kmsg.txt
    if grep -q "vmtest: mark $1\$" /tmp/kmsg.txt; then
        awk -v m="vmtest: mark $1" 'index($0, m){f=1; next} f' /tmp/kmsg.txt
    else
        cat /tmp/kmsg.txt
    fi
}
# Kernel messages that mean the application or the filesystem saw an error.
# Expected on a restart, and no error: "Receive control failed (result -32)"
# (the server went away) and "Dead connection, failed to find a fallback"
# (requests wait up to the dead-connection timeout for the successor).
kmsg_errors() {
    kmsg_since "$1" | grep -Ei 'I/O error|blk_update_request|EXT4-fs (error|warning)|read-only|journal.*abort|shutting down sockets' || true
}
# Kernel messages about requests that timed out and were resent, not failed.
kmsg_retries() { kmsg_since "$1" | grep -Ei 'timed out, retrying|Possible stuck request' || true; }

# Field of one mapping in `nbd-client list -o json`: mapping_field VOLUME_NAME FIELD
mapping_field() {
    nbd-client list -o json | tr '{' '\n' | grep "\"name\":\"$1\"" |
        sed -n "s/.*\"$2\":\"\{0,1\}\([^\",}]*\).*/\1/p" | head -n1
}
# pid of a process of the dev cluster from cluster.json: cluster_pid storage2
cluster_pid() {
    awk -v n="\"name\": \"$1\"" 'index($0, n){f=1} f && /"pid"/{gsub(/[^0-9]/, ""); print; exit}' "$C/cluster.json"
}
is_mounted() { awk -v m="$1" '$2 == m {f=1} END {exit !f}' /proc/mounts; }
mounted_rw() { awk -v m="$1" '$2 == m {split($4, o, ","); print o[1]; exit}' /proc/mounts; }
dev_size() { cat "/sys/block/$(basename "$1")/size" 2>/dev/null || echo 0; }

dump_logs() {
    log "---- diagnostics ($1) ----"
    for f in "$STATE"/*.log; do [ -f "$f" ] && { echo "== $f (tail)"; tail -n 30 "$f"; }; done
    for f in "$C"/logs/*.log; do [ -f "$f" ] && { echo "== $f (tail)"; tail -n 15 "$f"; }; done
    dmesg > /tmp/dmesg.txt 2>&1; echo "== dmesg (rc $?, $(wc -l < /tmp/dmesg.txt) lines; tail)"; tail -n 40 /tmp/dmesg.txt
    echo "== nbd-client list"; nbd-client list 2>&1
    log "---- end of diagnostics ----"
}

map() { # map VOLUME [nbd-client map flags...] -> prints the device
    v=$1; shift
    timeout 120 nbd-client map "$v" --meta "$META" "$@"
}
unmap() { timeout 90 nbd-client unmap "$1"; }

# ensure_fs DEV: an ext4 filesystem on DEV, made if there is none yet.
ensure_fs() {
    # ext2/3/4 superblock magic 0xEF53 at byte 1080
    [ "$(dd if="$1" bs=8 skip=135 count=1 2>/dev/null | od -An -tx1 | awk '{print $1 $2}')" != 53ef ] || return 0
    log "mkfs.ext4 $1"
    mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 -L v1 "$1"
}

# write_set DIR TAG: files of several sizes (random data) and their sha256s in /tmp/sums.TAG
write_set() {
    d=$1; tag=$2
    mkdir -p "$d/$tag" || return 1
    echo "written through $tag at $(ts)" > "$d/$tag/hello.txt" || return 1
    dd if=/dev/urandom of="$d/$tag/random.bin" bs=1M count=8 2>/dev/null || return 1
    i=0
    while [ $i -lt 20 ]; do
        dd if=/dev/urandom of="$d/$tag/small.$i" bs=4k count=$((i + 1)) 2>/dev/null || return 1
        i=$((i + 1))
    done
    sync
    (cd "$d" && sha256sum "$tag"/*) > "/tmp/sums.$tag" || return 1
}
verify_set() { (cd "$1" && sha256sum -c -s "/tmp/sums.$2"); }

# ----------------------------------------------------------------- cluster
cluster_up() {
    log "ballast dev up --dir $C --storage 3"
    t0=$(ts)
    retried=
    for attempt in 1 2 3; do
        if timeout 150 ballast dev up --dir "$C" --storage 3 2>/tmp/devup.err; then
            set -a; . "$C/cluster.env"; set +a; META=$BALLAST_META
            result cluster PASS "3 meta + 3 storage up in $(elapsed "$t0") s${retried}; BALLAST_META=$META"
            return 0
        fi
        cat /tmp/devup.err
        # Retried, for a failure at startup that is not about the data path
        # (reported in the RESULT line, so it stays visible). Known cause:
        # `dev up` reads /proc/PID/cmdline of a daemon it has just spawned,
        # which is empty until the kernel finishes exec, and takes the daemon
        # for dead ("exited during startup").
        [ $attempt != 3 ] || break
        retried="$retried (attempt $attempt failed: $(tr '\n' ' ' < /tmp/devup.err))"
        timeout 30 ballast dev down --dir "$C" >/dev/null 2>&1
        rm -rf "${C:?}"/*
    done
    result cluster FAIL "ballast dev up --storage 3 failed after $(elapsed "$t0") s"
    dump_logs "dev up"
    timeout 30 ballast dev down --dir "$C" >/dev/null 2>&1
    # What still works without chunk servers: the metadata service alone.
    rm -rf "${C:?}"/*
    t0=$(ts)
    if timeout 120 ballast dev up --dir "$C" --storage 0; then
        set -a; . "$C/cluster.env"; set +a; META=$BALLAST_META
        if out=$(timeout 60 ballast volume create v1 --size 256MiB --replicas 3 --meta "$META" 2>&1); then
            result meta-only PASS "dev up --storage 0 in $(elapsed "$t0") s; volume create: $(echo "$out" | tr '\n' ' ')"
        else
            result meta-only FAIL "volume create: $out"
        fi
    else
        result meta-only FAIL "ballast dev up --storage 0 failed"
        dump_logs "dev up --storage 0"
    fi
    return 1
}

# ----------------------------------------------------------------- 1. map, mkfs, write, unmap, map, verify
basic_round() { # basic_round SCENARIO METHOD_FLAGS EXPECTED_METHOD
    name=$1; flags=$2; expect=$3
    t0=$(ts)
    dev=$(map v1 $flags) || { result "$name" FAIL "map failed"; dump_logs "$name"; return 1; }
    method=$(mapping_field v1 method)
    log "$name: v1 -> $dev (method $method, $(dev_size "$dev") sectors, mapped in $(elapsed "$t0") s)"
    [ "$method" = "$expect" ] || { result "$name" FAIL "method $method, expected $expect"; return 1; }
    # Ioctl connections cannot be replaced: the device must run on the
    # kernel's 30 s, whatever an earlier netlink user of it set.
    timer=$(cat "/sys/block/$(basename "$dev")/queue/io_timeout")
    [ "$expect" != ioctl ] || [ "$timer" = 30000 ] ||
        { result "$name" FAIL "request timeout $timer ms, not the kernel's 30000"; return 1; }
    ensure_fs "$dev" || { result "$name" FAIL "mkfs.ext4"; return 1; }
    mkdir -p "$MNT"
    mount -t ext4 "$dev" "$MNT" || { result "$name" FAIL "mount"; dump_logs "$name"; return 1; }
    # What an earlier round wrote (through another attach method) must be intact.
    for tag in "$MNT"/set-*; do
        [ -d "$tag" ] || continue
        tag=${tag##*/}
        verify_set "$MNT" "$tag" || { result "$name" FAIL "$tag from an earlier round differs"; return 1; }
    done
    write_set "$MNT" "set-$expect" || { result "$name" FAIL "writing files"; dump_logs "$name"; return 1; }
    stall_storage "$name" || { result "$name" FAIL "chunk servers stalled 2 s: $LOAD_DETAIL"; dump_logs "$name"; return 1; }
    umount "$MNT" || { result "$name" FAIL "umount"; return 1; }
    e2fsck -fn "$dev" >/tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; result "$name" FAIL "e2fsck"; return 1; }
    unmap v1 || { result "$name" FAIL "unmap"; dump_logs "$name"; return 1; }
    [ "$(dev_size "$dev")" = 0 ] || { result "$name" FAIL "$dev still has a size after unmap"; return 1; }
    [ -z "$(mapping_field v1 pid)" ] || { result "$name" FAIL "v1 still listed after unmap"; return 1; }
    dev2=$(map v1 $flags) || { result "$name" FAIL "second map failed"; dump_logs "$name"; return 1; }
    mount -t ext4 -o ro "$dev2" "$MNT" || { result "$name" FAIL "second mount"; return 1; }
    ok=1
    sets=0
    for tag in "$MNT"/set-*; do
        tag=${tag##*/}
        sets=$((sets + 1))
        verify_set "$MNT" "$tag" || { ok=0; log "$tag: checksums differ after unmap+map"; }
    done
    umount "$MNT"
    unmap v1 || { result "$name" FAIL "second unmap"; return 1; }
    [ $ok = 1 ] || { result "$name" FAIL "checksums differ after unmap+map"; return 1; }
    result "$name" PASS "$dev ($method): mkfs/mount/write 8 MiB + 20 files, e2fsck clean, unmap, map ($dev2), $sets file sets verified by sha256 in $(elapsed "$t0") s"
}

# Every chunk server stops for 2 s while writes wait on them: past a 500 ms
# request timeout (which the block layer fires 0.5-1.5 s late), well under
# the 5 s replica timeout. The
# writes must complete once they run again, whatever the device's history
# (an ioctl device once kept a netlink user's 500 ms timeout, so the kernel
# dropped its connections, which ioctl cannot replace, and failed them).
# Stopping the serving process instead would test nothing of the kind for
# ioctl: a signal to the thread in NBD_DO_IT makes the kernel shut the
# device down.
stall_storage() { # stall_storage SCENARIO
    pids=$(for s in storage1 storage2 storage3; do cluster_pid $s; done | tr '\n' ' ')
    [ -n "$pids" ] || { LOAD_DETAIL="no chunk servers in $C/cluster.json"; return 1; }
    load_start "$1-stall" || { LOAD_DETAIL="load did not start"; return 1; }
    kill -STOP $pids; sleep 2; kill -CONT $pids
    sleep 2
    load_verdict "$1-stall" || return 1
    rm -f "$MNT/load-$1-stall.dat"
}

# release_v1: after a failed scenario, v1 unmounted and unmapped, so that
# the next scenario starts from a clean device instead of failing with it.
release_v1() {
    ! is_mounted "$MNT" || umount "$MNT" || umount -l "$MNT"
    [ -z "$(mapping_field v1 pid)" ] || unmap v1 || log "release_v1: unmap v1 failed"
}

# ----------------------------------------------------------------- 2./3. disruption under load
# load_start NAME: loadgen writing (and fsyncing) a file on $MNT in the
# background ($lpid), once it reached its random phase.
load_start() {
    kmsg_mark "$1"
    rm -f /tmp/stop
    loadgen --file "$MNT/load-$1.dat" --size-mib 16 --bs-kib 64 --sync-every 8 --duration 300 \
        --stop-file /tmp/stop --slow-ms 250 > "/tmp/load-$1.log" 2>&1 &
    lpid=$!
    # Let the load reach its random phase (first pass over all blocks done).
    i=0; while [ $i -lt 600 ] && ! grep -q '^progress' "/tmp/load-$1.log"; do sleep 0.1; i=$((i + 1)); done
    kill -0 $lpid 2>/dev/null || { cat "/tmp/load-$1.log"; return 1; }
}
# load_verdict NAME [MAX_PAUSE_MS]: stops the load; succeeds if it saw no
# error, the kernel logged none, the mount is still rw and the longest I/O
# pause stayed under the limit. LOAD_DETAIL says what was measured.
load_verdict() {
    touch /tmp/stop
    timeout 180 sh -c "while kill -0 $lpid 2>/dev/null; do sleep 0.2; done"
    wait $lpid; lrc=$?
    grep -E '^(slow|ERROR|LOADGEN)' "/tmp/load-$1.log" | head -n 30
    summary=$(grep '^LOADGEN' "/tmp/load-$1.log")
    errors=$(echo "$summary" | sed -n 's/.* errors=\([0-9]*\).*/\1/p')
    maxms=$(echo "$summary" | sed -n 's/.* max_op_ms=\([0-9]*\).*/\1/p')
    ops=$(echo "$summary" | sed -n 's/.*LOADGEN ops=\([0-9]*\).*/\1/p')
    kerr=$(kmsg_errors "$1")
    kcount=$(printf '%s' "$kerr" | grep -c . || true)
    kretry=$(kmsg_retries "$1" | grep -c . || true)
    rw=$(mounted_rw "$MNT")
    echo "METRIC $1 max_io_pause_ms=${maxms:-?} load_errors=${errors:-?} kernel_io_errors=$kcount kernel_request_timeouts=$kretry mount=$rw ops=${ops:-?}"
    echo "kernel log since the start of $1:"; kmsg_since "$1" | tail -n 20
    slow=
    [ -z "${2:-}" ] || [ "${maxms:-0}" -le "$2" ] || slow=1
    if [ "$lrc" = 0 ] && [ "${errors:-1}" = 0 ] && [ "$kcount" = 0 ] && [ "$rw" = rw ] && [ -z "$slow" ]; then
        LOAD_DETAIL="load ops=$ops errors=0, longest I/O pause ${maxms} ms, kernel I/O errors 0 (request timeouts retried: $kretry), mount rw"
    else
        LOAD_DETAIL="loadgen rc=$lrc errors=${errors:-?} longest pause ${maxms:-?} ms${slow:+ (limit $2)}, kernel errors $kcount, request timeouts $kretry, mount ${rw:-gone}"
        return 1
    fi
}

# under_load SCENARIO ACTION [MAX_PAUSE_MS]: mounts v1 (mapped), runs loadgen,
# performs ACTION (a shell function) while it runs, lets the load go on
# LOAD_SECS, checks; the longest I/O pause must stay under MAX_PAUSE_MS (or
# vmtest.max_pause_ms) when given.
under_load() {
    name=$1; action=$2; pause_limit=${3:-$MAX_PAUSE_MS}
    dev=$(map v1) || { result "$name" FAIL "map failed"; dump_logs "$name"; return 1; }
    ensure_fs "$dev" || { result "$name" FAIL "mkfs.ext4"; return 1; }
    mkdir -p "$MNT"
    is_mounted "$MNT" || mount -t ext4 "$dev" "$MNT" || { result "$name" FAIL "mount"; return 1; }
    load_start "$name" || { result "$name" FAIL "load did not start"; return 1; }
    ACTION_DETAIL=
    if ! $action; then
        touch /tmp/stop; wait $lpid
        cat "/tmp/load-$name.log"
        result "$name" FAIL "action: $ACTION_DETAIL"; dump_logs "$name"; return 1
    fi
    sleep "$LOAD_SECS"
    if load_verdict "$name" "$pause_limit"; then
        result "$name" PASS "$ACTION_DETAIL; $LOAD_DETAIL"
    else
        result "$name" FAIL "$ACTION_DETAIL; $LOAD_DETAIL"
        dump_logs "$name"
        return 1
    fi
}

# The standby of serving process PID, once it stands by (catches SIGUSR2).
wait_standby() { # wait_standby PID -> prints the standby's pid
    i=0
    while [ $i -lt 300 ]; do
        for p in /proc/[0-9]*; do
            tr '\0' ' ' < "$p/cmdline" 2>/dev/null | grep -q -- "--standby-for $1 " || continue
            mask=$(awk '/^SigCgt:/ {print $2}' "$p/status" 2>/dev/null)
            # SIGUSR2 is signal 12: bit 11 of the mask.
            [ -n "$mask" ] && [ $(( 0x$mask & 0x800 )) -ne 0 ] && { basename "$p"; return 0; }
        done
        sleep 0.1; i=$((i + 1))
    done
    return 1
}

# The serving process dies (SIGKILL) or is stopped (SIGTERM) while its
# standby stands by: the standby takes the device over, no `map` needed
# (SIGTERM hands it the live connections; after SIGKILL it re-attaches).
# With `both`, the standby is killed too and `map` starts a successor.
restart_with() { # restart_with SIGNAL [both]
    sig=$1; both=${2:-}
    dev=$(mapping_field v1 device); old=$(mapping_field v1 pid)
    [ -n "$old" ] || { ACTION_DETAIL="no serving process listed"; return 1; }
    sb=$(wait_standby "$old") || { ACTION_DETAIL="no standby stood by for pid $old"; return 1; }
    t0=$(ts)
    if [ -n "$both" ]; then kill -KILL "$old" "$sb"; else kill "-$sig" "$old"; fi
    i=0; while [ -d "/proc/$old" ] && [ $i -lt 300 ]; do sleep 0.05; i=$((i + 1)); done
    [ ! -d "/proc/$old" ] || { ACTION_DETAIL="pid $old still alive 15 s after SIG$sig"; return 1; }
    t1=$(ts)
    # `map` starts the successor's log afresh: keep the predecessor's.
    vid=$(mapping_field v1 volume)
    cp "$STATE/$vid.log" "/tmp/serve-$sig.log" 2>/dev/null
    echo "serving process log before SIG$sig (tail):"; tail -n 4 "/tmp/serve-$sig.log" 2>/dev/null
    if [ -z "$both" ]; then
        i=0
        until [ "$(mapping_field v1 served)" = true ] && [ "$(mapping_field v1 pid)" != "$old" ]; do
            [ $i -lt 600 ] || { ACTION_DETAIL="the standby $sb did not take the device over within 30 s of SIG$sig"; return 1; }
            sleep 0.05; i=$((i + 1))
        done
    fi
    new_dev=$(map v1) || { ACTION_DETAIL="map after SIG$sig failed"; return 1; }
    t2=$(ts)
    new=$(mapping_field v1 pid)
    who="successor pid $new"; [ -n "$both" ] || who="standby pid $new"
    ACTION_DETAIL="SIG$sig pid $old${both:+ and its standby $sb} (gone after $(elapsed "$t0" "$t1") s), $who serves $new_dev $(elapsed "$t1" "$t2") s later"
    echo "METRIC restart-$sig${both:+-both} gone_s=$(elapsed "$t0" "$t1") reattach_s=$(elapsed "$t1" "$t2")"
    [ "$new_dev" = "$dev" ] || { ACTION_DETAIL="$ACTION_DETAIL; device changed $dev -> $new_dev"; return 1; }
    [ "$new" != "$old" ] || { ACTION_DETAIL="$ACTION_DETAIL; same pid"; return 1; }
    [ -n "$both" ] || [ "$new" = "$sb" ] || { ACTION_DETAIL="$ACTION_DETAIL; not the standby ($sb)"; return 1; }
    if [ "$sig" = TERM ]; then
        # The standby was handed the live connections: the kernel took no part.
        ! kmsg_since "$name" | grep -q "$(basename "$dev"): reconnected socket" ||
            { ACTION_DETAIL="$ACTION_DETAIL; the kernel had to be given new sockets"; return 1; }
    else
        # The live device was handed new sockets (NBD_CMD_RECONFIGURE), not replaced.
        kmsg_since "$name" | grep -q "$(basename "$dev"): reconnected socket" ||
            { ACTION_DETAIL="$ACTION_DETAIL; no 'reconnected socket' for $dev in the kernel log"; return 1; }
    fi
}
action_sigkill() { restart_with KILL; }
action_sigkill_both() { restart_with KILL both; }
# A successor takes the live device over from the serving process (`map
# --take-over`): the connections move between the processes, the kernel
# takes no part, and no request waits for a timeout.
action_takeover() {
    dev=$(mapping_field v1 device); old=$(mapping_field v1 pid)
    [ -n "$old" ] || { ACTION_DETAIL="no serving process listed"; return 1; }
    t0=$(ts)
    new_dev=$(map v1 --take-over) || { ACTION_DETAIL="map --take-over failed"; return 1; }
    t1=$(ts)
    new=$(mapping_field v1 pid)
    i=0; while [ -d "/proc/$old" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    ACTION_DETAIL="pid $old handed $dev over to pid $new; map --take-over took $(elapsed "$t0" "$t1") s"
    echo "METRIC restart-takeover takeover_s=$(elapsed "$t0" "$t1")"
    [ ! -d "/proc/$old" ] || { ACTION_DETAIL="$ACTION_DETAIL; the predecessor still runs"; return 1; }
    [ "$new_dev" = "$dev" ] || { ACTION_DETAIL="$ACTION_DETAIL; device changed $dev -> $new_dev"; return 1; }
    [ "$new" != "$old" ] || { ACTION_DETAIL="$ACTION_DETAIL; same pid"; return 1; }
    # The predecessor's standby must see that the device went on elsewhere
    # and leave: never a second process serving it.
    sleep 2
    if kmsg_since "$name" | grep -q "$(basename "$dev"): reconnected socket"; then
        ACTION_DETAIL="$ACTION_DETAIL; the kernel had to be given new sockets"; return 1
    fi
    [ "$(mapping_field v1 pid)" = "$new" ] ||
        { ACTION_DETAIL="$ACTION_DETAIL; pid $(mapping_field v1 pid) serves the device now, not $new"; return 1; }
    for p in /proc/[0-9]*; do
        tr '\0' ' ' < "$p/cmdline" 2>/dev/null | grep -q -- "--standby-for $old " &&
            { ACTION_DETAIL="$ACTION_DETAIL; the predecessor's standby ${p#/proc/} still runs"; return 1; }
    done
    return 0
}
action_sigterm() { restart_with TERM; }
# The serving process stops answering for longer than the kernel's request
# timeout: the kernel drops the connections the stuck requests are on
# and requeues them; once the process runs again it hands the kernel new
# connections (NBD_CMD_RECONFIGURE) and the requeued requests complete.
action_freeze() {
    pid=$(mapping_field v1 pid); dev=$(mapping_field v1 device)
    [ -n "$pid" ] || { ACTION_DETAIL="no serving process listed"; return 1; }
    kill -STOP "$pid"
    sleep 12
    kill -CONT "$pid"
    i=0; while [ $i -lt 100 ] && ! kmsg_since "$name" | grep -q "$(basename "$dev"): reconnected socket"; do sleep 0.1; i=$((i + 1)); done
    kmsg_since "$name" | grep -q "$(basename "$dev"): reconnected socket" ||
        { ACTION_DETAIL="serving process $pid frozen 12 s: no 'reconnected socket' for $dev afterwards"; return 1; }
    [ "$(mapping_field v1 pid)" = "$pid" ] || { ACTION_DETAIL="the serving process changed"; return 1; }
    ACTION_DETAIL="serving process $pid frozen 12 s (past the request timeout), dropped connections replaced by the same process"
}
action_kill_storage() {
    pid=$(cluster_pid storage2)
    [ -n "$pid" ] || { ACTION_DETAIL="no storage2 in $C/cluster.json"; return 1; }
    kill -KILL "$pid"
    ACTION_DETAIL="storage2 (pid $pid) SIGKILLed, serving process pid $(mapping_field v1 pid) kept"
}

# Online growth of a mounted ext4 on a device attached through METHOD_FLAGS:
# `ballast volume expand`, `nbd-client resize`, resize2fs while mounted.
grow_online() { # grow_online SCENARIO METHOD_FLAGS NEW_SIZE_MIB
    name=$1; flags=$2; mib=$3
    t0=$(ts)
    dev=$(map v1 $flags) || { result "$name" FAIL "map failed"; dump_logs "$name"; return 1; }
    ensure_fs "$dev" || { result "$name" FAIL "mkfs.ext4"; return 1; }
    mkdir -p "$MNT"
    mount -t ext4 "$dev" "$MNT" || { result "$name" FAIL "mount"; return 1; }
    before=$(dev_size "$dev"); kb0=$(df -k "$MNT" | awk 'NR==2 {print $2}')
    fail() { umount "$MNT"; unmap v1 >/dev/null 2>&1; result "$name" FAIL "$1"; dump_logs "$name"; return 1; }
    timeout 60 ballast volume expand v1 --size "${mib}MiB" --meta "$META" >/dev/null || { fail "ballast volume expand"; return 1; }
    out=$(timeout 60 nbd-client resize v1 2>&1) || { fail "nbd-client resize: $out"; return 1; }
    [ "$(dev_size "$dev")" = $((mib * 2048)) ] || { fail "$dev is $(dev_size "$dev") sectors, not $((mib * 2048))"; return 1; }
    resize2fs "$dev" >/tmp/resize2fs.log 2>&1 || { cat /tmp/resize2fs.log; fail "online resize2fs"; return 1; }
    kb1=$(df -k "$MNT" | awk 'NR==2 {print $2}')
    [ "$kb1" -gt $((kb0 + 32768)) ] || { fail "df shows $kb1 KiB, was $kb0 KiB"; return 1; }
    write_set "$MNT" "set-$name" || { fail "writing after growth"; return 1; }
    for tag in "$MNT"/set-*; do
        tag=${tag##*/}
        verify_set "$MNT" "$tag" || { fail "$tag differs after growth"; return 1; }
    done
    umount "$MNT" || { result "$name" FAIL "umount"; return 1; }
    e2fsck -fn "$dev" >/tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; unmap v1; result "$name" FAIL "e2fsck after growth"; return 1; }
    unmap v1 || { result "$name" FAIL "unmap"; return 1; }
    result "$name" PASS "$dev ($flags): mounted ext4 grown online $((before / 2048)) -> $mib MiB (df $kb0 -> $kb1 KiB), files verified, e2fsck clean, in $(elapsed "$t0") s"
}

# A second volume gets its own device; the live device keeps its backend id.
identity() {
    dev1=$(map v1) || { result identity FAIL "map v1"; return 1; }
    timeout 60 ballast volume create v2 --size 64MiB --replicas 3 --meta "$META" >/dev/null ||
        { result identity FAIL "volume create v2"; return 1; }
    dev2=$(map v2) || { result identity FAIL "map v2"; dump_logs identity; return 1; }
    id1=$(mapping_field v1 volume); id2=$(mapping_field v2 volume)
    b1=$(cat "/sys/block/$(basename "$dev1")/backend" 2>/dev/null); b2=$(cat "/sys/block/$(basename "$dev2")/backend" 2>/dev/null)
    again=$(map v2)
    unmap v2 >/dev/null 2>&1
    if [ "$dev1" != "$dev2" ] && [ "$b1" = "$id1" ] && [ "$b2" = "$id2" ] && [ "$again" = "$dev2" ]; then
        result identity PASS "v1=$dev1 backend $b1; v2=$dev2 backend $b2; mapping v2 again returns $again"
    else
        result identity FAIL "v1=$dev1 backend '$b1' (id $id1); v2=$dev2 backend '$b2' (id $id2); again=$again"
    fi
}

# ----------------------------------------------------------------- CSI plugins
# csi-plugin in controller mode (CreateVolume, ControllerPublish: the epoch)
# and in node mode (what the kubelet drives), driven through our csi-client.
csi_start() { # csi_start DIR -> $D $CTL $NODE $cpid $npid
    D=$1; CTL=$D/controller.sock; NODE=$D/node.sock
    mkdir -p "$D"
    csi-plugin --mode controller --endpoint "unix://$CTL" --meta "$META" > "$D/controller.log" 2>&1 &
    cpid=$!
    csi-plugin --mode node --node-id n1 --endpoint "unix://$NODE" --meta "$META" --state-dir "$D/state" > "$D/node.log" 2>&1 &
    npid=$!
    i=0; while [ $i -lt 300 ] && ! { [ -S "$CTL" ] && [ -S "$NODE" ]; }; do sleep 0.1; i=$((i + 1)); done
}
# csi_run SOCKET CALL ARGS...: the answer in $out
csi_run() { out=$(timeout 150 csi-client "$@" 2>&1) || { echo "csi-client $*: $out"; return 1; }; }
# Chunk files of a CSI volume (its id is vol-<data id, hex>) on every chunk server.
chunk_files() { find "$C"/storage*/chunks/"$(printf '%016x' "$((0x${1#vol-}))")" -name '*.chunk' 2>/dev/null; }

# ----------------------------------------------------------------- 4. CSI node service on the real device
csi_node() {
    command -v csi-client >/dev/null || { result csi-node SKIP "csi-client not in the initramfs"; return 0; }
    vid=; target=/tmp/csi/pods/p1/volumes/data; staging=/tmp/csi/staging/none
    csi_start /tmp/csi
    csi_fail() {
        result csi-node FAIL "$1"
        echo "== controller log"; tail -n 20 $D/controller.log; echo "== node log"; tail -n 30 $D/node.log
        dump_logs csi-node
        # Leave nothing attached for the scenarios after this one.
        umount "$target" "$staging" 2>/dev/null
        [ -z "${vid:-}" ] || unmap "$vid" >/dev/null 2>&1
        kill $cpid $npid 2>/dev/null; wait $cpid $npid 2>/dev/null
        return 1
    }
    csi_run $NODE node-info && [ "$out" = n1 ] || { csi_fail "NodeGetInfo: $out"; return 1; }
    csi_run $CTL create pvc-csi 128 || { csi_fail "CreateVolume"; return 1; }
    vid=$(echo "$out" | head -n1)
    csi_run $CTL controller-publish "$vid" n1 || { csi_fail "ControllerPublishVolume"; return 1; }
    ctx=$(echo "$out" | tr '\n' ' ')
    staging=$D/staging/$vid; target=$D/pods/p1/volumes/data
    csi_run $NODE stage "$vid" "$staging" $ctx || { csi_fail "NodeStageVolume ($ctx)"; return 1; }
    dev=$(awk -v m="$staging" '$2 == m {print $1}' /proc/mounts)
    case "$dev" in /dev/nbd*) ;; *) csi_fail "staging path not mounted from an nbd device ($dev)"; return 1 ;; esac
    fstype=$(awk -v m="$staging" '$2 == m {print $3}' /proc/mounts)
    csi_run $NODE publish "$vid" "$staging" "$target" || { csi_fail "NodePublishVolume"; return 1; }
    is_mounted "$target" || { csi_fail "target not mounted"; return 1; }
    write_set "$target" set-csi || { csi_fail "writing through the published path"; return 1; }
    csi_run $NODE stats "$vid" "$target" || { csi_fail "NodeGetVolumeStats"; return 1; }
    stats=$(echo "$out" | head -n1)
    # Online expansion: the volume grows, then the live nbd device under the
    # mounted filesystem (netlink reconfigure), then the filesystem.
    sectors=$(dev_size "$dev")
    csi_run $CTL controller-expand "$vid" 192 || { csi_fail "ControllerExpandVolume"; return 1; }
    csi_run $NODE node-expand "$vid" "$target" 192 || { csi_fail "NodeExpandVolume"; return 1; }
    [ "$(dev_size "$dev")" = $((192 * 2048)) ] || { csi_fail "$dev is $(dev_size "$dev") sectors after NodeExpandVolume, was $sectors"; return 1; }
    csi_run $NODE stats "$vid" "$target" || { csi_fail "NodeGetVolumeStats after growth"; return 1; }
    grown=$(echo "$out" | head -n1)
    total0=$(echo "$stats" | sed -n 's/.*total=\([0-9]*\).*/\1/p'); total1=$(echo "$grown" | sed -n 's/.*total=\([0-9]*\).*/\1/p')
    [ "${total1:-0}" -gt $((${total0:-0} + 50 * 1048576)) ] || { csi_fail "filesystem did not grow: $stats -> $grown"; return 1; }
    write_set "$target" set-csi-grown || { csi_fail "writing after growth"; return 1; }
    verify_set "$target" set-csi || { csi_fail "data differs after growth"; return 1; }
    csi_run $NODE unpublish "$vid" "$target" || { csi_fail "NodeUnpublishVolume"; return 1; }
    ! is_mounted "$target" || { csi_fail "target still mounted after NodeUnpublishVolume"; return 1; }
    csi_run $NODE unstage "$vid" "$staging" || { csi_fail "NodeUnstageVolume"; return 1; }
    ! grep -q " $staging " /proc/mounts || { csi_fail "staging still mounted after NodeUnstageVolume"; return 1; }
    [ "$(dev_size "$dev")" = 0 ] || { csi_fail "$dev still attached after NodeUnstageVolume"; return 1; }
    # Stage and publish again: the data comes back, the filesystem is not reformatted.
    csi_run $NODE stage "$vid" "$staging" $ctx || { csi_fail "second NodeStageVolume"; return 1; }
    csi_run $NODE publish "$vid" "$staging" "$target" || { csi_fail "second NodePublishVolume"; return 1; }
    verify_set "$target" set-csi && verify_set "$target" set-csi-grown || { csi_fail "data differs after unstage + stage"; return 1; }
    # A restart of the node plugin's container: the plugin and the serving
    # process it started die together. The restarted plugin gives the live
    # device a new serving process; the mounted filesystem only waits.
    spid=$(mapping_field pvc-csi pid)
    kmsg_mark csi-restart
    t1=$(ts)
    kill -9 "$npid" "$spid"; wait "$npid" 2>/dev/null
    csi-plugin --mode node --node-id n1 --endpoint "unix://$NODE" --meta "$META" --state-dir $D/state >> $D/node.log 2>&1 &
    npid=$!
    i=0
    until [ "$(mapping_field pvc-csi served)" = true ] && [ "$(mapping_field pvc-csi pid)" != "$spid" ]; do
        [ $i -lt 600 ] || { csi_fail "no new serving process 60 s after the plugin restart"; return 1; }
        sleep 0.1; i=$((i + 1))
    done
    replaced=$(elapsed "$t1")
    write_set "$target" set-csi-restarted || { csi_fail "writing after the plugin restart"; return 1; }
    verify_set "$target" set-csi && verify_set "$target" set-csi-grown || { csi_fail "data differs after the plugin restart"; return 1; }
    [ "$(mounted_rw "$staging")" = rw ] || { csi_fail "the filesystem is $(mounted_rw "$staging") after the plugin restart"; return 1; }
    errs=$(kmsg_errors csi-restart)
    [ -z "$errs" ] || { csi_fail "kernel errors after the plugin restart: $errs"; return 1; }
    csi_run $NODE unpublish "$vid" "$target" && csi_run $NODE unstage "$vid" "$staging" ||
        { csi_fail "second unpublish/unstage"; return 1; }
    csi_run $CTL controller-unpublish "$vid" n1 || { csi_fail "ControllerUnpublishVolume"; return 1; }
    csi_run $CTL delete "$vid" || { csi_fail "DeleteVolume"; return 1; }
    kill $cpid $npid; wait $cpid $npid 2>/dev/null
    result csi-node PASS "$vid: staged on $dev ($fstype), published, 21 files written, grown online 128 -> 192 MiB (filesystem total $total0 -> $total1 bytes), 21 more files, all verified by sha256 after unstage + stage; plugin and serving process SIGKILLed, device served again ${replaced} s later, files verified, no kernel errors; unpublished, unstaged (device detached), deleted"
}

# ----------------------------------------------------------------- 5. an encrypted volume (LUKS2) through the CSI node service
# StorageClass encrypted=true, the passphrase in the node-stage secret: the
# filesystem sits on the opened container, no chunk file holds a byte of
# plaintext, a wrong or missing passphrase opens nothing, and the volume
# survives unstage + stage, online growth, and a snapshot restored into a
# clone that opens with the same passphrase.
csi_encrypted() {
    command -v cryptsetup >/dev/null || { result csi-encrypted SKIP "cryptsetup not in the initramfs"; return 0; }
    vid=; cid=; sid=
    csi_start /tmp/csi-enc
    target=$D/pods/p1/volumes/data; clone_target=$D/pods/p2/volumes/data
    pass=secret:encryptionPassphrase=correct-horse-battery-staple
    marker=BALLAST-PLAINTEXT-MARKER-7f3a9c
    enc_fail() {
        result csi-encrypted FAIL "$1"
        echo "== controller log"; tail -n 20 $D/controller.log; echo "== node log"; tail -n 30 $D/node.log
        umount "$target" "$clone_target" "$D"/staging/* 2>/dev/null
        for m in /dev/mapper/ballast-*; do [ -e "$m" ] && cryptsetup close "${m#/dev/mapper/}"; done
        for v in pvc-enc pvc-enc-clone; do [ -z "$(mapping_field $v pid)" ] || unmap $v >/dev/null 2>&1; done
        kill $cpid $npid 2>/dev/null; wait $cpid $npid 2>/dev/null
        return 1
    }
    csi_run $CTL create pvc-enc 64 encrypted=true || { enc_fail "CreateVolume encrypted=true"; return 1; }
    vid=$(echo "$out" | head -n1)
    echo "$out" | grep -qx encrypted=true || { enc_fail "no encrypted=true in the volume context: $out"; return 1; }
    csi_run $CTL controller-publish "$vid" n1 || { enc_fail "ControllerPublishVolume"; return 1; }
    ctx="$(echo "$out" | tr '\n' ' ') ctx:encrypted=true"
    staging=$D/staging/$vid
    if csi_run $NODE stage "$vid" "$staging" $ctx; then enc_fail "staged without a passphrase"; return 1; fi
    csi_run $NODE stage "$vid" "$staging" $ctx $pass || { enc_fail "NodeStageVolume"; return 1; }
    src=$(awk -v m="$staging" '$2 == m {print $1}' /proc/mounts)
    [ "$src" = "/dev/mapper/ballast-$vid" ] || { enc_fail "staging mounted from '$src', not the LUKS mapping"; return 1; }
    dev=$(mapping_field pvc-enc device)
    csi_run $NODE publish "$vid" "$staging" "$target" || { enc_fail "NodePublishVolume"; return 1; }
    write_set "$target" set-enc || { enc_fail "writing through the published path"; return 1; }
    i=0; while [ $i -lt 4096 ]; do echo "$marker $i"; i=$((i + 1)); done > "$target/marker.txt"; sync
    grep -qF "$marker" "$src" || { enc_fail "the marker is not on the opened container"; return 1; }
    ! grep -qF "$marker" "$dev" || { enc_fail "plaintext on the attached device $dev"; return 1; }
    files=$(chunk_files "$vid")
    [ -n "$files" ] || { enc_fail "no chunk files of $vid"; return 1; }
    ! grep -lF "$marker" $files || { enc_fail "plaintext in chunk files"; return 1; }
    # Unstaged, the container is closed; a wrong passphrase opens nothing.
    csi_run $NODE unpublish "$vid" "$target" && csi_run $NODE unstage "$vid" "$staging" ||
        { enc_fail "unpublish/unstage"; return 1; }
    [ ! -e "/dev/mapper/ballast-$vid" ] || { enc_fail "the container is still open after NodeUnstageVolume"; return 1; }
    if csi_run $NODE stage "$vid" "$staging" $ctx secret:encryptionPassphrase=wrong; then
        enc_fail "a wrong passphrase opened the volume"; return 1
    fi
    echo "$out" | grep -q "does not open this volume" || { enc_fail "wrong passphrase: $out"; return 1; }
    csi_run $NODE stage "$vid" "$staging" $ctx $pass && csi_run $NODE publish "$vid" "$staging" "$target" ||
        { enc_fail "NodeStageVolume again"; return 1; }
    verify_set "$target" set-enc || { enc_fail "data differs after unstage + stage"; return 1; }
    # Online growth: the volume, the device, the container, the filesystem.
    csi_run $NODE stats "$vid" "$target" && total0=$(echo "$out" | sed -n '1s/.*total=\([0-9]*\).*/\1/p')
    csi_run $CTL controller-expand "$vid" 96 && csi_run $NODE node-expand "$vid" "$target" 96 ||
        { enc_fail "expansion"; return 1; }
    csi_run $NODE stats "$vid" "$target" && total1=$(echo "$out" | sed -n '1s/.*total=\([0-9]*\).*/\1/p')
    [ "${total1:-0}" -gt $((${total0:-0} + 24 * 1048576)) ] || { enc_fail "filesystem did not grow: $total0 -> $total1"; return 1; }
    # A snapshot restored into a clone (no encrypted parameter): still a
    # container, refused without the passphrase, opened with it.
    csi_run $CTL snapshot snap-enc "$vid" || { enc_fail "CreateSnapshot"; return 1; }
    sid=$(echo "$out" | head -n1)
    csi_run $CTL create pvc-enc-clone 96 "from-snapshot=$sid" || { enc_fail "CreateVolume from the snapshot"; return 1; }
    cid=$(echo "$out" | head -n1)
    csi_run $CTL controller-publish "$cid" n1 || { enc_fail "ControllerPublishVolume (clone)"; return 1; }
    cctx=$(echo "$out" | tr '\n' ' ')
    if csi_run $NODE stage "$cid" "$D/staging/$cid" $cctx; then enc_fail "the clone staged without a passphrase"; return 1; fi
    csi_run $NODE stage "$cid" "$D/staging/$cid" $cctx $pass && csi_run $NODE publish "$cid" "$D/staging/$cid" "$clone_target" ||
        { enc_fail "staging the clone"; return 1; }
    [ "$(awk -v m="$D/staging/$cid" '$2 == m {print $1}' /proc/mounts)" = "/dev/mapper/ballast-$cid" ] ||
        { enc_fail "the clone is not mounted from its LUKS mapping"; return 1; }
    verify_set "$clone_target" set-enc || { enc_fail "the clone's data differs"; return 1; }
    cfiles=$(chunk_files "$cid")
    [ -n "$cfiles" ] && ! grep -lF "$marker" $cfiles || { enc_fail "plaintext in the clone's chunk files"; return 1; }
    for v in "$cid:$clone_target" "$vid:$target"; do
        csi_run $NODE unpublish "${v%%:*}" "${v#*:}" && csi_run $NODE unstage "${v%%:*}" "$D/staging/${v%%:*}" &&
            csi_run $CTL controller-unpublish "${v%%:*}" n1 || { enc_fail "tearing ${v%%:*} down"; return 1; }
    done
    csi_run $CTL delete "$cid" && csi_run $CTL delete-snapshot "$sid" && csi_run $CTL delete "$vid" ||
        { enc_fail "deleting"; return 1; }
    kill $cpid $npid; wait $cpid $npid 2>/dev/null
    result csi-encrypted PASS "$vid: LUKS2 on $dev, 21 files + marker written, marker on the container, not on the device nor in $(echo $files | wc -w) chunk files; refused without and with a wrong passphrase; verified after unstage + stage; grown 64 -> 96 MiB (filesystem $total0 -> $total1 bytes); snapshot $sid restored into $cid: refused without the passphrase, verified with it, no plaintext in its chunks"
}

# ----------------------------------------------------------------- main
log "scenarios: $ONLY; load after each disruption: $LOAD_SECS s"
mkdir -p "$STATE"
for b in ballast meta-raft storage-server nbd-client csi-plugin loadgen csi-client; do
    command -v "$b" >/dev/null || { result binaries FAIL "$b missing"; exit 1; }
done

if cluster_up; then
    t0=$(ts)
    if timeout 60 ballast volume create v1 --size 256MiB --replicas 3 --meta "$META"; then
        result volume-create PASS "v1 256 MiB, 3 replicas in $(elapsed "$t0") s"
        wanted basic-netlink && { basic_round basic-netlink "" netlink || release_v1; }
        wanted basic-ioctl && { basic_round basic-ioctl "--method ioctl" ioctl || release_v1; }
        wanted grow-netlink && { grow_online grow-netlink "" 320 || release_v1; }
        wanted grow-ioctl && { grow_online grow-ioctl "--method ioctl" 384 || release_v1; }
        wanted identity && identity
        wanted csi-node && csi_node
        wanted csi-encrypted && csi_encrypted
        # A request stranded on the killed process's socket is resent when its
        # timer fires: the 500 ms request timeout, checked by a block-layer
        # timer rounded up to the next whole second, so 0.5-1.5 s, plus one
        # TCG operation (150-300 ms). The old 8 s timeout paused 8.2 s here.
        wanted restart-sigkill && under_load restart-sigkill action_sigkill 2500
        wanted restart-sigkill-both && under_load restart-sigkill-both action_sigkill_both
        wanted restart-sigterm && under_load restart-sigterm action_sigterm 1000
        wanted restart-takeover && under_load restart-takeover action_takeover 1000
        wanted freeze && under_load freeze action_freeze
        wanted storage-kill && under_load storage-kill action_kill_storage
        # Tear down: the filesystem must still check clean.
        if is_mounted "$MNT"; then
            umount "$MNT" || result teardown FAIL "umount"
        fi
        if [ -n "$(mapping_field v1 pid)" ]; then
            dev=$(mapping_field v1 device)
            e2fsck -fn "$dev" >/tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; result final-fsck FAIL "e2fsck after the disruptions"; }
            unmap v1 || result teardown FAIL "unmap v1"
        fi
    else
        result volume-create FAIL "ballast volume create v1"
        dump_logs volume-create
    fi
    timeout 60 ballast dev down --dir "$C" >/dev/null 2>&1 || true
fi

echo "kernel log, errors and warnings:"
dmesg | grep -Ei 'error|warn|nbd|EXT4' | grep -v 'vmtest: mark' | tail -n 30
[ $FAILED = 0 ]
