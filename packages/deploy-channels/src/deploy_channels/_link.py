"""Per-peer buffers shared by user threads and the loop thread (the negotiation is `_peers`).

A `Link` is everything this process holds for one remote pid: the outgoing buffer, the
inbox of messages not yet received, the connection currently carrying both directions
and how the peer died. User threads append to the out-buffer and pop the inbox; the
loop thread flushes the first and fills the second. Channels come and go over a link,
so order holds across closing and re-creating them.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from deploy_core import ChannelClosed, DeployError, PeerExited, PeerLost, Pid, SerializationError

from ._connection import RETRY, SETUP_TIMEOUT
from ._interrupts import Interrupted
from ._loop import EventLoop
from ._waiters import FdWaiter, Waiter, remaining
from ._wire import Payload, Values, small_frame, values_frame
from .framing import HEADER_SIZE

if TYPE_CHECKING:
    from ._connection import Connection
    from ._interrupts import DeferredInterrupt

__all__ = ["INHERITED", "ChannelEnd", "Link", "LinkOwner"]

INHERITED = "this endpoint belongs to the parent process (it was inherited through fork)"

# Small frames are gathered into one bytearray up to this size, so the loop writes many
# messages with a single sendmsg iovec.
_TAIL_MAX = 256 * 1024
_IOV_MAX = 512
# A send that follows the previous direct write this closely is part of a stream: queue it
# and let the loop write the batch, rather than paying a syscall per message.
_STREAMING_GAP = 20e-6
_perf_counter = time.perf_counter
# A send holding for its own buffers gives up waiting (and copies them) after the kernel
# has taken nothing for this long: the peer is not reading.
_HOLD_STALL = 1.0
# The inbox's byte accounting is kept per read of at least this many bytes.
_BATCH_GRAIN = 64 * 1024
# Values queued as one values frame (`push_value`) up to this bound of its size: a small
# frame (under framing's large-frame threshold), written and read whole.
_VALUES_MAX = 32 * 1024


class LinkOwner(Protocol):
    """What a link asks of the per-peer state that keeps it (`_peers.Peers`)."""

    pid: Pid  # this process's
    loop: EventLoop
    high_water: int
    max_frame_size: int

    def peer_status(self, pid: Pid) -> PeerExited | PeerLost | None:
        """User thread: the runtime's word on a peer gone without an exit code, if any."""

    def resume_reading(self, link: Link) -> None:
        """Loop thread: the inbox has drained enough to read from the peer again."""


class ChannelEnd(Protocol):
    """The channel (a `_channel.Sender` or `Receiver`) a user thread sends or receives for."""

    @property
    def _link(self) -> Link | None: ...  # None once the channel is closed

    def _closed_error(self) -> Exception: ...


class Link:
    """Everything this process holds for one peer (see the module comment)."""

    def __init__(self, owner: LinkOwner, pid: Pid):
        self.owner = owner
        self.pid = pid
        self.loop = owner.loop
        self.high_water = owner.high_water
        self.max_frame = owner.max_frame_size + HEADER_SIZE  # a whole frame, header included
        # Outgoing; guarded by out_lock. `wconn` is the connection writers may use now
        # (open and not closing); the loop sets it under the lock.
        self.out_lock = threading.Lock()
        self.out: deque = deque()
        self.out_bytes = 0
        self.written = 0  # bytes the loop ever wrote from `out` (see `push`)
        self.values_queued = 0  # `Values` in `out`, not yet pickled into a frame (`_seal`)
        self.values_max = min(_VALUES_MAX, owner.max_frame_size // 2)
        self.holding = 0  # user threads waiting for the kernel to take their buffers
        self.flush_scheduled = False
        self.wconn: Connection[Link] | None = None
        self.last_direct = 0.0
        self.shut = False  # the endpoint is closing: no new sends
        self.goodbye_queued = False  # the endpoint's goodbye is in `out` (loop thread)
        # Loop-thread connection state.
        self.conn: Connection[Link] | None = None  # established (possibly closing)
        self.pending: Connection[Link] | None = None  # our outgoing attempt
        self.closing = False  # a close request or reply is outstanding
        self.idle_token = 0
        # Set-up that failed with the peer possibly alive (see Endpoint._setup_failed):
        # when the first attempt of this series failed, how many failed, whether the next
        # one is scheduled, and the set-up timeout the next attempt gets.
        self.setup_since: float | None = None
        self.setup_failures = 0
        self.setup_retry = False
        self.setup_timeout = SETUP_TIMEOUT
        # Incoming: the loop appends, user threads popleft (both atomic on a deque).
        self.inbox: deque = deque()
        self.in_lock = threading.Lock()
        self.total_in = 0  # messages ever appended (loop only)
        self.total_in_bytes = 0
        self.in_hand = 0  # bytes of large messages taken by receivers, not decoded yet (`take`)
        # (total_in, total_in_bytes) at the end of each grain of reads; `base` is the mark
        # before the first grain still (partly) in the inbox. Loop thread only.
        self.batches: deque = deque()
        self.base = (0, 0)
        self.paused = False
        self.resume_at = 0  # resume reading once len(inbox) <= this
        self.resume_requested = False
        self.rx_watchers: set[Any] = set()
        self.tx_watchers: set[Any] = set()
        # (code, lost, reason) once the peer is gone; checked after the inbox is empty.
        self.death: tuple[int | None, bool, str | None] | None = None
        self._death_error: Exception | None = None  # what death_error() settled on
        self.has_sender = False
        self.has_receiver = False

    def __repr__(self) -> str:
        return f"<Link to {self.pid}>"

    # --- errors -------------------------------------------------------------------------

    def death_error(self) -> Exception:
        """User thread: the error for a peer that is gone. Where the peer left no exit code,
        the endpoint's ``peer_status`` (the runtime's record of exits) may know more."""
        if self._death_error is None:
            assert self.death is not None, "the link's peer is not gone"
            code, lost, reason = self.death
            known = self.owner.peer_status(self.pid) if code is None else None
            if known is not None:
                self._death_error = known
            else:
                self._death_error = PeerLost(self.pid, reason=reason) if lost else PeerExited(self.pid, code)
        return copy.copy(self._death_error)  # a fresh one: each raise has its own traceback

    def closed_error(self) -> DeployError:
        if self.loop.forked:
            return DeployError(INHERITED)
        return ChannelClosed(f"the endpoint {self.owner.pid} is closed")

    # --- user threads: sending ------------------------------------------------------------

    def tx_ready(self) -> bool:
        return self.out_bytes < self.high_water or self.death is not None or self.shut

    def push(
        self, frame: bytes | list, nbytes: int, deadline: float | None, channel: ChannelEnd, *, hold: bool = True
    ) -> int | None:
        """Queue (or write) one framed message of ``channel``; blocks while the buffer is
        over high water (raising `ChannelClosed` if the channel is closed meanwhile).

        A message's value is taken when its send returns, and the caller may refill its
        own buffers at once (a bytearray, a NumPy array: anything but bytes). Rather than
        copy what the kernel has not taken of those, the send waits until it has
        (`hold_until`), as multiprocessing's does; a wait cut short (the deadline, an
        exception) copies what is left instead. With ``hold`` False that wait is left to
        the caller: the mark to give `taken` is returned, or None if there is none."""
        if nbytes > self.max_frame:
            # The peer would drop the connection on reading its header (and lose what follows).
            raise SerializationError(
                f"cannot send a message of {nbytes - HEADER_SIZE} bytes to {self.pid}: it exceeds "
                f"the maximum frame size of {self.max_frame - HEADER_SIZE} bytes (Endpoint max_frame_size)"
            )
        self._admit(deadline, channel)
        with self.out_lock:
            self._check_open(channel)
            out = self.out
            if out:
                # Streaming: a flush is already due, so just append.
                tail = out[-1]
                if type(frame) is bytes and type(tail) is bytearray and len(tail) < _TAIL_MAX:
                    tail += frame
                    self.out_bytes += nbytes
                    return None
            else:
                conn = self.wconn
                if conn is not None and not self.flush_scheduled and not conn.pre_out:
                    now = time.perf_counter()
                    direct = now - self.last_direct > _STREAMING_GAP
                    self.last_direct = now
                    if direct:
                        sent = conn.write_now(frame)
                        if sent == nbytes:
                            return None
                        frame = _rest(frame, sent)
                        nbytes -= sent
            end = None
            if isinstance(frame, bytes):
                out.append(bytearray(frame) if nbytes < _TAIL_MAX else frame)
            else:
                out.extend(frame)
                if any(map(_borrowed, frame)):
                    if self.values_queued:
                        self._seal()  # (so that out_bytes counts bytes, not bounds)
                    end = self.written + self.out_bytes + nbytes
                    self.holding += 1  # (until the caller's wait ends: `hold_until`, asend)
            self.out_bytes += nbytes
            flush = self.wconn is not None and not self.flush_scheduled
            if flush:
                self.flush_scheduled = True
        try:
            if flush:
                self.loop.call_soon(self.flush)
        except BaseException:  # (a KeyboardInterrupt): the hold must not outlive the call
            if end is not None:
                self.release_hold(end)
            raise
        if end is not None and hold:
            self.hold_until(end, deadline)
            return None
        return end

    def push_value(self, value: object, size: int, deadline: float | None, channel: ChannelEnd) -> None:
        """Send a small immutable value (``size`` is its `_wire.batch_size`): while a
        flush is due anyway, it joins the `Values` at the tail of the queue, which the
        loop pickles as one frame when it writes them (a stream of small messages costs
        the sender an append each, and the receiver no unpickling of its own); else it
        goes as a frame of its own, as `push` sends it."""
        if self.out_bytes < self.high_water:
            flush = False
            with self.out_lock:  # (the two common cases first, checked again under the lock)
                out = self.out
                if channel._link is not None and not self.shut and self.death is None:
                    if out:
                        # A stream: the value joins the values queued last.
                        tail = out[-1]
                        if type(tail) is Values and tail.size + size <= self.values_max:
                            tail.append(value)
                            tail.size += size
                            self.out_bytes += size
                            return
                    elif not self.flush_scheduled and size + Values.OVERHEAD <= self.values_max:
                        # Nothing queued: written at once, as `push` would, unless the
                        # sends before it came just as fast (then it waits to batch).
                        conn = self.wconn
                        now = _perf_counter()
                        if conn is not None and not conn.pre_out and now - self.last_direct > _STREAMING_GAP:
                            self.last_direct = now
                            frame = small_frame(value)
                            sent = conn.write_now(frame)
                            if sent == len(frame):
                                return
                            out.append(bytearray(frame[sent:]))  # (the loop writes the rest)
                            self.out_bytes += len(frame) - sent
                            self.flush_scheduled = True
                            flush = True
            if flush:
                self.loop.call_soon(self.flush)
                return
        self._push_value(value, size, deadline, channel)

    def _push_value(self, value: object, size: int, deadline: float | None, channel: ChannelEnd) -> None:
        self._admit(deadline, channel)
        with self.out_lock:
            self._check_open(channel)
            out = self.out
            conn = self.wconn
            if size + Values.OVERHEAD > self.values_max:
                batch = None  # (a small max_frame_size: `push` checks the frame against it)
            else:
                # (`push_value` wrote it at once unless it is part of a stream, or waited.)
                batch = True
                if not out:
                    self.last_direct = _perf_counter()  # (sends as close as this one keep batching)
            if batch:
                tail = out[-1] if out else None
                if type(tail) is Values and tail.size + size <= self.values_max:
                    tail.append(value)
                    tail.size += size
                    self.out_bytes += size
                    return
                values = Values(value, size)
                out.append(values)
                self.values_queued += 1
                self.out_bytes += values.size
            flush = batch is not None and conn is not None and not self.flush_scheduled
            if flush:
                self.flush_scheduled = True
        if batch is None:
            frame = small_frame(value)
            self.push(frame, len(frame), deadline, channel)
        elif flush:
            self.loop.call_soon(self.flush)

    def _admit(self, deadline: float | None, channel: ChannelEnd) -> None:
        """Before a message is queued: wait out back-pressure; raise if the peer is gone."""
        if self.out_bytes >= self.high_water:
            self._wait_tx(deadline, channel)
        if self.death is not None and not self.shut and channel._link is not None:
            # Outside the lock: death_error may ask the runtime how the peer ended.
            raise self.death_error()

    def _check_open(self, channel: ChannelEnd) -> None:
        """Under out_lock: raise unless ``channel`` may still queue a message here."""
        if channel._link is None:
            raise channel._closed_error()
        if self.shut:
            raise self.closed_error()
        if self.death is not None:
            raise self.death_error()

    def _seal(self) -> None:
        """Under out_lock: pickle every `Values` queued into its frame, and count its bytes
        in `out_bytes` instead of its bound."""
        out = self.out
        for index, chunk in enumerate(out):
            if type(chunk) is Values:
                frame = values_frame(chunk)
                out[index] = frame
                self.out_bytes += len(frame) - chunk.size
        self.values_queued = 0

    def taken(self, end: int) -> bool:
        """Whether the kernel has every queued byte up to ``end`` (see `push`), or they were
        dropped (the peer is gone, or the endpoint gave up at close)."""
        return self.written >= end or not self.out

    def hold_until(self, end: int, deadline: float | None) -> None:
        """Wait until `taken` (``end``), or the kernel takes nothing for `_HOLD_STALL`, or
        the deadline; then `release_hold`."""
        waiter = Waiter()
        self.tx_watchers.add(waiter)
        try:
            written, progress_at = self.written, time.monotonic()
            while not self.taken(end):
                # A peer that stops reading must not stall the sender for good (it may be
                # waiting for this thread to receive): after _HOLD_STALL without progress
                # the rest is copied and queued, as back-pressure allows.
                now = time.monotonic()
                if self.written != written:
                    written, progress_at = self.written, now
                left = progress_at + _HOLD_STALL - now
                if deadline is not None:
                    left = min(left, deadline - now)
                if left <= 0:
                    break
                waiter.wait(left)
        finally:
            self.tx_watchers.discard(waiter)
            self.release_hold(end)

    def release_hold(self, end: int) -> None:
        """A sender's wait for its buffers ends: if the kernel has not taken them all (the
        deadline passed, an exception), what is queued of them is copied, and the message
        stays what it was."""
        with self.out_lock:
            self.holding -= 1
            if self.taken(end):
                return
            out = self.out
            for index, chunk in enumerate(out):
                if _borrowed(chunk):
                    out[index] = bytes(chunk)

    def push_control(self, frame: bytes) -> None:
        """Loop thread: queue a control frame behind any data and flush."""
        with self.out_lock:
            self.out.append(frame)
            self.out_bytes += len(frame)
        self.flush()

    def _wait_tx(self, deadline: float | None, channel: ChannelEnd) -> None:
        waiter = Waiter()
        self.tx_watchers.add(waiter)
        try:
            while not self.tx_ready() and channel._link is not None:
                waiter.wait(remaining(deadline))
        finally:
            self.tx_watchers.discard(waiter)

    # --- loop thread: writing -------------------------------------------------------------

    def flush(self) -> None:
        """Loop thread: write what is queued, until it is all out or the kernel's buffer is
        full. The batch is written without ``out_lock``, so that user threads go on
        queueing (behind it, in a fresh deque) during the syscall rather than wait for it;
        `flush_scheduled` stays set meanwhile, so none writes directly. Not while a user
        thread holds for its own buffers (`holding`): those may be copied at any moment
        (`release_hold`), which must not race a write of them."""
        error = None
        batch = None
        with self.out_lock:
            conn = self.wconn
            out = self.out
            if self.values_queued and conn is not None:
                self._seal()
            if conn is None or not out:
                self.flush_scheduled = False
                more = False
            elif conn.pre_out:
                more = True  # a control frame goes first; the next write event flushes
            elif self.holding:
                sent, error = _write(conn.sock, out)
                self.out_bytes -= sent
                self.written += sent
                more = self.flush_scheduled = bool(out)
            else:
                # (Set here too: a flush may start with it unset, e.g. for what was queued
                # before the connection existed; a direct write now would interleave.)
                self.flush_scheduled = True
                batch, self.out = out, deque()
        if batch is not None:
            assert conn is not None
            # (wconn changes only in this thread, under the lock: it still is conn.)
            sent, error = _write(conn.sock, batch)
            with self.out_lock:
                self.out_bytes -= sent
                self.written += sent
                if batch:  # what the kernel did not take goes before what was queued meanwhile
                    batch.extend(self.out)
                    self.out = batch
                more = self.flush_scheduled = bool(self.out)
        if conn is not None:
            conn.want_write(more)
            if error is not None:
                conn.fail(error)
        if self.tx_watchers and (self.out_bytes < self.high_water or self.holding):
            self.wake_tx()

    def discard_output(self) -> None:
        with self.out_lock:
            self.out.clear()
            self.out_bytes = 0
            self.values_queued = 0
            self.flush_scheduled = False

    # --- user threads: receiving ------------------------------------------------------------

    def rx_ready(self) -> bool:
        if self.inbox or self.death is not None or self.shut:
            return True
        self._unpark()  # (the caller waits for the loop to deliver)
        return False

    def _unpark(self) -> None:
        conn = self.conn
        if conn is not None and conn.parked:
            conn.unpark()

    def take(
        self,
        deadline: float | None,
        channel: ChannelEnd,
        deferred: DeferredInterrupt | None = None,
        waiter: FdWaiter | None = None,
    ) -> Payload:
        """The next message's payload for ``channel``; blocks until one arrives, the peer
        dies, the deadline passes or the channel is closed (`ChannelClosed`). The caller
        calls `done_with` once it has decoded the payload. (``waiter``: this thread's.)"""
        inbox = self.inbox
        try:
            # (Checked first: raising IndexError on every blocking recv costs a microsecond.)
            payload = inbox.popleft() if inbox else self._wait_rx(deadline, channel, deferred, waiter)
        except IndexError:  # another thread took it
            payload = self._wait_rx(deadline, channel, deferred, waiter)
        size = len(payload)
        if size >= _BATCH_GRAIN:
            # Out of the inbox but not decoded yet: back-pressure counts it until
            # `done_with` (a large message in hand and the next one arriving meanwhile
            # would be two in memory at once).
            with self.in_lock:
                self.in_hand += size
        return payload

    def done_with(self, payload: Payload) -> None:
        """A payload `take` returned is decoded (or failed to): reading may resume."""
        size = len(payload)
        if size >= _BATCH_GRAIN:
            with self.in_lock:
                self.in_hand -= size
        if self.paused:
            self.resume_if_due()

    def resume_if_due(self) -> None:
        """A user thread took a message: ask the loop to read again once few are left."""
        if self.paused and len(self.inbox) <= self.resume_at and not self.resume_requested:
            self.resume_requested = True
            try:
                self.loop.call_soon(self.owner.resume_reading, self)
            except BaseException:
                self.resume_requested = False  # (a KeyboardInterrupt) the next take asks again
                raise

    def discard(self, payload: Payload) -> None:
        """Drop a message that could not be received (it failed to decode)."""
        try:
            self.inbox.remove(payload)
        except ValueError:
            pass

    def put_back(self, payload: Payload, *, direct: bool) -> None:
        """Return a taken message to the front of the inbox (its recv was interrupted);
        ``direct`` if it was read off the socket and never counted in."""
        self.inbox.appendleft(payload)  # first: a KeyboardInterrupt after it loses nothing
        if direct:
            with self.in_lock:
                self.total_in += 1
                self.total_in_bytes += len(payload)
        self.wake_rx()

    def take_nowait(self) -> Payload | None:
        try:
            payload = self.inbox.popleft()
        except IndexError:
            if self.shut:
                raise self.closed_error() from None
            if self.death is not None:
                raise self.death_error() from None
            self._unpark()  # (the caller waits for the loop to deliver, or polls)
            return None
        if self.paused and len(self.inbox) <= self.resume_at and not self.resume_requested:
            self.resume_requested = True
            self.loop.call_soon(self.owner.resume_reading, self)
        return payload

    def _wait_rx(
        self, deadline: float | None, channel: ChannelEnd, deferred: DeferredInterrupt | None, waiter: FdWaiter | None
    ) -> Payload:
        if waiter is None:
            waiter = FdWaiter.for_this_thread()
        self.rx_watchers.add(waiter)
        try:
            while True:
                if channel._link is None:
                    raise channel._closed_error()
                if deferred is not None and deferred.pending is not None:
                    raise Interrupted
                conn = self.conn
                if conn is not None and not self.inbox:
                    # Read the socket ourselves rather than wait for the loop to hand us
                    # the message (see _connection's module comment).
                    payload = conn.read_direct(self, deadline, waiter)
                    if payload is not None and payload is not RETRY:
                        if deferred is not None:
                            deferred.direct = True
                        return payload  # type: ignore[return-value]  # (read_direct: a Payload)
                    if payload is not None:  # woken: look again
                        if channel._link is None:
                            raise channel._closed_error()
                        if deferred is not None and deferred.pending is not None:
                            raise Interrupted
                        payload = self.take_nowait()
                        if payload is not None:
                            return payload
                        remaining(deadline)
                        continue
                payload = self.take_nowait()
                if payload is not None:
                    return payload
                waiter.wait(remaining(deadline))
        finally:
            self.rx_watchers.discard(waiter)

    # --- loop thread: receiving -------------------------------------------------------------

    def deliver(self, payloads: list, nbytes: int) -> None:
        self._account(payloads, nbytes)
        if self.rx_watchers:
            self.loop.deferred_wakes.append(self.wake_rx)

    def deliver_direct(self, payloads: list, nbytes: int, reader: FdWaiter) -> None:
        """A user thread that holds the read side queues what it read beyond its message."""
        self._account(payloads, nbytes)
        for waiter in tuple(self.rx_watchers):
            if waiter is not reader:
                waiter.wake()

    def _account(self, payloads: list, nbytes: int) -> None:
        # Whoever holds the connection's read side delivers; in_lock orders that against
        # the loop's back-pressure bookkeeping below.
        with self.in_lock:
            self.inbox.extend(payloads)
            self.total_in += len(payloads)
            self.total_in_bytes += nbytes
            batches = self.batches
            previous = batches[-2] if len(batches) > 1 else self.base
            if batches and batches[-1][1] - previous[1] < _BATCH_GRAIN:
                batches[-1] = (self.total_in, self.total_in_bytes)
            else:
                batches.append((self.total_in, self.total_in_bytes))

    def buffered_bytes(self) -> int:
        """Bytes in the inbox, over-estimated by at most one grain (loop thread)."""
        with self.in_lock:
            consumed = self.total_in - len(self.inbox)
            batches = self.batches
            while batches and batches[0][0] <= consumed:
                self.base = batches.popleft()
            return self.total_in_bytes - self.base[1]

    def resume_threshold(self, low_water: int) -> int:
        """How many messages may still be in the inbox when reading resumes (loop thread)."""
        allowed = 0
        with self.in_lock:
            for count, nbytes in reversed((self.base, *self.batches)):
                if self.total_in_bytes - nbytes > low_water:
                    break
                allowed = self.total_in - count
        return allowed

    def wake_rx(self) -> None:
        for waiter in tuple(self.rx_watchers):
            waiter.wake()

    def wake_tx(self) -> None:
        for waiter in tuple(self.tx_watchers):
            waiter.wake()

    def wake_all(self) -> None:
        self.wake_rx()
        self.wake_tx()


def _write(sock: Any, out: deque) -> tuple[int, OSError | None]:
    """Write from the front of ``out`` until it is empty or the kernel takes no more,
    removing what was written; returns (bytes written, the error that stopped it)."""
    total = 0
    while out:
        chunks = list(out) if len(out) <= _IOV_MAX else [out[i] for i in range(_IOV_MAX)]
        try:
            sent = sock.sendmsg(chunks) if len(chunks) > 1 else sock.send(chunks[0])
        except (BlockingIOError, InterruptedError):
            break
        except OSError as error:
            return total, error
        total += sent
        while sent:
            head = out[0]
            size = len(head) if type(head) is not memoryview else head.nbytes
            if size <= sent:
                out.popleft()
                sent -= size
            else:
                if type(head) is bytearray:
                    del head[:sent]
                else:
                    out[0] = memoryview(head).cast("B")[sent:]
                sent = 0
                break
        else:
            continue
        break  # partial write: the kernel buffer is full
    return total, None


def _borrowed(chunk: object) -> bool:
    # A view of the caller's own buffer that it may change (anything but immutable bytes;
    # the chunks of our own making are bytes or bytearrays of our own, never views).
    return type(chunk) is memoryview and type(chunk.obj) is not bytes


def _rest(frame: bytes | list[Any], sent: int) -> bytes | list[Any]:
    if isinstance(frame, bytes):
        return frame[sent:] if sent else frame
    rest = []
    for chunk in frame:
        size = memoryview(chunk).nbytes
        if sent >= size:
            sent -= size
            continue
        rest.append(memoryview(chunk).cast("B")[sent:] if sent else chunk)
        sent = 0
    return rest
