"""Channel-level frames: what travels inside each `framing` frame of a channel connection.

The kind of a frame is its payload's LAST byte. For data that lets the receiver hand the
payload straight to ``pickle.loads``, which ignores bytes past the pickle's STOP opcode,
so neither side slices or copies a message to add or strip a kind byte.

    data           pickle + b"D"
    data, buffers  count u32, pickle length u64, buffer lengths u64 each, buffer kinds u8
                   each, pickle, buffers, b"B"

A buffer's kind says what the receiver builds from its bytes: a writable view that the
pickle's own reconstructor takes (NumPy arrays, a `pickle.PickleBuffer` sent as such), or
the message itself when it is a large ``bytes``, ``bytearray`` or ``memoryview``: those
are wrapped in a PickleBuffer so that the pickler does not copy them in band, and arrive
as ``bytes`` (read-only source) or a ``bytearray`` (writable source).
    hello          b"<from pid> <wanted pid>" (connector) or b"<own pid>" (acceptor), b"H"
    duplicate      b"X"  the acceptor keeps another connection between the same two pids
    goodbye        exit code as ASCII digits (empty: unknown) + b"G"
    close request  b"C"; close ok b"K"; close refused b"N"
"""

from __future__ import annotations

import pickle
import struct
from typing import Any

from deploy_core import Pid, dumps_message

from .framing import frame_header

__all__ = [
    "CLOSE_NO",
    "CLOSE_OK",
    "CLOSE_REQUEST",
    "DATA",
    "DATA_BUFFERS",
    "DUPLICATE",
    "GOODBYE",
    "HELLO",
    "control_frame",
    "decode_goodbye",
    "decode_hello",
    "decode_message",
    "encode_message",
    "goodbye_frame",
    "hello_frame",
]

DATA = ord("D")
DATA_BUFFERS = ord("B")
HELLO = ord("H")
DUPLICATE = ord("X")
GOODBYE = ord("G")
CLOSE_REQUEST = ord("C")
CLOSE_OK = ord("K")
CLOSE_NO = ord("N")

_DATA_TAIL = b"D"
_COUNTS = struct.Struct(">IQ")
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
            meta = b"".join((_COUNTS.pack(len(views), len(data)), *(_LENGTH.pack(size) for size in sizes), kinds))
            length = len(meta) + len(data) + sum(sizes) + 1
            return [frame_header(length), meta, data, *views, b"B"], length + 4
    length = len(data) + 1
    if length >= _SPLIT_MIN:
        return [frame_header(length), data, _DATA_TAIL], length + 4
    return b"".join((_HEADER_PACK(length), data, _DATA_TAIL)), length + 4


def decode_message(payload: bytes | bytearray) -> Any:
    """Unpickle a data frame's payload (either data kind)."""
    if payload[-1] == DATA:
        return pickle.loads(payload)
    view = memoryview(payload)
    count, pickle_length = _COUNTS.unpack_from(view, 0)
    offset = _COUNTS.size
    sizes = [_LENGTH.unpack_from(view, offset + 8 * i)[0] for i in range(count)]
    offset += 8 * count
    kinds = view[offset : offset + count]
    offset += count
    data = view[offset : offset + pickle_length]
    offset += pickle_length
    # The decoder hands over large frames as bytearrays: buffers built on them are
    # writable, as the sender's were (a bytes payload would give read-only ones).
    writable = type(payload) is bytearray
    buffers: list[Any] = []
    for size, kind in zip(sizes, kinds, strict=True):
        buffer = view[offset : offset + size]
        if kind == _BYTES:
            buffers.append(bytes(buffer))
        elif kind == _BYTEARRAY or not writable:
            buffers.append(bytearray(buffer))
        else:
            buffers.append(buffer)
        offset += size
    return pickle.loads(data, buffers=buffers)


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
