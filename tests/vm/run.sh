#!/usr/bin/env bash
# Kernel NBD tests in a VM: boots Debian's kernel under QEMU (TCG, no KVM
# needed) with an initramfs holding Ballast's release binaries, runs
# tests/vm/guest-test.sh inside (a whole cluster on the guest's loopback,
# real /dev/nbdN devices attached by our nbd-client, ext4 on top) and reads
# the verdict from the serial console. `make vm-test` runs this.
#
# Downloads (kernel, QEMU, busybox-static .debs via `apt-get download`) and
# what is extracted from them are cached under .cache/vm/ (gitignored).
# Needs root on a Debian bookworm host; installs missing host packages
# (QEMU's shared libraries, cpio) with apt-get.
#
# Environment:
#   VM_TIMEOUT=secs   wall-clock limit for the VM (default 900; a passing run
#                     takes about 6 minutes here, and emulation on a busy
#                     host is slower)
#   VM_ONLY=a,b       scenarios to run (default all): basic-netlink,
#                     basic-ioctl, grow-netlink, grow-ioctl, identity,
#                     csi-node, restart-sigkill, restart-sigkill-both,
#                     restart-sigterm, restart-takeover, freeze,
#                     storage-kill, csi-encrypted
#   VM_LOAD_SECS=n    seconds of load after each disruption (default 6)
#   VM_MAX_PAUSE_MS=n fail a disruption whose longest I/O pause is longer
#                     (default: measure and report only)
#   VM_BUILD=0        do not run cargo build (use VM_BIN_DIR as it is)
#   VM_BIN_DIR=dir    where the release binaries are (default target/release)
#   VM_MEM=MiB VM_SMP=n   guest size (default 2048 MiB, 2 vCPUs)
#   VM_KEEP=1         keep the work directory (initramfs, scratch disk)
#   VM_GUEST_TEST=f   run this script in the guest instead of guest-test.sh
#                     (for working on the harness itself)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$ROOT/tests/vm
CACHE=${VM_CACHE:-$ROOT/.cache/vm}
TIMEOUT=${VM_TIMEOUT:-900}
ONLY=${VM_ONLY:-all}
LOAD_SECS=${VM_LOAD_SECS:-6}
BIN_DIR=${VM_BIN_DIR:-$ROOT/target/release}
MEM=${VM_MEM:-2048}
SMP=${VM_SMP:-2}
BINARIES=(ballast meta-raft storage-server nbd-client csi-plugin)
PACKAGES=(-p meta-raft -p storage-server -p nbd-client -p ballast-cli -p csi-plugin)

t_start=$(date +%s)
say() { echo "[vm-test +$(($(date +%s) - t_start))s] $*"; }
die() { echo "vm-test: $*" >&2; exit 1; }

WORK=
QPID=
TAILPID=
cleanup() {
    [ -z "$QPID" ] || kill "$QPID" 2>/dev/null || true
    [ -z "$TAILPID" ] || kill "$TAILPID" 2>/dev/null || true
    if [ -n "$WORK" ] && [ "${VM_KEEP:-0}" != 1 ]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ "$(id -u)" = 0 ] || die "run as root (apt-get, and the host side has to read the downloaded packages)"
mkdir -p "$CACHE/debs" "$CACHE/bin"

# ---------------------------------------------------------------- host packages
apt_updated=0
apt_update() { [ $apt_updated = 1 ] || { say "apt-get update" >&2; apt-get update -qq; apt_updated=1; }; }
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
ensure_packages() {
    local missing=() p
    for p in "$@"; do installed "$p" || missing+=("$p"); done
    [ ${#missing[@]} = 0 ] && return 0
    apt_update
    say "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
cached() { ls "$CACHE/debs/$1"_*.deb >/dev/null 2>&1; }
# apt_update_for PACKAGE...: `apt-get update` once (in this shell) if any of them is not cached yet.
apt_update_for() {
    local p
    for p in "$@"; do cached "$p" || { apt_update; return 0; }; done
}
# download PACKAGE: the newest cached .deb of PACKAGE, fetched with `apt-get download` if there is none.
# (Called in $(...): run apt_update_for first, a subshell's apt_updated does not come back.)
download() {
    local deb
    deb=$(ls "$CACHE/debs/$1"_*.deb 2>/dev/null | sort -V | tail -n1 || true)
    if [ -z "$deb" ]; then
        apt_update
        say "apt-get download $1" >&2
        # `_apt` cannot write into a root-owned cache: download as root without the sandbox warning
        (cd "$CACHE/debs" && apt-get download -o APT::Sandbox::User=root "$1" >/dev/null)
        deb=$(ls "$CACHE/debs/$1"_*.deb | sort -V | tail -n1)
    fi
    echo "$deb"
}

ensure_packages cpio e2fsprogs util-linux binutils xz-utils cryptsetup-bin

# ---------------------------------------------------------------- QEMU (extracted, not installed)
# `apt-get install qemu-system-x86` conflicts with newer qemu-utils from backports; extract the
# bookworm packages instead and install only the shared libraries qemu-system-x86 depends on
# (qemu-system-common is needed for its TCG accelerator module only).
QDIR=$CACHE/qemu
apt_update_for qemu-system-x86 qemu-system-common qemu-system-data seabios busybox-static
if [ ! -x "$QDIR/usr/bin/qemu-system-x86_64" ]; then
    rm -rf "$QDIR.tmp"; mkdir -p "$QDIR.tmp"
    for p in qemu-system-x86 qemu-system-common qemu-system-data seabios; do dpkg-deb -x "$(download $p)" "$QDIR.tmp"; done
    rm -rf "$QDIR"; mv "$QDIR.tmp" "$QDIR"
fi
qemu_libs=$(dpkg-deb -f "$(download qemu-system-x86)" Depends | tr ',' '\n' | sed -E 's/^ *([^ (|]+).*/\1/' | grep '^lib')
# shellcheck disable=SC2086
ensure_packages $qemu_libs
QEMU=$QDIR/usr/bin/qemu-system-x86_64
export QEMU_MODULE_DIR=$QDIR/usr/lib/x86_64-linux-gnu/qemu # accel-tcg-x86_64.so (qemu-system-common)
if "$QEMU" --version >/dev/null 2>&1; then :; else
    ldd "$QEMU" | grep 'not found' >&2 || true
    die "$QEMU does not start"
fi

# ---------------------------------------------------------------- kernel + modules
# dm_crypt and the ciphers of LUKS2's default aes-xts-plain64 (plus the
# userspace crypto API cryptsetup encrypts key slots with): the guest has no
# modprobe to load them on demand.
MODULES=(nbd virtio_pci virtio_blk virtio-rng crc32c_generic ext4 dm_crypt xts aes_generic aesni_intel algif_skcipher)
kdeb=
for deb in "$CACHE"/debs/linux-image-*-amd64_*.deb; do
    case "$deb" in *unsigned*) ;; *) [ -f "$deb" ] && kdeb=$deb ;; esac # normally just one
done
if [ -z "$kdeb" ]; then
    apt_update
    kpkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}')
    [ -n "$kpkg" ] || die "cannot resolve linux-image-amd64"
    kdeb=$(download "$kpkg")
fi
KV=$(basename "$kdeb" | sed -E 's/^linux-image-([^_]+)_.*/\1/')
# A changed module list makes a new directory: what is cached holds only its own list.
KDIR=$CACHE/kernel-$KV-$(echo "${MODULES[*]}" | md5sum | cut -c1-8)
if [ ! -f "$KDIR/load-order" ]; then
    say "extracting kernel $KV"
    rm -rf "$KDIR" "$KDIR.tmp"; mkdir -p "$KDIR.tmp/x" "$KDIR.tmp/modules"
    dpkg-deb --fsys-tarfile "$kdeb" | tar -x -C "$KDIR.tmp/x" --wildcards "./boot/vmlinuz-$KV" "./lib/modules/$KV/kernel/*"
    cp "$KDIR.tmp/x/boot/vmlinuz-$KV" "$KDIR.tmp/vmlinuz"
    # The uncompressed ELF boots through its PVH entry: no real mode, no in-guest XZ (faster under TCG).
    off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$KDIR.tmp/vmlinuz" | head -n1 | cut -d: -f1 || true)
    if [ -n "$off" ]; then
        tail -c +$((off + 1)) "$KDIR.tmp/vmlinuz" > "$KDIR.tmp/payload.xz"
        xz -dc --single-stream < "$KDIR.tmp/payload.xz" > "$KDIR.tmp/vmlinux" 2>/dev/null || true
        rm -f "$KDIR.tmp/payload.xz"
    fi
    [ "$(head -c 4 "$KDIR.tmp/vmlinux" 2>/dev/null | od -An -tx1 | tr -d ' \n')" = 7f454c46 ] || rm -f "$KDIR.tmp/vmlinux"
    # Load order from each module's depends= (there is no modules.dep in the package).
    declare -A seen=()
    order=()
    visit() {
        local name=${1//-/_} path dep
        [ -z "${seen[$name]:-}" ] || return 0
        seen[$name]=1
        path=$(find "$KDIR.tmp/x/lib/modules" -name "$name.ko" -o -name "${name//_/-}.ko" | head -n1)
        [ -n "$path" ] || return 0 # built in
        for dep in $(tr '\0' '\n' < "$path" | sed -n 's/^depends=//p' | tr ',' ' '); do visit "$dep"; done
        cp "$path" "$KDIR.tmp/modules/"
        order+=("$(basename "$path")")
    }
    for m in "${MODULES[@]}"; do visit "$m"; done
    for m in "${order[@]}"; do
        case "$m" in nbd.ko) echo "$m nbds_max=4" ;; *) echo "$m" ;; esac
    done > "$KDIR.tmp/load-order"
    rm -rf "$KDIR.tmp/x"
    mv "$KDIR.tmp" "$KDIR"
fi
if [ -f "$KDIR/vmlinux" ]; then KIMG=$KDIR/vmlinux; else KIMG=$KDIR/vmlinuz; fi

# ---------------------------------------------------------------- busybox-static (extracted)
BUSYBOX=$CACHE/busybox/bin/busybox
if [ ! -x "$BUSYBOX" ]; then
    rm -rf "$CACHE/busybox"; mkdir -p "$CACHE/busybox"
    dpkg-deb -x "$(download busybox-static)" "$CACHE/busybox"
fi

# ---------------------------------------------------------------- our binaries
if [ "${VM_BUILD:-1}" != 0 ]; then
    say "cargo build --release ${PACKAGES[*]}"
    (cd "$ROOT" && cargo build --release "${PACKAGES[@]}")
fi
for b in "${BINARIES[@]}"; do [ -x "$BIN_DIR/$b" ] || die "$BIN_DIR/$b missing (cargo build --release)"; done
LOADGEN=$CACHE/bin/loadgen
if [ ! -x "$LOADGEN" ] || [ "$HERE/loadgen.rs" -nt "$LOADGEN" ]; then
    say "rustc tests/vm/loadgen.rs"
    rustc --edition 2021 -C opt-level=2 -C strip=symbols "$HERE/loadgen.rs" -o "$LOADGEN"
fi

# The CSI test client: its own package (not a workspace member), built from a copy under the
# cache against the workspace's Cargo.lock and target directory.
CSI_CLIENT=$ROOT/target/release/csi-client
if [ "${VM_BUILD:-1}" != 0 ] || [ ! -x "$CSI_CLIENT" ]; then
    src=$CACHE/csi-client
    mkdir -p "$src/src"
    # Copied keeping timestamps, and only what changed: cargo then rebuilds nothing needlessly.
    update() { cmp -s "$1" "$2" || cp -p "$1" "$2"; }
    update "$HERE/csi-client/src/main.rs" "$src/src/main.rs"
    sed "s#path = \"../../../proto\"#path = \"$ROOT/proto\"#" "$HERE/csi-client/Cargo.toml" > "$src/Cargo.toml.new"
    update "$src/Cargo.toml.new" "$src/Cargo.toml"
    rm -f "$src/Cargo.toml.new"
    update "$ROOT/Cargo.lock" "$src/Cargo.lock"
    say "cargo build --release tests/vm/csi-client"
    CARGO_TARGET_DIR=$ROOT/target cargo build --release --manifest-path "$src/Cargo.toml"
fi

# ---------------------------------------------------------------- initramfs
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ballast-vm.XXXXXX")
IR=$WORK/root
mkdir -p "$IR"/{bin,sbin,usr/local/bin,usr/local/sbin,opt/ballast/bin,lib/modules,lib64,etc,vm}
ln -s ../lib "$IR/usr/lib" # libraries land in /lib/...; merged-/usr paths resolve too
cp "$BUSYBOX" "$IR/bin/busybox"
ln -s busybox "$IR/bin/sh"
install -m 755 "$HERE/guest-init.sh" "$IR/init"
install -m 755 "${VM_GUEST_TEST:-$HERE/guest-test.sh}" "$IR/vm/guest-test.sh"
for b in "${BINARIES[@]}"; do strip -o "$IR/opt/ballast/bin/$b" "$BIN_DIR/$b"; done
cp "$LOADGEN" "$IR/usr/local/bin/loadgen"
strip -o "$IR/usr/local/bin/csi-client" "$CSI_CLIENT"
# e2fsprogs and util-linux from the host (busybox's mount and blkid are not util-linux's).
host_tool() { # host_tool NAME DEST_DIR [ALIAS...]
    local src
    src=$(PATH=/usr/sbin:/usr/bin:/sbin:/bin command -v "$1") || die "host tool $1 missing"
    cp "$src" "$IR/$2/$1"
    local alias; for alias in "${@:3}"; do ln -sf "$1" "$IR/$2/$alias"; done
}
host_tool mke2fs usr/local/sbin mkfs.ext4
host_tool e2fsck usr/local/sbin fsck.ext4
host_tool resize2fs usr/local/sbin
host_tool mount usr/local/bin
host_tool umount usr/local/bin
host_tool blkid usr/local/sbin
host_tool cryptsetup usr/local/sbin
[ ! -f /etc/mke2fs.conf ] || cp /etc/mke2fs.conf "$IR/etc/"
# Shared libraries: whatever ldd lists for the dynamic binaries (glibc and friends).
for f in "$IR"/opt/ballast/bin/* "$IR"/usr/local/bin/* "$IR"/usr/local/sbin/*; do
    [ -L "$f" ] && continue
    ldd "$f" 2>/dev/null | awk '/=> \//{print $3} /^\t\/lib64/{print $1}'
done | sort -u | while read -r lib; do
    mkdir -p "$IR$(dirname "$lib")"
    cp -L "$lib" "$IR$lib"
done
for f in "$IR"/opt/ballast/bin/* "$IR"/usr/local/bin/loadgen "$IR"/usr/local/sbin/mke2fs "$IR"/usr/local/bin/mount; do
    if chroot "$IR" /lib64/ld-linux-x86-64.so.2 --list "${f#"$IR"}" | grep -q 'not found'; then
        chroot "$IR" /lib64/ld-linux-x86-64.so.2 --list "${f#"$IR"}" >&2
        die "missing libraries for ${f#"$IR"} in the initramfs"
    fi
done
cp "$KDIR"/modules/*.ko "$KDIR/load-order" "$IR/lib/modules/"
# Uncompressed: unpacking is a copy, decompressing under TCG would cost seconds.
(cd "$IR" && find . | cpio -o -H newc --quiet) > "$WORK/initramfs.cpio"
say "initramfs $(du -m "$WORK/initramfs.cpio" | cut -f1) MiB; kernel $KV ($(basename "$KIMG")); modules: $(awk '{printf "%s ", $1}' "$KDIR/load-order")"
rm -rf "$IR"

# ---------------------------------------------------------------- boot
truncate -s 4G "$WORK/scratch.img" # the cluster's data disk (sparse)
LOG=$WORK/console.log
: > "$LOG"
APPEND="console=ttyS0 panic=-1 quiet loglevel=4 vmtest.only=$ONLY vmtest.load_secs=$LOAD_SECS"
[ -z "${VM_MAX_PAUSE_MS:-}" ] || APPEND="$APPEND vmtest.max_pause_ms=$VM_MAX_PAUSE_MS"
say "booting: $SMP vCPUs, $MEM MiB, TCG, timeout ${TIMEOUT}s"
tail -n +1 -f "$LOG" &
TAILPID=$!
t_boot=$(date +%s)
timeout -k 5 "$TIMEOUT" "$QEMU" -L "$QDIR/usr/share/qemu" -L "$QDIR/usr/share/seabios" \
    -accel tcg,thread=multi -cpu max -M q35 -smp "$SMP" -m "$MEM" \
    -display none -monitor none -serial "file:$LOG" -no-reboot -nic none \
    -kernel "$KIMG" -initrd "$WORK/initramfs.cpio" -append "$APPEND" \
    -drive "file=$WORK/scratch.img,if=virtio,format=raw,cache=unsafe,discard=unmap" \
    -device virtio-rng-pci &
QPID=$!
set +e
wait "$QPID"
qrc=$?
set -e
QPID=
sleep 0.5
kill "$TAILPID" 2>/dev/null || true
TAILPID=
t_end=$(date +%s)

mkdir -p "$CACHE/last"
cp "$LOG" "$CACHE/last/console.log"
echo
echo "================ VM test summary ================"
grep -a '^RESULT ' "$LOG" | sed 's/^RESULT /  /' || true
grep -a '^METRIC ' "$LOG" | sed 's/^METRIC /  metric: /' || true
echo "qemu exit $qrc$([ $qrc = 124 ] && echo ' (TIMEOUT)'); VM ${TIMEOUT}s limit: ran $((t_end - t_boot)) s; total $((t_end - t_start)) s"
echo "console log: $CACHE/last/console.log"
if [ $qrc = 0 ] && grep -aq '^=== BALLAST-VM-TEST PASS ===' "$LOG"; then
    echo "vm-test: PASS"
    exit 0
fi
echo "vm-test: FAIL"
exit 1
