#!/bin/busybox sh
# /init of the VM test initramfs (PID 1): mounts the pseudo filesystems,
# loads the kernel modules, prepares the scratch disk, runs
# /vm/guest-test.sh and prints the verdict on the serial console for
# tests/vm/run.sh, then powers off.
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /mnt /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs tmpfs /dev/shm
export PATH=/opt/ballast/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TERM=dumb NO_COLOR=1
mkdir -p /root
hostname vm

ts() { cut -d' ' -f1 /proc/uptime; }
log() { echo "[init $(ts)] $*"; }
finish() {
    echo "=== BALLAST-VM-TEST $1 ==="
    sync
    poweroff -f
    sleep 10
}

# Modules in dependency order (resolved on the host from modinfo depends=).
while read -r m args; do
    [ -n "$m" ] || continue
    insmod "/lib/modules/$m" $args || log "insmod $m failed"
done < /lib/modules/load-order
ip link set lo up

# Scratch disk for the cluster's data (meta-raft's sled, chunk files):
# a real filesystem, so the chunk servers use O_DIRECT as in production.
mkdir -p /tmp/c
if [ -b /dev/vda ]; then
    mkfs.ext4 -q -F -L scratch /dev/vda && mount -o noatime /dev/vda /tmp/c && rm -rf /tmp/c/lost+found
fi
log "kernel $(uname -r), $(grep -c ^processor /proc/cpuinfo) cpus, $(awk '/MemTotal/{print int($2/1024)}' /proc/meminfo) MiB," \
    "modules: $(awk '{printf "%s ", $1}' /proc/modules)"

if sh /vm/guest-test.sh; then finish PASS; else finish FAIL; fi
