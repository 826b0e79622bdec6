"""Regression tests for the defects a review of deploy-channels found (issue 12), one
section per defect, each reproduced with real endpoints as a user would meet it."""

from __future__ import annotations

import asyncio
import os
import pickle
import random
import signal
import socket
import threading
import time

import pytest
from deploy_channels import Endpoint, Receiver, Sender, _link, _wire, aselect, select
from deploy_core import ChannelClosed, ChannelExists, DeployError, PeerLost, Pid, SerializationError

pytestmark = pytest.mark.timeout(60)


def call_in_loop(endpoint, fn, *args):
    """Run ``fn`` on the endpoint's loop thread and wait until it has run."""
    done, result = threading.Event(), []
    endpoint._loop.call_soon(lambda: (result.append(fn(*args)), done.set()))
    assert done.wait(10), "the loop thread did not run it"
    return result[0]


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
    link = b._peers.links[a.pid.hex]
    big = bytes(range(256)) * (400 * 1024)  # 100 MiB
    tx.send(big)
    # B has no channel, nothing queued and nothing unread: its linger would ask A to close
    # while most of the message is still on its way.
    if who == "linger":
        call_in_loop(b, b._peers._linger_over, link, link.idle_token)
    else:
        call_in_loop(b, force_close_request, b, link)
    rx = Receiver(a.pid, endpoint=b)
    assert rx.recv(timeout=20) == big
    tx.send(b"after")
    assert rx.recv(timeout=10) == b"after"
    assert a._peers.links[b.pid.hex].death is None and b._peers.links[a.pid.hex].death is None


# --- 2. closing a channel wakes every thread and task blocked on it ----------------------


@pytest.mark.parametrize("how", ["recv", "select"])
def test_closing_a_receiver_wakes_a_blocked_thread(pair, how, in_thread, wait_until):
    a, b = pair
    tx = Sender(b.pid, endpoint=a)
    rx = Receiver(a.pid, endpoint=b)
    tx.send("hello")
    assert rx.recv(timeout=10) == "hello"
    wait = rx.recv if how == "recv" else lambda: select(rx)
    link = b._peers.links[a.pid.hex]
    thread, outcome = in_thread(wait)
    wait_until(lambda: link.rx_watchers)  # blocked on the link
    assert not outcome
    rx.close()
    thread.join(5)
    assert outcome and isinstance(outcome[0], ChannelClosed), outcome
    # The closed Receiver's waiter took nothing: the next message goes to the next one.
    tx.send("next")
    assert Receiver(a.pid, endpoint=b).recv(timeout=5) == "next"


@pytest.mark.parametrize("how", ["arecv", "aselect"])
def test_closing_a_receiver_wakes_a_blocked_task(pair, how):
    a, b = pair
    Sender(b.pid, endpoint=a)
    rx = Receiver(a.pid, endpoint=b)

    link = b._peers.links[a.pid.hex]

    async def main():
        task = asyncio.ensure_future(rx.arecv() if how == "arecv" else aselect(rx))
        while not link.rx_watchers:  # until the task waits on the link
            await asyncio.sleep(0.005)
        assert not task.done()
        rx.close()
        return await asyncio.wait_for(task, 5)

    with pytest.raises(ChannelClosed):
        asyncio.run(main())


def test_closing_a_sender_wakes_a_send_blocked_by_backpressure(make_endpoint, in_thread, wait_until):
    a, b = make_endpoint(high_water=1 << 16), make_endpoint(high_water=1 << 16)
    rx = Receiver(a.pid, endpoint=b)  # never read: B stops reading, the kernel buffers fill
    tx = Sender(b.pid, endpoint=a)
    chunk = bytes(1 << 16)

    def pump():
        while True:
            tx.send(chunk)

    thread, outcome = in_thread(pump)
    link = a._peers.links[b.pid.hex]
    wait_until(lambda: link.tx_watchers and b._peers.links[a.pid.hex].paused)
    time.sleep(0.2)
    assert link.tx_watchers and not outcome  # blocked for good, not just for a moment
    tx.close()
    thread.join(5)
    assert outcome and isinstance(outcome[0], ChannelClosed), outcome
    rx.close()


# --- 4. Ctrl-C in a thread blocked in recv leaves the stream intact -----------------------

INTERRUPTED_RECEIVER = """
import signal
import socket
ep = dc.Endpoint("127.0.0.1:0", secret=SECRET)
parent = Pid.parse(sys.argv[1])
count = int(sys.argv[2])
rx = dc.Receiver[int](parent, endpoint=ep)
expected = interrupts = 0
armed = False
raised_at = None  # where the last KeyboardInterrupt was raised, for a failure's message

def on_sigint(signum, frame):
    # Raise only inside deploy_channels (in recv), which is what the test is about: not at
    # this script's own loop (it would end it), nor between recv returning a value and the
    # value being counted (a message lost there is this script's, as with any function).
    global raised_at
    if armed and frame is not None and "deploy_channels" in frame.f_code.co_filename:
        raised_at = f"{frame.f_code.co_name}:{frame.f_lineno}"
        raise KeyboardInterrupt

def receive_all():
    global expected
    while expected < count:
        value = rx.recv(timeout=15)
        if value != expected:
            print("got", value, "expected", expected, "last interrupt at", raised_at, flush=True)
            os._exit(1)
        expected += 1

signal.signal(signal.SIGINT, on_sigint)
print(ep.pid.format(), flush=True)
while True:
    try:
        armed = True
        receive_all()
        armed = False
        break
    except KeyboardInterrupt:
        armed = False
        interrupts += 1
    except Exception as error:
        print("failed after", expected, "messages:", repr(error), flush=True)
        os._exit(1)
print("ok", interrupts, flush=True)
ep.close()
"""


def test_keyboard_interrupt_in_recv_loses_no_message_and_no_lock(make_endpoint, children, in_thread):
    ep = make_endpoint()
    count = 30_000
    proc = children.run(INTERRUPTED_RECEIVER, ep.pid.format(), str(count))
    peer = Pid.parse(proc.stdout.readline())
    tx = Sender[int](peer, endpoint=ep)
    rng = random.Random(12)

    def pump():
        # Bursts (the inbox has messages) and gaps (the receiver waits on the socket).
        for i in range(count):
            tx.send(i)
            if i % 50 == 0:
                time.sleep(rng.random() * 0.002)

    thread, outcome = in_thread(pump)
    try:
        signals = 0
        while thread.is_alive() and signals < 2000:
            os.kill(proc.pid, signal.SIGINT)
            signals += 1
            time.sleep(rng.random() * 0.001)
        thread.join(60)
        line = proc.stdout.readline().split()
        assert line[:1] == ["ok"], " ".join(line)
        assert int(line[1]) > 50  # the interrupts did land in recv
        assert outcome == [None]
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


# --- 10. a message over max_frame_size is refused by send(); the link lives on -------------


@pytest.mark.parametrize("size", [300, 3 * 2**20], ids=["small-path", "large-path"])
def test_oversized_message_is_refused_at_send_and_the_link_lives_on(make_endpoint, size):
    limit = 200 if size < 1000 else 2**20
    a, b = make_endpoint(max_frame_size=limit), make_endpoint(max_frame_size=limit)
    tx, rx = Sender(b.pid, endpoint=a), Receiver(a.pid, endpoint=b)
    tx.send(b"before")
    assert rx.recv(timeout=10) == b"before"
    with pytest.raises(SerializationError, match="exceeds the maximum"):
        tx.send(bytes(size))
    tx.send(b"after")
    assert rx.recv(timeout=10) == b"after"
    tx.close()
    rx.close()
    with Sender(b.pid, endpoint=a) as tx2, Receiver(a.pid, endpoint=b) as rx2:
        tx2.send(b"fresh")
        assert rx2.recv(timeout=10) == b"fresh"


# --- 5. a pid whose host does not resolve is lost at once, with the reason ----------------


def test_peer_whose_host_does_not_resolve_is_lost_with_the_reason(make_endpoint, caplog):
    ep = make_endpoint()
    ghost = Pid("0123456789abcdef0123456789abcdef", "no-such-host.invalid", 4242)
    start = time.monotonic()
    tx = Sender(ghost, endpoint=ep)
    rx = Receiver(ghost, endpoint=ep)
    with pytest.raises(PeerLost) as info:
        rx.recv(timeout=10)
    assert time.monotonic() - start < 5
    assert "no-such-host.invalid" in str(info.value) or "resolve" in str(info.value) or "Name" in str(info.value)
    with pytest.raises(PeerLost):
        tx.send("anyone?")
    assert not [r for r in caplog.records if "internal error" in r.getMessage()]
    start = time.monotonic()
    ep.close()
    assert time.monotonic() - start < 1.0


# --- 11. a peer is its 32-hex id: another spelling of its host is the same peer ----------


def test_peer_named_with_another_host_spelling_is_the_same_peer(pair):
    a, b = pair
    b_as_localhost = Pid(b.pid.hex, "localhost", b.pid.port)
    with Sender(b_as_localhost, endpoint=a) as tx, Receiver(a.pid, endpoint=b) as rx:
        for i in range(3):
            tx.send(i)
        assert [rx.recv(timeout=10) for _ in range(3)] == [0, 1, 2]
    # B answers over the connection A opened; A's Receiver, named the other way, gets it.
    with Receiver(b_as_localhost, endpoint=a) as rx_a, Sender(a.pid, endpoint=b) as tx_b:
        tx_b.send("back")
        assert rx_a.recv(timeout=10) == "back"
    with Sender(b_as_localhost, endpoint=a) as tx:
        tx.send("still here")
    with Receiver(a.pid, endpoint=b) as rx:
        assert rx.recv(timeout=10) == "still here"
    with pytest.raises(ChannelExists):
        with Sender(b.pid, endpoint=a), Sender(b_as_localhost, endpoint=a):
            pass


# --- 3. a buffer's value is captured when send() returns ---------------------------------


def test_buffer_refilled_after_send_arrives_as_it_was_sent(pair):
    a, b = pair
    tx, rx = Sender(b.pid, endpoint=a), Receiver(a.pid, endpoint=b)
    buffer = bytearray(1 << 20)  # large: sent out of band, more than the kernel takes at once
    for i in range(12):  # (12 MiB: queued, but under both sides' high water)
        buffer[:] = bytes([i]) * len(buffer)
        tx.send(pickle.PickleBuffer(buffer))
    buffer[:] = b"\xff" * len(buffer)
    for i in range(12):
        got = rx.recv(timeout=10)
        assert bytes(got[:1]) == bytes([i]) and bytes(got[-1:]) == bytes([i]), i


# --- 6. a message that cannot be unpickled raises SerializationError ----------------------


def test_message_that_cannot_be_unpickled_names_the_sender_and_the_cause(make_endpoint, children):
    ep = make_endpoint()
    proc = children.run(
        """
from dataclasses import dataclass
ep = dc.Endpoint("127.0.0.1:0", secret=SECRET)
parent = Pid.parse(sys.argv[1])
print(ep.pid.format(), flush=True)

@dataclass
class Job:  # defined only in this process's __main__
    n: int

tx = dc.Sender(parent, endpoint=ep)
tx.send(Job(1))
tx.send(42)
ep.close()
""",
        ep.pid.format(),
    )
    peer = Pid.parse(proc.stdout.readline())
    rx = Receiver(peer, endpoint=ep)
    with pytest.raises(SerializationError) as info:
        rx.recv(timeout=10)
    assert str(peer) in str(info.value) and "Job" in str(info.value)
    assert rx.recv(timeout=10) == 42  # the stream goes on
    assert proc.wait(timeout=10) == 0


# --- 7. a lambda with a small PickleBuffer keeps the cloudpickle fallback -----------------


def test_lambda_with_a_small_pickle_buffer_can_be_sent(pair):
    a, b = pair
    tx, rx = Sender(b.pid, endpoint=a), Receiver(a.pid, endpoint=b)
    offset = 1
    tx.send((lambda x: x + offset, pickle.PickleBuffer(bytearray(b"small"))))
    fn, buffer = rx.recv(timeout=10)
    assert fn(1) == 2 and bytes(buffer) == b"small"


def test_unpicklable_value_with_a_raising_repr_is_a_serialization_error(pair):
    a, b = pair
    tx = Sender(b.pid, endpoint=a)

    class Broken:
        def __reduce__(self):
            raise RuntimeError("no pickling")

        def __repr__(self):
            raise RuntimeError("no repr either")

    with pytest.raises(SerializationError, match="no pickling"):
        tx.send([Broken(), pickle.PickleBuffer(bytearray(10))])


# --- 8. received buffers are writable at every size ---------------------------------------


@pytest.mark.parametrize("size", [100, 65_535, 65_536, 300_000, 4 * 2**20])
def test_received_buffers_are_writable_at_every_size(pair, size):
    a, b = pair
    tx, rx = Sender(b.pid, endpoint=a), Receiver(a.pid, endpoint=b)
    sent = bytearray(bytes(range(256)) * (size // 256 + 1))[:size]
    tx.send(pickle.PickleBuffer(sent))
    got = rx.recv(timeout=10)
    view = memoryview(got)
    assert not view.readonly, type(got)
    assert view.tobytes() == sent
    view[0] = 255  # writable for real


# --- 9. an endpoint inherited through fork is unusable in the child ------------------------


def test_inherited_channels_fail_in_a_forked_child_and_the_parent_keeps_them(pair, wait_until):
    a, b = pair
    tx, rx = Sender(b.pid, endpoint=a), Receiver(a.pid, endpoint=b)
    back = Sender(a.pid, endpoint=b)
    for i in range(3):
        tx.send(i)
    wait_until(lambda: len(b._peers.links[a.pid.hex].inbox) == 3)  # unread, in b's inbox
    read_fd, write_fd = os.pipe()
    child = os.fork()
    if child == 0:
        code = 1
        try:
            os.close(read_fd)
            outcomes = []
            for call in (lambda: rx.recv(timeout=1), rx.recv_nowait, lambda: back.send("x"), lambda: select(rx)):
                try:
                    outcomes.append(repr(call()))
                except DeployError as error:
                    outcomes.append("inherited" if "inherited through fork" in str(error) else repr(error))
                except BaseException as error:
                    outcomes.append(repr(error))
            os.write(write_fd, (" ".join(outcomes) + "\n").encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        report = pipe.readline().split()
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert report == ["inherited"] * 4, report
    assert [rx.recv(timeout=5) for _ in range(3)] == [0, 1, 2]
    tx.send("after")
    assert rx.recv(timeout=5) == "after"


# --- (lead's note) the exit drain waits for a live peer that has not accepted yet ---------


def test_close_waits_for_a_peer_whose_kernel_holds_the_connection(make_endpoint, in_thread):
    # The peer's socket listens (its kernel completes our connect and keeps it in the
    # backlog) but its process accepts nothing for longer than the drain's stall bound.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    peer = Pid.new("127.0.0.1", listener.getsockname()[1])
    a = make_endpoint()
    Sender(peer, endpoint=a).send("accepted by send()")
    closing, outcome = in_thread(lambda: a.close(timeout=15))
    time.sleep(4.0)  # longer than the 3 s without progress after which close used to give up
    assert not outcome, "close() gave up while the peer's kernel held the connection"
    b = Endpoint(secret=a._peers.secret, sock=listener, pid=peer)
    try:
        assert Receiver(a.pid, endpoint=b).recv(timeout=10) == "accepted by send()"
        closing.join(15)
        assert outcome == [None]
    finally:
        b.close(timeout=2)


# --- a flush that starts unscheduled still keeps direct writes out ------------------------


def test_a_flush_started_unscheduled_keeps_user_threads_from_writing_meanwhile(pair, monkeypatch):
    # The loop writes a taken batch without the queue's lock; a user thread may write
    # directly only while no flush is scheduled. A flush can start unscheduled (messages
    # queued before the connection existed, which attaching flushes), so taking the batch
    # must mark it scheduled, or a sender's direct write lands inside the batch's bytes
    # (seen in CI as lost messages and "unexpected frame kind 0").
    a, b = pair
    tx, rx = Sender(b.pid, endpoint=a), Receiver(a.pid, endpoint=b)
    tx.send(0)
    assert rx.recv(timeout=10) == 0
    link = a._peers.links[b.pid.hex]
    scheduled_while_writing: list[bool] = []
    write = _link._write

    def watched(sock, out):
        scheduled_while_writing.append(link.flush_scheduled)
        return write(sock, out)

    monkeypatch.setattr(_link, "_write", watched)
    frame, nbytes = _wire.encode_message("queued before the flush")

    def queue_unscheduled_and_flush():
        with link.out_lock:
            link.out.append(bytearray(frame))
            link.out_bytes += nbytes
            link.flush_scheduled = False  # as when the connection attaches
        link.flush()

    call_in_loop(a, queue_unscheduled_and_flush)
    assert rx.recv(timeout=10) == "queued before the flush"
    assert scheduled_while_writing == [True]
