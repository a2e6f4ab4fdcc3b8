"""The install's operational parts, as a cluster operator meets them: what
the node plugin says about the host, the metrics Services, taints, the
disruption budget that keeps the metadata service's majority through a
drain, and certificates on every connection. Runs after
test_kubernetes.py and makes no volumes."""

import json
import tempfile

from kube import BALLAST_IN_META_POD, ballast, get, kubectl, kubectl_run, node_plugin_on, wait_until

SYSTEM = "ballast-system"


def log_events(pod, container):
    lines = kubectl("logs", "-n", SYSTEM, pod, "-c", container).splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def nodes():
    return [n["metadata"]["name"] for n in get("node", namespace=None)["items"]]


def test_every_node_plugin_says_how_volumes_attach():
    for node in nodes():
        events = log_events(node_plugin_on(node), "csi-plugin")
        said = [e["fields"] for e in events if e.get("target") == "csi_plugin::node::host"]
        attach = [fields for fields in said if "method" in fields]
        assert attach, f"the node plugin on {node} did not say how volumes attach: {said}"
        method = attach[-1]["method"]
        assert method in ("netlink", "ioctl", "fuse-loop"), attach[-1]
        if method != "netlink":
            # Why not kernel NBD, and what loading the module answered.
            assert attach[-1]["reason"] and attach[-1]["module"], attach[-1]
        # And whether each kernel feature works, a fallback never silent.
        features = {fields["feature"]: fields.get("reason", "works") for fields in said if "feature" in fields}
        assert set(features) == {"nbd", "fuse", "io_uring"}, said
        print(f"{node}: {method}: {attach[-1]}; {features}")


def scrape(service, pod_name_prefix, port):
    """Every endpoint of a metrics Service, scraped through the API
    server's proxy to each pod."""
    slices = json.loads(
        kubectl("get", "endpointslices", "-n", SYSTEM, "-l", f"kubernetes.io/service-name={service}", "-o", "json")
    )
    pods = [
        endpoint["targetRef"]["name"]
        for endpoint_slice in slices["items"]
        for endpoint in endpoint_slice.get("endpoints") or []
        if endpoint.get("conditions", {}).get("ready")
    ]
    assert pods and all(p.startswith(pod_name_prefix) for p in pods), (service, pods)
    return {p: kubectl("get", "--raw", f"/api/v1/namespaces/{SYSTEM}/pods/{p}:{port}/proxy/metrics") for p in pods}


def test_metrics_services_reach_every_pod():
    expected = {
        # service: (pods, port, a metric each of them exports)
        "ballast-meta": ("ballast-meta-", 3, 9101, "ballast_meta_raft_term"),
        "ballast-storage-metrics": ("ballast-storage-", 3, 9400, "ballast_storage_capacity_bytes"),
        "ballast-csi-node-metrics": ("ballast-csi-node-", 3, 9810, "ballast_csi_node_attach_method"),
        "ballast-csi-controller-metrics": ("ballast-csi-controller-", 2, 9810, "ballast_csi_operations_total"),
    }
    for service, (prefix, count, port, metric) in expected.items():
        scraped = scrape(service, prefix, port)
        assert len(scraped) == count, (service, sorted(scraped))
        for pod, text in scraped.items():
            assert metric in text, f"{pod} ({service}) does not export {metric}"


TAINT = "ballast.io/test-dedicated=databases:NoSchedule"


def test_the_node_plugin_runs_on_tainted_nodes():
    node = nodes()[-1]
    kubectl("taint", "node", node, TAINT)
    try:
        plugin = node_plugin_on(node)
        kubectl("delete", "pod", "-n", SYSTEM, plugin, "--wait=true")
        wait_until(f"a node plugin on the tainted node {node}", lambda: node_plugin_on(node) not in (None, plugin), timeout=60)
        kubectl("wait", "-n", SYSTEM, f"pod/{node_plugin_on(node)}", "--for=condition=Ready", "--timeout=120s")
    finally:
        kubectl("taint", "node", node, TAINT + "-", check=False)


def evict(pod):
    """Asks the API server to evict `pod`, as kubectl drain does; returns
    kubectl's result (a failure when a disruption budget refuses)."""
    eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod, "namespace": SYSTEM}}
    with tempfile.NamedTemporaryFile("w", suffix=".json") as body:
        json.dump(eviction, body)
        body.flush()
        return kubectl_run("create", "--raw", f"/api/v1/namespaces/{SYSTEM}/pods/{pod}/eviction", "-f", body.name)


def metadata_ready():
    statefulset = get("statefulset", "ballast-meta", namespace=SYSTEM)
    return statefulset["status"].get("readyReplicas") == 3


def ready_pod_uid(name):
    pod = get("pod", name, namespace=SYSTEM)
    ready = any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))
    return ready and pod["metadata"]["uid"]


def test_a_drain_takes_one_metadata_member_at_a_time():
    wait_until("three ready metadata members", metadata_ready, timeout=120)
    evicted = ready_pod_uid("ballast-meta-2")
    first = evict("ballast-meta-2")
    assert first.returncode == 0, first.stderr
    # While that member is away, a second eviction would leave one of three.
    second = evict("ballast-meta-1")
    assert second.returncode != 0 and "disruption budget" in second.stderr, (second.returncode, second.stderr)
    wait_until(
        "the evicted member back and ready",
        lambda: ready_pod_uid("ballast-meta-2") not in (False, evicted),
        timeout=300,
        interval=2,
    )
    wait_until("a metadata leader", lambda: ballast("status")["leader"]["id"], timeout=60)


def test_nothing_serves_callers_without_the_right_certificate():
    """As installed, the metadata service and the chunk servers refuse a
    caller without a certificate of the cluster's authority, and a
    member's own certificate (role meta) may not create a volume."""
    member = ["--meta", "127.0.0.1:7101"]
    plaintext = kubectl_run(*BALLAST_IN_META_POD, "status", *member)
    assert plaintext.returncode != 0 and "--tls-dir" in plaintext.stderr, plaintext.stderr
    as_member = kubectl_run(
        *BALLAST_IN_META_POD, "volume", "create", "intruder", "--size", "1GiB", *member, "--tls-dir", "/etc/ballast/tls"
    )
    assert as_member.returncode != 0 and "may not call Meta/CreateVolume" in as_member.stderr, as_member.stderr
    assert all(v["name"] != "intruder" for v in ballast("volume", "list") or [])
    server = ballast("status")["chunk_servers"][0]["address"]
    unsecured = kubectl_run(*BALLAST_IN_META_POD, "chunks", "--servers", server)
    assert unsecured.returncode != 0, unsecured.stdout
