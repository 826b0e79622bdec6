"""One TCP connection between two endpoints: connect, authenticate, exchange pids, frames.

The handshake names both pids (ours, and the one we connect to), so the pid a hello
frame announces must be the one the peer authenticated as. On a protected connection
(`Endpoint`'s ``protect``) the socket is swapped for a `deploy_core.ProtectedSocket`
right after the handshake: everything after it (the hello included) travels in
records with a MAC and a sequence number; the framing above is unchanged. Its sealed
bytes that the kernel has not taken yet keep WRITE interest and count as unsent.

OS facts relied on:
- A non-blocking ``connect`` returns EINPROGRESS; the socket turns writable once the
  attempt ends and ``SO_ERROR`` then says how. ECONNREFUSED on loopback means nothing
  listens on the port any more: the process that owned it is gone.
- A connection that ends during set-up (EOF, reset, the set-up timeout) says nothing
  sure about the peer: a listener over its cap of connections authenticating closes
  the oldest, and a loaded peer may not get to it in time. The endpoint retries it.
  Only ECONNREFUSED says nothing listens there any more; and an acceptor that is
  another process (the pid's port was reused) answers a hello that wants someone
  else with its own identity (and no valid MAC), so the connector learns that the
  process it wants is gone rather than retrying.
- ``TCP_NODELAY`` is set: frames are batched here, so Nagle would only delay the last one.
- ``recv`` returning ``b""`` is the peer's FIN; ECONNRESET/EPIPE mean the peer closed with
  data unread or died. The kernel closes a dead process's sockets, so either shows up
  at once on loopback.
- ``close()`` drops this process's reference only. ``shutdown()`` would end the
  connection for every process sharing the descriptor (a forked child's parent), so it
  is never called.
- ``TIOCOUTQ`` (ioctl 0x5411 on Linux) on a TCP socket counts the bytes in the send queue
  that the peer's kernel has not acknowledged yet; 0 means all sent data reached it.
- ``epoll_ctl`` may be called from any thread while another waits in ``epoll_wait``;
  with READ dropped from a level-triggered registration the loop is not woken by data,
  but EPOLLHUP/EPOLLERR are always reported.
- A descriptor number is reused as soon as it is closed, so nothing may poll or
  ``epoll_ctl`` a connection's fd once its socket is closed.

Reading: whoever holds ``rlock`` owns the read side (the socket's receive queue and the
frame decoder). Normally that is the loop thread for the length of one read. A user
thread blocked in ``recv`` with nothing buffered takes it instead (`read_direct`): it
drops READ from the loop's registration, waits on the socket itself and returns the
first data frame without waking the loop, which saves a thread hand-off per message.
READ then stays off ("parked") for that thread's next recv, as long as nobody else
waits for the loop to deliver: a thread or task that starts to (`unpark`) and the
loop's check, a `_PARK_TIME` after the last direct read, give it back. Anything else
the reader meets (a control frame, EOF, an error, leftover frames) it leaves for the
loop and restores READ at once. This is the one deviation from "only the loop thread
touches the selector": a user thread changes its own connection's mask, under
``mask_lock``, which also orders it against `close` so a closed fd is never touched.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct
import termios
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from deploy_core import AuthenticationError, FrameError, Handshake, Pid, ProtectedSocket

from . import _wire
from ._loop import READ, WRITE, EventLoop
from .framing import CLOSED, NEED_DATA, FrameDecoder

if TYPE_CHECKING:
    from ._waiters import FdWaiter

__all__ = ["RETRY", "SETUP_TIMEOUT", "Connection", "ConnectionOwner", "Carried", "unsent_bytes"]

log = logging.getLogger("deploy.channels")

_TIOCOUTQ = getattr(termios, "TIOCOUTQ", 0x5411)
# One read takes at most this much, into the thread's buffer (`Connection._receive`).
_RECV_SIZE = 256 * 1024
# The read after a large frame: the next one likely is large too, and most of it is then
# read straight into its own memory rather than copied out of the thread's buffer.
_PEEK_SIZE = 16 * 1024
# One read into a large frame takes at most this much, so that a big message read by the
# loop holds up other connections' messages for no longer than that read.
_RECV_INTO_MAX = 1024 * 1024
# What `_recv` reads into: one buffer per reading thread (the loop thread, or a user thread
# reading directly), not per connection, so that an endpoint with many connections does
# not hold 256 KiB for each. A thread finishes feeding one read before it reads again.
_read_buffers = threading.local()
# Until the peer has proven the secret and said who it is, no frame may be bigger.
_SETUP_MAX_FRAME = 4096
SETUP_TIMEOUT = 10.0
_DATA_KINDS = (_wire.DATA, _wire.DATA_BUFFERS)
_Buffers = _wire.Buffers
#: `read_direct`: the loop should look again (a wake-up, not a message).
RETRY = object()
# A user thread reads frames up to this size itself; bigger ones are left to the loop.
_DIRECT_MAX = 64 * 1024
# The rest of a large frame up to this size is read in one go once it is all in, rather
# than woken for as its segments land (`Connection._wake_when_whole`). On loopback the
# sender's CPU runs the receiving side's TCP processing, waking the reader included, and
# here the sender is the busy side: with one wake-up a message, 1 MiB messages went from
# 0.71x-0.94x to 0.84x-1.09x the throughput of multiprocessing's blocking reader (four
# benchmark runs each). Larger frames are read as they come until then: through a 64 MiB
# frame, a mark of 1 MiB at a time was slower.
_LOWAT_MAX = 1024 * 1024
# How long READ stays parked after a direct read (see `Connection.parked`): the longest
# the loop leaves a connection unread while its direct reader is away.
_PARK_TIME = 0.002


class Carried(Protocol):
    """The per-peer state a connection carries (a `_link.Link`): where its data frames go
    and its output comes from. The connection reads these attributes, never sets them."""

    @property
    def pid(self) -> Pid: ...
    @property
    def setup_timeout(self) -> float: ...
    @property
    def conn(self) -> Connection[Any] | None: ...  # the connection carrying the link now
    @property
    def wconn(self) -> Connection[Any] | None: ...  # the one its writers may use now
    @property
    def inbox(self) -> deque: ...
    @property
    def death(self) -> object: ...  # None while the peer lives
    @property
    def shut(self) -> bool: ...
    @property
    def rx_watchers(self) -> set: ...  # the threads and tasks waiting for a message

    def deliver(self, payloads: list, nbytes: int) -> None:
        """Loop thread: data frames read for the link."""

    def deliver_direct(self, payloads: list, nbytes: int, reader: FdWaiter) -> None:
        """The user thread reading directly queues what it read beyond its message."""

    def flush(self) -> None:
        """Loop thread: the socket is writable; write what is queued."""


L = TypeVar("L", bound=Carried)
L_contra = TypeVar("L_contra", bound=Carried, contravariant=True)


class ConnectionOwner(Protocol[L_contra]):
    """What a connection reports to, in the loop thread (the endpoint's `_peers.Peers`).
    A connection calls these and nothing else of its owner; each is named for the event."""

    pid: Pid  # this process's
    loop: EventLoop
    secret: bytes
    keepalive: float | None
    max_frame_size: int

    def protects(self, host: str) -> bool:
        """Whether a connection with a peer at ``host`` carries protected frames."""

    def connection_failed(
        self,
        conn: Connection,
        error: BaseException,
        *,
        refused: bool = False,
        logged: bool = False,
        final: bool = False,
    ) -> None:
        """The connection ended (it is closed already or closes now)."""

    def connection_closed(self, conn: Connection[Any]) -> None:
        """``conn.close()`` ran: forget it."""

    def hello_answered(self, conn: Connection[Any], pid: Pid) -> None:
        """Our connection's peer said who it is."""

    def hello_received(self, conn: Connection[Any], pid: Pid, wanted: Pid | None) -> None:
        """An accepted connection's peer said who it is and whom it wants."""

    def refused_as_duplicate(self, conn: Connection[Any]) -> None: ...

    def goodbye(self, conn: Connection[Any], code: int | None) -> None: ...

    def close_requested(self, conn: Connection[Any]) -> None: ...

    def close_agreed(self, conn: Connection[Any]) -> None: ...

    def close_refused(self, conn: Connection[Any]) -> None: ...

    def delivered(self, link: L_contra) -> None:
        """Data frames were delivered to ``link`` (back-pressure may pause reading)."""


def unsent_bytes(sock: socket.socket) -> int:
    """Bytes the peer's kernel has not acknowledged yet (0 if the socket is unusable)."""
    try:
        raw = fcntl.ioctl(sock.fileno(), _TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return 0
    return struct.unpack("i", raw)[0]


class Connection(Generic[L]):
    """Loop-thread object; user threads call only `write_now` (under the link's
    out_lock) and `read_direct` (see the module comment)."""

    def __init__(self, owner: ConnectionOwner[L], sock: socket.socket, *, link: L | None, addr: object):
        self.owner = owner
        self.loop = owner.loop
        # A socket.socket, or once sealed a deploy_core.ProtectedSocket that adds flush()
        # and pending_out() (used only when self.protected).
        self.sock: Any = sock
        self.fd = sock.fileno()
        self.addr: Any = addr
        self.link: L | None = link
        self.initiator = link is not None
        self.state = "connecting" if self.initiator else "auth"
        # Bound to both pids: a connection relayed to any other process of the run fails.
        self.handshake = Handshake(
            owner.secret,
            initiator=self.initiator,
            identity=owner.pid.hex,
            wanted=link.pid.hex if link is not None else None,
        )
        self.decoder = FrameDecoder(_SETUP_MAX_FRAME, assemble=_wire.MessageAssembly)
        self.read_size = _RECV_SIZE  # the next read into the thread's buffer (see `_receive`)
        self.lowat = 1  # the socket's SO_RCVLOWAT (0: not available)
        self.setup_in = bytearray()  # the handshake bytes received (at most ~600)
        self.setup_timeout = link.setup_timeout if link is not None else SETUP_TIMEOUT
        self.started = time.monotonic()
        self.replaced = False  # another process answered at the pid's address
        self.pre_out = bytearray()
        self.reading = True  # not paused by back-pressure
        self.writing = False  # output waits for the socket to turn writable
        self.agreed_close = False
        self.protected = False  # self.sock is a ProtectedSocket
        # The read side: see the module comment.
        self.rlock = threading.Lock()
        self.mask_lock = threading.Lock()
        self.user_reading = False
        self.reader: FdWaiter | None = None
        # After a direct read READ stays off ("parked") for the reader's next recv, so that
        # neither read nor wait pays for turning it off and on. The loop takes it back
        # once a `_PARK_TIME` passes without a direct read, or at once when a thread
        # starts waiting for the loop to deliver (`unpark`).
        self.parked = False
        self.park_reads = 0  # direct reads done parked (the loop's check compares them)
        self._park_seen = 0
        self._park_timer = False  # the loop's check is scheduled
        self.held: list | None = None  # frames a user thread read, for the loop
        self.held_error: Exception | None = None
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if owner.keepalive is not None:
                _keepalive(sock, owner.keepalive)
        except OSError:
            pass

    def __repr__(self) -> str:
        peer = self.link.pid if self.link is not None else self.addr
        return f"<Connection {self.state} {'to' if self.initiator else 'from'} {peer}>"

    # --- set-up -------------------------------------------------------------------------

    def start_connect(self) -> None:
        assert self.link is not None, "a connection we make is for a link"
        try:
            # (A host name is resolved here, in the loop thread.)
            err = self.sock.connect_ex(tuple(self.link.pid.addr))
        except OSError as error:  # socket.gaierror: the host does not resolve
            self.owner.connection_failed(
                self, OSError(f"cannot connect to {_address(self.link.pid.addr)}: {error}"), final=True
            )
            return
        if err not in (0, errno.EINPROGRESS, errno.EAGAIN):
            failure = OSError(err, errno.errorcode.get(err, str(err)))
            self.owner.connection_failed(self, failure, refused=err == errno.ECONNREFUSED)
            return
        self.loop.register(self.fd, WRITE, self.on_event)
        self.loop.call_later(self.setup_timeout, self._setup_deadline)

    def start_accept(self) -> None:
        self.loop.register(self.fd, READ, self.on_event)
        self.loop.call_later(self.setup_timeout, self._setup_deadline)

    @property
    def handshake_own(self) -> bytes:
        return self.owner.pid.hex.encode("ascii")

    @property
    def handshake_wanted(self) -> bytes:
        assert self.link is not None
        return self.link.pid.hex.encode("ascii")

    def _setup_deadline(self) -> None:
        if self.state in ("connecting", "auth", "hello"):
            self.owner.connection_failed(self, TimeoutError(f"no complete set-up within {self.setup_timeout:g}s"))

    def _connected(self) -> None:
        err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            refused = err == errno.ECONNREFUSED
            self.owner.connection_failed(self, OSError(err, errno.errorcode.get(err, str(err))), refused=refused)
            return
        self.state = "auth"
        self.pre_out += self.handshake.data_to_send()
        self.loop.modify(self.fd, READ)
        self._write_pre()

    def _authenticate(self) -> None:
        data = self.sock.recv(self.handshake.bytes_needed())
        if not data:
            self._ended_in_setup(EOFError("the peer closed the connection during the handshake"))
            return
        self.setup_in += data
        try:
            self.handshake.receive_data(data)
        except AuthenticationError as error:
            parts = _handshake_identities(self.setup_in)
            if self.initiator:
                assert self.link is not None
                if parts is not None and parts[0] != self.handshake_wanted and _is_pid_hex(parts[0]):
                    # Another process listens at the pid's address: the one we want is gone.
                    log.info("deploy.channels: %s is gone: another process listens at its address", self.link.pid)
                    self.replaced = True
                    self.owner.connection_failed(self, error, refused=True)
                    return
                log.warning("deploy.channels: connection to %s failed authentication: %s", self.link.pid, error)
            else:
                log.warning("deploy.channels: dropped a connection from %s: %s", _address(self.addr), error)
                if parts is not None and parts[1] != self.handshake_own:
                    self._answer_not_me(parts[0])
            self.owner.connection_failed(self, error, logged=True)
            return
        self.pre_out += self.handshake.data_to_send()
        if self.handshake.done:
            if self.owner.protects(self._peer_host()):
                # The proof (initiator) goes out as it is; everything after it is sealed.
                self.sock = ProtectedSocket(
                    self.sock,
                    self.handshake.key,
                    initiator=self.initiator,
                    unsent=bytes(self.pre_out),
                    peer=self.handshake.peer[:7],
                )
                self.protected = True
                self.pre_out.clear()
            self.state = "hello"
            if self.initiator:
                assert self.link is not None
                self.pre_out += _wire.hello_frame(self.owner.pid, self.link.pid)
        self._write_pre()

    def _answer_not_me(self, caller: bytes) -> None:
        # A hello that wants another process: say who listens here, so that its sender
        # learns the process it wants is gone (its port was reused) instead of retrying.
        # The MAC is zeros: this proves nothing and the connector never accepts it.
        own = self.handshake_own
        notice = self.setup_in[:5] + os.urandom(32) + bytes([len(own), len(caller)]) + own + caller + bytes(32)
        try:
            self.sock.send(notice)
        except OSError:
            pass

    def _ended_in_setup(self, error: BaseException) -> None:
        # Hung up before authenticating. For our attempt that proves nothing: the peer's
        # listener may have evicted it (over its cap of strangers) or closed with it in
        # its backlog; the endpoint retries, and a retry refused means the peer is gone.
        # For an accepted one it is a prober or a peer that gave up on a duplicate:
        # routine, so not logged as a warning.
        self.owner.connection_failed(self, error)

    def opened(self) -> None:
        """Set-up is over: frames may now be as large as the endpoint allows."""
        self.state = "open"
        self.decoder.max_frame_size = self.owner.max_frame_size

    # --- events ---------------------------------------------------------------------------

    def on_event(self, mask: int) -> None:
        if self.state == "connecting":
            self._connected()
            return
        if mask & WRITE:
            if self.protected and not self._flush_sealed():
                pass  # sealed bytes still wait for the kernel; WRITE stays on
            elif self.pre_out:
                self._write_pre()
            elif self.link is not None and self.link.wconn is self:
                self.link.flush()
            else:
                self.want_write(False)
        if mask & ~WRITE and self.state != "closed":
            self._readable()

    def _readable(self) -> None:
        if self.state == "auth":
            try:
                self._authenticate()
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as error:
                self._ended_in_setup(error)
            return
        if not self.rlock.acquire(False):
            return  # a user thread is reading; READ is (about to be) off our mask
        try:
            if self.state == "open" and (
                self.held is not None or self.held_error is not None or self.decoder.buffered()
            ):
                self._take_over()
                if self.state == "closed":
                    return
            self._read_once()
        finally:
            self._release_reader()

    def _take_over(self) -> None:
        """Process what a user thread left behind (rlock held)."""
        error, self.held_error = self.held_error, None
        held, self.held = self.held, None
        try:
            frames = held if held is not None else []
            if error is None:
                frames += self.decoder.frames()
            if frames:
                self._dispatch(frames)
            if isinstance(error, FrameError):
                raise error
        except FrameError as exc:
            self._protocol_error(exc)
            return
        if error is not None and self.state != "closed":
            self.owner.connection_failed(self, error)

    def after_user_read(self) -> None:
        """Loop thread: a user thread handed the read side back with work left."""
        if self.state == "closed" or not self.rlock.acquire(False):
            return  # closed, or being read again (whoever reads finds the leftovers)
        try:
            self._take_over()
        finally:
            self._release_reader()

    def _receive(self) -> bool:
        """One read, fed to the decoder (rlock held); False at EOF (then nothing is fed).

        The bytes of a large frame in progress are read straight into its own memory
        (`FrameDecoder.target`: the object the message will be built on). Other reads go
        to this thread's reused buffer, which the decoder copies what it keeps from. A
        fresh ``recv(_RECV_SIZE)`` per read would cost more than the read itself: a
        256 KiB allocation is over glibc's mmap threshold (mmap, page faults, mremap to
        shrink, munmap), about 15 µs per read on a small VM. A protected socket opens
        records into buffers of its own, so it keeps ``recv``.
        """
        decoder = self.decoder
        if self.protected:
            data = self.sock.recv(_RECV_SIZE)
            if data:
                decoder.feed(data)
            return bool(data)
        place = decoder.target()
        if place is not None:
            count = self.sock.recv_into(place, min(place.nbytes, _RECV_INTO_MAX))
            if count:
                decoder.wrote(count)
                if decoder.target() is None:
                    self.read_size = _PEEK_SIZE
            self._wake_when_whole()
            return bool(count)
        buf = getattr(_read_buffers, "buffer", None)
        if buf is None:
            buf = _read_buffers.buffer = memoryview(bytearray(_RECV_SIZE))
        count = self.sock.recv_into(buf, self.read_size)
        if count:
            self.read_size = _RECV_SIZE
            decoder.feed(buf[:count])
            if decoder.missing():
                self._wake_when_whole()
        return bool(count)

    def _wake_when_whole(self) -> None:
        """After a read into or starting a large frame: once the rest of it is at most
        `_LOWAT_MAX`, the socket turns readable (for the loop's epoll and a direct
        reader's poll alike) only when all of the rest is in (``SO_RCVLOWAT``); back to
        any byte once the frame is whole. The low mark never exceeds what the frame still
        lacks: the bytes after it may not come before a reply."""
        missing = self.decoder.missing()
        want = missing if 0 < missing <= _LOWAT_MAX else 1
        if want != self.lowat and self.lowat:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
            except OSError:
                self.lowat = 0  # (not supported: never again; a closed socket fails its read)
                return
            self.lowat = want

    def _read_once(self) -> None:
        decoder = self.decoder
        try:
            data = self._receive()
            if not data:
                decoder.feed(b"")
            while self.state == "hello":
                # One frame at a time: the pid exchange changes how the rest is read.
                frame = decoder.next_frame()
                if frame is NEED_DATA or frame is CLOSED:
                    break
                self._dispatch([frame])
            frames = decoder.frames() if self.state == "open" else []
            if frames:
                self._dispatch(frames)
            if not data and self.state != "closed":
                decoder.frames()  # raises FrameError on EOF mid-frame
                self.owner.connection_failed(self, EOFError("the peer closed the connection"))
        except (BlockingIOError, InterruptedError):
            return
        except FrameError as error:
            self._protocol_error(error)
        except OSError as error:
            self.owner.connection_failed(self, error)

    def _dispatch(self, frames: list) -> None:
        link = self.link
        batch: list = []
        nbytes = 0
        for payload in frames:
            if not payload:
                raise FrameError("empty frame")
            kind = payload[-1] if type(payload) is not _wire.Buffers else _wire.DATA_BUFFERS
            if kind in _DATA_KINDS and self.state == "open":
                batch.append(payload)
                nbytes += len(payload)
                continue
            if kind == _wire.VALUES and self.state == "open":
                batch += _wire.decode_values(payload)
                nbytes += len(payload)
                continue
            if batch:
                assert link is not None, "data frames come only on an open connection, which has a link"
                link.deliver(batch, nbytes)
                batch, nbytes = [], 0
            self._control(kind, payload)
            if self.state == "closed":
                return
            link = self.link
        if batch:
            assert link is not None
            link.deliver(batch, nbytes)
        if link is not None:
            self.owner.delivered(link)

    def _control(self, kind: int, payload: bytes) -> None:
        owner = self.owner
        if self.state == "hello":
            if kind == _wire.HELLO:
                try:
                    own, wanted = _wire.decode_hello(payload)
                except ValueError:
                    raise FrameError("malformed hello") from None
                if own.hex != self.handshake.peer:
                    raise FrameError(
                        f"the hello names pid {own}, but the peer authenticated as {self.handshake.peer[:7]}"
                    )
                if self.initiator:
                    owner.hello_answered(self, own)
                else:
                    owner.hello_received(self, own, wanted)
            elif kind == _wire.DUPLICATE and self.initiator:
                owner.refused_as_duplicate(self)
            else:
                raise FrameError(f"unexpected frame kind {kind} before the pid exchange")
        elif kind == _wire.GOODBYE:
            owner.goodbye(self, _wire.decode_goodbye(payload))
        elif kind == _wire.CLOSE_REQUEST:
            owner.close_requested(self)
        elif kind == _wire.CLOSE_OK:
            owner.close_agreed(self)
        elif kind == _wire.CLOSE_NO:
            owner.close_refused(self)
        else:
            raise FrameError(f"unexpected frame kind {kind}")

    def _protocol_error(self, error: Exception) -> None:
        peer = self.link.pid if self.link is not None else _address(self.addr)
        log.warning("deploy.channels: dropped the connection with %s: %s", peer, error)
        self.owner.connection_failed(self, error, logged=True)

    # --- writing --------------------------------------------------------------------------

    def send_setup(self, frame: bytes) -> None:
        # Only while no data frame can be partly written on this connection (set-up, or
        # the link's writers stopped with nothing queued): pre_out goes out before data.
        self.pre_out += frame
        self._write_pre()

    def _flush_sealed(self) -> bool:
        """Protected: send sealed bytes that wait; True once none do."""
        try:
            return self.sock.flush()
        except OSError as error:
            self.owner.connection_failed(self, error)
            return False

    def _peer_host(self) -> str:
        """The address the socket reports for the peer: both ends judge "remote" on what
        their sockets see (a pid's host may be a name of this machine, or 0.0.0.0, that
        reaches loopback), so they agree without negotiating."""
        try:
            return str(self.sock.getpeername()[0])
        except OSError:  # reset meanwhile: the next read or write ends the connection
            return self.link.pid.host if self.link is not None else str(self.addr[0])

    def _write_pre(self) -> None:
        try:
            sent = self.sock.send(self.pre_out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as error:
            self.owner.connection_failed(self, error)
            return
        del self.pre_out[:sent]
        # `writing` belongs to the link's flush: queued data still wants the socket once
        # the set-up or control bytes are out.
        if self.state != "closed":
            with self.mask_lock:
                self._apply_mask()

    def write_now(self, frame: bytes | list) -> int:
        """User thread, under the link's out_lock, nothing queued: try the socket directly."""
        try:
            if isinstance(frame, bytes):
                return self.sock.send(frame)
            return self.sock.sendmsg(frame)
        except OSError:
            # Full buffer, or a broken connection that the loop thread will notice itself.
            return 0

    def want_write(self, flag: bool) -> None:
        if self.state == "closed":
            return
        with self.mask_lock:
            self.writing = flag
            self._apply_mask()

    def set_reading(self, flag: bool) -> None:
        if self.state == "closed" or self.reading == flag:
            return
        with self.mask_lock:
            self.reading = flag
            self._apply_mask()

    def _apply_mask(self) -> None:
        # Under mask_lock, from the loop or from the user thread that holds rlock.
        if self.state == "closed":
            return
        mask = 0 if self.user_reading or self.parked or not self.reading else READ
        if self.writing or self.pre_out or (self.protected and self.sock.pending_out()):
            mask |= WRITE
        self.loop.modify(self.fd, mask)

    # --- reading from a user thread -------------------------------------------------------

    def read_direct(self, link: L, deadline: float | None, waiter: FdWaiter) -> object:
        """User thread, nothing in the inbox: wait on the socket itself for the next data
        frame. Returns its payload; `RETRY` after a wake-up; None when the loop must
        do the reading (then wait for it to deliver)."""
        if not self.rlock.acquire(False):
            return None  # the loop (or another thread) is reading: it delivers
        with self.mask_lock:
            usable = (
                self.state == "open"
                and link.conn is self
                and self.reading
                and self.held is None
                and self.held_error is None
                and not link.inbox
            )
            if usable:
                self.user_reading = True
                self.reader = waiter
                if not self.parked:
                    self._apply_mask()  # READ off (parked, it is off already)
        if not usable:
            # Frames a reader left behind wait for the loop. Its `after_user_read` gives up
            # when it finds the read side taken (by us, just now), so ask for it again: if
            # nothing else arrives on the socket, nobody else would.
            leftovers = self.held is not None or self.held_error is not None
            self._release_reader()
            if leftovers:
                self.loop.call_soon(self.after_user_read)
            return None
        hand_back = False
        park = False  # (set where this thread will likely read again: READ stays off)
        decoder = self.decoder
        # (Set up before the wait: what follows it is the message's latency.)
        sock = self.sock
        fd = self.fd
        buf = getattr(_read_buffers, "buffer", None)
        if buf is None:
            buf = _read_buffers.buffer = memoryview(bytearray(_RECV_SIZE))
        try:
            frame: Any
            count = 0
            whole = False  # the last read went into an empty decoder
            partial = decoder.buffered() > 0  # (part of a frame is in, once NEED_DATA)
            try:
                frame = decoder.next_frame() if partial else NEED_DATA
            except FrameError:
                hand_back = True  # the loop meets it again and drops the connection
                return None
            while True:
                if frame is not NEED_DATA:
                    if frame is CLOSED:
                        hand_back = True  # EOF: the loop reads it again once READ is back
                        return None
                    # (A buffers frame of up to one read comes whole, as a _wire.Buffers.)
                    kind = frame[-1] if type(frame) is not _Buffers else _wire.DATA_BUFFERS
                    # (A read of exactly one frame into an empty decoder leaves nothing in it.)
                    rest = not whole or count != len(frame) + 4
                    park = True
                    if kind in _DATA_KINDS:
                        if rest and decoder.buffered() > 4:
                            hand_back = self._deliver_rest(link, waiter)
                        return frame
                    if kind == _wire.VALUES:
                        try:
                            values = _wire.decode_values(frame)
                        except FrameError as error:
                            self.held_error = error
                            hand_back = True
                            return None
                        if len(values) > 1:
                            link.deliver_direct(values[1:], len(frame), waiter)
                        if rest and decoder.buffered() > 4:
                            hand_back = self._deliver_rest(link, waiter)
                        return values[0]
                    park = False
                    self.held = [frame]
                    hand_back = True
                    return None
                if link.death is not None or link.shut or self.state != "open":
                    return RETRY
                if partial:
                    size = decoder.pending_size()
                    if size is not None and size > _DIRECT_MAX:
                        # A big message: the loop reads it while this thread still digests
                        # the previous one, rather than one thread doing both in turn.
                        return None
                readable, woken = waiter.poll(fd, None if deadline is None else max(0.0, deadline - time.monotonic()))
                if woken:
                    park = True
                    return RETRY
                if not readable:
                    if deadline is not None and time.monotonic() >= deadline:
                        park = True
                        return RETRY  # the caller raises TimeoutError
                    continue
                try:
                    if self.protected or (partial and decoder.target() is not None):
                        count = 0
                        frame = decoder.next_frame() if self._receive() else CLOSED
                    else:
                        # Into this thread's buffer; a frame that is all of the read is
                        # copied out of it at once (`feed_next`).
                        count = sock.recv_into(buf, self.read_size)
                        whole = not partial
                        if not count:
                            frame = CLOSED  # (not fed: the loop reads the EOF again)
                        else:
                            self.read_size = _RECV_SIZE
                            frame = decoder.feed_next(buf[:count])
                    partial = True  # (if it is NEED_DATA, part of a frame is in)
                except (BlockingIOError, InterruptedError):
                    continue
                except (OSError, FrameError) as error:  # (FrameError: a malformed frame)
                    self.held_error = error
                    hand_back = True
                    return None
        finally:
            arm = False
            with self.mask_lock:  # (`_release_reader`'s work too, inline: this is the message's latency)
                self.user_reading = False
                self.reader = None
                # Parked only while this thread is the one waiting: another waits for the loop.
                if park and not hand_back and self.state == "open" and len(link.rx_watchers) <= 1:
                    self.park_reads += 1
                    self.parked = True
                    if not self._park_timer:
                        self._park_timer = arm = True
                else:
                    self.parked = False
                    self._apply_mask()
                closed = self.state == "closed"
                self.rlock.release()
            if closed:
                sock.close()  # close() left it to us (idempotent otherwise)
            if hand_back:
                self.loop.call_soon(self.after_user_read)
            elif arm:
                self.loop.call_soon(self._watch_park)

    def unpark(self) -> None:
        """Any thread about to wait for the loop to deliver: give READ back to the loop."""
        if self.parked:
            with self.mask_lock:
                if self.parked and not self.user_reading:
                    self.parked = False
                    self._apply_mask()

    def _watch_park(self) -> None:
        # Loop thread: look again in a `_PARK_TIME` (the direct reader's first park).
        self._park_seen = self.park_reads
        self.loop.call_later(_PARK_TIME, self._check_park)

    def _check_park(self) -> None:
        # Loop thread: keep READ parked while the direct reader keeps coming back.
        with self.mask_lock:
            again = self.parked and (self.user_reading or self.park_reads != self._park_seen)
            if again:
                self._park_seen = self.park_reads
            else:
                self._park_timer = False
                if self.parked:
                    self.parked = False
                    self._apply_mask()
        if again:
            self.loop.call_later(_PARK_TIME, self._check_park)

    def _deliver_rest(self, link: L, waiter: FdWaiter) -> bool:
        """After a direct read: queue the other complete frames that came with it; True if
        some must go to the loop."""
        try:
            frames = self.decoder.frames()
        except FrameError as error:
            self.held_error = error
            return True
        count = 0
        nbytes = 0
        messages: list = []
        for payload in frames:
            if not payload:
                break
            kind = _wire.kind_of(payload)
            if kind in _DATA_KINDS:
                messages.append(payload)
            elif kind == _wire.VALUES:
                try:
                    messages += _wire.decode_values(payload)
                except FrameError as error:
                    self.held_error = error  # (the frames before it are delivered)
                    break
            else:
                break
            count += 1
            nbytes += len(payload)
        if messages:
            link.deliver_direct(messages, nbytes, waiter)
        if self.held_error is not None:
            return True
        if count < len(frames):
            self.held = frames[count:]
            return True
        return False

    def _release_reader(self) -> None:
        # (A direct reader lets go in `read_direct` itself: it also parks or restores READ.)
        with self.mask_lock:
            closed = self.state == "closed"
            self.rlock.release()
        if closed:
            self.sock.close()  # close() left it to us (idempotent otherwise)

    def fail(self, error: BaseException) -> None:
        if self.state != "closed":
            self.owner.connection_failed(self, error)

    def unsent(self) -> int:
        if self.state == "closed":
            return 0
        return unsent_bytes(self.sock) + (self.sock.pending_out() if self.protected else 0)

    def close(self) -> None:
        if self.state == "closed":
            return
        with self.mask_lock:
            self.state = "closed"
            self.loop.unregister(self.fd)
            free = self.rlock.acquire(False)
            if free:
                self.rlock.release()
            reader = self.reader
        if free:
            self.sock.close()
        elif reader is not None:
            reader.wake()  # it closes the socket when it lets go of the read side
        self.owner.connection_closed(self)


def _handshake_identities(raw: bytes | bytearray) -> tuple[bytes, bytes] | None:
    # A handshake hello or challenge (deploy_core._auth's layout: magic and version,
    # a 32-byte nonce, two lengths, then the sender's identity and the one it names).
    if len(raw) < 39:
        return None
    first, second = raw[37], raw[38]
    if not first or not second or len(raw) < 39 + first + second:
        return None  # (a failure before the identities: nothing to answer or learn)
    return bytes(raw[39 : 39 + first]), bytes(raw[39 + first : 39 + first + second])


def _is_pid_hex(identity: bytes) -> bool:
    return len(identity) == 32 and all(c in b"0123456789abcdef" for c in identity)


def _address(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return str(addr)


def _keepalive(sock: socket.socket, seconds: float) -> None:
    """Probe an idle connection so that a peer cut off without a FIN is an error in ``seconds``."""
    idle = max(1, int(seconds * 0.4))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", idle),
        ("TCP_KEEPINTVL", 1),
        ("TCP_KEEPCNT", max(1, int(seconds) - idle)),
        ("TCP_USER_TIMEOUT", int(seconds * 1000)),
    ):
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
