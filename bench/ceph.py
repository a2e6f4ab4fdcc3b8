"""A single-host Ceph cluster as a benchmark peer: what most users would run
instead of Ballast, measured on the same machine in the same run.

One monitor and three BlueStore OSDs on files, a pool of size 3, an RBD
image driven by fio's rbd engine with the client cache off (as Ballast's
volumes have none). Authentication is off and every address is loopback:
this cluster exists for the length of one benchmark.

Needs Debian's ceph-mon, ceph-osd and ceph-common (`ensure_installed`).
"""

import os
import subprocess
import time
import uuid
from pathlib import Path

PACKAGES = ["ceph-mon", "ceph-osd", "ceph-common"]
TOOLS = ["ceph-mon", "ceph-osd", "ceph", "rbd", "monmaptool", "ceph-authtool"]
OSDS = 3
# Not a default Ceph port, so a cluster already on this machine is left alone.
MON_PORT = 43300
OSD_BLOCK_BYTES = 4 << 30
# Enough for BlueStore's caches at this size; the default (4 GiB) per OSD is
# sized for production disks.
OSD_MEMORY_TARGET = 1 << 30
# Every cluster command gets this long: without a manager some commands wait forever.
COMMAND_TIMEOUT_S = 60


def ensure_installed(log):
    missing = [t for t in TOOLS if not any((Path(d) / t).exists() for d in os.environ["PATH"].split(":"))]
    if not missing:
        return
    log(f"installing {' '.join(PACKAGES)} (missing {' '.join(missing)})")
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES], check=True, env=env,
                   stdout=subprocess.DEVNULL)


class CephCluster:
    """Started by the constructor, stopped by `down`."""

    def __init__(self, workdir, log):
        self.dir = Path(workdir) / "ceph"
        self.log = log
        self.conf = self.dir / "ceph.conf"
        self.pids = []
        fsid = str(uuid.uuid4())
        for sub in ("run", "log", "mon", "osd"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self._config(fsid))
        monmap, keyring = self.dir / "monmap", self.dir / "mon.keyring"
        self._run("monmaptool", "--create", "--clobber", "--addv", "a", f"[v2:127.0.0.1:{MON_PORT}]",
                  "--fsid", fsid, monmap)
        self._run("ceph-authtool", "--create-keyring", keyring, "--gen-key", "-n", "mon.", "--cap", "mon", "allow *")
        self._run("ceph-mon", "-c", self.conf, "--mkfs", "-i", "a", "--monmap", monmap, "--keyring", keyring)
        self._start("ceph-mon", "-i", "a")
        for _ in range(OSDS):
            osd_uuid = str(uuid.uuid4())
            osd_id = self._run("ceph", "-c", self.conf, "osd", "new", osd_uuid).strip()
            (self.dir / "osd" / osd_id).mkdir()
            self._run("ceph-osd", "-c", self.conf, "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid)
            self._start("ceph-osd", "-i", osd_id)
        self._wait_osds_up()
        self.ceph("osd", "pool", "create", "rbd", "32", "32")
        self.ceph("osd", "pool", "set", "rbd", "size", "3", "--yes-i-really-mean-it")
        self._run("rbd", "-c", self.conf, "pool", "init", "rbd")

    def _config(self, fsid):
        d = self.dir
        return f"""[global]
fsid = {fsid}
mon_host = v2:127.0.0.1:{MON_PORT}
auth_cluster_required = none
auth_service_required = none
auth_client_required = none
ms_bind_ipv6 = false
run_dir = {d}/run
admin_socket = {d}/run/$name.asok
log_file = {d}/log/$name.log
osd_pool_default_size = 3
osd_pool_default_min_size = 2
# Three OSDs on one host: replicas go to different OSDs, not hosts.
osd_crush_chooseleaf_type = 0
mon_data_avail_warn = 1
[mon]
mon_data = {d}/mon/$name
[osd]
osd_data = {d}/osd/$id
osd_objectstore = bluestore
bluestore_block_path = {d}/osd/$id.block
bluestore_block_create = true
bluestore_block_size = {OSD_BLOCK_BYTES}
osd_memory_target = {OSD_MEMORY_TARGET}
[client]
rbd_cache = false
"""

    def _run(self, *cmd):
        self.log(" ".join(str(c) for c in cmd))
        return subprocess.run([str(c) for c in cmd], check=True, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S).stdout

    def _start(self, binary, *args):
        # Daemons fork into the background by default; stay in the foreground
        # so the process we started is the one we stop.
        proc = subprocess.Popen([binary, "-f", "-c", str(self.conf), *args],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.pids.append(proc)

    def ceph(self, *args):
        return self._run("ceph", "-c", self.conf, *args)

    def _wait_osds_up(self):
        deadline = time.time() + COMMAND_TIMEOUT_S
        while True:
            stat = self.ceph("osd", "stat", "--format=json")
            if f'"num_up_osds":{OSDS}' in stat.replace(" ", ""):
                return
            if time.time() > deadline:
                raise RuntimeError(f"Ceph OSDs not all up: {stat}")
            time.sleep(1)

    def image(self, name, size):
        """Creates an RBD image; returns fio's [global] lines for it."""
        self._run("rbd", "-c", self.conf, "create", "--size", f"{size // (1 << 20)}M", f"rbd/{name}")
        return ["ioengine=rbd", "clientname=admin", "pool=rbd", f"rbdname={name}"]

    def env(self):
        """What a client (fio) needs to find this cluster."""
        return {"CEPH_CONF": str(self.conf)}

    def cpu_pids(self):
        return [p.pid for p in self.pids]

    def down(self):
        for proc in self.pids:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.pids:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
