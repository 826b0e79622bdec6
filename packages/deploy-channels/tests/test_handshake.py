"""Strangers at the door: wrong secrets, garbage and port scanners are dropped and logged
while a good peer keeps working."""

import logging
import socket
import time

import pytest
from deploy_channels import Endpoint, Receiver, Sender, framing
from deploy_core import Handshake, PeerLost, Pid

pytestmark = pytest.mark.timeout(30)


def raw_connect(endpoint: Endpoint) -> socket.socket:
    sock = socket.create_connection(endpoint.pid.addr, timeout=5)
    return sock


def wait_closed(sock: socket.socket, timeout: float = 5.0) -> None:
    sock.settimeout(timeout)
    while True:
        try:
            data = sock.recv(4096)
        except ConnectionResetError:
            return
        if not data:
            return


def test_strangers_are_dropped_while_a_good_peer_works(pair, caplog):
    a, b = pair
    caplog.set_level(logging.WARNING, logger="deploy.channels")
    tx, rx = Sender(b.pid, endpoint=a), Receiver(a.pid, endpoint=b)
    tx.send("before")
    assert rx.recv(timeout=5) == "before"

    scanner = raw_connect(b)  # connect and close at once
    scanner.close()

    garbage = raw_connect(b)
    garbage.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + b"\x00" * 100)
    wait_closed(garbage)
    garbage.close()

    intruder = Endpoint("127.0.0.1:0", secret=b"wrong secret")
    try:
        with pytest.raises(PeerLost):
            Receiver(b.pid, endpoint=intruder).recv(timeout=5)
    finally:
        intruder.close(timeout=1)

    for i in range(100):
        tx.send(i)
    assert [rx.recv(timeout=5) for _ in range(100)] == list(range(100))
    deadline = time.monotonic() + 5
    # The garbage and the wrong secret are warnings; a scanner that just hangs up is not
    # (peers hang up during set-up routinely, e.g. when giving up a duplicate connection).
    while len([r for r in caplog.records if r.name == "deploy.channels"]) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.1)
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert len([r for r in caplog.records if r.name == "deploy.channels"]) == 2, messages
    assert "dropped" in messages
    assert "not speaking the deploy protocol" in messages
    assert "secret" in messages or "authentication" in messages


def test_a_silent_connection_does_not_block_the_loop(pair):
    a, b = pair
    silent = raw_connect(b)  # holds a half-open handshake
    try:
        tx, rx = Sender(b.pid, endpoint=a), Receiver(a.pid, endpoint=b)
        tx.send("through")
        assert rx.recv(timeout=5) == "through"
    finally:
        silent.close()


def test_authenticated_stranger_with_oversized_frame_is_dropped(pair, caplog):
    a, b = pair
    caplog.set_level(logging.WARNING, logger="deploy.channels")
    sock = raw_connect(b)
    handshake = Handshake(b._peers.secret, initiator=True, identity="f" * 32, wanted=b.pid.hex)
    sock.sendall(handshake.data_to_send())
    while not handshake.done:
        handshake.receive_data(sock.recv(handshake.bytes_needed()))
    sock.sendall(handshake.data_to_send())
    # Claims to be a (pre-hello) 1 GiB frame: over the set-up limit, never allocated.
    sock.sendall(framing.frame_header(2**30))
    wait_closed(sock)
    sock.close()
    tx, rx = Sender(b.pid, endpoint=a), Receiver(a.pid, endpoint=b)
    tx.send("still fine")
    assert rx.recv(timeout=5) == "still fine"


def test_connecting_to_a_pid_whose_port_is_reused_reports_the_peer_gone(pair):
    a, b = pair
    impostor = Pid.new(b.pid.host, b.pid.port)  # same address, another process id
    from deploy_core import PeerExited

    start = time.monotonic()
    with pytest.raises(PeerExited) as info:
        Receiver(impostor, endpoint=a).recv(timeout=5)
    assert info.value.code is None
    assert time.monotonic() - start < 2
    Sender(b.pid, endpoint=a).send("real peer unaffected")
    assert Receiver(a.pid, endpoint=b).recv(timeout=5) == "real peer unaffected"
