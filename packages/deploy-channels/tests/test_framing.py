import pytest
from deploy_channels.framing import (
    CLOSED,
    DEFAULT_MAX_FRAME_SIZE,
    NEED_DATA,
    FrameDecoder,
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
