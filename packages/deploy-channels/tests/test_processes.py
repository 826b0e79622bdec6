"""Real child processes: exits, crashes, the exit drain, back-pressure and fork."""

import os
import signal
import threading
import time

import pytest
from deploy_channels import Endpoint, Receiver, Sender
from deploy_core import DeployError, PeerExited, PeerLost, Pid

pytestmark = pytest.mark.timeout(60)

# A child that makes an endpoint, prints its pid and reads the parent's from argv.
CHILD_SETUP = """
ep = dc.Endpoint("127.0.0.1:0", secret=SECRET, **eval(os.environ.get("EP_OPTIONS", "{}")))
parent = Pid.parse(sys.argv[1])
print(ep.pid.format(), flush=True)
"""


def child_pid(proc) -> Pid:
    return Pid.parse(proc.stdout.readline())


def test_sends_then_exits_at_once_all_delivered(make_endpoint, children):
    ep = make_endpoint()
    proc = children.run(
        CHILD_SETUP
        + """
tx = dc.Sender[int](parent, endpoint=ep)
for i in range(100_000):
    tx.send(i)
""",  # no close, no wait: the atexit drain must deliver everything
        ep.pid.format(),
    )
    rx = Receiver[int](child_pid(proc), endpoint=ep)
    got = [rx.recv(timeout=20) for _ in range(100_000)]
    assert got == list(range(100_000))
    with pytest.raises(PeerExited):
        rx.recv(timeout=10)
    assert proc.wait(timeout=10) == 0


def test_peer_exit_code_via_close(make_endpoint, children):
    ep = make_endpoint()
    proc = children.run(
        CHILD_SETUP
        + """
dc.Sender(parent, endpoint=ep).send("bye")
ep.close(exit_code=7)
sys.exit(7)
""",
        ep.pid.format(),
    )
    rx = Receiver(child_pid(proc), endpoint=ep)
    assert rx.recv(timeout=10) == "bye"
    with pytest.raises(PeerExited) as info:
        rx.recv(timeout=10)
    assert info.value.code == 7
    assert proc.wait(timeout=10) == 7
    tx = Sender(rx.pid, endpoint=ep)
    with pytest.raises(PeerExited):
        tx.send("to the dead")


@pytest.mark.parametrize("how", ["sigkill", "os_exit"])
def test_peer_lost_is_reported_within_a_second(make_endpoint, children, how):
    ep = make_endpoint()
    proc = children.run(
        CHILD_SETUP
        + """
dc.Sender(parent, endpoint=ep).send("hello")
sys.stdin.readline()
"""
        + ("os.kill(os.getpid(), 9)" if how == "sigkill" else "os._exit(3)"),
        ep.pid.format(),
    )
    pid = child_pid(proc)
    rx = Receiver(pid, endpoint=ep)
    tx = Sender(pid, endpoint=ep)
    assert rx.recv(timeout=10) == "hello"
    errors = []

    def blocked_recv():
        try:
            rx.recv(timeout=10)
        except Exception as error:
            errors.append((error, time.monotonic()))

    waiter = threading.Thread(target=blocked_recv)
    waiter.start()
    time.sleep(0.1)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    proc.wait(timeout=10)
    died = time.monotonic()
    waiter.join(5)
    assert errors and isinstance(errors[0][0], PeerLost)
    assert errors[0][1] - died < 1.0
    with pytest.raises(PeerLost):
        tx.send("anyone?")
    assert proc.returncode == (-signal.SIGKILL if how == "sigkill" else 3)


def test_channel_to_a_process_that_is_gone(make_endpoint):
    ep = make_endpoint()
    gone = Endpoint("127.0.0.1:0", secret=b"x")
    pid = gone.pid
    gone.close()
    start = time.monotonic()
    with pytest.raises(PeerExited) as info:
        Receiver(pid, endpoint=ep).recv()  # no timeout: must not hang
    assert info.value.code is None
    assert time.monotonic() - start < 1.0
    with pytest.raises(PeerExited):
        Sender(pid, endpoint=ep).send(1)


def test_clogged_receiver_blocks_the_sender_with_bounded_memory(make_endpoint, children):
    high_water = 1 << 20
    ep = make_endpoint(high_water=high_water)
    proc = children.run(
        CHILD_SETUP
        + """
rx = dc.Receiver[bytes](parent, endpoint=ep)
sys.stdin.readline()  # not reading until told
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS"))
before = rss()
count = 0
while True:
    try:
        value = rx.recv(timeout=10)
    except PeerExited:
        break
    assert value[:8] == count.to_bytes(8, "big"), (count, value[:8])
    count += 1
print(count, flush=True)
""",
        ep.pid.format(),
    )
    pid = child_pid(proc)
    tx = Sender[bytes](pid, endpoint=ep)
    sent = [0]
    payload = bytes(4096)

    def pump():
        for i in range(20_000):  # 80 MiB in total
            tx.send(i.to_bytes(8, "big") + payload)
            sent[0] = i + 1

    pumper = threading.Thread(target=pump)
    pumper.start()
    time.sleep(1.5)
    first = sent[0]
    time.sleep(0.5)
    assert sent[0] == first, "send kept going although the receiver does not read"
    # Sender buffer + kernel buffers + the receiver's bounded inbox: far below 80 MiB.
    assert first * 4104 < 40 * 2**20
    assert ep._peers.links[pid.hex].out_bytes <= high_water + 8192
    proc.stdin.write("read\n")
    proc.stdin.flush()
    pumper.join(30)
    assert not pumper.is_alive()
    tx.close()
    ep.close()
    assert proc.stdout.readline().strip() == "20000"
    assert proc.wait(timeout=10) == 0


def test_fork_child_makes_its_own_endpoint(make_endpoint):
    a, b = make_endpoint(), make_endpoint()
    tx, rx = Sender(b.pid, endpoint=a), Receiver(a.pid, endpoint=b)
    tx.send("before fork")
    assert rx.recv(timeout=5) == "before fork"
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:
        code = 1
        try:
            os.close(read_fd)
            try:
                Sender(b.pid, endpoint=a)
            except DeployError:
                pass
            else:
                raise AssertionError("the inherited endpoint should be unusable")
            own = Endpoint("127.0.0.1:0", secret=b._peers.secret)
            os.write(write_fd, own.pid.format().encode() + b"\n")
            Sender(b.pid, endpoint=own).send("from the child")
            own.close(exit_code=0)
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        child_pid_ = Pid.parse(pipe.readline())
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert Receiver(child_pid_, endpoint=b).recv(timeout=5) == "from the child"
    # The child closed its copies of our sockets without shutting them down.
    tx.send("after fork")
    assert rx.recv(timeout=5) == "after fork"
