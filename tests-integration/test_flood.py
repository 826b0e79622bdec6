"""Issue 13: a flood of idle connections under a soft limit of 1,024 descriptors.

The run sets its own RLIMIT_NOFILE to 1,024 (inherited by the bridge, the zygote and
every process); a separate process, not part of the run and with a higher limit,
opens 1,500 connections each to the bridge's port and to the top process's endpoint
and holds them. Meanwhile the top process spawns children and exchanges messages with
them. None may fail, no peer may be reported lost, and the bridge must not spin.
"""

import pytest
from conftest import run

pytestmark = pytest.mark.timeout(180)

JOB = r'''
import os, resource, subprocess, sys, time
import psutil
import deploy

FLOOD = """
import resource, select, socket, sys, time
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
host, ports = sys.argv[1], [int(port) for port in sys.argv[2:]]
held = []
for port in ports:
    for _ in range(1500):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex((host, port))
        held.append(sock)
poller = select.poll()
for sock in held:
    poller.register(sock, select.POLLOUT)
connected, deadline = set(), time.monotonic() + 20
while len(connected) < 1100 * len(ports) and time.monotonic() < deadline:
    connected.update(fd for fd, _ in poller.poll(100))
print("flooding", len(connected), flush=True)
sys.stdin.read()  # hold every connection until told to stop
"""


def child(parent, n):
    # A message to the parent, then an answer back from it.
    deploy.Sender[int](parent).send(n)
    assert deploy.Receiver[int](parent).recv(timeout=60) == n * 2


if __name__ == "__main__":
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))
    deploy.init()
    from deploy_fabric import _process as _runtime

    me = _runtime._me
    bridge = psutil.Process(os.getppid()).parent()  # top <- zygote <- bridge
    flood = subprocess.Popen(
        [sys.executable, "-c", FLOOD, me.fabric[0], str(me.fabric[1]), str(me.pid.port)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        print(flood.stdout.readline().strip(), file=sys.stderr)
        # The bridge's CPU while it serves the spawns with the flood at its door.
        before, start = sum(bridge.cpu_times()[:2]), time.monotonic()
        pids = [deploy.spawn(child, n) for n in range(20)]
        got = {}
        for pid in pids:
            got[pid] = deploy.Receiver[int](pid).recv(timeout=60)
            deploy.Sender[int](pid).send(got[pid] * 2)
        assert sorted(got.values()) == list(range(20)), got
        elapsed = time.monotonic() - start
        busy = (sum(bridge.cpu_times()[:2]) - before) / elapsed
        print(f"spawns and messages took {elapsed:.2f}s; bridge busy {busy:.2f}", file=sys.stderr)
        assert busy < 0.5, f"the bridge spins: {busy:.0%} of a core over {elapsed:.1f}s"
        more = deploy.spawn(child, 100)
        assert deploy.Receiver[int](more).recv(timeout=60) == 100
        deploy.Sender[int](more).send(200)
        print("all done")
    finally:
        flood.stdin.close()
        flood.wait(30)
'''


def test_a_connection_flood_under_1024_descriptors_does_not_break_the_run(script):
    result = run(script(JOB), timeout=150)
    result.check_tree()
    assert result.code == 0, result.all_output(2) + result.stderr
    assert result.output(result.top) == b"all done\n", result.all_output(2)
    assert [event["reason"] for event in result.exits().values() if event.get("reason")] == []
    assert "PeerLost" not in result.all_output(2)
