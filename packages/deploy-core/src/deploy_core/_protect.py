"""Frame protection after the handshake: a keyed MAC and a sequence number on every record.

Once the handshake is done both sides hold its 32-byte per-connection ``key``. A
protected connection carries its byte stream in records; each direction has its own
key and its own counter, starting at 0::

    record  = length (4 bytes, big-endian, 1..MAX_RECORD), data, tag (16 bytes)
    tag     = HMAC-SHA256(direction key, seq (8 bytes) | length | data), first 16 bytes
    direction key = HMAC-SHA256(handshake key, "initiator->acceptor" or the reverse)

(HMAC-SHA256 rather than keyed BLAKE2b: with the SHA extensions of current x86 and ARM
CPUs, OpenSSL's SHA-256 hashes large records about twice as fast.)

The counter is never sent: a receiver expects record ``n`` next, so a record that was
changed, injected, dropped, reordered, replayed from earlier in the connection, taken
from another connection (another key) or reflected back to its sender (the other
direction's key) fails its tag. What a record carries (frames, parts of frames) is the
caller's business: this layer protects the stream, and the framing on top is unchanged.

`Sealer` and `Opener` are sans-IO; `ProtectedSocket` wraps a connected socket with them
for code written against a plain socket (``send``, ``sendmsg``, ``sendall``, ``recv``).

OS facts relied on: ``send``/``sendmsg`` on a non-blocking socket may take fewer bytes
than offered, or raise BlockingIOError; ``recv`` returning ``b""`` is the end of the
stream. A record is sealed once (its counter used), so its unsent rest is kept and sent
before anything else.
"""

from __future__ import annotations

import hmac
import logging
import socket
import struct
import threading
from collections.abc import Sequence

from ._errors import FrameError

__all__ = ["MAX_RECORD", "Opener", "ProtectedSocket", "Sealer", "TamperedError"]

log = logging.getLogger("deploy")

MAX_RECORD = 256 * 1024
TAG = 16
# What one send call seals at most: its unsent rest is copied, so keep it bounded.
_MAX_BATCH = 4 * MAX_RECORD
_JOIN_BELOW = 64 * 1024
_LENGTH = struct.Struct(">I")
_SEQ = struct.Struct(">Q")
_LABELS = (b"initiator->acceptor", b"acceptor->initiator")


def _direction_key(key: bytes, label: bytes) -> bytes:
    return hmac.digest(key, label, "sha256")


def _keys(key: bytes, initiator: bool) -> tuple[bytes, bytes]:
    """(sending key, receiving key) for this side."""
    if not isinstance(key, (bytes, bytearray)) or len(key) < 16:
        raise ValueError("frame protection needs the handshake's key (at least 16 bytes)")
    forward, backward = (_direction_key(bytes(key), label) for label in _LABELS)
    return (forward, backward) if initiator else (backward, forward)


class TamperedError(ConnectionError):
    """A protected connection received a record that failed its check."""


class Sealer:
    """Turns plain bytes into records, for one direction of one connection."""

    def __init__(self, key: bytes, *, initiator: bool):
        self._mac = hmac.new(_keys(key, initiator)[0], digestmod="sha256")  # copied per record
        self._seq = 0

    def seal(self, chunks: Sequence[bytes | bytearray | memoryview]) -> list:
        """The buffers of the records carrying ``chunks`` (a list of byte buffers), in order."""
        out: list = []
        record: list = []
        size = 0
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            while view.nbytes:
                take = view[: MAX_RECORD - size]
                record.append(take)
                size += take.nbytes
                view = view[take.nbytes :]
                if size == MAX_RECORD:
                    out += self._record(record, size)
                    record, size = [], 0
        if size:
            out += self._record(record, size)
        return out

    def _record(self, parts: list, size: int) -> list:
        header = _LENGTH.pack(size)
        mac = self._mac.copy()
        mac.update(_SEQ.pack(self._seq))
        mac.update(header)
        for part in parts:
            mac.update(part)
        self._seq += 1
        return [header, *parts, mac.digest()[:TAG]]


class Opener:
    """Checks records and returns the plain bytes they carry, for one direction."""

    def __init__(self, key: bytes, *, initiator: bool):
        self._mac = hmac.new(_keys(key, initiator)[1], digestmod="sha256")  # copied per record
        self._seq = 0
        self._buf = bytearray()

    def buffered(self) -> int:
        """Bytes of an incomplete record held back."""
        return len(self._buf)

    def open(self, data: bytes | bytearray | memoryview) -> bytes:
        """The plain bytes of every record ``data`` completes (maybe ``b""``).

        Raises `FrameError` for a record that fails its tag or announces a bad length;
        the connection must then be dropped (the counter no longer matches the peer's).
        """
        if self._buf:
            self._buf += data
            buf: bytes | bytearray | memoryview = self._buf
        else:
            buf = data  # the common case: parse the caller's bytes, copy only what is left
        view = memoryview(buf).cast("B")
        pieces: list = []
        pos = 0
        try:
            while view.nbytes - pos >= _LENGTH.size:
                (size,) = _LENGTH.unpack_from(view, pos)
                if not 0 < size <= MAX_RECORD:
                    raise FrameError(f"a protected record announces {size} bytes (at most {MAX_RECORD})")
                end = pos + _LENGTH.size + size + TAG
                if end > view.nbytes:
                    break
                mac = self._mac.copy()
                mac.update(_SEQ.pack(self._seq))
                mac.update(view[pos : end - TAG])
                if not hmac.compare_digest(mac.digest()[:TAG], view[end - TAG : end]):
                    raise FrameError("a protected record failed its check (changed, injected or replayed)")
                pieces.append(view[pos + _LENGTH.size : end - TAG])
                self._seq += 1
                pos = end
            plain = pieces[0].tobytes() if len(pieces) == 1 else b"".join(pieces)
            rest = view[pos:].tobytes() if pos < view.nbytes else b""
        finally:
            for piece in pieces:
                piece.release()
            view.release()
        self._buf = bytearray(rest)
        return plain


class ProtectedSocket:
    """A connected socket whose stream is protected both ways (see the module comment).

    ``send``/``sendmsg`` return how many of the offered plain bytes were taken: all of a
    batch is sealed at once and what the kernel did not take yet waits in `pending_out`,
    which goes first on the next call (BlockingIOError while it cannot). Call `flush`
    when the socket turns writable. ``recv`` returns checked plain bytes; BlockingIOError
    while only part of a record has arrived; `TamperedError` (logged once) for a record
    that fails its check. Everything else is the wrapped socket's.
    """

    def __init__(self, sock: socket.socket, key: bytes, *, initiator: bool, unsent: bytes = b"", peer: str = ""):
        self.raw = sock
        self._sealer = Sealer(key, initiator=initiator)
        self._opener = Opener(key, initiator=initiator)
        self._out = bytearray(unsent)  # sealed (or pre-handshake) bytes the kernel has not taken
        self._lock = threading.Lock()
        self._peer = peer
        self._failed = False

    def __getattr__(self, name: str):
        return getattr(self.raw, name)

    def fileno(self) -> int:
        return self.raw.fileno()

    def close(self) -> None:
        self.raw.close()

    def pending_out(self) -> int:
        """Sealed bytes still waiting for the kernel."""
        return len(self._out)

    def flush(self) -> bool:
        """Send what waits; True once nothing does. Raises like ``send`` (not BlockingIOError)."""
        with self._lock:
            return self._flush()

    def _flush(self) -> bool:
        while self._out:
            try:
                sent = self.raw.send(self._out)
            except (BlockingIOError, InterruptedError):
                return False
            del self._out[:sent]
        return True

    def send(self, data: bytes | bytearray | memoryview, flags: int = 0) -> int:
        return self.sendmsg([data])

    def sendmsg(self, buffers: Sequence, *_ignored) -> int:
        with self._lock:
            if not self._flush():
                raise BlockingIOError("the protected socket's sealed output is still waiting")
            taken: list = []
            total = 0
            for buffer in buffers:
                view = memoryview(buffer).cast("B")[: _MAX_BATCH - total]
                if view.nbytes:
                    taken.append(view)
                    total += view.nbytes
                if total == _MAX_BATCH:
                    break
            if not total:
                return 0
            records = self._sealer.seal(taken)
            size = sum(memoryview(buffer).nbytes for buffer in records)
            if size <= _JOIN_BELOW:
                records = [b"".join(records)]  # one small buffer: cheaper than a gather
            try:
                sent = self.raw.send(records[0]) if len(records) == 1 else self.raw.sendmsg(records)
            except (BlockingIOError, InterruptedError):
                sent = 0
            if sent < size:
                for buffer in records:  # keep only what the kernel did not take
                    part = memoryview(buffer).cast("B")
                    if sent >= part.nbytes:
                        sent -= part.nbytes
                        continue
                    self._out += part[sent:]
                    sent = 0
                if self.raw.gettimeout() != 0.0:  # a blocking socket: nothing may stay behind
                    self.raw.sendall(self._out)
                    self._out.clear()
            return total

    def sendall(self, data: bytes | bytearray | memoryview, flags: int = 0) -> None:
        """Blocking sockets only: seal and send everything."""
        view = memoryview(data).cast("B")
        while view.nbytes:
            view = view[self.sendmsg([view]) :]
            with self._lock:
                if self._out:
                    self.raw.sendall(self._out)
                    self._out.clear()

    def recv(self, size: int, flags: int = 0) -> bytes:
        """Checked plain bytes: as many as the records completed so far carry (which may
        exceed ``size`` by up to a record)."""
        while True:
            data = self.raw.recv(size)
            if not data:
                return b""  # an incomplete record at the end is a cut connection: just the end
            try:
                plain = self._opener.open(data)
            except FrameError as error:
                if not self._failed:
                    self._failed = True
                    log.warning("deploy: dropped the protected connection with %s: %s", self._peer or "a peer", error)
                raise TamperedError(str(error)) from None
            if plain:
                return plain
            if self.raw.gettimeout() == 0.0:
                raise BlockingIOError("only part of a protected record has arrived")
