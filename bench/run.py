#!/usr/bin/env python3
"""Runs the fio jobs in bench/jobs against the baselines and Ballast, in one go.

Targets, all measured in the same run on the same machine, each job on every
target before the next job starts:
  local-file   a file in the work directory, ioengine=io_uring, direct=1 (the disk's ceiling)
  qemu-nbd     qemu-nbd serving a file (cache=none), ioengine=nbd (the ceiling behind NBD on loopback)
  ballast-r1   a Ballast volume with replicas=1 served by `nbd-client serve`, ioengine=nbd
  ballast-r3   the same with replicas=3
  ballast-r3-plain  replicas=3 on a second cluster started --insecure: what mutual TLS costs
  ballast-r3-overloaded  replicas=3 with one of the three chunk servers held to
               5% of a CPU (cgroup cpu controller) during its jobs: a node
               overloaded by its other tenants
  ceph-rbd     with PEERS=ceph: a 3-OSD Ceph cluster on this host, pool size 3,
               fio's rbd engine (bench/ceph.py); installs Debian's Ceph if missing

Ballast clusters run with mutual TLS (as `ballast dev up` does) unless the
target says plain. The report gives the CPU time each target's server side
spent per I/O (µs; user+system time of its processes over the job divided
by IOPS × the job's duration with its ramp): qemu-nbd; for Ballast the
serving process, the chunk servers and the metadata service; for Ceph the
monitor and the OSDs (its client library runs inside fio and is not
counted).

With BENCH_CLUSTER=FILE the Ballast targets use a cluster that is already
running, on other machines: FILE holds its BALLAST_META and BALLAST_TLS_DIR
(an admin certificate) as KEY=VALUE lines, as `ballast dev up` writes them
to cluster.env. Their volumes are created there, served by `nbd-client serve`
on this machine, and deleted at the end. The chunk servers' CPU is not seen
from here, so their CPU per I/O is the serving process's alone; the targets
that need the cluster's processes at hand (`-plain`, `-overloaded`) are
left out. On one machine every replica shares its cores and its disk: a
3-replica volume does three times the server work of qemu-nbd on the same
cores, which a cluster of separate machines does not.

Writes bench/results/<timestamp>.json, .md (tables with ratios to qemu-nbd
and to Ceph, the machine and the commit) and .svg (chart). Environment:
BENCH_RUNTIME (s, default 10), BENCH_SIZE (default 512MiB), BENCH_TARGETS
(comma list, default all but the peers), PEERS (comma list: ceph),
BENCH_JOBS (comma list of job names, default all in bench/jobs), BENCH_DIR
(work directory), BENCH_CLUSTER (see above), BENCH_BIN (Ballast's binaries,
default target/release), BENCH_RESULTS (default bench/results).
"""

import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ceph

ROOT = Path(__file__).resolve().parent.parent
JOBS = ROOT / "bench" / "jobs"
RESULTS = Path(os.environ.get("BENCH_RESULTS") or ROOT / "bench" / "results")
BIN = Path(os.environ.get("BENCH_BIN") or ROOT / "target" / "release")
ALL_TARGETS = ["local-file", "qemu-nbd", "ceph-rbd", "ballast-r1", "ballast-r3", "ballast-r3-plain",
               "ballast-r3-overloaded"]
# Measured only when asked for (PEERS=ceph): they need packages and minutes.
PEER_TARGETS = {"ceph": "ceph-rbd"}
RAMP_S = 2
# The share of a CPU left to the overloaded target's slowed chunk server.
OVERLOADED_CPU_PERCENT = 5
BASELINE = "qemu-nbd"
# The peer Ballast is compared with when it ran, and the Ballast target compared.
PEER, OURS = "ceph-rbd", "ballast-r3"
# Targets that need the cluster's processes on this machine.
LOCAL_ONLY = ("ballast-r3-plain", "ballast-r3-overloaded")
DAEMONS = ["meta-raft", "storage-server", "nbd-client"]
ALL_JOBS = [p.stem for p in sorted(JOBS.glob("*.fio"))]
# The jobs this run measures, in report order.
JOB_ORDER = [j for j in ALL_JOBS if j in os.environ.get("BENCH_JOBS", ",".join(ALL_JOBS)).split(",")]


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def run(cmd, **kw):
    log(" ".join(str(c) for c in cmd))
    return subprocess.run(cmd, check=True, **kw)


def wait_for(path, timeout=30):
    deadline = time.time() + timeout
    while not Path(path).exists():
        if time.time() > deadline:
            raise RuntimeError(f"{path} did not appear within {timeout}s")
        time.sleep(0.1)


class Target:
    """Where fio sends I/O: the [global] lines that point it there."""

    def __init__(self, name, global_lines, processes=(), cpu_pids=(), env=None, node_pids=()):
        self.name = name
        self.global_lines = global_lines
        self.processes = list(processes)
        # Whose CPU time counts as this target's (empty: not measured).
        self.cpu_pids = list(cpu_pids)
        # Of those, the process serving the device on the node: what stays
        # on this machine when the servers run on others.
        self.node_pids = list(node_pids)
        # Added to fio's environment.
        self.env = env or {}
        # What holds while its jobs run (a context manager factory).
        self.condition = contextlib.nullcontext

    def cpu_seconds(self):
        """User and system time so far: of every process counted for this
        target, and of its serving process alone."""
        return self.seconds_of(self.cpu_pids), self.seconds_of(self.node_pids)

    @staticmethod
    def seconds_of(pids):
        ticks = 0
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            ticks += int(fields[11]) + int(fields[12])  # utime, stime
        return ticks / os.sysconf("SC_CLK_TCK")

    def stop(self):
        for p in self.processes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()


class CpuLimit:
    """Holds a process to a share of one CPU: a cgroup of its own with the cpu
    controller's bandwidth limit (v1 cpu.cfs_quota_us, else v2 cpu.max); it
    goes back to its own cgroup on exit."""

    V1, V2, PERIOD_US = Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup"), 100_000

    def __init__(self, pid, percent):
        self.pid, self.quota_us = pid, self.PERIOD_US * percent // 100
        self.v1 = (self.V1 / "cpu.cfs_quota_us").exists()
        self.root = self.V1 if self.v1 else self.V2

    def own_cgroup(self):
        for line in Path(f"/proc/{self.pid}/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if ("cpu" in controllers.split(",")) if self.v1 else not controllers:
                return self.root / path.lstrip("/")
        raise RuntimeError(f"process {self.pid} is in no cpu cgroup")

    def __enter__(self):
        self.home = self.own_cgroup()
        self.dir = self.root / f"ballast-bench-cpu-{self.pid}"
        self.dir.mkdir()
        if self.v1:
            (self.dir / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
            (self.dir / "cpu.cfs_quota_us").write_text(str(self.quota_us))
        else:
            (self.root / "cgroup.subtree_control").write_text("+cpu")
            (self.dir / "cpu.max").write_text(f"{self.quota_us} {self.PERIOD_US}")
        (self.dir / "cgroup.procs").write_text(str(self.pid))
        log(f"process {self.pid} held to {self.quota_us * 100 // self.PERIOD_US}% of a CPU")
        return self

    def __exit__(self, *exc):
        with contextlib.suppress(OSError):
            (self.home / "cgroup.procs").write_text(str(self.pid))
        self.dir.rmdir()


def fio(target, job, size, runtime, workdir, time_based=True):
    text = "[global]\n" + "\n".join(target.global_lines) + f"\nsize={size}\n"
    if time_based:
        text += f"time_based=1\nruntime={runtime}\nramp_time={RAMP_S}\n"
    text += "group_reporting=1\n\n" + job
    jobfile = Path(workdir) / f"{target.name}.fio"
    jobfile.write_text(text)
    out = subprocess.run(
        ["fio", "--output-format=json", str(jobfile)], check=True, capture_output=True, text=True,
        env=os.environ | target.env,
    ).stdout
    return json.loads(out[out.index("{"):])["jobs"][0]


def summarize(job):
    def side(d):
        pct = d.get("clat_ns", {}).get("percentile", {})
        return {
            "iops": d["iops"],
            "bw_mib": d["bw"] / 1024,
            "p50_us": pct.get("50.000000", 0) / 1000,
            "p99_us": pct.get("99.000000", 0) / 1000,
        }

    return {"read": side(job["read"]), "write": side(job["write"])}


def headline(result):
    """The side that did the work (reads for read jobs, both summed for mixes)."""
    r, w = result["read"], result["write"]
    if r["iops"] and w["iops"]:
        return {
            "iops": r["iops"] + w["iops"],
            "bw_mib": r["bw_mib"] + w["bw_mib"],
            "p50_us": max(r["p50_us"], w["p50_us"]),
            "p99_us": max(r["p99_us"], w["p99_us"]),
        }
    return r if r["iops"] else w


def start_local_file(workdir, size):
    path = Path(workdir) / "local.img"
    return Target("local-file", ["ioengine=io_uring", "direct=1", f"filename={path}"])


def start_qemu_nbd(workdir, size):
    image = Path(workdir) / "qemu.img"
    run(["truncate", "-s", str(size), str(image)])
    sock = Path(workdir) / "qemu.sock"
    proc = subprocess.Popen(
        ["qemu-nbd", "--format=raw", f"--socket={sock}", "--persistent", "--shared=16", "--cache=none",
         "--aio=native", "--discard=unmap", str(image)],
        stderr=subprocess.DEVNULL,
    )
    wait_for(sock)
    return Target("qemu-nbd", ["ioengine=nbd", f"uri=nbd+unix:///?socket={sock}"], [proc], [proc.pid])


def start_ceph(cluster, size):
    return Target("ceph-rbd", cluster.image("bench", size), cpu_pids=cluster.cpu_pids(), env=cluster.env())


def read_env_file(path):
    """KEY=VALUE lines, as `ballast dev up` writes cluster.env."""
    return dict(l.split("=", 1) for l in Path(path).read_text().split() if "=" in l)


class Cluster:
    """A Ballast cluster the Ballast targets create their volumes on."""

    def __init__(self, env, server_pids=()):
        # BALLAST_META, and BALLAST_TLS_DIR unless insecure: for every command.
        self.env = env
        # Whose CPU counts beside the serving process's.
        self.server_pids = list(server_pids)
        # The volumes this run created.
        self.volumes = []

    def volume_target(self, target, replicas, size, workdir, run_id):
        name = f"bench-{target}-{run_id}"
        run([BIN / "ballast", "volume", "create", name, "--size", str(size), "--replicas", str(replicas)],
            stdout=subprocess.DEVNULL, env=self.env)
        self.volumes.append(name)
        sock = Path(workdir) / f"{name}.sock"
        proc = subprocess.Popen(
            [BIN / "nbd-client", "serve", name, "--listen", f"unix:{sock}"],
            stderr=open(Path(workdir) / f"{name}.log", "w"), env=self.env,
        )
        wait_for(sock)
        return Target(target, ["ioengine=nbd", f"uri=nbd+unix:///?socket={sock}"], [proc],
                      [proc.pid, *self.server_pids], node_pids=[proc.pid])


class LocalCluster(Cluster):
    """`ballast dev up` on this machine, stopped at the end."""

    def __init__(self, workdir, insecure=False):
        self.dir = Path(workdir) / ("cluster-plain" if insecure else "cluster")
        run([BIN / "ballast", "dev", "up", "--dir", self.dir] + (["--insecure"] if insecure else []),
            stdout=subprocess.DEVNULL)
        env = {k: v for k, v in os.environ.items() if k != "BALLAST_TLS_DIR"} | read_env_file(self.dir / "cluster.env")
        state = json.loads((self.dir / "cluster.json").read_text())
        self.storage_pids = [p["pid"] for p in state["processes"] if p["binary"] == "storage-server"]
        meta_pids = [p["pid"] for p in state["processes"] if p["binary"] == "meta-raft"]
        super().__init__(env, self.storage_pids + meta_pids)

    def down(self):
        subprocess.run([BIN / "ballast", "dev", "down", "--dir", self.dir], stdout=subprocess.DEVNULL)


class ExistingCluster(Cluster):
    """A cluster already running elsewhere (BENCH_CLUSTER): left running,
    without the volumes this run created."""

    def __init__(self, env_file):
        super().__init__(os.environ | read_env_file(env_file))
        if not self.env.get("BALLAST_META"):
            sys.exit(f"{env_file} names no BALLAST_META")
        run([BIN / "ballast", "volume", "list"], stdout=subprocess.DEVNULL, env=self.env)

    def down(self):
        for name in self.volumes:
            subprocess.run([BIN / "ballast", "volume", "delete", name], stdout=subprocess.DEVNULL, env=self.env)


def peak_rss_mib():
    """VmHWM of every running daemon, by binary name (the largest instance)."""
    peaks = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:
            continue
        name = fields.get("Name", "").strip()
        # /proc truncates names to 15 characters.
        match = next((d for d in DAEMONS if d.startswith(name) and name), None)
        if match and "VmHWM" in fields:
            kib = int(fields["VmHWM"].split()[0])
            peaks[match] = max(peaks.get(match, 0), kib / 1024)
    return peaks


def markdown(report):
    targets = [t for t in ALL_TARGETS if t in report["results"]]
    lines = [
        f"# Ballast fio benchmark, {report['timestamp']}",
        "",
        f"size {report['size']} bytes, runtime {report['runtime_s']} s per job, fio {report['fio']}.",
        f"Commit {report.get('commit', '?')}; machine: {describe_machine(report.get('machine', {}))}.",
        f"Ratios are against `{BASELINE}` from the same run (IOPS; for latency, ours / baseline);",
        "each job ran on every target before the next job started.",
        *(["Ballast's volumes were on a cluster running elsewhere (`BENCH_CLUSTER`); the machine above",
           "is the node that served them."] if report.get("cluster") == "existing" else []),
        "",
        "| "
        + " | ".join(
            ["job"]
            + [f"{t} {m}" for t in targets for m in ("IOPS", "MiB/s", "p50 µs", "p99 µs")]
            + [f"{t}/{BASELINE} {m}" for t in targets if t.startswith("ballast") for m in ("IOPS", "p50")]
        )
        + " |",
        "|---" * (1 + 4 * len(targets) + 2 * sum(t.startswith("ballast") for t in targets)) + "|",
    ]
    for job in JOB_ORDER:
        row = [job]
        for t in targets:
            h = report["results"][t].get(job, {}).get("headline")
            row += [f"{h['iops']:.0f}", f"{h['bw_mib']:.1f}", f"{h['p50_us']:.0f}", f"{h['p99_us']:.0f}"] if h else ["-"] * 4
        base = report["results"].get(BASELINE, {}).get(job, {}).get("headline")
        for t in targets:
            if not t.startswith("ballast"):
                continue
            h = report["results"][t].get(job, {}).get("headline")
            if h and base and base["iops"] and base["p50_us"]:
                row += [f"{h['iops'] / base['iops']:.2f}", f"{h['p50_us'] / base['p50_us']:.2f}"]
            else:
                row += ["-", "-"]
        lines.append("| " + " | ".join(row) + " |")
    lines += peer_ratios(report)
    lines += cpu_per_io(report)
    lines += beside(report, "ballast-r3", "ballast-r3-plain", "Mutual TLS", ("TLS", "plain"))
    lines += beside(report, "ballast-r3-overloaded", "ballast-r3",
                    f"One of three chunk servers held to {OVERLOADED_CPU_PERCENT}% of a CPU", ("overloaded", "all well"))
    lines += ["", "Peak RSS (MiB): " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(report["peak_rss_mib"].items()))]
    return "\n".join(lines) + "\n"


def describe_machine(machine):
    if not machine:
        return "not recorded"
    return (f"{machine['cpus']} × {machine['cpu_model']}, {machine['memory_gib']:.0f} GiB, "
            f"Linux {machine['kernel']}")


def machine():
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((l.split(":", 1)[1].strip() for l in cpuinfo.splitlines() if l.startswith("model name")), "unknown")
    meminfo = Path("/proc/meminfo").read_text().split()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": int(meminfo[meminfo.index("MemTotal:") + 1]) / (1 << 20),
        "kernel": platform.release(),
    }


def commit():
    """The commit measured, marked dirty when the work tree differs from it."""
    described = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
                               capture_output=True, text=True)
    return described.stdout.strip() or "unknown"


def peer_ratios(report):
    """Ballast beside the system its users would otherwise run, when both ran."""
    ours, peer = (report["results"].get(t) for t in (OURS, PEER))
    if not ours or not peer:
        return []
    lines = ["", f"`{OURS}` against `{PEER}` (same run; IOPS ratio, and p50 latency ours / theirs).", "",
             f"| job | {OURS} IOPS | {PEER} IOPS | IOPS ratio | p50 ratio |", "|---|---|---|---|---|"]
    for job in JOB_ORDER:
        o, p = (r.get(job, {}).get("headline") for r in (ours, peer))
        if not o or not p or not p["iops"] or not p["p50_us"]:
            continue
        lines.append(f"| {job} | {o['iops']:.0f} | {p['iops']:.0f} | {o['iops'] / p['iops']:.2f} | "
                     f"{o['p50_us'] / p['p50_us']:.2f} |")
    return lines


def cpu_per_io(report):
    """Server-side CPU µs per I/O of every target that has it, ours against the
    baseline's, and what of ours is the serving process on the node."""
    measured = [t for t in ALL_TARGETS if any("cpu_us_per_io" in r for r in report["results"].get(t, {}).values())]
    if not measured:
        return []
    compare = OURS in measured and BASELINE in measured
    whose = ("; Ballast's is its serving process's alone, its chunk servers being elsewhere"
             if report.get("cluster") == "existing" else "")
    head = ["job", *measured]
    if compare:
        head += [f"{OURS}/{BASELINE}", f"{OURS} serving process", f"serving process/{BASELINE}"]
    lines = ["", f"Server-side CPU µs per I/O (same run{whose}). The serving process is what stays on",
             "the node when the chunk servers run on other machines.", "",
             "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]

    def ratio(a, b):
        return f"{a / b:.2f}" if a and b else "-"

    for job in JOB_ORDER:
        results = {t: report["results"][t].get(job, {}) for t in measured}
        cpu = {t: r.get("cpu_us_per_io") for t, r in results.items()}
        row = [job] + [f"{cpu[t]:.1f}" if cpu[t] is not None else "-" for t in measured]
        if compare:
            node = results[OURS].get("node_cpu_us_per_io")
            row += [ratio(cpu[OURS], cpu[BASELINE]), f"{node:.1f}" if node is not None else "-",
                    ratio(node, cpu[BASELINE])]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def beside(report, first, second, caption, labels):
    """Two targets side by side, when both ran: IOPS, their ratio, CPU per I/O."""
    a, b = (report["results"].get(t) for t in (first, second))
    if not a or not b:
        return []
    x, y = labels
    lines = ["", f"{caption}: `{first}` beside `{second}` (same run).", "",
             f"| job | IOPS {x} | IOPS {y} | {x}/{y} | CPU µs/IO {x} | CPU µs/IO {y} |", "|---|---|---|---|---|---|"]
    for job in JOB_ORDER:
        s, p = a.get(job), b.get(job)
        if not s or not p:
            continue
        ratio = s["headline"]["iops"] / p["headline"]["iops"] if p["headline"]["iops"] else 0
        cpu = [f"{r['cpu_us_per_io']:.1f}" if "cpu_us_per_io" in r else "-" for r in (s, p)]
        lines.append(f"| {job} | {s['headline']['iops']:.0f} | {p['headline']['iops']:.0f} | {ratio:.2f} | {cpu[0]} | {cpu[1]} |")
    return lines


def svg(report):
    """Grouped bars: IOPS of each target per job, normalised to the baseline."""
    targets = [t for t in ALL_TARGETS if t in report["results"]]
    colors = ["#888888", "#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"]
    width, height, left, bottom = 900, 360, 60, 80
    group = (width - left - 20) / max(1, len(JOB_ORDER))
    bar = group * 0.8 / max(1, len(targets))
    ratios = []
    for job in JOB_ORDER:
        base = report["results"].get(BASELINE, {}).get(job, {}).get("headline")
        for t in targets:
            h = report["results"][t].get(job, {}).get("headline")
            ratios.append(h["iops"] / base["iops"] if h and base and base["iops"] else 0)
    top = max([1.0] + ratios) * 1.1
    scale = (height - bottom - 20) / top
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">',
           f'<text x="{left}" y="14">IOPS relative to {BASELINE} (same run)</text>']
    y1 = height - bottom - scale
    out.append(f'<line x1="{left}" y1="{y1:.1f}" x2="{width - 20}" y2="{y1:.1f}" stroke="#000" stroke-dasharray="4"/>')
    out.append(f'<text x="5" y="{y1 + 4:.1f}">1.0×</text>')
    i = 0
    for j, job in enumerate(JOB_ORDER):
        x0 = left + j * group + group * 0.1
        for k, t in enumerate(targets):
            r = ratios[i]
            i += 1
            h = r * scale
            out.append(f'<rect x="{x0 + k * bar:.1f}" y="{height - bottom - h:.1f}" width="{bar - 1:.1f}" '
                       f'height="{h:.1f}" fill="{colors[k % len(colors)]}"><title>{t} {job}: {r:.2f}×</title></rect>')
        out.append(f'<text x="{x0:.1f}" y="{height - bottom + 14}" transform="rotate(20 {x0:.1f} {height - bottom + 14})">{job}</text>')
    step = min(150, (width - left) // max(1, len(targets)))
    for k, t in enumerate(targets):
        out.append(f'<rect x="{left + k * step}" y="{height - 18}" width="10" height="10" fill="{colors[k % len(colors)]}"/>')
        out.append(f'<text x="{left + k * step + 14}" y="{height - 9}">{t}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    runtime = int(os.environ.get("BENCH_RUNTIME", "10"))
    size = os.environ.get("BENCH_SIZE", "512MiB")
    units = {"KiB": 10, "MiB": 20, "GiB": 30}
    size_bytes = next((int(size[: -len(u)]) << s for u, s in units.items() if size.endswith(u)), None) or int(size)
    peers = [p for p in os.environ.get("PEERS", "").split(",") if p]
    for peer in peers:
        if peer not in PEER_TARGETS:
            sys.exit(f"unknown peer {peer} (known: {', '.join(PEER_TARGETS)})")
    existing = os.environ.get("BENCH_CLUSTER")
    default = [t for t in ALL_TARGETS if t not in PEER_TARGETS.values() or any(PEER_TARGETS[p] == t for p in peers)]
    if existing:
        default = [t for t in default if t not in LOCAL_ONLY]
    wanted = os.environ.get("BENCH_TARGETS", ",".join(default)).split(",")
    if existing and set(wanted) & set(LOCAL_ONLY):
        sys.exit(f"{', '.join(sorted(set(wanted) & set(LOCAL_ONLY)))} need a cluster on this machine: "
                 "leave BENCH_CLUSTER unset for them")
    if not JOB_ORDER:
        sys.exit(f"BENCH_JOBS names none of the jobs ({', '.join(ALL_JOBS)})")
    for tool in ["fio", "qemu-nbd"]:
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed (apt-get install fio qemu-utils)")
    workdir = Path(os.environ.get("BENCH_DIR") or tempfile.mkdtemp(prefix="ballast-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ"),
        "runtime_s": runtime,
        "size": size_bytes,
        "fio": subprocess.run(["fio", "--version"], capture_output=True, text=True).stdout.strip(),
        "commit": commit(),
        "machine": machine(),
        "cluster": "existing" if existing else "local",
        "results": {},
        "peak_rss_mib": {},
    }
    jobs = {name: (JOBS / f"{name}.fio").read_text() for name in JOB_ORDER}
    clusters = {}
    targets = []
    try:
        for name in wanted:
            if name == "local-file":
                targets.append(start_local_file(workdir, size_bytes))
            elif name == "qemu-nbd":
                targets.append(start_qemu_nbd(workdir, size_bytes))
            elif name == "ceph-rbd":
                ceph.ensure_installed(log)
                clusters["ceph"] = ceph.CephCluster(workdir, log)
                targets.append(start_ceph(clusters["ceph"], size_bytes))
            elif name in ("ballast-r1", "ballast-r3", "ballast-r3-plain", "ballast-r3-overloaded"):
                insecure = name.endswith("-plain")
                if insecure not in clusters:
                    clusters[insecure] = ExistingCluster(existing) if existing else LocalCluster(workdir, insecure)
                cluster = clusters[insecure]
                replicas = int(name.removeprefix("ballast-r")[0])
                target = cluster.volume_target(name, replicas, size_bytes, workdir, report["timestamp"])
                if name.endswith("-overloaded"):
                    slowed = cluster.storage_pids[-1]
                    target.condition = lambda pid=slowed: CpuLimit(pid, OVERLOADED_CPU_PERCENT)
                targets.append(target)
            else:
                sys.exit(f"unknown target {name}")
        for target in targets:
            log(f"{target.name}: filling {size} so reads hit written data")
            fio(target, "[fill]\nrw=write\nbs=1m\niodepth=8\n", size_bytes, runtime, workdir, time_based=False)
            report["results"][target.name] = {}
        # Every target runs a job before the next job starts: the runs a
        # ratio compares are a minute or two apart, not a whole target's
        # jobs apart, on a machine whose load drifts.
        for job in JOB_ORDER:
            for target in targets:
                log(f"{target.name}: {job}")
                with target.condition():
                    cpu_before = target.cpu_seconds()
                    result = summarize(fio(target, jobs[job], size_bytes, runtime, workdir))
                    cpu_all, cpu_node = (after - before for after, before in zip(target.cpu_seconds(), cpu_before))
                result["headline"] = headline(result)
                ios = result["headline"]["iops"] * (runtime + RAMP_S)
                if target.cpu_pids and ios:
                    result["cpu_us_per_io"] = cpu_all * 1e6 / ios
                if target.node_pids and ios:
                    result["node_cpu_us_per_io"] = cpu_node * 1e6 / ios
                report["results"][target.name][job] = result
        report["peak_rss_mib"] = peak_rss_mib()
    finally:
        for target in targets:
            target.stop()
        for cluster in clusters.values():
            cluster.down()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / report["timestamp"]
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(markdown(report))
    stem.with_suffix(".svg").write_text(svg(report))
    print(markdown(report))
    log(f"wrote {stem}.json, .md and .svg")
    if not os.environ.get("BENCH_DIR"):
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
