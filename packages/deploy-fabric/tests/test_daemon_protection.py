"""The daemons' rule for frame protection (`_connections.protected`): both ends of a
connection decide alike without negotiating, however the connector spelled the address."""

from __future__ import annotations

import os
import socket

import pytest
from deploy_core import ProtectedSocket
from deploy_fabric._connections import PROTECT_ALL, protected

pytestmark = pytest.mark.timeout(30)
KEY = os.urandom(32)

# Every spelling reaches this machine's loopback (0.0.0.0 and this machine's own name
# too, on Linux), except that the name may resolve to the machine's real address: then
# both ends must protect.
SPELLINGS = ["127.0.0.1", "localhost", "0.0.0.0", "::1", "::ffff:127.0.0.1", socket.gethostname()]


@pytest.fixture
def listener():
    """A dual-stack listener: it sees an IPv4 connector as ``::ffff:a.b.c.d``."""
    with socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True) as sock:
        yield sock


def both_ends(listener: socket.socket, spelling: str) -> tuple[socket.socket, socket.socket]:
    connector = socket.create_connection((spelling, listener.getsockname()[1]), timeout=5)
    acceptor, _ = listener.accept()
    initiator_side = protected(connector, KEY, initiator=True, peer="master")
    acceptor_side = protected(acceptor, KEY, initiator=False, peer="node:x")
    return initiator_side, acceptor_side


@pytest.mark.parametrize("spelling", SPELLINGS)
def test_both_ends_agree_however_the_address_was_spelled(listener, spelling, monkeypatch):
    monkeypatch.delenv(PROTECT_ALL, raising=False)
    initiator_side, acceptor_side = both_ends(listener, spelling)
    try:
        assert isinstance(initiator_side, ProtectedSocket) == isinstance(acceptor_side, ProtectedSocket)
        if spelling != socket.gethostname():
            assert not isinstance(initiator_side, ProtectedSocket)  # loopback does without
        # and they talk: a protected pair round-trips, a plain pair too
        initiator_side.sendall(b"hello")
        assert acceptor_side.recv(64) == b"hello"
    finally:
        initiator_side.close()
        acceptor_side.close()


def test_the_internal_variable_protects_loopback_on_both_ends(listener, monkeypatch):
    monkeypatch.setenv(PROTECT_ALL, "1")
    initiator_side, acceptor_side = both_ends(listener, "127.0.0.1")
    try:
        assert isinstance(initiator_side, ProtectedSocket) and isinstance(acceptor_side, ProtectedSocket)
        initiator_side.sendall(b"sealed")
        record = acceptor_side.raw.recv(64)
        assert len(record) == 4 + 6 + 16 and record[4:10] == b"sealed"  # length, data, tag
    finally:
        initiator_side.close()
        acceptor_side.close()
