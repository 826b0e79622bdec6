"""A cluster whose nodes each live in their own network namespace, joined by veth pairs to a
bridge in a hub namespace, so that traffic between nodes really crosses interfaces; cutting
a node's link (no FIN, no RST: packets just stop) must be noticed within 5 s.

The addresses (10.213.0.0/24) exist only inside the namespaces this test makes. Skipped,
with the reason, where namespaces cannot be made (not root, no ``ip``, no CAP_NET_ADMIN).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import time
import uuid

import pytest
from cluster import (
    CLUSTER_TAG,
    HOLDER_MEM,
    MASTER_SIZE,
    STREAM,
    WORKER_SIZES,
    Cluster,
    Daemon,
    assert_gone,
    node_of,
    project,
    wait_until,
)
from conftest import survivors

pytestmark = pytest.mark.timeout(180)

SUBNET = "10.213.0"
PORT, BRIDGE_PORT = 7000, 7100


def ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=10)


def link_bytes(namespace: str, device: str, direction: str) -> int:
    path = f"/sys/class/net/{device}/statistics/{direction}_bytes"
    out = subprocess.run(
        ["ip", "netns", "exec", namespace, "cat", path], check=True, capture_output=True, text=True, timeout=10
    )
    return int(out.stdout)


@pytest.fixture
def namespaces():
    """Four namespaces: a hub holding a bridge, and one per node with a veth into the hub."""
    if shutil.which("ip") is None:
        pytest.skip("network namespaces cannot be made here: the ip command is missing")
    if os.geteuid() != 0:
        pytest.skip("network namespaces cannot be made here: the test is not running as root")
    prefix = f"dt{uuid.uuid4().hex[:6]}"
    hub = f"{prefix}-hub"
    nodes = {name: f"{prefix}-{name}" for name in ("m", "a", "b")}
    made: list[str] = []
    try:
        try:
            ip("netns", "add", hub)
        except subprocess.CalledProcessError as error:
            pytest.skip(f"network namespaces cannot be made here: {error.stderr.decode().strip()}")
        made.append(hub)
        ip("-n", hub, "link", "add", "br0", "type", "bridge")
        ip("-n", hub, "link", "set", "br0", "up")
        for index, (name, namespace) in enumerate(nodes.items(), start=1):
            ip("netns", "add", namespace)
            made.append(namespace)
            ip(
                "link",
                "add",
                f"{prefix}{name}",
                "netns",
                namespace,
                "type",
                "veth",
                "peer",
                "name",
                f"h{name}",
                "netns",
                hub,
            )
            ip("-n", namespace, "link", "set", f"{prefix}{name}", "name", "eth0")
            ip("-n", namespace, "addr", "add", f"{SUBNET}.{index}/24", "dev", "eth0")
            ip("-n", namespace, "link", "set", "eth0", "up")
            ip("-n", namespace, "link", "set", "lo", "up")
            ip("-n", hub, "link", "set", f"h{name}", "master", "br0")
            ip("-n", hub, "link", "set", f"h{name}", "up")
        yield hub, nodes
    finally:
        for namespace in reversed(made):
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=10)


def boot_in(namespaces_: tuple[str, dict[str, str]], root) -> Cluster:
    _, nodes = namespaces_
    tag = uuid.uuid4().hex
    secret = secrets.token_hex(16)  # required: these addresses are not loopback

    def env(name: str) -> dict[str, str]:
        environment = {**os.environ, CLUSTER_TAG: tag, "DEPLOY_SECRET": secret, "PYTHONUNBUFFERED": "1"}
        environment["DEPLOY_CACHE"] = str(root / name / "cache")
        environment.pop("DEPLOY_LOG", None)
        return environment

    addr = {name: f"{SUBNET}.{index}:{PORT}" for index, name in enumerate(nodes, start=1)}
    workers = []
    for name, (mem, cpu) in zip(("a", "b"), WORKER_SIZES, strict=True):
        workers.append(
            Daemon(name, addr[name], ["fabric", addr[name], "--mem", mem, "--cpu", cpu], root / name, env(name))
        )
    bridge = f"{SUBNET}.1:{BRIDGE_PORT}"
    listed = [
        word for daemon, (mem, cpu) in zip(workers, WORKER_SIZES, strict=True) for word in (daemon.addr, mem, cpu)
    ]
    master = Daemon(
        "m", addr["m"], ["fabric", "master", addr["m"], *MASTER_SIZE, "bridge", bridge, *listed], root / "m", env("m")
    )
    cluster = Cluster(root, secret, tag, master, workers, bridge, prefix=["ip", "netns", "exec", nodes["m"]])
    try:
        for daemon in [*workers, master]:
            daemon.start(prefix=["ip", "netns", "exec", nodes[daemon.name]])
        cluster.wait_ready()
    except BaseException:
        cluster.shutdown()
        raise
    return cluster


def test_a_node_cut_off_is_lost_within_5s_and_comes_back(namespaces, tmp_path):
    hub, nodes = namespaces
    cluster = boot_in(namespaces, tmp_path / "cluster")
    try:
        push = cluster.start_push(project(tmp_path / "job", STREAM))
        line = push.wait_for_output("producer ")
        victim = node_of(cluster, int(line.split()[1]))
        assert victim is not cluster.master
        sent = link_bytes(nodes[victim.name], "eth0", "tx")
        wait_until(
            lambda: link_bytes(nodes[victim.name], "eth0", "tx") - sent > 1_000_000,
            20,
            "a megabyte of the stream to cross the producer's interface",
        )
        ip("-n", hub, "link", "set", f"h{victim.name}", "down")
        cut_at = time.time()  # after the link is surely down: the delay measured is at most the real one
        result = push.finish(30)
        lost_after = time.time() - cut_at
        result.check_tree()
        consumer, producer = result.children(result.top)
        assert result.exits()[producer]["reason"] == "node lost", result.exits()[producer]
        says = result.output(consumer).decode()
        assert says.startswith("PeerLost at "), says
        noticed = float(says.split()[2].rstrip(":")) - cut_at
        print(f"the consumer got PeerLost {noticed:.2f}s after the cut; the run ended after {lost_after:.2f}s")
        assert noticed <= 5.0, f"PeerLost came {noticed:.2f}s after the link went down"
        assert result.exits()[consumer]["code"] == 3
        assert result.code != 0
        # The cut-off node ends the run's processes itself once it has lost the master.
        assert_gone(lambda: survivors(result.tag), "processes of the run, on the cut-off node too", wait=15)
        status = cluster.status()
        assert victim.addr not in {node["addr"] for node in status["nodes"]}

        ip("-n", hub, "link", "set", f"h{victim.name}", "up")
        cluster.wait_ready(3, timeout=70)
        again = cluster.push(project(tmp_path / "again", STREAM_OF_TEN))
        assert again.code == 0 and again.output(again.top) == b"10 across\n", again.stderr
    finally:
        cluster.shutdown()


# Both workers are needed at once (neither node holds two of these): the node that came
# back is used again.
STREAM_OF_TEN = f"""
import deploy

def send(parent, peer):
    tx = deploy.Sender[int](peer)
    for index in range(10):
        tx.send(index)

def receive(parent, _):
    rx = deploy.Receiver[int](deploy.Receiver[deploy.Pid](parent).recv())
    deploy.Sender[int](parent).send(sum(1 for _ in range(10) if rx.recv() is not None))

if __name__ == "__main__":
    deploy.init()
    big = deploy.Resources(mem="{HOLDER_MEM}", cpu=0.1)
    r = deploy.spawn(receive, None, big)
    deploy.Sender[deploy.Pid](r).send(deploy.spawn(send, r, big))
    print(deploy.Receiver[int](r).recv(), "across")
"""
