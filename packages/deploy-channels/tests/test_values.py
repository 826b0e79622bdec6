"""Values frames: small immutable values sent in a stream travel pickled together in one
frame (`_wire.values_frame`), and arrive one by one, in order, as what was sent."""

import asyncio
import math
import pickle
import sys
import threading
import time

import pytest
from deploy_channels import Receiver, Sender, _link, _wire
from deploy_core import FrameError, PeerExited, Pid

pytestmark = pytest.mark.timeout(30)


def same(got, sent) -> bool:
    """Equal and of exactly the same type (a bool is not an int; -0.0 is not 0.0)."""
    if type(got) is not type(sent):
        return False
    if type(sent) is float:
        if math.isnan(sent):
            return math.isnan(got)
        return got == sent and math.copysign(1.0, got) == math.copysign(1.0, sent)
    return got == sent


def assert_same_sequence(got: list, sent: list) -> None:
    assert len(got) == len(sent)
    for index, (g, s) in enumerate(zip(got, sent, strict=True)):
        assert same(g, s), f"message {index}: sent {type(s).__name__} {s!r:.60}, got {type(g).__name__} {g!r:.60}"


@pytest.fixture
def frames(monkeypatch):
    """Count the frames the sending side makes: values frames (and the values in them) and
    small frames of one value (`small_frame`: a value written directly, alone)."""
    counts = {"values_frames": 0, "values": 0, "small_frames": 0}
    lock = threading.Lock()
    values_frame, small_frame = _link.values_frame, _link.small_frame

    def counting_values_frame(values):
        with lock:
            counts["values_frames"] += 1
            counts["values"] += len(values)
        return values_frame(values)

    def counting_small_frame(value):
        with lock:
            counts["small_frames"] += 1
        return small_frame(value)

    monkeypatch.setattr(_link, "values_frame", counting_values_frame)
    monkeypatch.setattr(_link, "small_frame", counting_small_frame)
    return counts


def connected(tx: Sender, rx: Receiver, value: object = -1) -> None:
    """One message through: the connection is up, nothing is queued."""
    tx.send(value)
    assert rx.recv(timeout=10) == value


# --- batch_size, values_frame, decode_values (no sockets) ----------------------------------


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 11),
        (-1, 11),
        (2**63 - 1, 11),
        (-(2**63), 11),
        (1.5, 10),
        (float("nan"), 10),
        (True, 2),
        (False, 2),
        (None, 2),
        ("", 12),
        ("abc", 24),
        ("x" * 256, 4 * 256 + 12),
        (b"", 12),
        (b"abc", 15),
        (bytes(256), 256 + 12),
    ],
)
def test_batch_size_of_small_values(value, size):
    assert _wire.batch_size(value) == size


class MyInt(int):
    pass


class MyStr(str):
    pass


class MyBytes(bytes):
    pass


class MyFloat(float):
    pass


@pytest.mark.parametrize(
    "value",
    [
        2**63,
        -(2**63) - 1,
        2**70,
        MyInt(1),
        MyStr("a"),
        MyBytes(b"a"),
        MyFloat(1.0),
        "x" * 257,
        bytes(257),
        bytearray(b"a"),
        memoryview(b"a"),
        [],
        [1],
        (),
        (1,),
        {},
        frozenset(),
        1j,
        object(),
    ],
    ids=lambda value: type(value).__name__,
)
def test_batch_size_is_none_for_what_may_not_travel_in_a_values_frame(value):
    assert _wire.batch_size(value) is None


def test_values_frame_fits_its_bound_and_decodes_back():
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    small = st.one_of(
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.sampled_from([0, 255, 256, 65535, 65536, 2**31 - 1, -(2**31), 2**31, 2**63 - 1, -(2**63)]),
        st.floats(allow_nan=True, allow_infinity=True),
        st.booleans(),
        st.none(),
        st.text(max_size=256),
        st.text(alphabet=st.characters(min_codepoint=0x10000), min_size=200, max_size=256),
        st.binary(max_size=256),
    )

    @hypothesis.settings(max_examples=300, deadline=None, database=None)
    @hypothesis.given(st.lists(small, min_size=1, max_size=1500))
    def check(values):
        assert all(_wire.batch_size(v) is not None for v in values)
        frame = _wire.values_frame(values)
        assert len(frame) <= _wire.Values.OVERHEAD + sum(_wire.batch_size(v) for v in values)
        # A frame: its 4-byte length, then the payload, whose last byte is the kind.
        assert int.from_bytes(frame[:4], "big") == len(frame) - 4
        assert frame[-1] == _wire.VALUES
        decoded = _wire.decode_values(frame[4:])
        assert all(type(message) is tuple and len(message) == 2 for message in decoded)
        assert len({message[1] for message in decoded}) == len(decoded)  # (numbered apart)
        assert_same_sequence([message[0] for message in decoded], values)

    check()


def test_values_frame_bound_with_the_same_object_repeated_and_values_at_their_largest():
    # (Worst cases by hand: every value at its bound's size, memo references, 64 KiB+
    # pickles that the pickler splits into several of its frames.)
    text = "\U0001f40d" * 256
    cases = [
        [2**63 - 1] * 5000,
        [-(2**63)] * 5000,
        [1.0e300] * 5000,
        [True, False, None] * 3000,
        [text] * 200,
        ["\U0001f40d" * n for n in range(257)],
        [bytes([n % 256]) * n for n in range(257)],
        [""] * 2000 + [b""] * 2000,
        [0],
    ]
    for values in cases:
        bound = _wire.Values.OVERHEAD + sum(_wire.batch_size(v) for v in values)
        assert len(_wire.values_frame(values)) <= bound
        assert_same_sequence([m[0] for m in _wire.decode_values(_wire.values_frame(values)[4:])], values)


def test_values_frame_of_a_values_pickles_as_a_plain_list():
    values = _wire.Values(7, _wire.batch_size(7))
    values.append("eight")
    assert values.size == _wire.Values.OVERHEAD + 11
    frame = _wire.values_frame(values)
    assert type(pickle.loads(frame[4:])) is list
    assert [m[0] for m in _wire.decode_values(frame[4:])] == [7, "eight"]


def test_decode_values_takes_the_payload_with_or_without_its_kind_byte():
    payload = _wire.values_frame([1, "two", None])[4:]
    assert payload[-1:] == b"V"
    for data in (payload, payload[:-1], bytearray(payload)):
        assert [m[0] for m in _wire.decode_values(data)] == [1, "two", None]


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"V",
        b"\x00\x01\x02garbage V",
        _wire.values_frame([1, 2]),  # with its frame header: not a payload
        _wire.values_frame([1, 2])[4:-6],  # cut short
        pickle.dumps((1, 2), 5) + b"V",
        pickle.dumps(1, 5) + b"V",
        pickle.dumps({"a": 1}, 5) + b"V",
        pickle.dumps([], 5) + b"V",
        pickle.dumps(_wire.Values(1, 11), 5) + b"V",  # a list subclass: not a plain list
    ],
    ids=["empty", "kind-only", "garbage", "with-header", "truncated", "tuple", "int", "dict", "empty-list", "subclass"],
)
def test_decode_values_rejects_what_is_not_a_values_frame(payload):
    with pytest.raises(FrameError, match="malformed values frame"):
        _wire.decode_values(payload)


# --- over real connections ------------------------------------------------------------------


def mixed_values() -> list:
    """One round of everything: batchable and not, interleaved."""
    return [
        0,
        -1,
        2**63,  # not batchable: just out of range
        1.5,
        True,
        -(2**63) - 1,  # not batchable
        None,
        False,
        2**70,  # not batchable
        -0.0,
        float("nan"),
        float("inf"),
        2**63 - 1,
        -(2**63),
        "",
        "short",
        "\U0001f40d snake ✓",
        "s" * 256,
        "t" * 300,  # not batchable
        b"",
        b"bytes",
        b"\x01" * 256,
        b"\x02" * 257,  # not batchable
        (1, "a"),
        [1, 2, 3],
        {"k": [True, None]},
        bytes(range(256)) * 400,  # 100 KiB: out of band
        bytearray(b"\x03") * (1 << 20),  # 1 MiB bytearray: arrives as a bytearray
        MyInt(5),
        1,
        MyStr("sub"),
        "after",
    ]


def test_a_mixed_burst_keeps_order_values_and_types(pair, frames, in_thread):
    a, b = pair
    tx, rx = Sender(b.pid, endpoint=a), Receiver(a.pid, endpoint=b)
    connected(tx, rx)
    sent = []
    for round_ in range(6):
        for value in mixed_values():
            sent.append(value)
            for i in range(20):  # small ones between, so that batches form around each
                sent.append(round_ * 1000 + i)
    thread, outcome = in_thread(lambda: [rx.recv(timeout=10) for _ in sent])
    for value in sent:
        tx.send(value)
    thread.join(20)
    assert len(outcome) == 1 and isinstance(outcome[0], list), outcome
    assert_same_sequence(outcome[0], sent)
    assert frames["values_frames"] > 0  # the burst did use values frames
    with pytest.raises(TimeoutError):
        rx.recv(timeout=0.05)


def test_a_burst_travels_in_few_frames_and_an_isolated_send_alone(pair, frames):
    a, b = pair
    tx, rx = Sender[int](b.pid, endpoint=a), Receiver[int](a.pid, endpoint=b)
    connected(tx, rx)
    for counter in frames:
        frames[counter] = 0
    count = 10_000
    for i in range(count):
        tx.send(i)
    assert [rx.recv(timeout=10) for _ in range(count)] == list(range(count))
    # Each message went in exactly one frame: a values frame or a frame of its own.
    assert frames["values"] + frames["small_frames"] == count, frames
    assert frames["values_frames"] > 0, frames
    assert frames["values_frames"] + frames["small_frames"] < count // 10, frames

    # Nothing queued and no send for a while: written at once, alone (not batched).
    time.sleep(0.05)
    before = dict(frames)
    tx.send(12345)
    assert rx.recv(timeout=10) == 12345
    assert frames["values_frames"] == before["values_frames"], frames
    assert frames["small_frames"] == before["small_frames"] + 1, frames
    link = a._peers.links[b.pid.hex]
    assert not link.out and link.values_queued == 0


def test_the_receiver_unpickles_a_values_frame_once(pair, monkeypatch):
    a, b = pair
    tx, rx = Sender[int](b.pid, endpoint=a), Receiver[int](a.pid, endpoint=b)
    connected(tx, rx)
    decoded = []
    decode_values = _wire.decode_values

    def counting(payload):
        result = decode_values(payload)
        decoded.append(len(result))
        return result

    monkeypatch.setattr(_wire, "decode_values", counting)
    count = 5000
    for i in range(count):
        tx.send(i)
    assert [rx.recv(timeout=10) for _ in range(count)] == list(range(count))
    assert decoded and len(decoded) < count // 10
    assert sum(decoded) <= count


@pytest.mark.parametrize("max_frame_size", [4096, 1024, 64])
def test_a_small_max_frame_size_still_carries_a_stream_in_order(make_endpoint, max_frame_size, in_thread):
    a, b = make_endpoint(max_frame_size=max_frame_size), make_endpoint(max_frame_size=max_frame_size)
    tx, rx = Sender(b.pid, endpoint=a), Receiver(a.pid, endpoint=b)
    connected(tx, rx)
    link = a._peers.links[b.pid.hex]
    assert link.values_max == min(_link._VALUES_MAX, max_frame_size // 2)
    if max_frame_size >= 1024:
        # 200 characters: ASCII, and 4 bytes each in UTF-8 (800 bytes pickled)
        sent = [f"{i:08d}".ljust(200, "a" if i % 3 else "\U0001f40d") for i in range(3000)]
    else:
        sent = [i if i % 5 else f"{i}" for i in range(3000)]
    thread, outcome = in_thread(lambda: [rx.recv(timeout=10) for _ in sent])
    for value in sent:
        tx.send(value)
    thread.join(20)
    assert outcome == [sent]


def test_back_pressure_times_a_send_out_and_loses_nothing(make_endpoint):
    high_water = 64 * 1024
    a, b = make_endpoint(high_water=high_water), make_endpoint(high_water=high_water)
    tx, rx = Sender[bytes](b.pid, endpoint=a), Receiver[bytes](a.pid, endpoint=b)
    connected(tx, rx, b"hello")

    def message(i: int) -> bytes:
        return i.to_bytes(8, "big") * 32  # 256 bytes: a values frame's at most

    assert _wire.batch_size(message(0)) is not None
    sent = 0
    start = time.monotonic()
    with pytest.raises(TimeoutError):  # b is not reading: its buffers, then a's, fill up
        while True:
            assert time.monotonic() - start < 15, f"{sent} messages sent and never blocked"
            tx.send(message(sent), timeout=0.2)
            sent += 1
    link = a._peers.links[b.pid.hex]
    assert link.out_bytes >= high_water
    assert link.out_bytes <= high_water + 32 * 1024  # (over by at most one values frame)
    # The timed-out message was not sent: the stream is 0..sent-1, then what follows.
    got = [rx.recv(timeout=10) for _ in range(sent)]
    assert got == [message(i) for i in range(sent)]
    with pytest.raises(TimeoutError):
        rx.recv(timeout=0.1)
    tx.send(message(sent), timeout=5)
    assert rx.recv(timeout=10) == message(sent)


def test_a_typed_sender_refuses_a_wrong_value_mid_stream(pair):
    a, b = pair
    tx, rx = Sender[int](b.pid, endpoint=a), Receiver[int](a.pid, endpoint=b)
    connected(tx, rx)
    for i in range(1000):
        tx.send(i)
    with pytest.raises(TypeError, match=r"Sender\[int\].*cannot send a str"):
        tx.send("1000")
    with pytest.raises(TypeError):
        tx.send(1.5)
    for i in range(1000, 2000):
        tx.send(i)
    tx.send(True)  # a bool is an int: it passes, and stays a bool
    got = [rx.recv(timeout=10) for _ in range(2001)]
    assert_same_sequence(got, [*range(2000), True])
    with pytest.raises(TimeoutError):
        rx.recv(timeout=0.05)


def test_a_typed_receiver_refuses_a_wrong_value_from_a_values_frame(pair, frames, wait_until):
    a, b = pair
    tx, rx = Sender(b.pid, endpoint=a), Receiver[int](a.pid, endpoint=b)
    connected(tx, rx)
    sent = [*range(500), "oops", *range(500, 1000)]
    for value in sent:
        tx.send(value)
    wait_until(lambda: len(b._peers.links[a.pid.hex].inbox) == len(sent))
    assert frames["values_frames"] > 0
    assert [rx.recv(timeout=10) for _ in range(500)] == list(range(500))
    with pytest.raises(TypeError, match=r"Receiver\[int\].*received a str"):
        rx.recv(timeout=10)
    assert [rx.recv(timeout=10) for _ in range(500)] == list(range(500, 1000))


def test_asend_stream_arrives_in_order(pair):
    a, b = pair
    tx, rx = Sender[int](b.pid, endpoint=a), Receiver[int](a.pid, endpoint=b)
    count = 10_000

    async def produce():
        for i in range(count):
            await tx.asend(i)

    async def consume():
        return [await rx.arecv() for _ in range(count)]

    async def main():
        got = await asyncio.wait_for(asyncio.gather(produce(), consume()), 20)
        return got[1]

    assert asyncio.run(main()) == list(range(count))


def test_two_sending_threads_each_keep_their_order(pair, in_thread):
    a, b = pair
    tx, rx = Sender[int](b.pid, endpoint=a), Receiver[int](a.pid, endpoint=b)
    connected(tx, rx)
    count = 5000
    start = threading.Barrier(2)

    def send_range(base: int) -> None:
        start.wait(5)
        for i in range(count):
            tx.send(base + i)

    threads = [in_thread(lambda base=base: send_range(base)) for base in (0, 1_000_000)]
    got = [rx.recv(timeout=10) for _ in range(2 * count)]
    for thread, outcome in threads:
        thread.join(10)
        assert outcome == [None]
    assert [v for v in got if v < 1_000_000] == list(range(count))
    assert [v for v in got if v >= 1_000_000] == list(range(1_000_000, 1_000_000 + count))
    with pytest.raises(TimeoutError):
        rx.recv(timeout=0.05)


CHILD_STREAMS = """
ep = dc.Endpoint("127.0.0.1:0", secret=SECRET)
parent = Pid.parse(sys.argv[1])
count = int(sys.argv[2])
frames = 0
values_frame = dc._link.values_frame

def counting(values):
    global frames
    frames += 1
    return values_frame(values)

dc._link.values_frame = counting
print(ep.pid.format(), flush=True)
tx = dc.Sender[int](parent, endpoint=ep)
for i in range(count):
    tx.send(i)
ep.close(exit_code=0)
print(frames, flush=True)
sys.exit(0)
"""


def test_a_child_streams_then_exits_and_everything_arrives(make_endpoint, children):
    ep = make_endpoint()
    count = 100_000
    proc = children.run(CHILD_STREAMS, ep.pid.format(), str(count))
    rx = Receiver[int](Pid.parse(proc.stdout.readline()), endpoint=ep)
    got = [rx.recv(timeout=10) for _ in range(count)]
    assert got == list(range(count))
    with pytest.raises(PeerExited) as info:
        rx.recv(timeout=10)
    assert info.value.code == 0
    assert proc.wait(timeout=10) == 0
    assert int(proc.stdout.readline()) > 0  # the child's stream went in values frames


@pytest.mark.parametrize("close", ["sender", "endpoint"])
def test_everything_sent_before_closing_arrives(make_endpoint, frames, close):
    a, b = make_endpoint(), make_endpoint()
    tx, rx = Sender[int](b.pid, endpoint=a), Receiver[int](a.pid, endpoint=b)
    connected(tx, rx)
    count = 50_000
    for i in range(count):
        tx.send(i)
    tx.close()
    if close == "endpoint":
        a.close(exit_code=0)
    assert frames["values_frames"] > 0
    assert [rx.recv(timeout=10) for _ in range(count)] == list(range(count))
    if close == "endpoint":
        with pytest.raises(PeerExited) as info:
            rx.recv(timeout=10)
        assert info.value.code == 0
    else:
        with pytest.raises(TimeoutError):
            rx.recv(timeout=0.1)


def test_a_message_taken_by_another_thread_meanwhile_costs_no_equal_one(pair, frames, wait_until):
    # A receiving thread decodes the inbox's first message, then takes it out by equality
    # (`deque.remove`). If another thread took that one meanwhile, no other message may
    # compare equal to it: True == 1, yet a True received must not remove a 1.
    a, b = pair
    tx, rx = Sender(b.pid, endpoint=a), Receiver(a.pid, endpoint=b)
    connected(tx, rx)
    for value in ["filler"] * 50 + [True, 1, 2]:
        tx.send(value)
    assert [rx.recv(timeout=10) for _ in range(50)] == ["filler"] * 50
    wait_until(lambda: len(rx._link.inbox) == 3)
    assert frames["values_frames"] > 0
    decode, raced = rx._decode, []

    def decode_while_another_thread_takes_it(payload):
        if not raced:  # (the other thread's recv, run between this one's decode and take)
            raced.append("racing")
            raced[0] = rx.recv_nowait()
        return decode(payload)

    rx._decode = decode_while_another_thread_takes_it
    first = rx.recv(timeout=10)
    rx._decode = decode
    last = rx.recv(timeout=10)
    assert_same_sequence([*raced, first, last], [True, 1, 2])
    with pytest.raises(TimeoutError):
        rx.recv(timeout=0.05)


@pytest.fixture
def fast_switching():
    """Threads switch every microsecond: races between them happen, for real."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(previous)


def test_two_receiving_threads_get_every_message_once(pair, fast_switching, in_thread):
    a, b = pair
    tx, rx = Sender(b.pid, endpoint=a), Receiver(a.pid, endpoint=b)
    connected(tx, rx)
    count = 40_000

    def receive():
        got = {"bool": 0, "int": 0}
        while (value := rx.recv(timeout=10)) is not None:
            got[type(value).__name__] += 1
        return got

    receivers = [in_thread(receive) for _ in range(2)]
    for i in range(count):
        tx.send(True if i % 2 else 1)
    tx.send(None)
    tx.send(None)
    totals = {"bool": 0, "int": 0}
    for thread, outcome in receivers:
        thread.join(20)
        assert len(outcome) == 1 and isinstance(outcome[0], dict), outcome
        for name, n in outcome[0].items():
            totals[name] += n
    assert totals == {"bool": count // 2, "int": count // 2}
