#!/usr/bin/env python3
"""Runs bench/run.py end to end at a tiny size, so that `make bench` keeps
working: one job on qemu-nbd and a 3-replica volume of a cluster started
apart and named by BENCH_CLUSTER, with the binaries `cargo test` built.
Fails unless the report has both targets with their CPU per I/O (the
serving process's apart) and the run deleted the volume it created."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from run import read_env_file

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(os.environ.get("BENCH_BIN") or ROOT / "target" / "debug")


def volume_names(env):
    listed = subprocess.run([BIN / "ballast", "volume", "list", "-o", "json"], env=env, check=True,
                            capture_output=True, text=True).stdout
    return [v["name"] for v in json.loads(listed)]


def main():
    with tempfile.TemporaryDirectory(prefix="ballast-bench-smoke-") as tmp:
        tmp = Path(tmp)
        cluster = tmp / "cluster"
        subprocess.run([BIN / "ballast", "dev", "up", "--dir", cluster], check=True,
                       stdout=subprocess.DEVNULL)
        try:
            env_file = cluster / "cluster.env"
            env = os.environ | read_env_file(env_file)
            results = tmp / "results"
            bench = os.environ | {
                "BENCH_CLUSTER": str(env_file), "BENCH_BIN": str(BIN), "BENCH_RESULTS": str(results),
                "BENCH_DIR": str(tmp / "work"), "BENCH_TARGETS": "qemu-nbd,ballast-r3",
                "BENCH_JOBS": "randread-4k-qd1", "BENCH_RUNTIME": "1", "BENCH_SIZE": "16MiB",
            }
            ran = subprocess.run([sys.executable, ROOT / "bench" / "run.py"], env=bench, capture_output=True,
                                 text=True)
            if ran.returncode != 0:
                sys.exit(f"bench/run.py failed:\n{ran.stderr}")
            report = json.loads(next(results.glob("*.json")).read_text())
            failures = []
            for target, keys in {"qemu-nbd": ["cpu_us_per_io"],
                                 "ballast-r3": ["cpu_us_per_io", "node_cpu_us_per_io"]}.items():
                job = report["results"].get(target, {}).get("randread-4k-qd1", {})
                if not job.get("headline", {}).get("iops"):
                    failures.append(f"{target}: no IOPS measured")
                failures += [f"{target}: no {k}" for k in keys if k not in job]
            if report.get("cluster") != "existing":
                failures.append(f"report names the cluster {report.get('cluster')!r}, not 'existing'")
            left = [n for n in volume_names(env) if n.startswith("bench-")]
            if left:
                failures.append(f"volumes left on the cluster: {left}")
        finally:
            subprocess.run([BIN / "ballast", "dev", "down", "--dir", cluster], stdout=subprocess.DEVNULL)
    if failures:
        sys.exit("bench smoke test failed:\n  " + "\n  ".join(failures))
    print("bench smoke test: passed")


if __name__ == "__main__":
    main()
