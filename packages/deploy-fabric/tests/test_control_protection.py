"""The master's control port with protected records (``Master(protect=...)``,
``wire.connect(protect=...)``), driven without a run: just its accept and read path."""

from __future__ import annotations

import logging
import os
import socket
import threading

import pytest
from deploy_core import Pid, Resources, SpawnReply, SpawnRequest
from deploy_fabric import _wire as wire
from deploy_fabric._bridge import Bridge
from deploy_fabric._master import Master
from deploy_fabric._output import JsonFormatter
from deploy_fabric._scheduler import Node
from deploy_fabric._wire import Kind

pytestmark = pytest.mark.timeout(30)
SECRET = os.urandom(32)


class _Handle:
    def __init__(self) -> None:
        self.forks: list[int] = []

    def fork(self, ticket: int, request: bytes | None, resources: Resources) -> None:
        self.forks.append(ticket)

    def stop(self) -> None:
        pass


@pytest.fixture
def master():
    """A master with one node that records fork requests, serving on a thread."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    with open(os.devnull, "w") as sink:
        master = Master(listener, SECRET, Bridge(JsonFormatter(sink.fileno())), protect="all")
        handle = _Handle()
        master.add_node(Node("local", Resources.default()), handle)
        master.selector.register(listener, 1, master._accept)
        stop = threading.Event()

        def serve() -> None:
            while not stop.is_set():
                master.housekeeping()
                for key, mask in master.selector.select(0.05):
                    key.data(mask)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        yield master, listener.getsockname(), handle
        stop.set()
        thread.join(5)
        listener.close()


def test_a_protected_control_connection_spawns(master):
    master, addr, handle = master
    pid = Pid.new("127.0.0.1", 7)
    sock = wire.connect(addr, SECRET, pid.hex, (Kind.HELLO_PROCESS, pid.format()), protect="all")
    assert type(sock).__name__ == "ProtectedSocket"
    decoder = wire.FrameDecoder(max_frame_size=wire.MAX_MESSAGE)
    assert wire.recv_message(sock, decoder) == (Kind.HELLO_PROCESS, pid.format())  # set-up done
    request = SpawnRequest.build(print, None, Resources.default(), pid)
    wire.send_message(sock, (Kind.SPAWN, request.encode()))
    deadline = threading.Event()
    for _ in range(100):
        if handle.forks:
            break
        deadline.wait(0.05)
    assert handle.forks == [0]
    master.forked(0, Pid.new("127.0.0.1", 8), None)
    reply = wire.recv_message(sock, decoder)
    assert reply is not None and SpawnReply.decode(reply[1]).pid is not None
    sock.close()


def test_a_tampered_control_record_closes_the_connection(master, caplog):
    caplog.set_level(logging.WARNING)
    master, addr, handle = master
    pid = Pid.new("127.0.0.1", 7)
    sock = wire.connect(addr, SECRET, pid.hex, (Kind.HELLO_PROCESS, pid.format()), protect="all")
    decoder = wire.FrameDecoder(max_frame_size=wire.MAX_MESSAGE)
    assert wire.recv_message(sock, decoder) == (Kind.HELLO_PROCESS, pid.format())  # set-up done
    sock.raw.sendall(b"\x00\x00\x00\x05spawn" + b"\x00" * 16)  # a record made without the key
    sock.raw.settimeout(10)
    assert sock.raw.recv(100) == b""  # closed by the master
    sock.close()
    assert handle.forks == []
    assert len([r for r in caplog.records if "failed its check" in r.getMessage()]) == 1, caplog.text


def test_an_unprotected_client_cannot_talk_to_a_protecting_master(master):
    master, addr, handle = master
    pid = Pid.new("127.0.0.1", 7)
    sock = wire.connect(addr, SECRET, pid.hex, (Kind.HELLO_PROCESS, pid.format()), protect="off")
    request = SpawnRequest.build(print, None, Resources.default(), pid)
    wire.send_message(sock, (Kind.SPAWN, request.encode()))  # plain frames fail the first check
    sock.settimeout(10)
    try:
        assert sock.recv(100) == b""
    except ConnectionResetError:
        pass
    sock.close()
    assert handle.forks == []


def test_protect_must_be_a_known_setting():
    with pytest.raises(ValueError, match="protect"):
        wire.protects("sometimes", "10.0.0.1")
    assert wire.protects("remote", "10.0.0.1") and not wire.protects("remote", "127.0.0.1")
