"""Large messages (issue 8): they arrive intact and of the type sent, writable where the
sender's were, and they do not hold up small messages to another peer."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time

import pytest
from deploy_channels import Receiver, Sender, _wire

pytestmark = pytest.mark.timeout(120)

MIB = 1 << 20


def digest(data) -> str:
    return hashlib.sha256(memoryview(data).cast("B")).hexdigest()


def filled(size: int) -> bytes:
    # Not a constant fill: a misplaced or repeated chunk changes the digest.
    block = os.urandom(MIB)
    return b"".join(bytes([i % 251]) + block[1:] for i in range(size // MIB))


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "readonly memoryview"])
def test_a_64_mib_message_arrives_intact_and_of_its_type(pair, kind):
    a, b = pair
    tx, rx = Sender(b.pid, endpoint=a), Receiver(a.pid, endpoint=b)
    data = filled(64 * MIB)
    value = {
        "bytes": lambda: data,
        "bytearray": lambda: bytearray(data),
        "memoryview": lambda: memoryview(bytearray(data)),
        "readonly memoryview": lambda: memoryview(data),
    }[kind]()
    tx.send(value)
    got = rx.recv(timeout=60)
    # A memoryview arrives as the bytes it showed: bytes if read-only, else a bytearray.
    expected = bytes if kind in ("bytes", "readonly memoryview") else bytearray
    assert type(got) is expected
    assert len(got) == len(data) and digest(got) == digest(data)
    if expected is bytearray:
        got[0] ^= 0xFF  # writable for real


def test_messages_around_the_large_frame_sizes_cross_one_reply_at_a_time(pair):
    # The receiver reads the rest of a large frame only once all of it is in (its
    # socket's SO_RCVLOWAT): here nothing else comes until it answers, so a low mark
    # asking for more than the frame lacks, or one left up after it, would hang a recv.
    a, b = pair
    tx, rx = Sender(b.pid, endpoint=a), Receiver(a.pid, endpoint=b)
    back_tx, back_rx = Sender(a.pid, endpoint=b), Receiver(b.pid, endpoint=a)
    sizes = [10, 64 * 1024 - 1, 64 * 1024, 64 * 1024 + 1, MIB - 1, MIB, 10, MIB + 1, 3 * MIB, 256 * 1024, 5]
    block = filled(4 * MIB)

    def echo():
        for _ in range(2 * len(sizes)):
            got = rx.recv(timeout=20)
            back_tx.send(digest(got if isinstance(got, bytes) else got[0]))

    answering = threading.Thread(target=echo, daemon=True)
    answering.start()
    for size in sizes:
        for value in (block[:size], [block[:size]]):  # out of band, and a pickled list
            tx.send(value)
            assert back_rx.recv(timeout=20) == digest(block[:size]), size
    answering.join(20)
    assert not answering.is_alive()
    conn = b._peers.links[a.pid.hex].conn
    assert conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1


def test_large_bytes_go_out_of_band_and_small_ones_in_band():
    data = b"x" * MIB
    frame, _ = _wire.encode_message(data)
    assert isinstance(frame, list)
    # The caller's own object is one of the chunks written: the pickler made no copy.
    assert sum(memoryview(chunk).nbytes for chunk in frame) < MIB + 100
    assert any(isinstance(chunk, memoryview) and chunk.obj is data for chunk in frame)
    small, _ = _wire.encode_message(memoryview(b"abc"))
    assert isinstance(small, bytes)


@pytest.mark.parametrize("wrap", [bytearray, memoryview])
def test_a_bytearray_refilled_after_send_arrives_as_it_was_sent(pair, wrap):
    a, b = pair
    tx, rx = Sender(b.pid, endpoint=a), Receiver(a.pid, endpoint=b)
    buffer = bytearray(MIB)  # more than the kernel takes at once: part of it is queued
    for i in range(12):
        buffer[:] = bytes([i]) * len(buffer)
        tx.send(wrap(buffer))
    buffer[:] = b"\xff" * len(buffer)
    buffer.extend(b"resizable again")  # send() kept no view of it
    for i in range(12):
        got = rx.recv(timeout=10)
        assert type(got) is bytearray and got == bytes([i]) * MIB, i


def test_a_64_mib_numpy_array_arrives_intact_and_writable(pair):
    import numpy  # a test extra of the package; tox installs it

    a, b = pair
    tx, rx = Sender(b.pid, endpoint=a), Receiver(a.pid, endpoint=b)
    array = numpy.frombuffer(filled(64 * MIB), dtype=numpy.uint32).reshape(-1, 1024).copy()
    tx.send(array)
    got = rx.recv(timeout=60)
    assert got.dtype == array.dtype and got.shape == array.shape and numpy.array_equal(got, array)
    assert got.flags.writeable
    got[0, 0] += 1


def test_a_small_channel_keeps_its_latency_while_a_big_one_flows(make_endpoint):
    hub, bulk, echo = make_endpoint(), make_endpoint(), make_endpoint()
    big = Sender(bulk.pid, endpoint=hub)
    sink = Receiver(hub.pid, endpoint=bulk)
    ping, pong = Sender(echo.pid, endpoint=hub), Receiver(echo.pid, endpoint=hub)
    echo_in, echo_out = Receiver(hub.pid, endpoint=echo), Sender(hub.pid, endpoint=echo)
    payload = filled(16 * MIB)
    count = 16  # 256 MiB through the hub
    received: list[int] = []
    stop = threading.Event()

    def drain():
        for _ in range(count):
            received.append(len(sink.recv(timeout=60)))

    def answer():
        while not stop.is_set():
            try:
                echo_out.send(echo_in.recv(timeout=0.2))
            except TimeoutError:
                pass

    threads = [threading.Thread(target=drain), threading.Thread(target=answer)]
    for thread in threads:
        thread.start()
    flowing = threading.Thread(target=lambda: [big.send(payload) for _ in range(count)])
    try:
        ping.send(0)
        assert pong.recv(timeout=10) == 0  # both connections are up
        flowing.start()
        worst = 0.0
        trips = 0
        while len(received) < count:
            started = time.perf_counter()
            ping.send(trips)
            assert pong.recv(timeout=10) == trips
            worst = max(worst, time.perf_counter() - started)
            trips += 1
        assert received == [len(payload)] * count
        # Round trips kept going while the bulk flowed, each far shorter than the
        # transfer (several seconds here); generous for a loaded 2-core machine.
        assert trips >= 10, trips
        assert worst < 1.0, worst
    finally:
        stop.set()
        flowing.join(60)
        for thread in threads:
            thread.join(60)
