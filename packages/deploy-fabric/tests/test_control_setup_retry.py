"""A process's control connection to the fabric that ends during set-up is retried
(issue 9): the fabric port evicts the oldest of its connections authenticating when a
flood holds it, and an evicted spawn must not fail with "lost the connection"."""

from __future__ import annotations

import socket
import struct
import threading
import types

import pytest
from deploy_channels.framing import FrameDecoder
from deploy_core import Handshake, Pid
from deploy_fabric import _process
from deploy_fabric import _wire as wire

pytestmark = pytest.mark.timeout(60)

SECRET = b"fabric-control-setup"


class FlakyFabric:
    """A fabric port whose first ``drop`` connections are closed before the handshake
    (reset, their hello unread), as the cap on strangers closes them; then it answers."""

    def __init__(self, drop: int):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(20)
        self.drop = drop
        self.accepted = 0
        self.requests: list[tuple] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for _ in range(self.drop):
                sock, _ = self.listener.accept()
                self.accepted += 1
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
            sock, _ = self.listener.accept()
            self.accepted += 1
        except OSError:
            return
        with sock:
            sock.settimeout(20)
            handshake = Handshake(SECRET, initiator=False, identity=wire.BRIDGE)
            while not handshake.done:
                handshake.receive_data(sock.recv(handshake.bytes_needed()))
                sock.sendall(handshake.data_to_send())
            decoder = FrameDecoder(max_frame_size=wire.MAX_MESSAGE)
            hello = wire.recv_message(sock, decoder)
            assert hello is not None
            self.requests.append(hello)
            wire.send_message(sock, hello)  # the echo that says set-up is done
            request = wire.recv_message(sock, decoder)
            if request is not None:
                self.requests.append(request)
                wire.send_message(sock, (wire.Kind.PEER_EXITED, None, None, None))
            sock.recv(1)  # until the client closes

    def close(self) -> None:
        self.listener.close()
        self.thread.join(10)


def test_a_control_connection_evicted_during_set_up_is_retried():
    fabric = FlakyFabric(drop=3)
    me = types.SimpleNamespace(fabric=fabric.listener.getsockname(), secret=SECRET, pid=Pid.new("127.0.0.1", 1))
    try:
        answer = _process._ask(me, [wire.dumps((wire.Kind.PEER_EXIT, "0" * 32))], timeout=10)
        assert answer == (wire.Kind.PEER_EXITED, None, None, None)
        assert fabric.accepted == 4
        # The request went once, on the connection that completed its set-up.
        assert [message[0] for message in fabric.requests] == [wire.Kind.HELLO_PROCESS, wire.Kind.PEER_EXIT]
    finally:
        connection = getattr(_process._control, "connection", None)
        if connection is not None:
            connection.close()
            _process._control.connection = None
        fabric.close()


def test_a_fabric_that_is_gone_fails_at_once():
    listener = socket.create_server(("127.0.0.1", 0))
    address = listener.getsockname()
    listener.close()
    me = types.SimpleNamespace(fabric=address, secret=SECRET, pid=Pid.new("127.0.0.1", 1))
    with pytest.raises(Exception, match="cannot connect to the fabric"):
        _process._ask(me, [wire.dumps((wire.Kind.PEER_EXIT, "0" * 32))], timeout=10)
