"""Issue 13: on a protected connection (``Endpoint(protect=...)``) a network attacker on
the path cannot change, inject or replay frames after the handshake.

The attacker is a relay that the connector's TCP connection is routed through (the
test points the connector's socket at it), forwarding both ways and, when told,
flipping a byte or sending a captured chunk again.
"""

from __future__ import annotations

import logging
import socket
import threading

import pytest
from deploy_channels import Endpoint, Receiver, Sender
from deploy_channels._connection import SETUP_TIMEOUT, Connection
from deploy_channels._loop import WRITE
from deploy_core import PeerLost

SECRET = b"deploy-channels-tests"

pytestmark = pytest.mark.timeout(30)


class Attacker:
    """Relays one connection to ``target``; ``tamper``/``capture`` act on the next chunk
    going from the connector to the acceptor."""

    def __init__(self, target: tuple[str, int]):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.addr = self.listener.getsockname()
        self.target = target
        self.tamper = threading.Event()
        self.capture = threading.Event()
        self.captured: list[bytes] = []
        self.server: socket.socket | None = None
        self.lock = threading.Lock()
        self.sockets = [self.listener]
        self.threads = [threading.Thread(target=self._serve, daemon=True)]
        self.threads[0].start()

    def _serve(self) -> None:
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        server = socket.create_connection(self.target)
        self.server = server
        self.sockets += [client, server]
        for args in ((client, server, True), (server, client, False)):
            thread = threading.Thread(target=self._pipe, args=args, daemon=True)
            thread.start()
            self.threads.append(thread)

    def _pipe(self, source: socket.socket, sink: socket.socket, forward: bool) -> None:
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
            if forward and self.tamper.is_set():
                self.tamper.clear()
                middle = len(data) // 2
                data = data[:middle] + bytes([data[middle] ^ 0x20]) + data[middle + 1 :]
            if forward and self.capture.is_set():
                self.capture.clear()
                self.captured.append(data)
            try:
                with self.lock:
                    sink.sendall(data)
            except OSError:
                return

    def inject(self, data: bytes) -> None:
        assert self.server is not None
        with self.lock:
            self.server.sendall(data)

    def close(self) -> None:
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for thread in self.threads:
            thread.join(5)


@pytest.fixture
def attacked(make_endpoint, monkeypatch, request):
    """(connector, acceptor, attacker): the connector's connections to the acceptor go
    through the attacker."""
    protect = request.param
    a = make_endpoint(protect=protect, linger=60.0)
    b = make_endpoint(protect=protect, linger=60.0)
    attacker = Attacker(b.pid.addr)
    original = Connection.start_connect

    def start_connect(conn: Connection) -> None:
        if conn.owner is a._peers and conn.link.pid == b.pid:
            # The connector's packets to b take a path through the attacker.
            conn.sock.connect_ex(attacker.addr)
            conn.loop.register(conn.fd, WRITE, conn.on_event)
            conn.loop.call_later(SETUP_TIMEOUT, conn._setup_deadline)
            return
        original(conn)

    monkeypatch.setattr(Connection, "start_connect", start_connect)
    yield a, b, attacker
    attacker.close()


def established(a: Endpoint, b: Endpoint) -> tuple[Sender, Receiver]:
    tx, rx = Sender(b.pid, endpoint=a), Receiver(a.pid, endpoint=b)
    tx.send("zero")
    assert rx.recv(timeout=5) == "zero"
    return tx, rx


def integrity_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "failed its check" in r.getMessage()]


@pytest.mark.parametrize("attacked", ["all"], indirect=True)
def test_a_tampered_frame_is_refused_and_the_connection_closed(attacked, caplog):
    caplog.set_level(logging.WARNING)
    a, b, attacker = attacked
    tx, rx = established(a, b)
    attacker.tamper.set()
    tx.send("pay 100 to alice")
    with pytest.raises(PeerLost):
        rx.recv(timeout=5)  # the changed frame is never delivered
    assert len(integrity_warnings(caplog)) == 1, caplog.text


@pytest.mark.parametrize("attacked", ["all"], indirect=True)
def test_a_replayed_frame_is_refused_and_the_connection_closed(attacked, caplog, wait_until):
    caplog.set_level(logging.WARNING)
    a, b, attacker = attacked
    tx, rx = established(a, b)
    attacker.capture.set()
    tx.send("pay 100 to alice")
    assert rx.recv(timeout=5) == "pay 100 to alice"
    wait_until(lambda: attacker.captured)
    attacker.inject(attacker.captured[0])
    with pytest.raises(PeerLost):
        rx.recv(timeout=5)  # not a second payment
    assert len(integrity_warnings(caplog)) == 1, caplog.text


@pytest.mark.parametrize("attacked", ["off"], indirect=True)
def test_without_protection_a_replayed_frame_goes_through(attacked, wait_until):
    # What protection is for: on an unprotected connection the same replay works.
    a, b, attacker = attacked
    tx, rx = established(a, b)
    attacker.capture.set()
    tx.send("pay 100 to alice")
    assert rx.recv(timeout=5) == "pay 100 to alice"
    wait_until(lambda: attacker.captured)
    attacker.inject(attacker.captured[0])
    assert rx.recv(timeout=5) == "pay 100 to alice"


@pytest.mark.parametrize("protect", ["remote", "all"])
def test_a_protected_pair_carries_messages_both_ways(make_endpoint, protect):
    a, b = make_endpoint(protect=protect), make_endpoint(protect=protect)
    tx, rx = Sender(b.pid, endpoint=a), Receiver(a.pid, endpoint=b)
    back_tx, back_rx = Sender(a.pid, endpoint=b), Receiver(b.pid, endpoint=a)
    big = bytes(range(256)) * 40000
    for i in range(200):
        tx.send(i)
    tx.send(big)
    back_tx.send("back")
    assert [rx.recv(timeout=10) for _ in range(200)] == list(range(200))
    assert rx.recv(timeout=10) == big
    assert back_rx.recv(timeout=10) == "back"
    kinds = {type(conn.sock).__name__ for conn in a._peers.conns}
    assert kinds == ({"ProtectedSocket"} if protect == "all" else {"socket"})  # loopback: "remote" is off


def test_protect_must_be_a_known_setting():
    with pytest.raises(ValueError, match="protect"):
        Endpoint("127.0.0.1:0", secret=SECRET, protect="yes")
