"""Two endpoints in one process, real loopback sockets."""

import asyncio
import pickle
import threading
import time
from dataclasses import dataclass

import pytest
from deploy_channels import Endpoint, Receiver, Sender, aselect, default_endpoint, select, set_default_endpoint
from deploy_core import ChannelClosed, ChannelExists, DeployError, PeerExited, Pid

pytestmark = pytest.mark.timeout(30)


@dataclass
class Point:
    x: int
    y: int


def settle(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_send_and_receive_typed(pair):
    a, b = pair
    with Sender[Point](b.pid, endpoint=a) as tx, Receiver[Point](a.pid, endpoint=b) as rx:
        tx.send(Point(1, 2))
        assert rx.recv(timeout=5) == Point(1, 2)


def test_both_directions_share_one_connection(pair):
    a, b = pair
    tx_ab, rx_ab = Sender(b.pid, endpoint=a), Receiver(a.pid, endpoint=b)
    tx_ba, rx_ba = Sender(a.pid, endpoint=b), Receiver(b.pid, endpoint=a)
    for i in range(100):
        tx_ab.send(i)
        tx_ba.send(-i)
    assert [rx_ab.recv(timeout=5) for _ in range(100)] == list(range(100))
    assert [rx_ba.recv(timeout=5) for _ in range(100)] == [-i for i in range(100)]
    settle(lambda: len(a._peers.conns) == 1 and len(b._peers.conns) == 1)


def connect_both_ways_at_once(a, b):
    start = threading.Barrier(2)
    made = {}

    def open_sender(src, dst, key):
        start.wait()
        made[key] = Sender(dst.pid, endpoint=src)

    threads = [
        threading.Thread(target=open_sender, args=(a, b, "ab")),
        threading.Thread(target=open_sender, args=(b, a, "ba")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rx_b, rx_a = Receiver(a.pid, endpoint=b), Receiver(b.pid, endpoint=a)
    made["ab"].send("to b")
    made["ba"].send("to a")
    assert rx_b.recv(timeout=5) == "to b"
    assert rx_a.recv(timeout=5) == "to a"
    settle(lambda: len(a._peers.conns) == 1 and len(b._peers.conns) == 1)


def test_simultaneous_connects_end_with_one_connection(make_endpoint):
    for _ in range(5):
        a, b = make_endpoint(), make_endpoint()
        connect_both_ways_at_once(a, b)
        a.close()
        b.close()


def test_second_channel_to_same_pid_raises(pair):
    a, b = pair
    tx = Sender(b.pid, endpoint=a)
    rx = Receiver(b.pid, endpoint=a)
    with pytest.raises(ChannelExists):
        Sender(b.pid, endpoint=a)
    with pytest.raises(ChannelExists):
        Receiver[int](b.pid, endpoint=a)
    tx.close()
    rx.close()
    Sender[str](b.pid, endpoint=a).close()  # another T once the first is closed
    Receiver[bytes](b.pid, endpoint=a).close()


def test_garbage_collected_channel_releases_its_slot(pair):
    a, b = pair
    Sender[int](b.pid, endpoint=a).send(1)
    Sender[int](b.pid, endpoint=a).send(2)  # the first was collected
    rx = Receiver[int](a.pid, endpoint=b)
    assert [rx.recv(timeout=5), rx.recv(timeout=5)] == [1, 2]


def test_own_pid_raises(pair):
    a, _ = pair
    with pytest.raises(ValueError, match="own pid"):
        Sender(a.pid, endpoint=a)
    with pytest.raises(ValueError, match="own pid"):
        Receiver(a.pid, endpoint=a)


def test_closed_channel_raises(pair):
    a, b = pair
    tx, rx = Sender(b.pid, endpoint=a), Receiver(b.pid, endpoint=a)
    tx.close()
    rx.close()
    tx.close()  # idempotent
    with pytest.raises(ChannelClosed):
        tx.send(1)
    with pytest.raises(ChannelClosed):
        rx.recv(timeout=1)
    with pytest.raises(ChannelClosed):
        select(rx, timeout=0.1)


def test_type_mismatch_on_send_sends_nothing(pair):
    a, b = pair
    tx, rx = Sender[int](b.pid, endpoint=a), Receiver(a.pid, endpoint=b)
    with pytest.raises(TypeError, match="Sender\\[int\\]"):
        tx.send("not an int")
    tx.send(5)
    assert rx.recv(timeout=5) == 5


def test_type_mismatch_on_receive(pair):
    a, b = pair
    tx, rx = Sender(b.pid, endpoint=a), Receiver[int](a.pid, endpoint=b)
    tx.send("text")
    tx.send(3)
    with pytest.raises(TypeError, match="Receiver\\[int\\]"):
        rx.recv(timeout=5)
    assert rx.recv(timeout=5) == 3


def test_typing_generics_are_checked_by_origin(pair):
    a, b = pair
    with Sender[list[int]](b.pid, endpoint=a) as tx:
        tx.send([1, 2])
        with pytest.raises(TypeError):
            tx.send((1, 2))
    with Sender[int | None](b.pid, endpoint=a) as tx:
        tx.send(None)
        tx.send(1)
        with pytest.raises(TypeError):
            tx.send("x")
    with Sender[float](b.pid, endpoint=a) as tx:
        tx.send(1)  # an int is a float for typing purposes
    rx = Receiver(a.pid, endpoint=b)
    assert [rx.recv(timeout=5) for _ in range(4)] == [[1, 2], None, 1, 1]


def test_recv_timeout(pair):
    a, b = pair
    rx = Receiver(b.pid, endpoint=a)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        rx.recv(timeout=0.2)
    assert 0.15 < time.monotonic() - start < 2
    with pytest.raises(TimeoutError):
        rx.recv_nowait()


def test_order_kept_across_closing_and_recreating_channels(pair):
    a, b = pair
    expected = []
    for round_ in range(5):
        with Sender(b.pid, endpoint=a) as tx:
            for i in range(50):
                tx.send((round_, i))
                expected.append((round_, i))
    got = []
    for _ in range(5):
        with Receiver(a.pid, endpoint=b) as rx:
            got.extend(rx.recv(timeout=5) for _ in range(50))
    assert got == expected


def test_messages_wait_for_their_receiver(pair):
    a, b = pair
    tx = Sender(b.pid, endpoint=a)
    for i in range(10):
        tx.send(i)
    tx.close()
    del tx
    time.sleep(0.2)
    rx = Receiver(a.pid, endpoint=b)
    assert [rx.recv(timeout=5) for _ in range(10)] == list(range(10))


def test_large_and_out_of_band_messages(pair):
    a, b = pair
    tx, rx = Sender(b.pid, endpoint=a), Receiver(a.pid, endpoint=b)
    big = bytes(range(256)) * (4 * 4096)  # 4 MiB
    tx.send(big)
    tx.send(pickle.PickleBuffer(bytearray(big)))  # goes out of band
    tx.send("after")
    assert rx.recv(timeout=10) == big
    assert bytes(rx.recv(timeout=10)) == big
    assert rx.recv(timeout=10) == "after"


def test_unpicklable_locals_fall_back_to_cloudpickle(pair):
    a, b = pair
    tx, rx = Sender(b.pid, endpoint=a), Receiver(a.pid, endpoint=b)
    offset = 10
    tx.send(lambda x: x + offset)
    assert rx.recv(timeout=5)(1) == 11


def test_many_threads_send_to_one_channel(pair):
    a, b = pair
    tx, rx = Sender(b.pid, endpoint=a), Receiver(a.pid, endpoint=b)
    threads_n, per_thread = 8, 2000

    def work(t):
        for i in range(per_thread):
            tx.send((t, i))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
    for t in threads:
        t.start()
    last = dict.fromkeys(range(threads_n), -1)
    for _ in range(threads_n * per_thread):
        t, i = rx.recv(timeout=10)
        assert i == last[t] + 1  # each thread's own messages stay in order
        last[t] = i
    for t in threads:
        t.join()
    assert all(v == per_thread - 1 for v in last.values())


def test_select_returns_the_ready_object_fairly(make_endpoint):
    hub, p1, p2 = make_endpoint(), make_endpoint(), make_endpoint()
    rx1, rx2 = Receiver(p1.pid, endpoint=hub), Receiver(p2.pid, endpoint=hub)
    tx1, tx2 = Sender(hub.pid, endpoint=p1), Sender(hub.pid, endpoint=p2)
    with pytest.raises(TimeoutError):
        select(rx1, rx2, timeout=0.1)
    for i in range(200):
        tx1.send(i)
        tx2.send(i)
    settle(lambda: hub._peers.links[p1.pid.hex].total_in == 200 and hub._peers.links[p2.pid.hex].total_in == 200)
    picked = {rx1: 0, rx2: 0}
    for _ in range(200):
        ready = select(rx1, rx2, timeout=5)
        assert ready is rx1 or ready is rx2
        ready.recv(timeout=1)
        picked[ready] += 1
    assert picked[rx1] > 50 and picked[rx2] > 50


def test_select_wakes_on_arrival_and_senders_are_ready(pair):
    a, b = pair
    rx = Receiver(b.pid, endpoint=a)
    tx = Sender(b.pid, endpoint=a)
    assert select(tx, timeout=1) is tx
    other = Sender(a.pid, endpoint=b)
    threading.Timer(0.2, other.send, args=("late",)).start()
    assert select(rx, timeout=5) is rx
    assert rx.recv(timeout=1) == "late"


def test_asyncio_api(pair):
    a, b = pair

    async def main():
        tx, rx = Sender[int](b.pid, endpoint=a), Receiver[int](a.pid, endpoint=b)
        back_tx, back_rx = Sender[int](a.pid, endpoint=b), Receiver[int](b.pid, endpoint=a)

        async def echo():
            async for value in rx:
                await back_tx.asend(value * 2)
                if value == 9:
                    return

        task = asyncio.ensure_future(echo())
        ticks = 0

        async def ticker():
            nonlocal ticks
            while not task.done():
                ticks += 1
                await asyncio.sleep(0.001)

        tick_task = asyncio.ensure_future(ticker())
        # The echo task now waits in arecv with nothing sent: the loop must keep ticking.
        await asyncio.sleep(0.05)
        for i in range(10):
            await tx.asend(i)
        got = [await back_rx.arecv() for _ in range(10)]
        await task
        await tick_task
        assert got == [i * 2 for i in range(10)]
        assert ticks > 0  # the event loop kept running while we waited
        later = asyncio.get_running_loop().call_later(0.1, back_tx.send, 99)
        assert await asyncio.wait_for(aselect(back_rx), 5) is back_rx
        assert await back_rx.arecv() == 99
        later.cancel()

    asyncio.run(main())


def test_idle_connections_are_torn_down_and_come_back(make_endpoint):
    a, b = make_endpoint(linger=0.05), make_endpoint(linger=0.05)
    for round_ in range(3):
        with Sender(b.pid, endpoint=a) as tx, Receiver(a.pid, endpoint=b) as rx:
            tx.send(round_)
            assert rx.recv(timeout=5) == round_
        settle(lambda: not a._peers.links and not b._peers.links and not a._peers.conns and not b._peers.conns)


def test_unread_messages_keep_the_link(make_endpoint):
    a, b = make_endpoint(linger=0.05), make_endpoint(linger=0.05)
    with Sender(b.pid, endpoint=a) as tx:
        tx.send("kept")
    time.sleep(0.5)
    assert b._peers.links  # the message still waits for a Receiver
    assert Receiver(a.pid, endpoint=b).recv(timeout=5) == "kept"


def test_default_endpoint(pair):
    a, b = pair
    set_default_endpoint(None)
    with pytest.raises(DeployError, match="init\\(\\)"):
        default_endpoint()
    with pytest.raises(DeployError):
        Sender(b.pid)
    set_default_endpoint(a)
    try:
        assert default_endpoint() is a
        Sender(b.pid).send("via default")
        assert Receiver(a.pid, endpoint=b).recv(timeout=5) == "via default"
    finally:
        set_default_endpoint(None)


def test_adopting_a_listening_socket_and_pid():
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    pid = Pid.new("127.0.0.1", sock.getsockname()[1])
    ep = Endpoint(secret=b"k", sock=sock, pid=pid)
    other = Endpoint("127.0.0.1:0", secret=b"k")
    try:
        assert ep.pid is pid
        Sender(pid, endpoint=other).send(1)
        assert Receiver(other.pid, endpoint=ep).recv(timeout=5) == 1
        bad = socket.socket()
        bad.bind(("127.0.0.1", 0))
        bad.listen()
        with pytest.raises(ValueError):
            Endpoint(secret=b"k", sock=bad, pid=pid)
        bad.close()
    finally:
        ep.close()
        other.close()


def test_close_is_idempotent_and_closes_channels(make_endpoint):
    a, b = make_endpoint(), make_endpoint()
    rx = Receiver(b.pid, endpoint=a)
    tx = Sender(b.pid, endpoint=a)
    a.close()
    a.close()
    with pytest.raises(ChannelClosed):
        rx.recv(timeout=1)
    with pytest.raises(ChannelClosed):
        tx.send(1)
    with pytest.raises(DeployError):
        Sender(b.pid, endpoint=a)


def test_peer_close_reports_exit_code(pair):
    a, b = pair
    rx = Receiver(b.pid, endpoint=a)
    tx = Sender(a.pid, endpoint=b)
    tx.send("last words")
    b.close(exit_code=3)
    assert rx.recv(timeout=5) == "last words"
    with pytest.raises(PeerExited) as info:
        rx.recv(timeout=5)
    assert info.value.code == 3
    with pytest.raises(PeerExited):
        Sender(b.pid, endpoint=a).send(1)


@pytest.mark.parametrize("keepalive", [None, 4.0])
def test_keepalive_sets_probes_and_a_user_timeout_on_both_ends(keepalive):
    import socket

    a = Endpoint("127.0.0.1:0", secret=b"k", keepalive=keepalive)
    b = Endpoint("127.0.0.1:0", secret=b"k", keepalive=keepalive)
    try:
        Sender(b.pid, endpoint=a).send(1)
        assert Receiver(a.pid, endpoint=b).recv(timeout=5) == 1
        for endpoint in (a, b):
            conns = [conn for conn in endpoint._peers.conns if conn.sock.fileno() >= 0]
            assert conns
            for conn in conns:
                probes = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
                timeout = conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
                assert (bool(probes), timeout) == ((False, 0) if keepalive is None else (True, 4000))
    finally:
        a.close()
        b.close()
