"""Nodes that die, leave, come back and stop: each test has a cluster of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from cluster import HOLDER_MEM, STREAM, assert_gone, node_of, project, running, wait_until
from conftest import survivors

pytestmark = pytest.mark.timeout(150)


def expected_code(events: list[dict]) -> int | None:
    """DESIGN §3: the first failure's code, 128+N for a signal N; 0 if none failed."""
    for event in events:
        if event["event"] == "exit" and (event["code"] or event["signal"]):
            if event["code"] is not None:
                return event["code"]
            return 128 + signal.Signals[event["signal"]]
    return 0


def test_a_worker_killed_mid_run_is_a_lost_node_and_comes_back(tmp_path):
    with running(tmp_path / "cluster") as cluster:
        push = cluster.start_push(project(tmp_path / "job", STREAM))
        line = push.wait_for_output("producer ")
        victim = node_of(cluster, int(line.split()[1]))
        assert victim is not cluster.master
        killed_at = time.time()
        victim.process.kill()
        result = push.finish(30)
        result.check_tree()
        consumer, producer = result.children(result.top)
        assert result.exits()[producer]["reason"] == "node lost", result.exits()[producer]
        consumer_says = result.output(consumer).decode()
        assert consumer_says.startswith("PeerLost at "), consumer_says
        assert float(consumer_says.split()[2].rstrip(":")) - killed_at < 5.0
        assert result.exits()[consumer]["code"] == 3
        assert result.code == expected_code(result.events) != 0, result.stderr
        assert_gone(lambda: survivors(result.tag), "processes of the run")
        assert_gone(
            lambda: [p for p in cluster.processes() if p.cwd().startswith(str(victim.directory))],
            "processes of the killed node",
        )
        # The master keeps serving on the nodes it has, and uses the node again once it is back.
        status = wait_until(
            lambda: (s := cluster.status()) and len(s["nodes"]) == 2 and s, 10, "the lost node to leave deploy status"
        )
        assert victim.addr not in {node["addr"] for node in status["nodes"]}
        again = cluster.push(project(tmp_path / "small", "import deploy\ndeploy.init()\nprint('still serving')\n"))
        assert again.code == 0 and again.output(again.top) == b"still serving\n", again.stderr
        victim.start()
        cluster.wait_ready(3, timeout=70)  # the master retries its static list for up to a minute
        both = cluster.push(project(tmp_path / "both", BOTH))
        assert both.code == 0 and both.output(both.top) == b"both ran\n", both.stderr


# Two processes that must be alive at once and cannot share a node: both workers are used.
BOTH = f"""
import deploy

def wait(parent, _):
    deploy.Sender[str](parent).send(deploy.Receiver[str](parent).recv())

if __name__ == "__main__":
    deploy.init()
    big = deploy.Resources(mem="{HOLDER_MEM}", cpu=0.1)
    pids = [deploy.spawn(wait, None, big) for _ in range(2)]
    for pid in pids:
        deploy.Sender[str](pid).send("ran")
    assert [deploy.Receiver[str](pid).recv() for pid in pids] == ["ran", "ran"]
    print("both ran")
"""


JOINER = f"""
import os, sys, time, deploy

def hold(parent, release):
    deploy.Sender[int](parent).send(os.getpid())
    while not os.path.exists(release):
        time.sleep(0.02)

if __name__ == "__main__":
    deploy.init()
    pid = deploy.spawn(hold, sys.argv[1], deploy.Resources(mem="{HOLDER_MEM}", cpu=0.1))
    print("holder", deploy.Receiver[int](pid).recv(), flush=True)
"""


def test_a_joining_worker_leaves_and_comes_back(tmp_path):
    # The master's node (1GiB) cannot hold the holder: only the joining worker can.
    with running(tmp_path / "cluster", workers=[], joiners=[("2GiB", "2")]) as cluster:
        joiner = cluster.workers[0]
        release = tmp_path / "release"
        script = project(tmp_path / "job", JOINER)

        push = cluster.start_push(script, str(release))
        holder = int(push.wait_for_output("holder ").split()[1])
        assert node_of(cluster, holder) is joiner
        release.touch()
        assert push.finish(30).code == 0

        # Leaving while it runs a process: the process is killed and reported, the node leaves.
        release.unlink()
        push = cluster.start_push(script, str(release))
        push.wait_for_output("holder ")
        assert joiner.stop(signal.SIGTERM) == 0, joiner.log()
        result = push.finish(30)
        result.check_tree()
        holder_exit = result.exits()[result.children(result.top)[0]]
        assert holder_exit["signal"] == "SIGKILL" or holder_exit["code"], holder_exit
        assert result.code != 0
        assert_gone(lambda: survivors(result.tag), "processes of the run")
        wait_until(lambda: len(cluster.status()["nodes"]) == 1, 10, "the joiner to leave deploy status")

        # Back again: registered and used.
        joiner.start()
        cluster.wait_ready(2, timeout=30)
        push = cluster.start_push(script, str(release))
        holder = int(push.wait_for_output("holder ").split()[1])
        assert node_of(cluster, holder) is joiner
        release.touch()
        assert push.finish(30).code == 0


SLEEPERS = """
import sys, time, deploy

def sleep(parent, index):
    deploy.Sender[int](parent).send(index)
    time.sleep(120)

if __name__ == "__main__":
    deploy.init()
    pids = [deploy.spawn(sleep, i, deploy.Resources(mem="300MiB")) for i in range(5)]
    for pid in pids:
        deploy.Receiver[int](pid).recv()
    print("all up", flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_daemons_stop_cleanly_killing_and_reporting_their_processes(tmp_path, sig):
    with running(tmp_path / "cluster", workers=[("1GiB", "1")]) as cluster:
        push = cluster.start_push(project(tmp_path / "job", SLEEPERS))
        push.wait_for_output("all up")
        nodes = {p["node"] for p in cluster.status()["processes"]}
        assert nodes == {cluster.master.addr, cluster.workers[0].addr}  # 6 x 300MiB cannot fit on one node
        assert cluster.workers[0].stop(sig) == 0, cluster.workers[0].log()
        assert_gone(
            lambda: [p for p in cluster.processes() if p.cwd().startswith(str(cluster.workers[0].directory))],
            "processes of the stopped worker",
        )
        assert cluster.master.stop(sig) == 0, cluster.master.log()
        result = push.finish(30)
        result.check_tree()
        assert len(result.exits()) == 6
        assert all(e["signal"] == "SIGKILL" for e in result.exits().values()), result.exits()
        assert result.code == 128 + signal.SIGKILL
    assert_gone(cluster.processes, "processes of the cluster")


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "cluster" / "master" / "cache"
    mount.mkdir(parents=True)
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
            check=True,
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError) as error:
        pytest.skip(f"cannot mount a small tmpfs here to fill a node's disk: {error}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=10)


def test_a_node_whose_disk_is_full_fails_the_push_in_one_line(tmp_path, tiny_disk):
    with running(tmp_path / "cluster", workers=[]) as cluster:
        script = project(tmp_path / "job", "import deploy\ndeploy.init()\nprint('should not run')\n")
        (script.parent / "data.bin").write_bytes(os.urandom(1024 * 1024))  # incompressible, 4x the disk
        result = cluster.start_push(script).finish(30)
        assert result.code != 0
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("deploy push: "), result.stderr
        assert "no space left" in lines[0], lines[0]
        assert "should not run" not in result.all_output()
        assert list(tiny_disk.iterdir()) == []  # nothing half-unpacked
        small = cluster.push(project(tmp_path / "small", "import deploy\ndeploy.init()\nprint('fits')\n"))
        assert small.code == 0 and small.output(small.top) == b"fits\n", small.stderr


def test_a_listed_worker_down_at_start_is_used_when_it_comes_up(tmp_path):
    # Only the worker can hold the holder (the master's node has 1GiB): the push waits for it.
    with running(tmp_path / "cluster", workers=[("2GiB", "2")], start_workers=False) as cluster:
        worker = cluster.workers[0]
        release = tmp_path / "release"
        push = cluster.start_push(project(tmp_path / "job", JOINER), str(release))
        with pytest.raises(AssertionError, match="no output"):
            push.wait_for_output("holder ", timeout=2)  # nowhere to run it yet
        worker.start()
        holder = int(push.wait_for_output("holder ", timeout=70).split()[1])
        assert node_of(cluster, holder) is worker
        release.touch()
        result = push.finish(30)
        assert result.code == 0, result.stderr
        result.check_tree()
