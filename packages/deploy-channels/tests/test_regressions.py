"""Regression tests for the defects a review of deploy-channels found (issue 12), one
section per defect, each reproduced with real endpoints as a user would meet it."""

from __future__ import annotations

import time

import pytest
from deploy_channels import Receiver, Sender, _wire

pytestmark = pytest.mark.timeout(60)


def wait_until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def call_in_loop(endpoint, fn, *args):
    """Run ``fn`` on the endpoint's loop thread and wait until it has run."""
    done = []
    endpoint._loop.call_soon(lambda: done.append(fn(*args)))
    wait_until(lambda: done)
    return done[0]


# --- 1. a close request that meets a large message in flight ----------------------------


def force_close_request(endpoint, link):
    # What B's linger does, minus B's own check that no frame is partly received: the
    # request reaches A in the middle of writing the message.
    with link.out_lock:
        assert not link.out
        link.wconn = None
    link.closing = True
    link.conn.send_setup(_wire.control_frame(_wire.CLOSE_REQUEST))


@pytest.mark.parametrize("who", ["linger", "forced"])
def test_idle_close_request_during_a_large_message_loses_nothing(make_endpoint, who):
    a, b = make_endpoint(linger=60.0), make_endpoint(linger=60.0)
    tx = Sender(b.pid, endpoint=a)
    with Receiver(a.pid, endpoint=b) as rx:
        tx.send(b"first")
        assert rx.recv(timeout=10) == b"first"
    link = b._links[a.pid]
    big = bytes(range(256)) * (400 * 1024)  # 100 MiB
    tx.send(big)
    # B has no channel, nothing queued and nothing unread: its linger would ask A to close
    # while most of the message is still on its way.
    if who == "linger":
        call_in_loop(b, b._linger_over, link, link.idle_token)
    else:
        call_in_loop(b, force_close_request, b, link)
    rx = Receiver(a.pid, endpoint=b)
    assert rx.recv(timeout=20) == big
    tx.send(b"after")
    assert rx.recv(timeout=10) == b"after"
    assert a._links[b.pid].death is None and b._links[a.pid].death is None
