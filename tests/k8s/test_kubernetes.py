"""Ballast on a real Kubernetes cluster, driven only through kubectl.

Run by `make k8s-test` on the cluster `tests/k8s/cluster.sh up` starts,
after `kubectl apply -k deploy/kubernetes`. Tests run in file order; each
cleans up the objects it made, and the last one checks that deleting
everything leaves no volume and no chunk behind. test_operations.py then
checks the install's operational parts, which make no volumes.
"""

import json
import time

import pytest

from kube import (
    NAMESPACE,
    apply,
    ballast,
    delete,
    exec_in,
    get,
    kubectl,
    node_plugin_on,
    pod,
    pvc,
    pvc_bound,
    wait_pod_done,
    wait_pod_ready,
    wait_until,
)

MIB = 1 << 20
CAP_SYS_RESOURCE = 24


def machine_has_capability(bit):
    """Whether this machine lets any process (a privileged pod included) hold
    the capability: the bounding set of this process, which runs as root."""
    with open("/proc/self/status") as status:
        bounding = next(int(line.split()[1], 16) for line in status if line.startswith("CapBnd:"))
    return bool(bounding >> bit & 1)

WRITE_BLOB = (
    "head -c 256M /dev/urandom > /data/blob && sha256sum /data/blob > /data/blob.sha256 && sync && cat /data/blob.sha256"
)
CHECK_BLOB = "cd /data && sha256sum -c blob.sha256"


def fio_verify(path, size, extra=""):
    return (
        f"fio --name=verify --filename={path} --size={size} --direct=1 --invalidate=0 --ioengine=libaio "
        f"--rw=randwrite --bs=4k --iodepth=8 --verify=crc32c --verify_fatal=1 --do_verify=1 "
        f"--output-format=json {extra}"
    )


def fio_report(log):
    """fio's JSON report from a pod's log (its warnings come first)."""
    return json.loads(log[log.index("{") :])


@pytest.fixture(scope="module", autouse=True)
def namespace():
    kubectl("create", "namespace", NAMESPACE, check=False)
    apply(
        """
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: ballast-wffc
provisioner: csi.ballast.io
parameters:
  replicas: "3"
  fsType: ext4
reclaimPolicy: Delete
allowVolumeExpansion: true
volumeBindingMode: WaitForFirstConsumer
""",
    )
    yield
    kubectl("delete", "namespace", NAMESPACE, "--wait=true", timeout=600)
    kubectl("delete", "storageclass", "ballast-wffc", "--ignore-not-found")


@pytest.fixture(autouse=True)
def clean_namespace():
    """Whatever a test leaves (it failed half-way) is gone before the next."""
    yield
    for kind in ("pods", "volumesnapshots", "pvc"):
        kubectl("delete", kind, "--all", "-n", NAMESPACE, "--wait=true", timeout=600)


def volume_handle(claim):
    return get("pv", pvc_bound(claim), namespace=None)["spec"]["csi"]["volumeHandle"]


@pytest.mark.parametrize("storage_class", ["ballast", "ballast-wffc"])
def test_data_survives_the_pod(storage_class):
    claim = f"data-{storage_class}"
    apply(pvc(claim, "1Gi", storage_class))
    if storage_class == "ballast-wffc":
        time.sleep(3)
        assert get("pvc", claim)["status"]["phase"] == "Pending", "WaitForFirstConsumer bound before any pod"
    apply(pod("writer", WRITE_BLOB, claim))
    written = wait_pod_done("writer")
    delete("pod", "writer")
    apply(pod("reader", CHECK_BLOB, claim))
    assert "blob: OK" in wait_pod_done("reader"), written
    delete("pod", "reader")
    delete("pvc", claim)


def test_snapshot_restore_and_clone():
    apply(pvc("origin", "1Gi"))
    apply(pod("writer", "echo first > /data/note && sync", "origin"))
    wait_pod_done("writer")
    delete("pod", "writer")
    apply(
        """
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata:
  name: origin-snap
spec:
  volumeSnapshotClassName: ballast
  source:
    persistentVolumeClaimName: origin
"""
    )
    wait_until(
        "the snapshot to be ready",
        lambda: get("volumesnapshot", "origin-snap").get("status", {}).get("readyToUse"),
    )
    # Written after the snapshot: the restored volume must not see it.
    apply(pod("writer2", "echo second > /data/note && sync", "origin"))
    wait_pod_done("writer2")
    delete("pod", "writer2")

    apply(pvc("restored", "1Gi", data_source=("VolumeSnapshot", "origin-snap")))
    apply(pvc("cloned", "1Gi", data_source=("PersistentVolumeClaim", "origin")))
    apply(pod("read-restored", "cat /data/note", "restored"))
    apply(pod("read-cloned", "cat /data/note", "cloned"))
    assert wait_pod_done("read-restored").strip() == "first"
    assert wait_pod_done("read-cloned").strip() == "second"
    delete("pod", "read-restored", "read-cloned")
    delete("volumesnapshot", "origin-snap")
    delete("pvc", "restored", "cloned", "origin")


@pytest.mark.parametrize("storage_class", ["ballast", "ballast-xfs"])
def test_online_expansion(storage_class):
    claim = f"grow-{storage_class}"
    grower = f"grower-{storage_class}"
    apply(pvc(claim, "1Gi", storage_class))
    apply(pod(grower, "df -B1 --output=size /data | tail -1; sleep 3600", claim))
    wait_pod_ready(grower)
    before = int(exec_in(grower, "df", "-B1", "--output=size", "/data").split()[-1])
    kubectl("patch", "pvc", claim, "-n", NAMESPACE, "-p", '{"spec":{"resources":{"requests":{"storage":"2Gi"}}}}')

    def grown():
        size = int(exec_in(grower, "df", "-B1", "--output=size", "/data").split()[-1])
        return size > before + 900 * MIB and size

    if storage_class == "ballast" and not machine_has_capability(CAP_SYS_RESOURCE):
        # Growing a mounted ext4 needs CAP_SYS_RESOURCE, which this machine
        # withholds even from root: NodeExpandVolume refuses with
        # FAILED_PRECONDITION naming the capability (the kubelet then waits
        # to expand it offline), and the filesystem grows when the volume is
        # next staged, for the pod that replaces this one.
        node = get("pod", grower)["spec"]["nodeName"]

        def refused():
            logs = kubectl("logs", "-n", "ballast-system", node_plugin_on(node), "-c", "csi-plugin")
            return any("NodeExpandVolume" in line and "CAP_SYS_RESOURCE" in line for line in logs.splitlines())

        wait_until("the node plugin to refuse online ext4 growth, naming the capability", refused, timeout=240)
        volume = get("pvc", claim)["spec"]["volumeName"]

        def detached():
            attachments = get("volumeattachment", namespace=None)["items"]
            return not any(a["spec"]["source"].get("persistentVolumeName") == volume for a in attachments)

        delete("pod", grower)
        # Unstaged and detached: the next pod's node stages it afresh.
        wait_until(f"{volume} to be detached", detached, timeout=240)
        apply(pod(grower, "sleep 3600", claim))
        wait_pod_ready(grower)
        after = wait_until("the ext4 filesystem to grow when staged again", grown, timeout=240)
        wait_until("the claim to report 2Gi", lambda: get("pvc", claim)["status"]["capacity"]["storage"] == "2Gi",
                   timeout=240)
        print(f"ext4 without CAP_SYS_RESOURCE: {before} -> {after} bytes once the pod was replaced")
    else:
        after = wait_until(f"the {storage_class} filesystem to grow in the running pod", grown, timeout=240)
        assert get("pvc", claim)["status"]["capacity"]["storage"] == "2Gi"
        print(f"{storage_class}: {before} -> {after} bytes without a restart")
    delete("pod", grower)
    delete("pvc", claim)


def test_raw_block_with_fio_verify():
    apply(pvc("raw", "1Gi", mode="Block"))
    apply(
        pod("fio", fio_verify("/dev/xvda", "256M"), "raw", block=True)
    )
    report = fio_report(wait_pod_done("fio"))
    job = report["jobs"][0]
    assert job["error"] == 0, job
    assert job["write"]["io_bytes"] == 256 * MIB, job
    delete("pod", "fio")
    delete("pvc", "raw")


def test_ephemeral_and_static_volumes():
    generic = """[{name: data, ephemeral: {volumeClaimTemplate: {spec: {accessModes: [ReadWriteOnce],
        storageClassName: ballast, resources: {requests: {storage: 1Gi}}}}}}]"""
    apply(pod("generic", "echo hello > /data/x && cat /data/x", volumes=generic))
    assert wait_pod_done("generic").strip() == "hello"
    inline = """[{name: data, csi: {driver: csi.ballast.io, fsType: ext4, volumeAttributes: {size: 1Gi}}}]"""
    apply(pod("inline", "echo inline > /data/x && cat /data/x", volumes=inline))
    assert wait_pod_done("inline").strip() == "inline"
    delete("pod", "generic", "inline")

    # A volume made outside Kubernetes, bound by its handle.
    ballast("volume", "create", "static-volume", "--size", "1GiB")
    handle = next(v["id"] for v in ballast("volume", "list") if v["name"] == "static-volume")
    apply(
        """
apiVersion: v1
kind: PersistentVolume
metadata:
  name: static-volume
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: ""
  csi: {driver: csi.ballast.io, volumeHandle: %s, fsType: ext4}
"""
        % handle,
        namespace="default",
    )
    apply(
        """
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: static
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: ""
  volumeName: static-volume
  resources: {requests: {storage: 1Gi}}
"""
    )
    apply(pod("static", "echo static > /data/x && cat /data/x", "static"))
    assert wait_pod_done("static").strip() == "static"
    delete("pod", "static")
    delete("pvc", "static")
    kubectl("delete", "pv", "static-volume", "--wait=true")
    ballast("volume", "delete", handle)


def test_the_node_plugin_restarts_under_a_writing_pod():
    apply(pvc("steady", "1Gi"))
    # Verifies as it writes (verify_backlog), for long enough to span the restart.
    apply(pod("steady", fio_verify("/data/f", "128M", "--time_based --runtime=45 --verify_backlog=64"), "steady"))
    wait_pod_ready("steady")
    node = get("pod", "steady")["spec"]["nodeName"]
    plugin = node_plugin_on(node)
    mappings = kubectl("exec", "-n", "ballast-system", plugin, "--", "nbd-client", "list")
    time.sleep(5)
    kubectl("delete", "pod", "-n", "ballast-system", plugin, "--wait=true")
    wait_until("a new node plugin on the node", lambda: node_plugin_on(node) not in (None, plugin), timeout=120)
    successor = node_plugin_on(node)
    kubectl("wait", "-n", "ballast-system", f"pod/{successor}", "--for=condition=Ready", "--timeout=120s")
    # The serving process outlived the old plugin; its log is relayed
    # into the new one's.
    volume = volume_handle("steady")
    wait_until(
        "the serving process's log in the new node plugin's",
        lambda: any(json.loads(line).get("fields", {}).get("volume") == volume for line in plugin_log_lines(successor)),
        timeout=30,
    )
    report = fio_report(wait_pod_done("steady", timeout=300))
    job = report["jobs"][0]
    assert job["error"] == 0, job
    assert job["write"]["io_bytes"] > 0, job
    # Which attach path served it: /dev/nbdN (kernel NBD) or /dev/loopN (FUSE + loop).
    print(f"node plugin deleted under fio on {node}; mapping was: {mappings.strip()}")
    delete("pod", "steady")
    delete("pvc", "steady")


def plugin_log_lines(plugin):
    return [line for line in kubectl("logs", "-n", "ballast-system", plugin, "-c", "csi-plugin").splitlines() if line.startswith("{")]


def attachment_epoch(volume, node):
    for attachment in get("volumeattachment", namespace=None)["items"]:
        spec = attachment["spec"]
        if spec["source"].get("persistentVolumeName") == volume and spec["nodeName"] == node:
            status = attachment.get("status", {})
            if status.get("attached"):
                return int(status["attachmentMetadata"]["epoch"])
    return None


def test_a_pod_moved_to_another_node_gets_a_new_epoch():
    apply(pvc("moving", "1Gi"))
    nodes = [n["metadata"]["name"] for n in get("node", namespace=None)["items"]]
    apply(pod("first", "echo from-first > /data/note && sync && sleep 3600", "moving", node=nodes[0]))
    wait_pod_ready("first")
    volume = pvc_bound("moving")
    first = wait_until("the attachment on the first node", lambda: attachment_epoch(volume, nodes[0]))
    delete("pod", "first")
    apply(pod("second", "cat /data/note", "moving", node=nodes[1]))
    assert wait_pod_done("second").strip() == "from-first"
    second = attachment_epoch(volume, nodes[1])
    assert second is not None and second > first, (first, second)
    print(f"epoch {first} on {nodes[0]}, then {second} on {nodes[1]}")
    delete("pod", "second")
    delete("pvc", "moving")


def storage_pods():
    return get("pod", namespace="ballast-system")["items"]


def test_a_storage_server_killed_during_writes():
    apply(pvc("busy", "1Gi", mode="Block"))
    apply(
        pod("busy", fio_verify("/dev/xvda", "512M", "--bs=64k"), "busy", block=True)
    )
    wait_until("fio to be running", lambda: get("pod", "busy")["status"].get("phase") == "Running")
    time.sleep(5)
    victim = next(
        p["metadata"]["name"]
        for p in storage_pods()
        if p["metadata"]["name"].startswith("ballast-storage-") and p["spec"]["nodeName"] != get("pod", "busy")["spec"]["nodeName"]
    )
    kubectl("delete", "pod", "-n", "ballast-system", victim, "--grace-period=0", "--force")
    report = fio_report(wait_pod_done("busy", timeout=600))
    assert report["jobs"][0]["error"] == 0, report["jobs"][0]
    volume = volume_handle("busy")

    def whole():
        status = ballast("status")
        alive = [server for server in status["chunk_servers"] if server["alive"]]
        degraded = [chunk for chunk in status["degraded_chunks"] if chunk["volume_id"] == volume]
        return len(alive) == 3 and not degraded

    wait_until("every chunk of the volume to have 3 replicas again", whole, timeout=300, interval=5)
    delete("pod", "busy")
    delete("pvc", "busy")


def test_storage_capacity_is_published():
    # Only classes that wait for the first consumer use capacity, so only
    # those get CSIStorageCapacity objects.
    def capacities():
        items = get("csistoragecapacities", namespace="ballast-system")["items"]
        return [c for c in items if c.get("storageClassName") == "ballast-wffc"] or None

    published = wait_until("CSIStorageCapacity objects for the ballast-wffc class", capacities, timeout=180)
    status = ballast("status")
    raw_free = sum(s["capacity_bytes"] - s["used_bytes"] for s in status["chunk_servers"] if s["alive"])
    for capacity in published:
        assert 0 < parse_quantity(capacity["capacity"]) <= raw_free, (capacity, raw_free)


def parse_quantity(quantity):
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 1000, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(quantity[: -len(suffix)]) * factor
    return int(quantity)


def test_nothing_is_left_behind():
    wait_until(
        "every Ballast PersistentVolume to be deleted",
        lambda: not [pv for pv in get("pv", namespace=None)["items"] if pv["spec"].get("csi", {}).get("driver") == "csi.ballast.io"],
        timeout=300,
    )
    wait_until("the metadata service to hold no volumes", lambda: not ballast("volume", "list"), timeout=120)
    held = ballast("chunks")
    wait_until("chunk servers to hold no chunks", lambda: not ballast("chunks"), timeout=300, interval=5)
    print(f"chunks before the last wait: {held}")
