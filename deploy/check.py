#!/usr/bin/env python3
"""Checks the Kubernetes manifests without a cluster.

- every manifest validates against the Kubernetes API schemas
  (kubernetes-validate --strict; custom resources such as
  VolumeSnapshotClass have no schema there and are only parsed);
- the kustomization lists exactly the manifests in its directory;
- every flag and BALLAST_* variable a Ballast container (init containers
  too) passes is one its binary accepts (it appears in that binary's --help), so a renamed flag
  breaks this check instead of a rollout;
- the image (deploy/Dockerfile) carries every binary the containers run,
  and nbd-client, which the node plugin runs.

Usage: deploy/check.py [BIN_DIR]   (default: target/debug)
Under BALLAST_SYSTEM_TESTS=required (make test) a missing kubernetes-validate
is a failure, not a skip; `scripts/deps.sh` installs it in a virtualenv.
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent
KUSTOMIZE_DIR = ROOT / "kubernetes"
EXAMPLES_DIR = ROOT / "examples"
IMAGE = "ballast"
# Binaries whose flags live on a subcommand.
SUBCOMMANDS = {"meta-raft": ["serve"], "storage-server": ["serve"]}

failures = []


def fail(message):
    failures.append(message)
    print(f"FAIL {message}")


def manifests():
    return sorted(KUSTOMIZE_DIR.glob("*.yaml")) + sorted(EXAMPLES_DIR.glob("*.yaml"))


def check_schemas():
    if importlib.util.find_spec("kubernetes_validate") is None:
        if os.environ.get("BALLAST_SYSTEM_TESTS") == "required":
            fail("kubernetes-validate is missing (scripts/deps.sh installs it)")
        else:
            print("skipping schema validation: kubernetes-validate is missing (pip install kubernetes-validate)")
        return
    files = [str(p) for p in manifests() if p.name != "kustomization.yaml"]
    command = [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet", *files]
    result = subprocess.run(command, capture_output=True, text=True)
    for line in (result.stdout + result.stderr).splitlines():
        if "Couldn't find schema" in line:
            continue  # custom resources (snapshot.storage.k8s.io)
        print(line)
    if result.returncode != 0:
        fail("kubernetes-validate rejected a manifest")


def check_kustomization():
    kustomization = yaml.safe_load((KUSTOMIZE_DIR / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in KUSTOMIZE_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    for missing in sorted(present - listed):
        fail(f"kustomization.yaml does not list {missing}")
    for absent in sorted(listed - present):
        fail(f"kustomization.yaml lists {absent}, which does not exist")


def containers():
    """(file, container) for every container of every workload."""
    for path in manifests():
        for doc in yaml.safe_load_all(path.read_text()):
            spec = (doc or {}).get("spec", {})
            pod = spec.get("template", {}).get("spec") if "template" in spec else spec
            for container in (pod or {}).get("initContainers", []) + (pod or {}).get("containers", []):
                yield path.name, container


def command_line(container):
    """The binary a Ballast container runs, its subcommand, and the words
    passed to that."""
    words = list(container.get("command", [])) + list(container.get("args", []))
    if words[:2] == ["/bin/sh", "-c"]:
        script = " ".join(words[2:])
        binary = re.search(r"exec\s+(\S+)", script).group(1)
        return binary, SUBCOMMANDS.get(binary, []), re.findall(r"(--[a-z][a-z0-9-]*)", script)
    binary, rest = words[0], words[1:]
    named = 0
    while named < len(rest) and not rest[named].startswith("-"):
        named += 1
    return binary, rest[:named] or SUBCOMMANDS.get(binary, []), rest[named:]


def help_text(bin_dir, binary, subcommand):
    path = bin_dir / binary
    if not path.exists():
        fail(f"{path} is missing: build the workspace first")
        return ""
    command = [str(path), *subcommand, "--help"]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout


def check_flags(bin_dir):
    checked = 0
    in_image = set(re.findall(r"target/release/(\S+) ", (ROOT / "Dockerfile").read_text()))
    for needed in sorted({"nbd-client"} - in_image):
        fail(f"the image does not carry {needed}")
    for file, container in containers():
        if container.get("image") != IMAGE:
            continue
        binary, subcommand, words = command_line(container)
        if binary not in in_image:
            fail(f"{file}: {container['name']} runs {binary}, which the image does not carry")
        accepted = help_text(bin_dir, binary, subcommand)
        for word in words:
            flag = word.split("=", 1)[0]
            if flag.startswith("--") and not re.search(rf"{re.escape(flag)}\b", accepted):
                fail(f"{file}: {container['name']} passes {flag}, which {binary} does not take")
        for env in container.get("env", []):
            name = env["name"]
            if name.startswith("BALLAST_") and f"env: {name}=" not in accepted:
                fail(f"{file}: {container['name']} sets {name}, which {binary} does not read")
        checked += 1
    if checked == 0:
        fail(f"no container runs the {IMAGE} image")
    print(f"flags and variables of {checked} Ballast containers checked")


def main():
    bin_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT.parent / "target" / "debug"
    check_schemas()
    check_kustomization()
    check_flags(bin_dir)
    if failures:
        print(f"{len(failures)} problem(s) in the manifests")
        return 1
    print("manifests: fine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
