"""Property tests of the sans-IO frame decoder (issue 9): any split of a valid stream gives
back the frames exactly; garbage and truncation give frames or FrameError, nothing else;
an oversized header is refused before its payload is buffered."""

import struct

import pytest
from deploy_channels.framing import CLOSED, HEADER_SIZE, NEED_DATA, FrameDecoder, encode_frame
from deploy_core import FrameError

hypothesis = pytest.importorskip("hypothesis")  # a test extra: tox installs it
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = pytest.mark.timeout(120)

payloads = st.lists(st.binary(max_size=300), max_size=20)
cuts = st.lists(st.integers(min_value=0, max_value=10_000), max_size=30)


def split(data: bytes, points: list[int]) -> list[bytes]:
    marks = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in zip(marks, marks[1:], strict=False) if b > a]


def drain(decoder: FrameDecoder, use_frames: bool) -> list:
    if use_frames:
        return list(decoder.frames())
    out = []
    while True:
        frame = decoder.next_frame()
        if frame is NEED_DATA or frame is CLOSED:
            return out
        out.append(frame)


@settings(max_examples=400, deadline=None)
@given(payloads, cuts, st.booleans())
def test_any_split_of_a_valid_stream_gives_the_frames_back(frames, points, use_frames):
    decoder = FrameDecoder()
    got = []
    for chunk in split(b"".join(encode_frame(f) for f in frames), points):
        decoder.feed(chunk)
        got += [bytes(f) for f in drain(decoder, use_frames)]
    decoder.feed(b"")
    got += [bytes(f) for f in drain(decoder, use_frames)]
    assert got == frames
    assert decoder.next_frame() is CLOSED
    assert decoder.buffered() == 0


@settings(max_examples=400, deadline=None)
@given(payloads, st.integers(min_value=1, max_value=10_000), cuts)
def test_a_truncated_stream_gives_a_prefix_of_the_frames_then_frame_error(frames, cut, points):
    data = b"".join(encode_frame(f) for f in frames)
    if not data:
        return
    cut = cut % len(data)
    truncated = data[:cut]
    decoder = FrameDecoder()
    got = []
    for chunk in split(truncated, points):
        decoder.feed(chunk)
        got += [bytes(f) for f in drain(decoder, False)]
    decoder.feed(b"")
    boundary = cut in {sum(HEADER_SIZE + len(f) for f in frames[:i]) for i in range(len(frames) + 1)}
    if boundary:
        assert decoder.next_frame() is CLOSED
    else:
        with pytest.raises(FrameError):
            while decoder.next_frame() is not CLOSED:
                pass
    assert got == frames[: len(got)]


@settings(max_examples=600, deadline=None)
@given(st.binary(max_size=2000), cuts, st.integers(min_value=1, max_value=4096), st.booleans())
def test_garbage_gives_frames_or_frame_error_and_never_buffers_an_oversized_frame(data, points, limit, use_frames):
    decoder = FrameDecoder(max_frame_size=limit)
    try:
        for chunk in split(data, points):
            decoder.feed(chunk)
            for frame in drain(decoder, use_frames):
                assert len(frame) <= limit
            # Never more than one frame's worth (plus a header) is held back.
            assert decoder.buffered() < HEADER_SIZE + limit + len(chunk)
        decoder.feed(b"")
        drain(decoder, use_frames)
    except FrameError:
        pass


@given(st.integers(min_value=2**20 + 1, max_value=2**32 - 1), st.binary(max_size=64))
def test_an_oversized_header_is_refused_as_soon_as_it_is_seen(length, tail):
    decoder = FrameDecoder(max_frame_size=2**20)
    decoder.feed(struct.pack(">I", length) + tail)
    with pytest.raises(FrameError, match="exceeds the maximum"):
        decoder.next_frame()
