"""Faults in cluster mode (issue 9): kill -9 of `deploy push` and of the master mid-run.
(A worker killed mid-run is test_cluster_nodes.py's.) Each must leave no process of the
run anywhere, and the cluster must take the next push with all its capacity."""

from __future__ import annotations

import pytest
from cluster import HOLDER_MEM, STREAM, assert_gone, project, running, wait_until
from conftest import survivors
from reliability import record

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(200)]

# One process as big as the largest free slot: it runs only if the killed run's
# reservations were all given back.
BOTH_BIG = f"""
import deploy

def hold(parent, _):
    deploy.Sender[str](parent).send("ran")

if __name__ == "__main__":
    deploy.init()
    big = deploy.Resources(mem="{HOLDER_MEM}", cpu=0.1)
    pids = [deploy.try_spawn(hold, None, big) for _ in range(2)]
    print(" ".join(deploy.Receiver[str](pid).recv(timeout=60) for pid in pids))
"""


def test_kill_9_of_deploy_push_kills_its_run_and_frees_its_capacity(tmp_path):
    with running(tmp_path / "cluster") as cluster:
        push = cluster.start_push(project(tmp_path / "job", STREAM))
        push.wait_for_output("producer ")
        assert len(survivors(push.tag)) >= 3
        push.process.kill()
        push.process.wait(10)
        assert_gone(lambda: survivors(push.tag), "processes of the run whose push was killed", wait=15)
        status = wait_until(lambda: (s := cluster.status()) and not s.get("runs") and s, 15, "the run to leave status")
        again = cluster.push(project(tmp_path / "again", BOTH_BIG))
        assert again.code == 0 and again.output(again.top) == b"ran ran\n", again.stderr
        record("cluster: kill -9 of deploy push", nodes=len(status["nodes"]))


def test_kill_9_of_the_master_ends_the_push_and_leaves_no_process_of_the_run(tmp_path):
    with running(tmp_path / "cluster") as cluster:
        push = cluster.start_push(project(tmp_path / "job", STREAM))
        push.wait_for_output("producer ")
        cluster.master.process.kill()
        cluster.master.process.wait(10)
        result = push.finish(30)
        assert result.code != 0
        assert "Traceback" not in result.stderr, result.stderr
        assert_gone(lambda: survivors(push.tag), "processes of the run after its master died", wait=15)
        # The workers survive it and serve a new master.
        assert all(worker.alive() for worker in cluster.workers)
        cluster.master.start()
        cluster.wait_ready(timeout=70)
        again = cluster.push(project(tmp_path / "again", BOTH_BIG))
        assert again.code == 0 and again.output(again.top) == b"ran ran\n", again.stderr
        record("cluster: kill -9 of the master", push_code=result.code, push_said=result.stderr.strip()[-200:])
