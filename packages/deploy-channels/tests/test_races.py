"""Two real processes racing each other: simultaneous connects, idle teardown racing new
channels, and exits right after sending. Nothing may be lost, no PeerLost may appear
without a broken connection, and none of it may be logged as a warning."""

import logging
import random
import threading
import time

import pytest
from deploy_channels import Receiver, Sender
from deploy_core import PeerExited, Pid

pytestmark = pytest.mark.timeout(120)

# The child plays a process the runtime just started: its listening socket is bound (and
# listening) before its Endpoint exists, and it announces its pid at once, so the parent's
# connection may wait in the backlog while the child connects to the parent.
SHORT_LIVED_CHILDREN = """
import logging, random, socket
logging.basicConfig(level=logging.WARNING, format="CHILD-LOG %(levelname)s %(message)s")
parent = Pid.parse(sys.argv[1])
count, senders, linger = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
kinds = [int, str, list]
for index in range(count):
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    pid = Pid.new("127.0.0.1", sock.getsockname()[1])
    print(pid.format(), flush=True)
    if random.random() < 0.5:
        time.sleep(random.random() * 0.003)
    ep = dc.Endpoint(secret=SECRET, sock=sock, pid=pid, linger=linger)
    for n in range(senders):
        kind = kinds[n % 3]
        with dc.Sender[kind](parent, endpoint=ep) as tx:
            tx.send(kind(index) if kind is not list else [index] * n)
    ep.close(exit_code=index % 7)
print("done", flush=True)
"""


def expected(index: int, n: int):
    kind = (int, str, list)[n % 3]
    return kind(index) if kind is not list else [index] * n


def assert_no_warnings(caplog, stderr: str = "") -> None:
    warnings = [r.getMessage() for r in caplog.records if r.name == "deploy.channels" and r.levelno >= logging.WARNING]
    assert not warnings, warnings
    assert "CHILD-LOG" not in stderr, stderr


@pytest.mark.parametrize(
    ("senders", "linger"),
    [(1, 1.0), (3, 1.0), (3, 0.0)],
    ids=["one-sender", "three-senders", "three-senders-no-linger"],
)
def test_child_sends_and_exits_while_parent_connects(make_endpoint, children, caplog, senders, linger):
    caplog.set_level(logging.DEBUG, logger="deploy.channels")
    count = 150
    ep = make_endpoint(linger=linger)
    proc = children.run(SHORT_LIVED_CHILDREN, ep.pid.format(), str(count), str(senders), str(linger))
    for index in range(count):
        pid = Pid.parse(proc.stdout.readline())
        for n in range(senders):
            kind = (int, str, list)[n % 3]
            with Receiver[kind](pid, endpoint=ep) as rx:
                assert rx.recv(timeout=10) == expected(index, n), (index, n)
                if n == senders - 1:
                    with pytest.raises(PeerExited) as info:
                        rx.recv(timeout=10)
                    assert info.value.code == index % 7
    assert proc.stdout.readline().strip() == "done"
    assert proc.wait(timeout=10) == 0
    assert_no_warnings(caplog)


# Both processes open a Sender and a Receiver to each other at the same moment, exchange a
# message, close both and start again; with a linger of zero the idle teardown races
# every new pair of channels.
PING_PONG_CHILD = """
import logging, random
logging.basicConfig(level=logging.WARNING, format="CHILD-LOG %(levelname)s %(message)s")
random.seed(int(sys.argv[4]))
ep = dc.Endpoint("127.0.0.1:0", secret=SECRET, linger=float(sys.argv[3]))
print(ep.pid.format(), flush=True)
peer = Pid.parse(sys.argv[1])
for index in range(int(sys.argv[2])):
    if random.random() < 0.3:
        time.sleep(random.random() * 0.004)
    tx, rx = dc.Sender[int](peer, endpoint=ep), dc.Receiver[int](peer, endpoint=ep)
    tx.send(index)
    assert rx.recv(timeout=10) == -index, index
    tx.close()
    rx.close()
ep.close(exit_code=5)
"""


@pytest.mark.parametrize("linger", [0.0, 0.002, 1.0])
def test_both_sides_open_channels_at_once(make_endpoint, children, caplog, linger):
    caplog.set_level(logging.DEBUG, logger="deploy.channels")
    count = 2000 if linger < 1 else 300
    ep = make_endpoint(linger=linger)
    seed = random.randrange(1 << 30)
    proc = children.run(PING_PONG_CHILD, ep.pid.format(), str(count), str(linger), str(seed))
    peer = Pid.parse(proc.stdout.readline())
    rng = random.Random(seed + 1)
    for index in range(count):
        if rng.random() < 0.3:
            time.sleep(rng.random() * 0.004)
        rx, tx = Receiver[int](peer, endpoint=ep), Sender[int](peer, endpoint=ep)
        tx.send(-index)
        assert rx.recv(timeout=10) == index, (index, seed)
        rx.close()
        tx.close()
    with Receiver[int](peer, endpoint=ep) as rx, pytest.raises(PeerExited) as info:
        rx.recv(timeout=10)
    assert info.value.code == 5
    assert proc.wait(timeout=10) == 0
    assert_no_warnings(caplog)


def test_many_short_lived_peers_from_many_threads(make_endpoint, children, caplog):
    """The runtime's pattern: several threads each start a process and receive from it."""
    caplog.set_level(logging.DEBUG, logger="deploy.channels")
    ep = make_endpoint()
    per_thread, threads = 25, 4
    procs = [children.run(SHORT_LIVED_CHILDREN, ep.pid.format(), str(per_thread), "1", "1.0") for _ in range(threads)]
    failures: list = []
    results: list = []

    def receive_all(proc) -> None:
        try:
            for index in range(per_thread):
                pid = Pid.parse(proc.stdout.readline())
                results.append(Receiver[int](pid, endpoint=ep).recv(timeout=10) == index)
        except Exception as error:  # reported below
            failures.append(repr(error))

    workers = [threading.Thread(target=receive_all, args=(proc,)) for proc in procs]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert not failures, failures
    assert results == [True] * (per_thread * threads)
    for proc in procs:
        assert proc.stdout.readline().strip() == "done"
        assert proc.wait(timeout=10) == 0
    assert_no_warnings(caplog)


def test_connection_to_an_exiting_process_is_told_goodbye(make_endpoint, children):
    """A connection that reaches a process while it drains at exit gets its goodbye
    (PeerExited with the exit code), not a reset that would read as PeerLost."""
    ep = make_endpoint(high_water=1 << 16)  # stops reading early: the child's drain waits
    proc = children.run(
        """
parent = Pid.parse(sys.argv[1])
ep = dc.Endpoint("127.0.0.1:0", secret=SECRET, high_water=1 << 28)
print(ep.pid.format(), flush=True)
tx = dc.Sender[bytes](parent, endpoint=ep)
for i in range(8192):
    tx.send(i.to_bytes(4, "big") * 1024)
sys.stdin.readline()
ep.close(exit_code=9)
""",
        ep.pid.format(),
    )
    pid = Pid.parse(proc.stdout.readline())
    proc.stdin.write("go\n")
    proc.stdin.flush()
    time.sleep(0.3)
    # The child is draining into a parent that does not read: a newcomer is told goodbye.
    other = make_endpoint()
    with pytest.raises(PeerExited) as info:
        Receiver(pid, endpoint=other).recv(timeout=10)
    assert info.value.code == 9
    rx = Receiver[bytes](pid, endpoint=ep)
    for i in range(8192):
        assert rx.recv(timeout=10)[:4] == i.to_bytes(4, "big")
    with pytest.raises(PeerExited):
        rx.recv(timeout=10)
    assert proc.wait(timeout=10) == 0
