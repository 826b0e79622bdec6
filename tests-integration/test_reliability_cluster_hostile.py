"""Hostile input against the listening ports of a cluster (issue 9): the master's BIND
(nodes), a worker's BIND (its master), the bridge port (`deploy push`, `deploy status`)
and a run's control port on the master (its processes).

Each port gets what test_reliability_hostile.py feeds the local ports (its `assault`), all
four at once, and while the idle connections are held a legitimate `deploy status` and a
`deploy push` of a small job must succeed. Afterwards every bad connection is closed,
each logged once at most, no daemon holds more descriptors than before, and nothing sent
without the secret was unpickled. DEPLOY_RELIABILITY=full runs the issue's sizes.
"""

from __future__ import annotations

import os
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest
from cluster import project, running, wait_until
from reliability import listening_ports, record, scaled
from test_reliability_hostile import assault, release

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(240)]

# Holds its run (and so the run's control port on the master) open until the file argv[1] exists.
HOLD = """
import os, sys, time, deploy

if __name__ == "__main__":
    deploy.init()
    print("holding", flush=True)
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.1)
"""

# A legitimate client: a run that spawns a process and hears from it.
SMALL = """
import deploy

def child(parent, _):
    deploy.Sender[str](parent).send("pong")

if __name__ == "__main__":
    deploy.init()
    print(deploy.Receiver[str](deploy.spawn(child, None)).recv(timeout=60), flush=True)
"""


def _port(addr: str) -> int:
    return int(addr.rsplit(":", 1)[1])


def _fds(daemon) -> int:
    return psutil.Process(daemon.process.pid).num_fds()


def test_the_cluster_ports_survive_hostile_input(tmp_path):
    marker = str(tmp_path / "unpickled")
    cycles, idle = scaled(400, 2000), scaled(300, 1000)
    with running(tmp_path / "cluster", workers=[("1536MiB", "2")]) as cluster:
        master, worker = cluster.master, cluster.workers[0]
        hold_dir = tmp_path / "hold"
        holder = cluster.start_push(project(hold_dir, HOLD), str(hold_dir / "STOP"))
        holder.wait_for_output("holding")
        known = {_port(master.addr), _port(cluster.bridge)}
        run_ports = wait_until(
            lambda: [p for p in listening_ports(master.process.pid) if p not in known], 15, "the run's control port"
        )
        assert len(run_ports) == 1, f"the master listens on {listening_ports(master.process.pid)}"
        small = project(tmp_path / "small", SMALL)
        warm = cluster.push(small)  # every daemon has served once: its fds are at their steady count
        assert warm.code == 0, warm.stderr
        baseline = {daemon.name: _fds(daemon) for daemon in (master, worker)}
        logged = {daemon.name: len(daemon.log().splitlines()) for daemon in (master, worker)}
        targets = {
            "master's BIND": (master.addr, "master"),
            "worker's BIND": (worker.addr, "node"),
            "bridge port": (cluster.bridge, "bridge"),
            "run's control port": (f"127.0.0.1:{run_ports[0]}", "bridge"),
        }
        started = time.monotonic()
        with ThreadPoolExecutor(len(targets)) as pool:
            futures = {
                name: pool.submit(assault, ("127.0.0.1", _port(addr)), marker, wanted, cycles, idle)
                for name, (addr, wanted) in targets.items()
            }
            results = {name: future.result() for name, future in futures.items()}
        try:
            # Every port holds `idle` unauthenticated connections now: legitimate clients are served.
            status = cluster.status()
            assert len(status["nodes"]) == 2 and len(status["runs"]) == 1, status
            during = cluster.push(small)
            assert during.code == 0 and during.output(during.top) == b"pong\n", during.stderr
        finally:
            for result in results.values():
                release(result["held"])
        assault_seconds = time.monotonic() - started
        failures = [
            f"{name}: {attack}"
            for name, result in results.items()
            for attack, closed in result["outcomes"].items()
            if not closed
        ]
        assert not failures, f"connections not closed: {failures}"
        assert not os.path.exists(marker), "something was unpickled without the secret"
        after = cluster.push(small)
        assert after.code == 0 and after.output(after.top) == b"pong\n", after.stderr
        for daemon in (master, worker):
            wait_until(
                lambda daemon=daemon: _fds(daemon) <= baseline[daemon.name] + 4,
                30,
                f"the {daemon.name}'s fds back to {baseline[daemon.name]} (now {_fds(daemon)})",
            )
        (hold_dir / "STOP").write_text("")
        held = holder.finish(30)
        assert held.code == 0, held.stderr
        # Each bad connection (the attacks, the connect/close cycles, the idle ones) logged once at most.
        new_lines = {daemon.name: daemon.log().splitlines()[logged[daemon.name] :] for daemon in (master, worker)}
        sent = {name: result["bad"] + cycles + idle for name, result in results.items()}
        allowed = {"master": sum(sent[n] for n in targets if n != "worker's BIND"), "worker0": sent["worker's BIND"]}
        for name, lines in new_lines.items():
            assert len(lines) <= allowed[name], f"{name} logged {len(lines)} lines for {allowed[name]}: {lines[:10]}"
        kinds = Counter(
            re.sub(r"\d+", "N", line.split(": ", 2)[-1])[:90] for lines in new_lines.values() for line in lines
        )
        record(
            "hostile input: cluster ports",
            log_kinds=dict(kinds.most_common(8)),
            ports=len(targets),
            attacks_per_port=len(results["bridge port"]["outcomes"]) - 1,
            connect_close_cycles=cycles,
            idle_connections=idle,
            log_lines={name: len(lines) for name, lines in new_lines.items()},
            fds={daemon.name: (baseline[daemon.name], _fds(daemon)) for daemon in (master, worker)},
            seconds=round(assault_seconds, 1),
        )
