from __future__ import annotations

import pickle
import random
import struct

import pytest
from deploy_channels import _wire
from deploy_channels.framing import (
    CLOSED,
    DEFAULT_MAX_FRAME_SIZE,
    NEED_DATA,
    FrameDecoder,
    Whole,
    encode_frame,
    frame_header,
)
from deploy_core import FrameError

pytestmark = pytest.mark.timeout(10)

PAYLOADS = [b"", b"a", b"hello world", bytes(range(256)) * 40]


def stream() -> bytes:
    return b"".join(encode_frame(p) for p in PAYLOADS)


def test_encode_is_header_plus_payload():
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert frame_header(3) + b"abc" == encode_frame(b"abc")


def test_whole_stream_then_clean_eof():
    decoder = FrameDecoder()
    decoder.feed(stream())
    assert [decoder.next_frame() for _ in PAYLOADS] == PAYLOADS
    assert decoder.next_frame() is NEED_DATA
    decoder.feed(b"")
    assert decoder.next_frame() is CLOSED
    assert decoder.next_frame() is CLOSED


def test_one_byte_at_a_time():
    decoder = FrameDecoder()
    got = []
    for byte in stream():
        decoder.feed(bytes([byte]))
        while (frame := decoder.next_frame()) is not NEED_DATA:
            got.append(frame)
    assert got == PAYLOADS
    assert decoder.buffered() == 0


def test_frames_returns_every_complete_frame_at_once():
    data = stream()
    decoder = FrameDecoder()
    decoder.feed(data[:-5])
    assert decoder.frames() == PAYLOADS[:-1]
    assert decoder.frames() == []
    decoder.feed(data[-5:])
    assert decoder.frames() == PAYLOADS[-1:]
    for frame in PAYLOADS:
        assert isinstance(frame, bytes)


@pytest.mark.parametrize("cut", [1, 3, 4, 5, 10])
def test_eof_mid_frame_is_an_error(cut):
    decoder = FrameDecoder()
    decoder.feed(encode_frame(b"0123456789")[:cut])
    assert decoder.next_frame() is NEED_DATA
    decoder.feed(b"")
    with pytest.raises(FrameError, match="middle of a frame"):
        decoder.next_frame()


def test_eof_mid_frame_via_frames():
    decoder = FrameDecoder()
    decoder.feed(encode_frame(b"ok") + encode_frame(b"truncated")[:6])
    decoder.feed(b"")
    assert decoder.frames() == [b"ok"]
    with pytest.raises(FrameError):
        decoder.frames()


def test_oversize_rejected_from_the_header_alone():
    decoder = FrameDecoder(max_frame_size=100)
    decoder.feed(frame_header(101))  # no payload at all: rejected before allocating
    with pytest.raises(FrameError, match="exceeds the maximum"):
        decoder.next_frame()
    decoder = FrameDecoder(max_frame_size=100)
    decoder.feed(frame_header(2**32 - 1))
    with pytest.raises(FrameError):
        decoder.frames()


def test_exact_maximum_is_accepted():
    decoder = FrameDecoder(max_frame_size=100)
    decoder.feed(encode_frame(b"x" * 100))
    assert decoder.next_frame() == b"x" * 100


def test_default_maximum_fits_a_gibibyte_message():
    assert DEFAULT_MAX_FRAME_SIZE > 2**30
    assert FrameDecoder().max_frame_size == DEFAULT_MAX_FRAME_SIZE


def test_data_after_eof_is_an_error():
    decoder = FrameDecoder()
    decoder.feed(b"")
    with pytest.raises(FrameError):
        decoder.feed(b"x")


def test_feeds_accept_bytearray_and_memoryview():
    decoder = FrameDecoder()
    data = encode_frame(b"abc") + encode_frame(b"defg")
    decoder.feed(bytearray(data[:5]))
    decoder.feed(memoryview(data)[5:])
    assert decoder.frames() == [b"abc", b"defg"]


def test_fed_views_of_a_reused_buffer_may_be_overwritten():
    # A connection reads every chunk into the same buffer and feeds a view of it: the
    # decoder must copy what it keeps, for small frames, split headers and large frames.
    big = bytes(range(256)) * 600  # over the large-frame threshold
    data = encode_frame(b"first") + encode_frame(b"second") + encode_frame(big) + encode_frame(b"last")
    big_at = len(encode_frame(b"first") + encode_frame(b"second"))
    splits = [list(range(0, len(data), size)) for size in (1, 3, 7, 4096)]
    splits += [[0], [0, big_at], [0, big_at, big_at + 100], [0, big_at, len(data) - 10]]
    for starts in splits:
        decoder = FrameDecoder()
        buffer = memoryview(bytearray(len(data)))
        out = []
        for start, end in zip(starts, starts[1:] + [len(data)], strict=True):
            buffer[: end - start] = data[start:end]
            decoder.feed(buffer[: end - start])
            buffer[:] = b"\xee" * len(data)  # the next read overwrites it
            out += decoder.frames()
        assert out == [b"first", b"second", big, b"last"], starts[:4]


@pytest.mark.parametrize("chunk", [1, 3, 5, 6, 9, 100, 10**6])
def test_feed_next_is_feed_then_next_frame(chunk):
    # The shortcut (one whole small frame, nothing buffered) and the general case meet:
    # same frames, in order, from a reused buffer, wherever the reads cut the stream.
    big = bytes(range(256)) * 300
    payloads = [b"x", b"", b"one frame", big, b"after the big one", b"z" * 70]
    data = b"".join(encode_frame(p) for p in payloads)
    decoder = FrameDecoder()
    buffer = memoryview(bytearray(chunk))
    out = []
    for start in range(0, len(data), chunk):
        piece = data[start : start + chunk]
        buffer[: len(piece)] = piece
        frame = decoder.feed_next(buffer[: len(piece)])
        buffer[:] = b"\xee" * chunk
        while frame is not NEED_DATA:
            out.append(frame)
            frame = decoder.next_frame()
    assert out == payloads
    assert [type(f) for f in out] == [bytes, bytes, bytes, bytearray, bytes, bytes]


def test_feed_next_checks_the_maximum_and_what_is_buffered():
    decoder = FrameDecoder(max_frame_size=4)
    with pytest.raises(FrameError):
        decoder.feed_next(encode_frame(b"12345"))
    decoder = FrameDecoder()
    decoder.feed(encode_frame(b"first")[:6])
    assert decoder.feed_next(encode_frame(b"first")[6:] + encode_frame(b"2nd")) == b"first"
    assert decoder.next_frame() == b"2nd"


def test_invalid_maximum():
    with pytest.raises(ValueError):
        FrameDecoder(max_frame_size=0)
    with pytest.raises(ValueError):
        FrameDecoder(max_frame_size=2**32)


def test_pending_size_reads_the_header_once_it_is_in():
    decoder = FrameDecoder()
    data = encode_frame(b"x" * 300)
    assert decoder.pending_size() is None
    decoder.feed(data[:3])
    assert decoder.pending_size() is None
    decoder.feed(data[3:10])
    assert decoder.pending_size() == 300
    assert decoder.next_frame() is NEED_DATA
    decoder.feed(data[10:])
    assert decoder.next_frame() == b"x" * 300
    assert decoder.pending_size() is None


LARGE = bytes(range(256)) * 400  # 100 KiB: a large frame, assembled in place


def test_large_frame_fed_one_byte_at_a_time_is_a_bytearray():
    data = encode_frame(b"before") + encode_frame(LARGE) + encode_frame(b"after")
    decoder = FrameDecoder()
    got = []
    for byte in data:
        decoder.feed(bytes([byte]))
        while (frame := decoder.next_frame()) is not NEED_DATA:
            got.append(frame)
    assert got == [b"before", LARGE, b"after"]
    assert type(got[1]) is bytearray and type(got[0]) is bytes
    assert decoder.buffered() == 0


def test_large_frame_with_frames_and_eof_in_the_middle():
    data = encode_frame(b"x") + encode_frame(LARGE) + encode_frame(b"y")
    decoder = FrameDecoder()
    decoder.feed(data[:1000])
    assert decoder.frames() == [b"x"]
    assert decoder.pending_size() == len(LARGE)
    assert decoder.buffered() == 1000 - 5
    decoder.feed(data[1000:])
    assert decoder.frames() == [LARGE, b"y"]
    decoder.feed(data[:50000])
    assert decoder.frames() == [b"x"]
    decoder.feed(b"")
    with pytest.raises(FrameError, match="middle of a frame"):
        decoder.frames()


# --- large frames read into their own memory (target/wrote) and pluggable assemblies -------


def large_stream() -> tuple[bytes, list[bytes]]:
    # Large frames of random bytes among small ones, and one exactly at the threshold.
    rng = random.Random(8)
    payloads = [b"a", rng.randbytes(300_000), b"", rng.randbytes(64 * 1024), b"bc", rng.randbytes(100_000), b"z"]
    return b"".join(encode_frame(p) for p in payloads), payloads


def read(decoder: FrameDecoder, data: bytes, chunk: int, into: str, check=None) -> list:
    """Read ``data`` into ``decoder`` ``chunk`` bytes at a time: by `feed` alone
    (``into`` "never"), into `target` whenever there is one ("always"), or either at
    random ("mixed"); every frame is collected as it completes (by `frames`, or by
    `next_frame` for "mixed"). ``check(decoder, pos)`` runs after each step."""
    rng = random.Random(chunk)
    out: list = []
    pos = 0
    while pos < len(data):
        place = decoder.target()
        if place is not None and (into == "always" or (into == "mixed" and rng.random() < 0.5)):
            count = min(chunk, place.nbytes, len(data) - pos)
            place[:count] = data[pos : pos + count]
            place.release()  # (a reader keeps no view of the frame)
            decoder.wrote(count)
        else:
            count = min(chunk, len(data) - pos)
            decoder.feed(data[pos : pos + count])
        del place
        pos += count
        if into == "mixed":
            while (frame := decoder.next_frame()) is not NEED_DATA:
                out.append(frame)
        else:
            out += decoder.frames()
        if check is not None:
            check(decoder, pos)
    decoder.feed(b"")
    assert decoder.next_frame() is CLOSED
    assert decoder.buffered() == 0
    return out


@pytest.mark.parametrize("chunk", [1000, 4096, 65536, 1 << 20])
@pytest.mark.parametrize("into", ["never", "always", "mixed"])
def test_a_large_frame_read_into_its_target_and_fed_in_any_mix(chunk, into):
    data, payloads = large_stream()
    # Where each large frame's payload lies in the stream.
    spans = []
    at = 0
    for payload in payloads:
        if len(payload) >= 64 * 1024:
            spans.append((at + 4, at + 4 + len(payload)))
        at += 4 + len(payload)

    def check(decoder, pos):
        # Once a large frame's header is in and until its last byte is, the decoder
        # offers the frame's memory, never more than the bytes it still lacks; else none.
        place = decoder.target()
        inside = [(start, end) for start, end in spans if start <= pos < end]
        assert (place is not None) == bool(inside), pos
        if place is not None:
            start, end = inside[0]
            assert 0 < place.nbytes <= end - pos
            assert decoder.pending_size() == end - start
            place.release()

    got = read(FrameDecoder(), data, chunk, into, check)
    assert got == payloads
    assert [type(frame) for frame in got] == [bytes if len(p) < 64 * 1024 else bytearray for p in payloads]


def test_target_is_none_for_small_frames_and_between_frames():
    decoder = FrameDecoder()
    assert decoder.target() is None
    decoder.feed(encode_frame(b"x" * 1000)[:500])
    assert decoder.next_frame() is NEED_DATA and decoder.target() is None  # small: fed only
    assert decoder.missing() == 0  # (only a large frame's count)
    decoder.feed(encode_frame(b"x" * 1000)[500:])
    assert decoder.next_frame() == b"x" * 1000 and decoder.target() is None
    decoder.feed(frame_header(len(LARGE))[:3])
    assert decoder.next_frame() is NEED_DATA and decoder.target() is None  # header not in yet
    decoder.feed(frame_header(len(LARGE))[3:])
    assert decoder.next_frame() is NEED_DATA
    place = decoder.target()
    assert place is not None and place.nbytes == len(LARGE)
    assert decoder.missing() == len(LARGE)
    place[:10] = LARGE[:10]
    decoder.wrote(10)
    assert decoder.missing() == len(LARGE) - 10
    place[10:] = LARGE[10:]
    decoder.wrote(len(LARGE) - 10)
    assert decoder.target() is None and decoder.missing() == 0  # complete: nothing more goes into it
    frame = decoder.next_frame()
    assert frame == LARGE and type(frame) is bytearray
    assert place.obj is frame  # read in place: the frame is the memory the target was
    place.release()
    frame.extend(b"!")  # and it is resizable: the decoder keeps no view of it
    assert decoder.target() is None and decoder.next_frame() is NEED_DATA


def test_wrote_zero_is_not_the_end_of_the_stream():
    decoder = FrameDecoder()
    decoder.feed(frame_header(len(LARGE)))
    assert decoder.next_frame() is NEED_DATA
    decoder.wrote(0)
    decoder.target()[:] = LARGE
    decoder.wrote(len(LARGE))
    assert decoder.next_frame() == LARGE


class Recording:
    """An `Assembly` that hands out at most 1000 bytes at a time and keeps a record."""

    made: list[Recording] = []

    def __init__(self, length: int):
        self.length = length
        self.data = bytearray(length)
        self.filled = 0
        self.fills: list[int] = []
        self.done = False
        Recording.made.append(self)

    def target(self) -> memoryview:
        assert not self.done
        return memoryview(self.data)[self.filled : self.filled + 1000]

    def advance(self, count: int) -> None:
        assert 0 <= count <= 1000 and self.filled + count <= self.length
        self.fills.append(count)
        self.filled += count

    def result(self) -> object:
        assert self.filled == self.length and not self.done
        self.done = True
        return ("assembled", bytes(self.data))


@pytest.mark.parametrize("chunk", [1000, 4096, 1 << 20])
@pytest.mark.parametrize("into", ["never", "always", "mixed"])
def test_a_custom_assembly_gets_every_byte_in_order_and_makes_the_frame(chunk, into):
    data, payloads = large_stream()
    Recording.made.clear()
    got = read(FrameDecoder(assemble=Recording), data, chunk, into)
    large = [p for p in payloads if len(p) >= 64 * 1024]
    assert got == [("assembled", p) if len(p) >= 64 * 1024 else p for p in payloads]
    # One assembly per large frame (none for small ones), told its length, filled in
    # pieces no bigger than it offered, and asked for its result once.
    assert [made.length for made in Recording.made] == [len(p) for p in large]
    for made in Recording.made:
        assert made.done and sum(made.fills) == made.length and max(made.fills) <= 1000


def test_a_custom_assembly_makes_a_large_frame_that_arrives_whole():
    Recording.made.clear()
    decoder = FrameDecoder(assemble=Recording)
    decoder.feed(encode_frame(b"x") + encode_frame(LARGE) + encode_frame(b"y"))
    assert decoder.next_frame() == b"x"
    assert decoder.next_frame() == ("assembled", LARGE)
    assert decoder.next_frame() == b"y"
    decoder.feed(encode_frame(LARGE) * 2)
    assert decoder.frames() == [("assembled", LARGE)] * 2
    assert len(Recording.made) == 3


def test_whole_is_the_default_assembly_and_makes_a_bytearray():
    data = encode_frame(LARGE)
    for decoder in (FrameDecoder(), FrameDecoder(assemble=Whole)):
        decoder.feed(data[:1000])
        assert decoder.next_frame() is NEED_DATA
        decoder.feed(data[1000:])
        frame = decoder.next_frame()
        assert type(frame) is bytearray and frame == LARGE
    sizes = []

    def allocate(size: int) -> bytearray:
        sizes.append(size)
        return bytearray(b"\xee" * size)  # not cleared: every byte is written over

    whole = Whole(10, allocate)
    assert sizes == [10] and whole.target().nbytes == 10
    whole.target()[:4] = b"abcd"
    whole.advance(4)
    assert whole.target().nbytes == 6
    whole.target()[:] = b"efghij"
    whole.advance(6)
    result = whole.result()
    assert type(result) is bytearray and result == b"abcdefghij"
    result.extend(b"k")  # its own: resizable


# --- channel frames: _wire.MessageAssembly -------------------------------------------------


def message_values() -> dict:
    import numpy  # a test extra of the package; tox installs it

    rng = random.Random(5)
    return {
        "bytes": rng.randbytes(100_000),
        "bytearray": bytearray(rng.randbytes(100_000)),
        "readonly memoryview": memoryview(rng.randbytes(70_000)),
        "numpy": numpy.arange(25_000, dtype=numpy.float32).reshape(50, 500),
        # Several buffers, an empty one among them.
        "list of arrays": [numpy.arange(10_000.0), numpy.zeros(0), numpy.ones((3, 4), dtype=numpy.int16)],
        "in-band pickle": list(range(100_000)),
    }


def message_stream(value) -> bytes:
    frame, nbytes = _wire.encode_message(value)
    data = frame if isinstance(frame, bytes) else b"".join(frame)
    assert len(data) == nbytes
    return data


def same(got, value) -> bool:
    import numpy

    if isinstance(value, list):
        return len(got) == len(value) and all(same(g, v) for g, v in zip(got, value, strict=True))
    if isinstance(value, numpy.ndarray):
        return type(got) is numpy.ndarray and got.dtype == value.dtype and numpy.array_equal(got, value)
    return got == value


@pytest.mark.timeout(60)
@pytest.mark.parametrize("chunk", [1, 7, 4096, None])
@pytest.mark.parametrize("kind", list(message_values()))
def test_message_assembly_round_trips_encode_message(kind, chunk):
    import numpy

    value = message_values()[kind]
    data = message_stream("before") + message_stream(value) + message_stream("after")
    for into in ("never", "always", "mixed") if chunk in (7, 4096) else ("never",):
        frames = read(FrameDecoder(assemble=_wire.MessageAssembly), data, chunk or len(data), into)
        assert len(frames) == 3
        assert [_wire.decode_message(f) for f in (frames[0], frames[2])] == ["before", "after"]
        frame = frames[1]
        got = _wire.decode_message(frame)
        assert same(got, value), (kind, chunk, into)
        if kind == "in-band pickle":
            assert type(frame) is bytearray  # not a buffers frame: the payload whole
            continue
        assert type(frame) is _wire.Buffers and len(frame) == len(message_stream(value)) - 4
        if kind in ("bytes", "bytearray", "readonly memoryview"):
            # The message is the buffer read: no copy after the reads.
            assert got is frame.buffers[0]
            assert type(got) is (bytearray if kind == "bytearray" else bytes)
        if kind == "bytearray":
            got[0] ^= 0xFF
        if kind == "numpy":
            assert got.flags.writeable
            assert numpy.shares_memory(got, numpy.frombuffer(frame.buffers[0], dtype=numpy.uint8))
            got[0, 0] += 1


def buffers_frame(value=b"\x07" * 100_000) -> tuple[bytearray, int, int]:
    """A buffers frame's payload (header stripped), its buffer count and pickle length."""
    payload = bytearray(message_stream(value)[4:])
    assert payload[:1] == b"B" and payload[-1:] == b"B"
    count, pickle_length = struct.unpack_from(">IQ", payload, 1)
    return payload, count, pickle_length


def malformed() -> dict[str, bytes]:
    cases = {}
    payload, count, pickle_length = buffers_frame()
    sizes_at = 13  # mark, count u32, pickle length u64
    kinds_at = sizes_at + 8 * count

    def variant(name, change):
        data = bytearray(payload)
        change(data)
        cases[name] = bytes(data)

    variant("count zero", lambda d: struct.pack_into(">I", d, 1, 0))
    variant("count one more", lambda d: struct.pack_into(">I", d, 1, count + 1))
    variant("count huge", lambda d: struct.pack_into(">I", d, 1, 2**32 - 1))
    variant("pickle too long", lambda d: struct.pack_into(">Q", d, 5, pickle_length + 1))
    variant("pickle huge", lambda d: struct.pack_into(">Q", d, 5, 2**64 - 1))
    variant("size short", lambda d: struct.pack_into(">Q", d, sizes_at, 100_000 - 1))
    variant("size long", lambda d: struct.pack_into(">Q", d, sizes_at, 100_000 + 1))
    variant("wrong tail", lambda d: d.__setitem__(-1, ord("D")))
    variant("kind 3", lambda d: d.__setitem__(kinds_at, 3))
    variant("kind 255", lambda d: d.__setitem__(kinds_at, 255))
    # Two buffers, their sizes swapped around the total: still must sum to the length.
    two, count2, _ = buffers_frame([pickle.PickleBuffer(bytearray(70_000)), pickle.PickleBuffer(bytearray(30_000))])
    assert count2 == 2
    struct.pack_into(">QQ", two, sizes_at, 70_000 + 40_000, 30_000 - 40_000 + 2**64)
    cases["sizes overflowing"] = bytes(two)
    return {name: frame_header(len(data)) + data for name, data in cases.items()}


@pytest.mark.parametrize("chunk", [7, 4096, None])
@pytest.mark.parametrize("case", list(malformed()))
def test_a_malformed_buffers_frame_is_a_frame_error(case, chunk):
    data = malformed()[case]
    for into in ("never", "always") if chunk else ("never",):
        with pytest.raises(FrameError):
            read(FrameDecoder(assemble=_wire.MessageAssembly), data, chunk or len(data), into)


def test_a_buffers_frame_cut_short_is_a_frame_error():
    payload, _, _ = buffers_frame()
    data = frame_header(len(payload)) + payload
    for cut in (10, 20, 1000, len(data) - 1):
        decoder = FrameDecoder(assemble=_wire.MessageAssembly)
        decoder.feed(data[:cut])
        assert decoder.next_frame() is NEED_DATA
        decoder.feed(b"")
        with pytest.raises(FrameError, match="middle of a frame"):
            decoder.next_frame()


def test_message_assembly_takes_wrote_zero_at_the_start_of_a_buffers_frame():
    value = b"\x07" * 100_000
    data = message_stream(value)
    decoder = FrameDecoder(assemble=_wire.MessageAssembly)
    decoder.feed(memoryview(data)[:4])  # the header alone: the frame is started
    assert decoder.next_frame() is NEED_DATA
    decoder.wrote(0)  # "0 is not EOF here"
    pos = 4
    while (place := decoder.target()) is not None:
        count = min(place.nbytes, 5000, len(data) - pos)
        place[:count] = data[pos : pos + count]
        decoder.wrote(count)
        pos += count
    assert _wire.decode_message(decoder.next_frame()) == value
