"""Issue 13: a local user binds an exited process's port and relays whoever connects there
to another live process of the run, rewriting the pids it sees on the way."""

from __future__ import annotations

import logging
import socket
import threading
import time

import pytest
from deploy_channels import Receiver, Sender
from deploy_core import PeerExited, PeerLost

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
