"""What the errors for a gone peer say: PeerLost's reason, and the endpoint's
``peer_status`` (the runtime's record of exits) for a peer gone without an exit code."""

import pytest
from deploy_channels import Endpoint, Receiver, Sender
from deploy_core import PeerExited, PeerLost, Pid

pytestmark = pytest.mark.timeout(60)

CHILD = """
ep = dc.Endpoint("127.0.0.1:0", secret=SECRET)
parent = Pid.parse(sys.argv[1])
print(ep.pid.format(), flush=True)
dc.Sender(parent, endpoint=ep).send("hello")
sys.stdin.readline()
os.kill(os.getpid(), 9)
"""


def test_peer_lost_says_how_the_connection_ended(make_endpoint, children):
    ep = make_endpoint()
    proc = children.run(CHILD, ep.pid.format())
    rx = Receiver(Pid.parse(proc.stdout.readline()), endpoint=ep)
    assert rx.recv(timeout=10) == "hello"
    proc.stdin.write("go\n")
    proc.stdin.flush()
    with pytest.raises(PeerLost) as info:
        rx.recv(timeout=10)
    assert info.value.reason in ("connection reset", "the connection closed without a goodbye")
    assert str(info.value) == f"lost the connection to peer {rx.pid}: {info.value.reason}"
    assert proc.wait(timeout=10) == -9


def test_peer_status_tells_how_a_peer_gone_without_a_code_ended(make_endpoint):
    asked: list[Pid] = []

    def peer_status(pid: Pid) -> PeerExited:
        asked.append(pid)
        return PeerExited(pid, signal="SIGKILL", reason="memory limit 20MiB exceeded")

    ep = make_endpoint(peer_status=peer_status)
    gone = Endpoint("127.0.0.1:0", secret=b"x")
    pid = gone.pid
    gone.close()
    rx = Receiver(pid, endpoint=ep)
    with pytest.raises(PeerExited) as info:
        rx.recv(timeout=10)
    assert str(info.value) == f"peer {pid} was killed by SIGKILL (memory limit 20MiB exceeded)"
    with pytest.raises(PeerExited) as again:
        rx.recv(timeout=10)
    assert str(again.value) == str(info.value) and again.value is not info.value
    assert asked == [pid]  # asked once per link


def test_peer_status_is_not_asked_when_the_goodbye_had_the_code(make_endpoint):
    asked: list[Pid] = []
    ep = make_endpoint(peer_status=lambda pid: asked.append(pid))
    peer = make_endpoint()
    Sender(ep.pid, endpoint=peer).send("bye")
    rx = Receiver(peer.pid, endpoint=ep)
    assert rx.recv(timeout=10) == "bye"
    peer.close(exit_code=3)
    with pytest.raises(PeerExited) as info:
        rx.recv(timeout=10)
    assert info.value.code == 3 and str(info.value) == f"peer {peer.pid} has exited with code 3"
    assert asked == []


def test_a_failing_peer_status_leaves_the_channels_own_error(make_endpoint):
    def broken(pid: Pid) -> None:
        raise OSError("the runtime is gone")

    ep = make_endpoint(peer_status=broken)
    gone = Endpoint("127.0.0.1:0", secret=b"x")
    pid = gone.pid
    gone.close()
    with pytest.raises(PeerExited) as info:
        Receiver(pid, endpoint=ep).recv(timeout=10)
    assert str(info.value) == f"peer {pid} has exited"
