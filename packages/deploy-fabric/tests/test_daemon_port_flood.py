"""A daemon port (`_connections.accept_authenticated`) held by idle connections over its
cap of connections authenticating at once still lets a legitimate peer in: the newcomer
closes the oldest one still authenticating (issue 9)."""

from __future__ import annotations

import os
import socket
import threading

import pytest
from deploy_fabric import _connections
from deploy_fabric._connections import Loop, accept_authenticated, connect_authenticated

pytestmark = pytest.mark.timeout(60)
SECRET = os.urandom(32)


def test_a_legitimate_peer_gets_in_while_idle_connections_fill_the_cap():
    loop = Loop()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    ready = threading.Event()
    accept_authenticated(listener, SECRET, _connections.MASTER, ("node:",), loop, lambda sock: ready.set())
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            loop.once(0.05)

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    idle = [
        socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(_connections._MAX_UNAUTHENTICATED + 20)
    ]
    try:
        # (before the fix: every newcomer was closed while 128 were authenticating, for 10 s)
        sock = connect_authenticated(f"127.0.0.1:{port}", SECRET, "node:test", _connections.MASTER, timeout=5)
        assert ready.wait(5), "the legitimate peer was not handed to the loop"
        sock.close()
    finally:
        stop.set()
        server.join(5)
        for held in idle:
            held.close()
        listener.close()
