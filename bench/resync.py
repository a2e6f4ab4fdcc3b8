#!/usr/bin/env python3
"""How much a chunk server copies to catch up after a short absence.

A 3-replica volume on a local cluster of 3 chunk servers is filled; one
server is killed -9; fio writes 4 KiB blocks at random for a while; the
server starts again and rejoins the replica sets it left. Measured: the
bytes the metadata service copied to make the sets whole again
(`ballast_meta_copied_bytes_total`), against what fio wrote while the
server was away, the volume's size, and what copying every chunk the server
left in whole would have cost (the chunks it left times the chunk size).

Writes bench/results/resync-<timestamp>.md. Environment: RESYNC_SIZE
(default 2GiB), RESYNC_AWAY (seconds of writes, default 10), BENCH_DIR.
Needs the release binaries (make release) and fio.
"""

import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "target" / "release"
RESULTS = ROOT / "bench" / "results"
MIB = 1 << 20


def log(msg):
    print(f"[resync] {msg}", file=sys.stderr, flush=True)


def ballast(*args, **kw):
    return subprocess.run([BIN / "ballast", *map(str, args)], check=True, capture_output=True, text=True, **kw).stdout


def size_bytes(text):
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    text = text.lower().removesuffix("ib").removesuffix("b")
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def fio(uri, *args):
    out = subprocess.run(
        ["fio", "--name=resync", "--ioengine=nbd", f"--uri={uri}", "--bs=4k", "--output-format=json", *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out[out.index("{"):])["jobs"][0]


class Cluster:
    def __init__(self, workdir):
        self.dir = Path(workdir) / "cluster"
        self.up()
        # BALLAST_META and BALLAST_TLS_DIR, for every command.
        cluster_env = dict(l.split("=", 1) for l in (self.dir / "cluster.env").read_text().split() if "=" in l)
        self.env = os.environ | cluster_env

    def up(self):
        ballast("dev", "up", "--dir", self.dir, "--storage", 3)

    def down(self):
        subprocess.run([BIN / "ballast", "dev", "down", "--dir", self.dir], capture_output=True)

    def processes(self):
        return json.loads((self.dir / "cluster.json").read_text())["processes"]

    def kill(self, name):
        pid = next(p["pid"] for p in self.processes() if p["name"] == name)
        os.kill(pid, signal.SIGKILL)
        while Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]:
            time.sleep(0.05)

    def copied_bytes(self):
        """The counter summed over the metadata members (only the leader copies)."""
        total = 0.0
        for p in self.processes():
            args = p.get("args", [])
            if p["binary"] != "meta-raft" or "--metrics-addr" not in args:
                continue
            address = args[args.index("--metrics-addr") + 1]
            text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
            total += sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("ballast_meta_copied_bytes_total{")
            )
        return total

    def degraded(self):
        status = json.loads(ballast("status", "-o", "json", env=self.env))
        return len(status["degraded_chunks"])


def main():
    size = size_bytes(os.environ.get("RESYNC_SIZE", "2GiB"))
    away = int(os.environ.get("RESYNC_AWAY", "10"))
    workdir = Path(os.environ.get("BENCH_DIR") or tempfile.mkdtemp(prefix="ballast-resync-"))
    cluster = Cluster(workdir)
    serve = None
    try:
        created = ballast("volume", "-o", "json", "create", "resync", "--size", size, "--replicas", 3, env=cluster.env)
        volume = json.loads(created)[0]
        chunk_size = int(volume.get("chunk_size_bytes", 64 * MIB))
        sock = workdir / "resync.sock"
        serve = subprocess.Popen(
            [BIN / "nbd-client", "serve", "resync", "--listen", f"unix:{sock}"],
            stderr=open(workdir / "serve.log", "w"), env=cluster.env,
        )
        while not sock.exists():
            time.sleep(0.1)
        uri = f"nbd+unix:///?socket={sock}"
        log(f"filling {size / MIB:.0f} MiB")
        # Flushed at the end, as a database would: what the server held before
        # it went away is durable, not a region it must distrust.
        fio(uri, "--rw=write", "--bs=1M", "--iodepth=8", f"--size={size}", "--end_fsync=1")
        before = cluster.copied_bytes()

        log(f"storage2 killed; {away} s of 4 KiB random writes")
        cluster.kill("storage2")
        away_job = fio(uri, "--rw=randwrite", "--iodepth=16", f"--size={size}", "--time_based=1", f"--runtime={away}")
        written = away_job["write"]["io_bytes"]
        left = cluster.degraded()
        log(f"{written / MIB:.1f} MiB written; storage2 left {left} chunk sets; restarting it")
        started = time.time()
        cluster.up()
        while cluster.degraded() > 0:
            if time.time() - started > 600:
                raise RuntimeError("replica sets not whole 10 minutes after the restart")
            time.sleep(0.5)
        healed_s = time.time() - started
        copied = cluster.copied_bytes() - before
    finally:
        if serve:
            serve.terminate()
            serve.wait()
        cluster.down()

    whole = left * chunk_size
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    lines = [
        f"# Catching up after a short absence, {stamp}",
        "",
        f"A {size / MIB:.0f} MiB 3-replica volume ({chunk_size / MIB:.0f} MiB chunks) on 3 chunk servers; "
        f"one killed -9 during {away} s of fio 4 KiB random writes (iodepth 16), then restarted.",
        "",
        "| measure | MiB | / volume size |",
        "|---|---|---|",
        f"| volume size | {size / MIB:.1f} | 1.000 |",
        f"| written while the server was away | {written / MIB:.1f} | {written / size:.3f} |",
        f"| copied to catch up (measured) | {copied / MIB:.1f} | {copied / size:.3f} |",
        f"| whole copies of the {left} chunks it left (what a full rebuild copies) | {whole / MIB:.1f} | {whole / size:.3f} |",
        "",
        f"Copied / written while away: {copied / written:.2f}. Copied / whole copies: {copied / whole:.3f}. "
        f"Sets whole {healed_s:.1f} s after the restart.",
    ]
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"resync-{stamp}.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
