"""A thread blocked in `recv` reads its connection's socket itself (no hand-off from the
loop thread); it must hand the socket back correctly in every situation."""

import asyncio
import threading
import time

import pytest
from deploy_channels import Receiver, Sender, _connection, _wire, select
from deploy_channels._loop import READ
from deploy_core import ChannelClosed, PeerExited

pytestmark = pytest.mark.timeout(60)


def direct_readers(link) -> bool:
    conn = link.conn
    return conn is not None and conn.user_reading


def test_ping_pong_is_read_directly_without_waking_the_loop(pair, in_thread):
    a, b = pair
    tx_ab, rx_ba = Sender[int](b.pid, endpoint=a), Receiver[int](b.pid, endpoint=a)
    tx_ba, rx_ab = Sender[int](a.pid, endpoint=b), Receiver[int](a.pid, endpoint=b)

    def echo():
        for _ in range(2000):
            tx_ba.send(rx_ab.recv(timeout=10))

    thread, outcome = in_thread(echo)
    for i in range(2000):
        tx_ab.send(i)
        assert rx_ba.recv(timeout=10) == i
    thread.join(10)
    assert outcome == [None]
    # Most messages did not go through the inboxes: the receiving threads took them off
    # the sockets themselves. (The loop reads one when it arrives before its reader is back
    # in recv, which threads of one process sharing a GIL make common, the more so on a
    # loaded machine: a quarter of them here, over a quarter more under a parallel test run.
    # Without direct reads all 4000 would.)
    assert a._peers.links[b.pid.hex].total_in + b._peers.links[a.pid.hex].total_in < 2400


def test_mixed_sizes_and_bursts_keep_order(pair, in_thread):
    a, b = pair
    tx, rx = Sender(b.pid, endpoint=a), Receiver(a.pid, endpoint=b)
    sizes = [0, 10, 70_000, 5, 1 << 20, 3, 200_000, 1]
    expected = [(round_, size, bytes(size)) for round_ in range(30) for size in sizes]
    thread, outcome = in_thread(lambda: [rx.recv(timeout=10) for _ in expected])
    for index, value in enumerate(expected):
        tx.send(value)
        if index % 20 == 0:
            time.sleep(0.01)  # sometimes the reader is already waiting on the socket
    thread.join(30)
    assert outcome == [expected]
    with pytest.raises(TimeoutError):
        rx.recv(timeout=0.05)


def test_two_threads_receiving_on_one_receiver_get_each_message_once(pair, in_thread):
    a, b = pair
    tx, rx = Sender[int](b.pid, endpoint=a), Receiver[int](a.pid, endpoint=b)
    count = 5000
    got: list = []
    lock = threading.Lock()

    def take():
        while True:
            value = rx.recv(timeout=10)
            if value < 0:
                return
            with lock:
                got.append(value)

    threads = [in_thread(take) for _ in range(2)]
    for i in range(count):
        tx.send(i)
        if i % 500 == 0:
            time.sleep(0.005)
    tx.send(-1)
    tx.send(-1)
    for thread, outcome in threads:
        thread.join(20)
        assert outcome == [None]
    assert sorted(got) == list(range(count))


def test_closing_the_endpoint_wakes_a_direct_reader(pair, in_thread, wait_until):
    a, b = pair
    tx, rx = Sender(a.pid, endpoint=b), Receiver(b.pid, endpoint=a)
    tx.send("first")
    assert rx.recv(timeout=5) == "first"
    thread, outcome = in_thread(lambda: rx.recv(timeout=20))
    wait_until(lambda: direct_readers(a._peers.links[b.pid.hex]))
    start = time.monotonic()
    a.close()
    thread.join(5)
    assert isinstance(outcome[0], ChannelClosed)
    assert time.monotonic() - start < 2


def test_goodbye_reaches_a_direct_reader(pair, in_thread, wait_until):
    a, b = pair
    tx, rx = Sender(a.pid, endpoint=b), Receiver(b.pid, endpoint=a)
    tx.send("first")
    assert rx.recv(timeout=5) == "first"

    def drain():
        values = []
        try:
            while True:
                values.append(rx.recv(timeout=10))
        except PeerExited as error:
            return values, error.code

    thread, outcome = in_thread(drain)
    wait_until(lambda: direct_readers(a._peers.links[b.pid.hex]))
    tx.send("last")
    b.close(exit_code=4)
    thread.join(10)
    assert outcome == [(["last"], 4)]


def test_timeout_while_reading_directly_leaves_the_connection_usable(pair):
    a, b = pair
    tx, rx = Sender(a.pid, endpoint=b), Receiver(b.pid, endpoint=a)
    tx.send(0)
    assert rx.recv(timeout=5) == 0
    for i in range(1, 20):
        with pytest.raises(TimeoutError):
            rx.recv(timeout=0.01)
        tx.send(i)
        assert rx.recv(timeout=5) == i
    link = a._peers.links[b.pid.hex]
    assert link.conn is not None and not link.conn.user_reading
    # The loop reads again once nobody waits: select sees the next message.
    tx.send("for select")
    assert select(rx, timeout=5) is rx
    assert rx.recv_nowait() == "for select"


def test_frames_left_behind_are_processed_when_the_loop_finds_the_read_side_taken(pair):
    """A reader leaves a frame it cannot handle to the loop; the loop's hand-back finds the
    read side taken by a thread that is about to let it go empty-handed. The frame must not
    wait for more bytes on the socket, which may never come."""
    a, b = pair
    tx, rx = Sender(a.pid, endpoint=b), Receiver(b.pid, endpoint=a)
    tx.send(0)
    assert rx.recv(timeout=5) == 0
    conn = a._peers.links[b.pid.hex].conn
    frame, _ = _wire.encode_message(42)
    handed_back = threading.Event()
    with conn.rlock:  # a thread that holds the read side for a moment
        conn.held = [bytes(frame)[4:]]  # the payload, without its length prefix
        a._loop.call_soon(conn.after_user_read)
        a._loop.call_soon(handed_back.set)
        assert handed_back.wait(5)
    assert conn.held is not None  # the hand-back found the read side taken
    assert rx.recv(timeout=5) == 42


# --- parking: READ stays off between the direct reads of one thread --------------------


def _read_once_directly(link, tx, rx, in_thread, wait_until, value=0):
    # A recv that is waiting on the socket before the message comes reads it directly.
    thread, outcome = in_thread(lambda: rx.recv(timeout=10))
    wait_until(lambda: direct_readers(link))
    tx.send(value)
    thread.join(10)
    assert outcome == [value]


def _linked(a, b):
    # b's Receiver from a, connected (the first message came through), and b's link to a.
    tx, rx = Sender[int](b.pid, endpoint=a), Receiver[int](a.pid, endpoint=b)
    tx.send(-1)
    assert rx.recv(timeout=10) == -1
    return tx, rx, b._peers.links[a.pid.hex]


def _loop_reads(link) -> bool:
    conn = link.conn
    return bool(conn.loop.mask(conn.fd) & READ)


def test_after_a_direct_read_read_stays_parked_until_the_reader_stays_away(pair, in_thread, wait_until):
    a, b = pair
    tx, rx, link = _linked(a, b)
    _read_once_directly(link, tx, rx, in_thread, wait_until)
    assert link.conn.parked and not _loop_reads(link)
    # Nobody receives now: the loop takes the socket back and reads the next message.
    tx.send(1)
    wait_until(lambda: len(link.inbox) == 1, timeout=5)
    assert not link.conn.parked and _loop_reads(link)
    assert rx.recv_nowait() == 1


def _recv_nowait(rx):
    with pytest.raises(TimeoutError):
        rx.recv_nowait()


def _select(rx):
    with pytest.raises(TimeoutError):
        select(rx, timeout=0.01)


def _arecv(rx):
    async def wait():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(rx.arecv(), 0.01)

    asyncio.run(wait())


@pytest.mark.parametrize("wait_for_the_loop", [_recv_nowait, _select, _arecv])
def test_waiting_for_the_loop_takes_read_back_at_once(pair, in_thread, wait_until, monkeypatch, wait_for_the_loop):
    monkeypatch.setattr(_connection, "_PARK_TIME", 60.0)  # (only the waiter can unpark here)
    a, b = pair
    tx, rx, link = _linked(a, b)
    _read_once_directly(link, tx, rx, in_thread, wait_until)
    assert link.conn.parked
    wait_for_the_loop(rx)
    assert not link.conn.parked and _loop_reads(link)
    tx.send(2)
    assert select(rx, timeout=5) is rx
    assert rx.recv_nowait() == 2


def test_no_parking_while_another_waits_for_the_loop(pair, in_thread, wait_until, monkeypatch):
    monkeypatch.setattr(_connection, "_PARK_TIME", 60.0)
    a, b = pair
    tx, rx, link = _linked(a, b)

    class Other:  # a second thread or task waiting on the same link
        def wake(self) -> None:
            pass

    other = Other()
    link.rx_watchers.add(other)
    try:
        _read_once_directly(link, tx, rx, in_thread, wait_until)
        assert not link.conn.parked and _loop_reads(link)
    finally:
        link.rx_watchers.discard(other)


def test_a_peer_that_leaves_is_noticed_while_read_is_parked(pair, in_thread, wait_until):
    a, b = pair
    tx, rx, link = _linked(a, b)
    _read_once_directly(link, tx, rx, in_thread, wait_until)
    assert link.conn.parked
    a.close(exit_code=3)
    # b receives nothing meanwhile; its loop still reads the goodbye.
    wait_until(lambda: link.death is not None, timeout=5)
    with pytest.raises(PeerExited) as exited:
        rx.recv(timeout=5)
    assert exited.value.code == 3
