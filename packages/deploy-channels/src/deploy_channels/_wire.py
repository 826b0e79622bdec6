"""Channel-level frames: what travels inside each `framing` frame of a channel connection.

The kind of a frame is its payload's LAST byte. For data that lets the receiver hand the
payload straight to ``pickle.loads``, which ignores bytes past the pickle's STOP opcode,
so neither side slices or copies a message to add or strip a kind byte.

    data           pickle + b"D"
    values         pickle of a list of small immutable values + b"V": messages sent in a
                   stream, pickled as one (see `Values`); each arrives as a message
    data, buffers  b"B", count u32, pickle length u64, buffer lengths u64 each, buffer
                   kinds u8 each, pickle, buffers, b"B"

A buffer's kind says what the receiver builds from its bytes: a writable ``bytearray``
that the pickle's own reconstructor takes (NumPy arrays, a `pickle.PickleBuffer` sent as
such), or the message itself when it is a large ``bytes``, ``bytearray`` or
``memoryview``: those are wrapped in a PickleBuffer so that the pickler does not copy
them in band, and arrive as ``bytes`` (read-only source) or a ``bytearray`` (writable).

A buffers frame is always large (it is used from 64 KiB on), and its leading b"B" (a
pickle starts with its PROTO opcode, 0x80) tells the receiver the layout as soon as the
frame starts: `MessageAssembly` reads each buffer straight into the object the message
will be built on (a ``bytes`` too, allocated unwritten: see `_memory`), so a buffer
crosses with no copy beyond the kernel's. The frame arrives as a `Buffers`, not as bytes.
    hello          b"<from pid> <wanted pid>" (connector) or b"<own pid>" (acceptor), b"H"
    duplicate      b"X"  the acceptor keeps another connection between the same two pids
    goodbye        exit code as ASCII digits (empty: unknown) + b"G"
    close request  b"C"; close ok b"K"; close refused b"N"
"""

from __future__ import annotations

import itertools
import pickle
import struct
from typing import Any

from deploy_core import FrameError, Pid, dumps_message

from ._memory import new_bytearray, new_bytes
from .framing import Whole, frame_header

__all__ = [
    "CLOSE_NO",
    "CLOSE_OK",
    "CLOSE_REQUEST",
    "DATA",
    "DATA_BUFFERS",
    "VALUES",
    "DUPLICATE",
    "GOODBYE",
    "HELLO",
    "Buffers",
    "MessageAssembly",
    "Payload",
    "Values",
    "batch_size",
    "control_frame",
    "decode_goodbye",
    "decode_hello",
    "decode_message",
    "decode_values",
    "encode_message",
    "goodbye_frame",
    "hello_frame",
    "small_frame",
    "values_frame",
]

DATA = ord("D")
DATA_BUFFERS = ord("B")
VALUES = ord("V")
HELLO = ord("H")
DUPLICATE = ord("X")
GOODBYE = ord("G")
CLOSE_REQUEST = ord("C")
CLOSE_OK = ord("K")
CLOSE_NO = ord("N")

_DATA_TAIL = b"D"
_VALUES_TAIL = b"V"
_join = b"".join
_BUFFERS_MARK = b"B"
_COUNTS = struct.Struct(">IQ")
_PREFIX = 1 + _COUNTS.size  # the mark, count and pickle length
_LENGTH = struct.Struct(">Q")
# Buffer kinds (see the module comment).
_VIEW = 0
_BYTES = 1
_BYTEARRAY = 2
_HEADER_PACK = struct.Struct(">I").pack
# Below this, out-of-band buffers are cheaper copied in-band than sent as extra iovecs.
_OOB_MIN = 64 * 1024
# A single in-band pickle this large goes out as separate buffers (no concatenation copy).
_SPLIT_MIN = 64 * 1024


def encode_message(value: Any) -> tuple[bytes | list, int]:
    """The framed bytes of one message: a single bytes object, or a list of buffers for
    large messages (header, pickle and out-of-band buffers, never concatenated); plus
    the total length."""
    own = _VIEW
    kind = type(value)
    if kind is memoryview:
        # A memoryview does not pickle: it travels as the bytes it shows.
        if value.nbytes < _OOB_MIN or not value.c_contiguous:
            value = value.tobytes() if value.readonly else bytearray(value.tobytes())
            kind = type(value)
        else:
            own = _BYTES if value.readonly else _BYTEARRAY
    if (kind is bytes or kind is bytearray) and len(value) >= _OOB_MIN:
        own = _BYTES if kind is bytes else _BYTEARRAY
    if own != _VIEW:
        # Out of band: the frame carries the caller's own memory (a 5-byte pickle).
        value = pickle.PickleBuffer(value)
    views: list[memoryview] = []
    data = dumps_message(value, views)
    if views:
        sizes = [view.nbytes for view in views]
        if own == _VIEW and sum(sizes) < _OOB_MIN:
            data = dumps_message(value)  # small buffers: cheaper in band
        else:
            kinds = bytes([own] + [_VIEW] * (len(views) - 1))
            meta = b"".join(
                (_BUFFERS_MARK, _COUNTS.pack(len(views), len(data)), *(_LENGTH.pack(size) for size in sizes), kinds)
            )
            length = len(meta) + len(data) + sum(sizes) + 1
            return [frame_header(length), meta, data, *views, b"B"], length + 4
    length = len(data) + 1
    if length >= _SPLIT_MIN:
        return [frame_header(length), data, _DATA_TAIL], length + 4
    return b"".join((_HEADER_PACK(length), data, _DATA_TAIL)), length + 4


def small_frame(value: Any) -> bytes:
    """The framed data message of a value of a plain type (no buffers, no cloudpickle)."""
    data = pickle.dumps(value, 5)
    return _join((_HEADER_PACK(len(data) + 1), data, _DATA_TAIL))


# What a value of each type adds to a values frame at most (see `batch_size`); None:
# by its length. Only exact types: a subclass may be mutable or pickle otherwise.
_BATCH_SIZES: dict[type, int | None] = {int: 11, float: 10, bool: 2, type(None): 2, str: None, bytes: None}
_BATCH_INT = 2**63
_BATCH_LEN = 256


def batch_size(value: Any) -> int | None:
    """An upper bound of the bytes ``value`` adds to a values frame, if it may travel in
    one: small values of immutable plain types, which may be pickled later than they are
    sent (they cannot change) and unpickle anywhere. None for any other value."""
    kind = type(value)
    size = _BATCH_SIZES.get(kind, 0)
    if size:
        if kind is int and not -_BATCH_INT <= value < _BATCH_INT:
            return None
        return size
    if size is None and len(value) <= _BATCH_LEN:
        return 4 * len(value) + 12 if kind is str else len(value) + 12  # (UTF-8, and opcodes)
    return None


class Values(list):
    """Messages queued to travel as one values frame: the values, and `batch_size`'s
    bound of their frame's size (``size``)."""

    __slots__ = ("size",)
    #: What a values frame adds to its values: the frame header, the pickle's and the
    #: list's opcodes, the kind byte.
    OVERHEAD = 32

    def __init__(self, value: Any, size: int):
        super().__init__((value,))
        self.size = size + self.OVERHEAD


def values_frame(values: list) -> bytes:
    """The framed values frame of queued `Values`."""
    data = pickle.dumps(list(values), 5)  # (a plain list: the receiver need not know Values)
    return _join((_HEADER_PACK(len(data) + 1), data, _VALUES_TAIL))


def decode_values(payload: bytes) -> list[tuple[Any, int]]:
    """The messages of a values frame, each as a pair of the value and a number no other
    message of this process has (how an inbox holds a message that is decoded already);
    `FrameError` if it is not a values frame's pickle.

    The number keeps two messages from comparing equal: a receiving thread takes its
    message out of the inbox by equality (`deque.remove`), and ``(True,) == (1,)``."""
    try:
        values = pickle.loads(payload)
    except Exception as error:
        raise FrameError(f"malformed values frame: {type(error).__name__}: {error}") from None
    if type(values) is not list or not values:
        raise FrameError("malformed values frame: not a list of messages")
    return list(zip(values, _MESSAGE_NUMBERS, strict=False))  # (the numbers never end)


_MESSAGE_NUMBERS = itertools.count()


def decode_message(payload: bytes | bytearray | Buffers) -> Any:
    """Unpickle a data frame's payload (either data kind)."""
    if isinstance(payload, Buffers):
        return pickle.loads(payload.pickle, buffers=payload.buffers)
    # (Every buffers frame arrives as a Buffers: this is a pickle with its kind byte behind.)
    return pickle.loads(payload)


class Buffers:
    """A received buffers frame: its pickle and the buffers it is built on, each already
    the object the message keeps (see the module comment)."""

    __slots__ = ("pickle", "buffers", "nbytes")

    def __init__(self, pickle: memoryview, buffers: list[Any], nbytes: int):
        self.pickle = pickle
        self.buffers = buffers
        self.nbytes = nbytes  # the frame's payload length

    def __len__(self) -> int:
        return self.nbytes

    def __repr__(self) -> str:
        return f"<Buffers {len(self.buffers)} of {self.nbytes} bytes>"


#: A received message, as the inbox holds it: a data frame, or one of a values frame's
#: messages, decoded already, in a pair with a number (`decode_values`).
Payload = bytes | bytearray | Buffers | tuple


def kind_of(payload: Payload) -> int:
    """The frame kind of a received payload."""
    return DATA_BUFFERS if isinstance(payload, Buffers) else payload[-1]


_PREFIX_PART, _META_PART, _BUFFER_PART, _TAIL_PART, _DONE = range(5)


class MessageAssembly:
    """The `framing.Assembly` of a channel connection's large frames: a buffers frame
    is split as it arrives into its meta data and pickle, then each buffer in an object
    of its own; any other large frame (a big in-band pickle) is one bytearray."""

    __slots__ = ("_length", "_stage", "_part", "_view", "_filled", "_whole", "_meta", "_sizes", "_kinds", "_buffers")

    def __init__(self, length: int):
        self._length = length
        self._whole: Whole | None = None
        self._meta = bytearray()
        self._sizes: list[int] = []
        self._kinds = b""
        self._buffers: list[Any] = []
        self._stage = _PREFIX_PART
        self._start(bytearray(min(_PREFIX, length)))

    def _start(self, part: Any, view: memoryview | None = None) -> None:
        # What is being filled now: the prefix, the meta data, a buffer or the tail.
        self._part = part
        self._view = memoryview(part) if view is None else view
        self._filled = 0

    def target(self) -> memoryview:
        if self._whole is not None:
            return self._whole.target()
        return self._view[self._filled :]

    def advance(self, count: int) -> None:
        if self._whole is not None:
            self._whole.advance(count)
            return
        if not count:
            return  # (nothing read: the first byte is not known yet)
        self._filled += count
        if self._stage == _PREFIX_PART and self._part[0] != _BUFFERS_MARK[0]:
            # Not a buffers frame: the payload as one bytearray, its start copied over.
            whole = self._whole = Whole(self._length, new_bytearray)
            whole.target()[: self._filled] = self._view[: self._filled]
            whole.advance(self._filled)
            return
        while self._stage != _DONE and self._filled == self._view.nbytes:
            self._next_part()

    def _next_part(self) -> None:
        stage = self._stage
        self._view.release()
        if stage == _PREFIX_PART:
            if len(self._part) < _PREFIX:
                raise FrameError("a buffers frame shorter than its prefix")
            count, pickle_length = _COUNTS.unpack_from(self._part, 1)
            if not count or _PREFIX + 9 * count + pickle_length + 1 > self._length:
                raise FrameError("a buffers frame whose layout does not fit its length")
            self._sizes = [0] * count
            self._meta = bytearray(9 * count + pickle_length)
            self._stage = _META_PART
            self._start(self._meta)
            return
        if stage == _META_PART:
            count = len(self._sizes)
            self._sizes = [_LENGTH.unpack_from(self._meta, 8 * i)[0] for i in range(count)]
            self._kinds = bytes(self._meta[8 * count : 9 * count])
            if _PREFIX + len(self._meta) + sum(self._sizes) + 1 != self._length or max(self._kinds) > _BYTEARRAY:
                raise FrameError("a buffers frame whose layout does not fit its length")
            self._stage = _BUFFER_PART
        elif stage == _TAIL_PART:
            if self._part[0] != _BUFFERS_MARK[0]:
                raise FrameError("a buffers frame with a wrong tail")
            self._stage = _DONE
            return
        index = len(self._buffers)
        if index == len(self._sizes):
            self._stage = _TAIL_PART
            self._start(bytearray(1))
            return
        # The next buffer (an empty one is complete at once: `advance` moves on).
        size = self._sizes[index]
        if self._kinds[index] == _BYTES:
            buffer, view = new_bytes(size)
        else:
            buffer = new_bytearray(size)
            view = memoryview(buffer)
        self._buffers.append(buffer)
        self._start(buffer, view)

    def result(self) -> bytearray | Buffers:
        if self._whole is not None:
            return self._whole.result()
        assert self._stage == _DONE, "the frame is incomplete"
        buffers = [
            bytes(buffer) if type(buffer) is bytearray and kind == _BYTES else buffer
            for buffer, kind in zip(self._buffers, self._kinds, strict=True)
        ]
        return Buffers(memoryview(self._meta)[9 * len(self._sizes) :], buffers, self._length)


def control_frame(kind: int, body: bytes = b"") -> bytes:
    return _HEADER_PACK(len(body) + 1) + body + bytes([kind])


def hello_frame(own: Pid, wanted: Pid | None = None) -> bytes:
    text = own.format() if wanted is None else f"{own.format()} {wanted.format()}"
    return control_frame(HELLO, text.encode("ascii"))


def decode_hello(payload: bytes) -> tuple[Pid, Pid | None]:
    """(sender's pid, the pid it wanted or None); raises ValueError on a malformed hello."""
    parts = payload[:-1].decode("ascii").split(" ")
    if len(parts) == 1:
        return Pid.parse(parts[0]), None
    if len(parts) == 2:
        return Pid.parse(parts[0]), Pid.parse(parts[1])
    raise ValueError("malformed hello")


def goodbye_frame(code: int | None) -> bytes:
    return control_frame(GOODBYE, b"" if code is None else str(int(code)).encode("ascii"))


def decode_goodbye(payload: bytes) -> int | None:
    body = payload[:-1]
    try:
        return int(body) if body else None
    except ValueError:
        return None
