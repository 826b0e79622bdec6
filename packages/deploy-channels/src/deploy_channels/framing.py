"""Sans-IO length-prefixed framing (public and stable).

A frame is a 4-byte big-endian unsigned payload length followed by the payload. This
module imports no socket or selector: callers feed it the bytes they read and write the
bytes it returns, so it is tested on bytes alone and reused for any byte stream
(deploy's channels and the fabric's control connections).

    >>> decoder = FrameDecoder()
    >>> decoder.feed(encode_frame(b"hello") + encode_frame(b"world"))
    >>> decoder.next_frame(), decoder.next_frame(), decoder.next_frame() is NEED_DATA
    (b'hello', b'world', True)
    >>> decoder.feed(b"")  # EOF at a frame boundary
    >>> decoder.next_frame() is CLOSED
    True

A frame longer than ``max_frame_size`` raises `deploy_core.FrameError` as soon as its
header is seen, before any buffer is allocated for it; EOF in the middle of a frame
raises `FrameError` too (a broken peer), whereas EOF between frames yields `CLOSED`.

A payload of 64 KiB or more comes back as a ``bytearray`` that the caller
owns (writable, so out-of-band pickle buffers built on it are too); once such a frame's
header is in, the decoder allocates it whole and later reads fill it in place, rather
than growing a buffer and copying the frame out at the end. Smaller payloads are ``bytes``.

Large frames, zero-copy: a reader asks `FrameDecoder.target` for the memory the next
bytes of a large frame go to, reads into it itself (``sock.recv_into(target)``) and says
how much with `FrameDecoder.wrote`, so the bytes land where the frame's consumer will keep
them. What the large payload is assembled into is pluggable: ``assemble(length)``
returns an `Assembly` (a bytearray by default, `Whole`); a protocol on top may split the
payload into several buffers of its own layout as it arrives.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Protocol

from deploy_core import FrameError

__all__ = [
    "CLOSED",
    "DEFAULT_MAX_FRAME_SIZE",
    "HEADER_SIZE",
    "MAX_FRAME_SIZE_LIMIT",
    "NEED_DATA",
    "Assembly",
    "FrameDecoder",
    "Whole",
    "encode_frame",
    "frame_header",
]

_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size
#: The header's 32 bits cap a frame at 4 GiB - 1.
MAX_FRAME_SIZE_LIMIT = 2**32 - 1
#: 1 GiB of message plus room for its pickle header and channel framing.
DEFAULT_MAX_FRAME_SIZE = 2**30 + 2**20
#: Payloads at least this long are returned as a bytearray, assembled in place.
_LARGE_FRAME = 64 * 1024


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str):
        self._name = name

    def __repr__(self) -> str:
        return self._name

    def __reduce__(self) -> str:
        return self._name


#: `FrameDecoder.next_frame` needs more bytes before it can return a frame.
NEED_DATA = _Sentinel("NEED_DATA")
#: The stream ended cleanly, at a frame boundary; no frame will follow.
CLOSED = _Sentinel("CLOSED")


class Assembly(Protocol):
    """Where a large frame's payload is put together as it arrives (see the module
    comment). The decoder fills `target` and reports each fill to `advance`, in order,
    until the payload's length is in; then `result` is the frame it returns."""

    def target(self) -> memoryview:
        """The writable memory the payload's next bytes go to (never empty before the end)."""
        ...

    def advance(self, count: int) -> None:
        """``count`` bytes were written at the start of `target`; may raise `FrameError`
        when they show the payload is malformed."""
        ...

    def result(self) -> object:
        """The frame, once every byte is in."""
        ...


class Whole:
    """The default `Assembly`: the payload as one ``bytearray`` (made by ``allocate``,
    which may return one whose contents are not cleared first)."""

    __slots__ = ("_buffer", "_view", "_filled")

    def __init__(self, length: int, allocate: Callable[[int], bytearray] = bytearray):
        self._buffer = allocate(length)
        self._view = memoryview(self._buffer)
        self._filled = 0

    def target(self) -> memoryview:
        return self._view[self._filled :]

    def advance(self, count: int) -> None:
        self._filled += count

    def result(self) -> bytearray:
        self._view.release()  # (the bytearray stays resizable for its new owner)
        return self._buffer


def frame_header(length: int) -> bytes:
    """The 4-byte header of a frame whose payload is ``length`` bytes.

    Lets a writer send the header and a large payload as separate buffers (for example
    with ``socket.sendmsg``) instead of concatenating them.
    """
    if not 0 <= length <= MAX_FRAME_SIZE_LIMIT:
        raise FrameError(f"a frame payload of {length} bytes does not fit the 4-byte length header")
    return _HEADER.pack(length)


def encode_frame(payload: bytes) -> bytes:
    """Header plus payload, as one bytes object."""
    return frame_header(len(payload)) + payload


class FrameDecoder:
    """Split a byte stream into frames.

    `feed` what was read (``b""`` for EOF), then call `next_frame` until it returns
    `NEED_DATA` (or `CLOSED`). `frames` returns every complete frame at once, for
    readers that handle a whole read in one step.
    """

    __slots__ = ("_buf", "_pos", "_eof", "_max", "_unpack_from", "_large", "_length", "_filled", "_assemble")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE, *, assemble: Callable[[int], Assembly] = Whole):
        if not isinstance(max_frame_size, int) or not 0 < max_frame_size <= MAX_FRAME_SIZE_LIMIT:
            raise ValueError(f"max_frame_size must be an int from 1 to {MAX_FRAME_SIZE_LIMIT}")
        # Unconsumed bytes are _buf[_pos:]; _buf is the caller's own bytes object while
        # nothing is left over from earlier reads, so the common case copies nothing. A
        # bytearray or memoryview fed is copied (the caller may reuse its buffer).
        self._buf: bytes | bytearray = b""
        self._pos = 0
        self._eof = False
        self._max = max_frame_size
        self._unpack_from = _HEADER.unpack_from
        # A large frame being assembled: _filled of its _length payload bytes are in; while
        # it is incomplete, _buf holds nothing.
        self._large: Assembly | None = None
        self._length = 0
        self._filled = 0
        self._assemble = assemble

    @property
    def max_frame_size(self) -> int:
        """The largest payload accepted; may be changed between reads (e.g. raised once a
        peer has authenticated)."""
        return self._max

    @max_frame_size.setter
    def max_frame_size(self, value: int) -> None:
        if not isinstance(value, int) or not 0 < value <= MAX_FRAME_SIZE_LIMIT:
            raise ValueError(f"max_frame_size must be an int from 1 to {MAX_FRAME_SIZE_LIMIT}")
        self._max = value

    def buffered(self) -> int:
        """How many fed bytes have not been returned as frames yet."""
        if self._large is not None:
            return HEADER_SIZE + self._filled + len(self._buf) - self._pos
        return len(self._buf) - self._pos

    def pending_size(self) -> int | None:
        """The payload length of the next frame once its header is buffered, else None."""
        if self._large is not None:
            return self._length
        if len(self._buf) - self._pos < HEADER_SIZE:
            return None
        return self._unpack_from(self._buf, self._pos)[0]

    def missing(self) -> int:
        """How many bytes of the large frame being assembled are still to come (0: none is)."""
        return self._length - self._filled if self._large is not None else 0

    def target(self) -> memoryview | None:
        """Where to read the next bytes to: part of a large frame's own memory, while one
        is incomplete (at most its missing bytes); else None (read into a buffer and
        `feed` it). Report what was read into it with `wrote`, not `feed`."""
        large = self._large
        if large is None or self._filled == self._length:
            return None
        return large.target()

    def wrote(self, count: int) -> None:
        """``count`` bytes were read into `target` (0 is not EOF here: `feed` ``b""``)."""
        assert self._large is not None and self._filled + count <= self._length, "more than the target"
        self._filled += count
        self._large.advance(count)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes read from the stream; ``b""`` marks the end of the stream."""
        if self._eof:
            if data:
                raise FrameError("data fed after the end of the stream")
            return
        if not data:
            self._eof = True
            return
        large = self._large
        if large is not None and self._filled < self._length:
            with memoryview(data) as view:
                taken = self._fill(view.cast("B") if view.format != "B" else view)
                if taken == view.nbytes:
                    return
                data = bytes(view[taken:])
        if self._pos == len(self._buf):
            if not isinstance(data, bytes):
                # A caller's buffer (it may reuse it for its next read): copy what we keep,
                # and the start of a large frame only once, into the frame itself.
                if len(data) >= HEADER_SIZE and large is None:
                    (length,) = self._unpack_from(data, 0)
                    if _LARGE_FRAME <= length <= self._max and HEADER_SIZE + length > len(data):
                        self._buf = b""
                        self._pos = 0
                        self._large_from(data, length)
                        return
                data = bytes(data)
            self._buf = data
            self._pos = 0
        else:
            if self._pos or not isinstance(self._buf, bytearray):
                self._buf = bytearray(memoryview(self._buf)[self._pos :])
                self._pos = 0
            self._buf += data

    def feed_next(self, data: bytes | bytearray | memoryview) -> Any:
        """`feed` ``data`` (bytes, not the end of the stream), then return `next_frame`.

        Quicker for the common read that is exactly one small frame with nothing buffered
        before it: its payload is copied out of ``data`` at once. (A memoryview must be
        of format ``"B"``, as a socket's ``recv_into`` buffer is.)"""
        size = len(data)
        if size > HEADER_SIZE and self._pos == len(self._buf) and self._large is None and not self._eof:
            (length,) = self._unpack_from(data, 0)
            if length + HEADER_SIZE == size and length < _LARGE_FRAME and length <= self._max:
                return bytes(data[HEADER_SIZE:])
        self.feed(data)
        return self.next_frame()

    def _fill(self, view: memoryview) -> int:
        # Copy the start of ``view`` into the large frame being assembled; returns how much.
        large = self._large
        assert large is not None
        taken = 0
        size = view.nbytes
        while taken < size and self._filled < self._length:
            place = large.target()
            count = min(place.nbytes, size - taken, self._length - self._filled)
            place[:count] = view[taken : taken + count]
            taken += count
            self._filled += count
            large.advance(count)
        return taken

    def next_frame(self) -> Any:
        """The next complete frame's payload (bytes, a bytearray or what its `Assembly`
        made of a large one), `NEED_DATA` or `CLOSED`.

        Raises `FrameError` for a frame over the maximum size and for EOF mid-frame.
        """
        large = self._large
        if large is not None:
            if self._filled < self._length:
                if self._eof:
                    raise FrameError(f"the stream ended in the middle of a frame ({self._filled + 4} bytes left over)")
                return NEED_DATA
            self._large = None
            return large.result()
        buf, pos = self._buf, self._pos
        available = len(buf) - pos
        if available >= HEADER_SIZE:
            (length,) = self._unpack_from(buf, pos)
            if length > self._max:
                raise FrameError(f"frame of {length} bytes exceeds the maximum of {self._max}")
            end = pos + HEADER_SIZE + length
            if end <= len(buf):
                if length >= _LARGE_FRAME:
                    return self._whole_large(pos, length)
                self._pos = end
                if isinstance(buf, bytearray):
                    with memoryview(buf) as view:
                        return bytes(view[pos + HEADER_SIZE : end])
                return buf[pos + HEADER_SIZE : end]
            if not self._eof and length >= _LARGE_FRAME:
                self._start_large(pos, length)
                return NEED_DATA
        if not self._eof:
            return NEED_DATA
        if available:
            raise FrameError(f"the stream ended in the middle of a frame ({available} bytes left over)")
        return CLOSED

    def frames(self) -> list[Any]:
        """Every complete frame buffered now (possibly none); stops before `CLOSED`.

        Raises like `next_frame`, after the frames before the bad one have been consumed
        (they are lost to the caller; use `next_frame` to keep each one).
        """
        out: list[Any] = []
        append = out.append
        large = self._large
        if large is not None:
            frame = self.next_frame()
            if frame is NEED_DATA:
                return out
            assert frame is not CLOSED, "a large frame is data, not the end"
            append(frame)
        buf, pos, limit, unpack = self._buf, self._pos, self._max, self._unpack_from
        size = len(buf)
        # Slicing a bytearray through a memoryview copies once (straight into bytes).
        view = memoryview(buf) if isinstance(buf, bytearray) else buf
        while size - pos >= HEADER_SIZE:
            (length,) = unpack(buf, pos)
            if length > limit:
                self._pos = pos
                if isinstance(view, memoryview):  # ours, not buf
                    view.release()
                raise FrameError(f"frame of {length} bytes exceeds the maximum of {limit}")
            start = pos + HEADER_SIZE
            end = start + length
            if end > size:
                if length >= _LARGE_FRAME and not self._eof:
                    if isinstance(view, memoryview):
                        view.release()
                    self._start_large(pos, length)
                    return out
                break
            if length >= _LARGE_FRAME:
                self._pos = pos
                append(self._whole_large(pos, length))
                pos = end
                continue
            else:
                append(view[start:end] if view is buf else bytes(view[start:end]))
            pos = end
        self._pos = pos
        if isinstance(view, memoryview):
            view.release()
        if self._eof and pos < size and not out:
            raise FrameError(f"the stream ended in the middle of a frame ({size - pos} bytes left over)")
        return out

    def _start_large(self, pos: int, length: int) -> None:
        # The rest of the buffer is the start of one large frame: assemble it in place.
        with memoryview(self._buf) as view:
            self._large_from(view[pos:], length)
        self._buf = b""
        self._pos = 0

    def _large_from(self, data: bytes | bytearray | memoryview, length: int) -> None:
        # data is a header and the first part of a large frame's payload of length bytes.
        self._large = self._assemble(length)
        self._length = length
        self._filled = 0
        with memoryview(data) as view:
            self._fill(view.cast("B")[HEADER_SIZE:])

    def _whole_large(self, pos: int, length: int) -> object:
        # A large frame that is all in the buffer at pos: through its assembly too.
        with memoryview(self._buf) as view:
            self._large_from(view[pos : pos + HEADER_SIZE + length], length)
        self._pos = pos + HEADER_SIZE + length
        large = self._large
        assert large is not None
        self._large = None
        return large.result()

    @property
    def at_eof(self) -> bool:
        """True once EOF has been fed."""
        return self._eof
