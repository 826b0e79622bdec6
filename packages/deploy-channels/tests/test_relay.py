"""Issue 13: a local user binds an exited process's port and relays whoever connects there
to another live process of the run, rewriting the pids it sees on the way."""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest
from deploy_channels import Receiver, Sender
from deploy_core import PeerExited, PeerLost, Pid

pytestmark = pytest.mark.timeout(30)


class Relay:
    """Listens on ``port`` and forwards every connection to ``target``, replacing
    ``swap``'s first string by its second on the way there and back on the way back."""

    def __init__(self, port: int, target: tuple[str, int], swap: list[tuple[bytes, bytes]]):
        self.listener = socket.create_server(("127.0.0.1", port))
        self.target = target
        self.swap = swap
        self.forwarded = 0
        self.sockets: list[socket.socket] = [self.listener]
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            self.sockets += [client, server]
            there = [(old, new) for old, new in self.swap]
            back = [(new, old) for old, new in self.swap]
            for args in ((client, server, there), (server, client, back)):
                thread = threading.Thread(target=self._pipe, args=args, daemon=True)
                thread.start()
                self.threads.append(thread)

    def _pipe(self, source: socket.socket, sink: socket.socket, swap: list[tuple[bytes, bytes]]) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                data = b""
            if not data:
                try:
                    sink.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            for old, new in swap:
                data = data.replace(old, new)
            self.forwarded += len(data)
            try:
                sink.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for thread in self.threads:
            thread.join(5)


def test_a_late_send_to_an_exited_peer_relayed_to_another_process_fails(make_endpoint, caplog):
    caplog.set_level(logging.WARNING, logger="deploy.channels")
    sender, bystander, gone = make_endpoint(), make_endpoint(), make_endpoint()
    assert len(gone.pid.format()) == len(bystander.pid.format())  # a same-length swap keeps frames intact
    port = gone.pid.port
    gone.close(timeout=2)
    # The attacker holds the dead process's port and forwards to the bystander, renaming
    # the pids on the way (full text form first, then the bare id the handshake uses).
    swap = [
        (gone.pid.format().encode(), bystander.pid.format().encode()),
        (gone.pid.hex.encode(), bystander.pid.hex.encode()),
    ]
    relay = Relay(port, bystander.pid.addr, swap)
    try:
        tx = Sender(gone.pid, endpoint=sender)
        start = time.monotonic()
        with pytest.raises((PeerExited, PeerLost)):
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                tx.send("for the exited process only", timeout=5)
                time.sleep(0.01)
        assert time.monotonic() - start < 10
        assert relay.forwarded > 0, "the sender never reached the relay"
        # The bystander got nothing: no link from the sender carries that message.
        with pytest.raises(TimeoutError):
            Receiver(sender.pid, endpoint=bystander).recv(timeout=0.5)
        messages = [r.getMessage() for r in caplog.records if r.name == "deploy.channels"]
        assert any("wants" in m or "authenticat" in m for m in messages), messages
    finally:
        relay.close()


NO_DESCRIPTORS = """
import logging, resource, socket, threading

seen = threading.Event()


class Watch(logging.Handler):
    def emit(self, record):
        if "cannot open a socket" in record.getMessage():
            seen.set()


logging.getLogger("deploy.channels").addHandler(Watch())
a = dc.Endpoint("127.0.0.1:0", secret=SECRET)
b = dc.Endpoint("127.0.0.1:0", secret=SECRET)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 512), hard))
hog = []
try:
    while True:
        hog.append(socket.socket())
except OSError:
    pass
tx = dc.Sender(b.pid, endpoint=a)
tx.send("through")  # a's loop finds no descriptor for the connection
assert seen.wait(10), "the connect never failed"
for sock in hog:
    sock.close()
try:
    tx.send("and after")
    rx = dc.Receiver(a.pid, endpoint=b)
    print(rx.recv(timeout=10), rx.recv(timeout=10), flush=True)
except (PeerLost, PeerExited, TimeoutError) as error:
    print(type(error).__name__, flush=True)
a.close(timeout=2)
b.close(timeout=2)
"""


def test_a_connect_without_a_free_descriptor_is_retried_not_a_lost_peer(children):
    # EMFILE from socket() is this process's shortage, not a sign that the peer is gone.
    proc = children.run(NO_DESCRIPTORS)
    out, _ = proc.communicate(timeout=30)
    assert out.strip() == "through and after"
    assert proc.returncode == 0


def test_a_flood_of_idle_connections_is_capped_and_a_good_peer_still_connects(pair, caplog):
    cap = 128  # deploy_channels._endpoint.MAX_UNAUTHENTICATED
    caplog.set_level(logging.WARNING, logger="deploy.channels")
    a, b = pair
    flood = []
    try:
        for _ in range(cap + 200):
            flood.append(socket.create_connection(b.pid.addr, timeout=5))
        tx, rx = Sender(b.pid, endpoint=a), Receiver(a.pid, endpoint=b)
        tx.send("through the flood")
        assert rx.recv(timeout=10) == "through the flood"
        holding = sum(1 for conn in list(b._peers.conns) if conn.link is None and conn.state == "auth")
        assert holding <= cap
        warnings = [r.getMessage() for r in caplog.records if "authenticating at once" in r.getMessage()]
        assert len(warnings) == 1, warnings  # one line per flood, not one per connection
    finally:
        for sock in flood:
            sock.close()


ACCEPT_WITHOUT_DESCRIPTORS = """
import resource, socket
b = dc.Endpoint("127.0.0.1:0", secret=SECRET)
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 512), hard))
hog = []
try:
    while True:
        hog.append(socket.socket())
except OSError:
    pass
print(b.pid.format(), flush=True)
sys.stdin.readline()  # the test measures our CPU while a connection waits in the backlog
for sock in hog:
    sock.close()
rx = dc.Receiver(Pid.parse(sys.stdin.readline().strip()), endpoint=b)
print(rx.recv(timeout=10), flush=True)
b.close(timeout=2)
"""


def test_accept_without_a_free_descriptor_backs_off_instead_of_spinning(children, make_endpoint):
    import psutil

    proc = children.run(ACCEPT_WITHOUT_DESCRIPTORS)
    b_pid = Pid.parse(proc.stdout.readline().strip())
    waiting = socket.create_connection(b_pid.addr, timeout=5)  # in the backlog: accept fails
    try:
        child = psutil.Process(proc.pid)
        before, start = sum(child.cpu_times()[:2]), time.monotonic()
        time.sleep(1.0)  # a measurement window, not a synchronisation
        busy = (sum(child.cpu_times()[:2]) - before) / (time.monotonic() - start)
        assert busy < 0.3, f"the endpoint spins on EMFILE: {busy:.0%} of a core"
    finally:
        waiting.close()
    a = make_endpoint()
    proc.stdin.write("go\n" + a.pid.format() + "\n")
    proc.stdin.flush()
    Sender(b_pid, endpoint=a).send("after the shortage")
    out, _ = proc.communicate(timeout=20)
    assert out.strip() == "after the shortage"
