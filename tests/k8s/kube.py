"""kubectl, the way the suite drives the cluster: every step is a kubectl
command a user could type, and every wait has a limit and says what it
waited for."""

import json
import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("K8S_CACHE", ROOT / ".cache" / "k8s"))
KUBECTL = str(CACHE / "bin" / "kubectl")
NAMESPACE = "ballast-test"
# The workload image tests/k8s/build.sh makes: Debian with coreutils and fio.
WORKLOAD_IMAGE = "ballast-test/workload:1"


def kubectl_run(*args, input=None, timeout=300):
    """kubectl's whole answer: exit status, stdout and stderr."""
    return subprocess.run([KUBECTL, *args], input=input, capture_output=True, text=True, timeout=timeout)


def kubectl(*args, input=None, check=True, timeout=300):
    result = kubectl_run(*args, input=input, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return result.stdout


def apply(manifest, namespace=NAMESPACE):
    kubectl("apply", "-n", namespace, "-f", "-", input=manifest)


def get(kind, name=None, namespace=NAMESPACE):
    args = ["get", kind] + ([name] if name else []) + ["-o", "json"]
    if namespace:
        args += ["-n", namespace]
    return json.loads(kubectl(*args))


def wait_until(what, predicate, timeout=180, interval=1.0):
    """Polls predicate until it returns something truthy; fails naming what."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except AssertionError as err:
            last_error = err
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f": {last_error}" if last_error else ""))


def wait_pod_ready(name, timeout=300):
    kubectl("wait", "-n", NAMESPACE, f"pod/{name}", "--for=condition=Ready", f"--timeout={timeout}s", timeout=timeout + 10)


def wait_pod_done(name, timeout=300):
    """Waits for a pod that runs to completion and returns its log; fails if
    it did not succeed."""
    try:
        phase = wait_until(
            f"pod {name} to finish",
            lambda: get("pod", name)["status"].get("phase") in ("Succeeded", "Failed") and get("pod", name)["status"]["phase"],
            timeout,
        )
    except AssertionError as err:
        raise AssertionError(f"{err}\n{describe('pod', name)}") from None
    log = kubectl("logs", "-n", NAMESPACE, name, check=False)
    assert phase == "Succeeded", f"pod {name} {phase}:\n{log}\n{describe('pod', name)}"
    return log


def pvc_bound(name, timeout=180):
    wait_until(f"PVC {name} to be Bound", lambda: get("pvc", name)["status"].get("phase") == "Bound", timeout)
    return get("pvc", name)["spec"]["volumeName"]


def describe(kind, name, namespace=NAMESPACE):
    return kubectl("describe", kind, name, "-n", namespace, check=False)


def exec_in(pod, *command, check=True, timeout=300):
    return kubectl("exec", "-n", NAMESPACE, pod, "--", *command, check=check, timeout=timeout)


def delete(kind, *names, namespace=NAMESPACE, wait=True):
    kubectl("delete", kind, *names, "-n", namespace, "--ignore-not-found", f"--wait={str(wait).lower()}", timeout=600)


def pvc(name, size="1Gi", storage_class="ballast", mode="Filesystem", data_source=None, access="ReadWriteOnce"):
    source = ""
    if data_source:
        kind, source_name = data_source
        group = "snapshot.storage.k8s.io" if kind == "VolumeSnapshot" else '""'
        source = f"""
  dataSource:
    apiGroup: {group}
    kind: {kind}
    name: {source_name}"""
    return f"""
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: {name}
spec:
  accessModes: [{access}]
  volumeMode: {mode}
  storageClassName: {storage_class}
  resources:
    requests:
      storage: {size}{source}
"""


def pod(name, script, claim=None, block=False, volumes=None, node=None, restart="Never"):
    """A pod running `script` in sh with the claim at /data (or the block
    device at /dev/xvda)."""
    mount = (
        "volumeDevices: [{name: data, devicePath: /dev/xvda}]"
        if block
        else "volumeMounts: [{name: data, mountPath: /data}]"
    )
    if volumes is None:
        volumes = f"[{{name: data, persistentVolumeClaim: {{claimName: {claim}}}}}]"
    placement = f"\n  nodeName: {node}" if node else ""
    return f"""
apiVersion: v1
kind: Pod
metadata:
  name: {name}
spec:
  restartPolicy: {restart}
  terminationGracePeriodSeconds: 1{placement}
  containers:
    - name: work
      image: {WORKLOAD_IMAGE}
      command: ["/bin/sh", "-ec", {json.dumps(script)}]
      {mount}
  volumes: {volumes}
"""


# What an operator runs `ballast` with in a metadata pod: its member's
# address and the admin certificate the pod's init container issued.
BALLAST_IN_META_POD = ["exec", "-n", "ballast-system", "ballast-meta-0", "--", "ballast"]
ADMIN = ["--meta", "127.0.0.1:7101", "--tls-dir", "/etc/ballast/admin"]


def ballast(*args):
    """The ballast CLI inside a metadata pod, as an admin, against the
    cluster's metadata service; JSON output, parsed."""
    out = kubectl(*BALLAST_IN_META_POD, *args, *ADMIN, "-o", "json")
    return json.loads(out) if out.strip() else None


def node_plugin_on(node):
    """The name of the node plugin's pod on `node`, None if there is none."""
    return next(
        (
            p["metadata"]["name"]
            for p in get("pod", namespace="ballast-system")["items"]
            if p["metadata"]["name"].startswith("ballast-csi-node-") and p["spec"]["nodeName"] == node
        ),
        None,
    )
