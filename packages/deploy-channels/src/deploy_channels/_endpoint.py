"""The Endpoint: one listening port, one event loop thread and one link per peer.

Connection lifetime: a link connects when a Sender to its peer is opened, or a Receiver
whose peer has not connected within `_RECEIVER_CONNECT_DELAY`; an incoming connection is
adopted likewise. When two processes connect to each other at once, the
connection initiated by the lower pid (by hex) is kept and the other is refused with a
duplicate frame. Once a link has had no channel, nothing queued and nothing unread for
``linger`` seconds, its side asks the peer to close; the peer agrees only if it is idle
too, so neither side ever drops bytes the other still needs, and a later channel simply
connects again.

The acceptor decides which connection survives, and both sides must agree on it:
- an incoming connection is a duplicate while we hold a connection the peer has not
  agreed to close (a close we merely requested may still be refused), or while our own
  attempt is in flight and our pid is the lower;
- the side refused as a duplicate keeps its queued messages and waits for the peer's
  connection (retrying its own if none comes), and exit waits for that too;
- an exiting endpoint still completes connections that reach it and says goodbye on
  them, so its peers see `PeerExited`. Only evidence that the process is gone makes a
  peer `PeerExited`: a goodbye, a connect refused (nothing listens at its port), or
  another process answering at its address. An established connection broken without
  goodbye is `PeerLost`.
- an attempt that ends otherwise during set-up (EOF or reset during the handshake, the
  set-up timeout, a connect error) proves nothing: the peer's listener may have
  evicted it or be too loaded to accept in time. It is retried with back-off (the
  set-up timeout doubling after each timeout, within the bound) for `SETUP_RETRY_FOR`
  seconds from the first attempt, and only then is the peer `PeerLost`, with the last
  reason (the runtime's ``peer_status`` may still say it exited). Queued messages wait meanwhile: no
  data goes out before set-up completes, so nothing is sent twice. A handshake that
  fails authentication is never retried.

Strangers (issue 13). At most `MAX_UNAUTHENTICATED` accepted connections may be
authenticating at once: a newcomer over the cap evicts the oldest, since an honest
peer's handshake takes one round trip (its hello usually arrives with the connection,
and is read at once) while a flood's connections never finish. A wake-up accepts at
most `_ACCEPT_BATCH`, so an honest connection outlives several wake-ups of a flood.

OS facts relied on:
- ``accept`` failing with EMFILE/ENFILE (no descriptor), ENOBUFS/ENOMEM leaves the
  connection in the backlog, so the listener stays readable: accepting is paused (the
  listener's READ dropped) for a back-off that doubles up to 1 s, and the oldest
  unauthenticated connection is closed to free a descriptor.
- ``socket()`` failing with those errors says nothing about the peer: the connect is
  retried with back-off for up to `SETUP_TIMEOUT`, then left until more is sent; the
  peer is never reported lost for it.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable

from deploy_core import ChannelExists, DeployError, PeerExited, PeerLost, Pid

from . import _wire
from ._connection import SETUP_TIMEOUT, Connection
from ._link import INHERITED, Link
from ._loop import READ, EventLoop
from .framing import DEFAULT_MAX_FRAME_SIZE

__all__ = ["Endpoint", "EndpointState"]

log = logging.getLogger("deploy.channels")

DEFAULT_HIGH_WATER = 8 * 1024 * 1024
DEFAULT_LINGER = 1.0
_EXITED_RECORD = 4096
_RETRY_DUPLICATE = 0.05
_DRAIN_STALL = 3.0
_DRAIN_TICK = 0.005
# How long exit waits for connections from peers that are still authenticating.
_SETUP_WAIT = 1.0
# A Receiver connects only if its peer has not connected first by then: a process that
# will send opens the connection itself, and two connections for one pair (one of them
# refused) cost both processes a handshake. The connection is still made to learn of a
# peer that dies without ever connecting.
_RECEIVER_CONNECT_DELAY = 0.05
#: Accepted connections that may be authenticating at once (see the module comment).
MAX_UNAUTHENTICATED = 128
_ACCEPT_BATCH = 32
_BACKOFF_FIRST, _BACKOFF_MAX = 0.01, 1.0
#: How long set-up that failed with the peer possibly alive is retried (see above).
SETUP_RETRY_FOR = 60.0
_NO_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_EVICTION_LOG_EVERY = 10.0
PROTECT_CHOICES = ("off", "remote", "all")


class EndpointState:
    """Module-level registry of live endpoints (for atexit and fork)."""

    live: weakref.WeakSet = weakref.WeakSet()


def _why(error: BaseException) -> str:
    # What PeerLost says of how the connection ended.
    if isinstance(error, ConnectionResetError):
        return "connection reset"
    if isinstance(error, TimeoutError):
        return "timed out"
    if isinstance(error, EOFError):
        return "the connection closed without a goodbye"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror[:1].lower() + error.strerror[1:]
    return str(error) or type(error).__name__


def _link_of(conn: Connection) -> Link:
    # Connections reach these handlers only once their hello has given them a link.
    link = conn.link
    assert link is not None, f"{conn!r} has no link"
    return link


def _is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host == "localhost"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # a dual-stack listener's view of an IPv4 peer
    return address.is_loopback


def _parse_address(address: str | tuple[str, int]) -> tuple[str, int]:
    if isinstance(address, tuple):
        host, port = address
        return str(host), int(port)
    host, sep, port_text = str(address).rpartition(":")
    if not sep:
        raise ValueError(f"invalid address {address!r}: expected 'host:port'")
    return host.strip("[]") or "127.0.0.1", int(port_text)


class Endpoint:
    """A process's channel endpoint: its pid, listening socket and background loop thread.

    ``Endpoint("127.0.0.1:0", secret=b"...")`` binds and listens; ``Endpoint(secret=...,
    sock=listening_socket, pid=pid)`` adopts a socket already bound and listening at
    ``pid.addr``. Every connection, in and out, must prove the same ``secret``.

    ``protect`` says which connections carry a keyed MAC and a sequence number on every
    record after the handshake (`deploy_core.ProtectedSocket`), so that frames cannot be
    changed, injected or replayed: ``"off"`` (none), ``"remote"`` (those whose peer
    address is not loopback: what cluster mode uses) or ``"all"``. Every endpoint of a
    run must use the same setting.

    ``max_frame_size`` bounds one message: `Sender.send` refuses a bigger one, and a
    bigger frame from a peer drops its connection, so peers should use the same value.

    ``peer_status(pid)``, when given, is asked (in the thread about to raise) what became
    of a peer that is gone without having said its exit code: it returns the `PeerExited`
    or `PeerLost` to raise, or None when it does not know. The deploy runtime answers from
    its record of every process's exit.
    """

    def __init__(
        self,
        address: str | tuple[str, int] | None = None,
        *,
        secret: bytes,
        sock: socket.socket | None = None,
        pid: Pid | None = None,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        high_water: int = DEFAULT_HIGH_WATER,
        linger: float = DEFAULT_LINGER,
        protect: str = "off",
        peer_status: Callable[[Pid], PeerExited | PeerLost | None] | None = None,
        keepalive: float | None = None,
    ):
        if not isinstance(secret, (bytes, bytearray)) or not secret:
            raise ValueError("secret must be non-empty bytes")
        if protect not in PROTECT_CHOICES:
            raise ValueError(f"protect must be one of {', '.join(PROTECT_CHOICES)}, not {protect!r}")
        self._protect = protect
        self._secret = bytes(secret)
        self._max_frame_size = int(max_frame_size)
        self._high_water = int(high_water)
        self._linger = float(linger)
        self._peer_status_of = peer_status
        # Seconds after which a peer that went silent without a FIN (a cut-off machine) is
        # lost: TCP keepalive probes and TCP_USER_TIMEOUT on every connection. None: the
        # kernel's defaults (hours), fine on one machine where a dead peer always resets.
        self.keepalive = None if keepalive is None else float(keepalive)
        if sock is None:
            if address is None:
                address = ("127.0.0.1", 0)
            host, port = _parse_address(address)
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, port))
                sock.listen(128)
            except BaseException:
                sock.close()
                raise
        elif address is not None:
            raise ValueError("give either an address to bind or an already listening sock, not both")
        bound_host, bound_port = sock.getsockname()[:2]
        if pid is None:
            pid = Pid.new(_advertised_host(bound_host), bound_port)
        elif not isinstance(pid, Pid):
            raise TypeError(f"pid must be a deploy_core.Pid, not {type(pid).__name__}")
        elif pid.port != bound_port:
            raise ValueError(f"pid {pid.format()} does not match the socket's port {bound_port}")
        sock.setblocking(False)
        self._listener = sock
        self.pid: Pid = pid
        self._lock = threading.RLock()
        # Keyed by the peer's 32-hex id, its identity; its address is only where to reach it.
        self._links: dict[str, Link] = {}
        self._senders: dict[str, weakref.ref] = {}
        self._receivers: dict[str, weakref.ref] = {}
        self._exited: OrderedDict[str, tuple[int | None, bool, str | None]] = OrderedDict()
        self._conns: set[Connection] = set()
        self._authenticating: deque[Connection] = deque()  # accepted, oldest first
        self._accept_backoff = 0.0  # while accepting is paused for lack of descriptors
        self._evicted = 0
        self._evicted_logged = -_EVICTION_LOG_EVERY
        self._starved: set[str] = set()  # links (by pid hex) whose connect waits for a descriptor
        self._closed = False
        self._draining = False
        self._goodbye_frame = b""  # the goodbye frame, once draining
        self._setup_wait_until = 0.0
        self._drained = threading.Event()
        self._loop = EventLoop(f"deploy-channels-{pid}")
        self._loop.call_soon(self._loop.register, sock.fileno(), READ, self._on_listener)
        self._loop.start()
        EndpointState.live.add(self)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Endpoint {self.pid.format()} {state}>"

    @property
    def closed(self) -> bool:
        return self._closed

    # --- channels (user threads) ----------------------------------------------------------

    def _open_channel(self, kind: str, pid: Pid, channel: object) -> tuple[Link, weakref.ref]:
        if not isinstance(pid, Pid):
            raise TypeError(f"a channel needs a deploy_core.Pid, not {type(pid).__name__}")
        if pid.hex == self.pid.hex:
            raise ValueError(f"cannot open a channel to your own pid ({pid})")
        registry = self._senders if kind == "sender" else self._receivers
        key = pid.hex
        with self._lock:
            self._check_usable()
            existing = registry.get(key)
            if existing is not None and existing() is not None:
                raise ChannelExists(f"a {kind.capitalize()} to {pid} already exists in this process")
            link = self._links.get(key)
            if link is None:
                link = self._links[key] = Link(self, pid)
                if key in self._exited:
                    link.death = self._exited[key]

            def collected(ref: weakref.ref[object]) -> None:
                self._close_channel(kind, pid, ref)

            ref = weakref.ref(channel, collected)
            registry[key] = ref
            if kind == "sender":
                link.has_sender = True
            else:
                link.has_receiver = True
        if kind == "sender":
            self._loop.call_soon(self._ensure_connected, link)
        else:
            self._loop.call_soon(self._loop.call_later, _RECEIVER_CONNECT_DELAY, self._ensure_connected, link)
        return link, ref

    def _close_channel(self, kind: str, pid: Pid, ref: weakref.ref) -> None:
        registry = self._senders if kind == "sender" else self._receivers
        with self._lock:
            if registry.get(pid.hex) is not ref:
                return
            del registry[pid.hex]
            link = self._links.get(pid.hex)
            if link is not None:
                if kind == "sender":
                    link.has_sender = False
                else:
                    link.has_receiver = False
        if link is not None and not self._loop.forked and self._loop.is_running():
            self._loop.call_soon(self._channel_released, link)

    def _check_usable(self) -> None:
        if self._loop.forked:
            raise DeployError(INHERITED)
        if self._closed:
            raise DeployError(f"the endpoint {self.pid} is closed")

    def _protects(self, host: str) -> bool:
        """Whether a connection with a peer at ``host`` carries protected frames."""
        if self._protect == "off":
            return False
        return self._protect == "all" or not _is_loopback(host)

    # --- links (loop thread) --------------------------------------------------------------

    def _ensure_connected(self, link: Link) -> None:
        if link.death is not None or link.conn is not None or link.pending is not None or link.setup_retry:
            return
        if self._draining and not link.out:
            return
        if self._links.get(link.pid.hex) is not link or link.pid.hex in self._starved:
            return
        self._connect(link, None, _BACKOFF_FIRST)

    def _connect(self, link: Link, starved_since: float | None, delay: float) -> None:
        family = socket.AF_INET6 if ":" in link.pid.host else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as error:
            if error.errno not in _NO_DESCRIPTORS:
                log.warning("deploy.channels: cannot open a socket to %s: %s", link.pid, error)
                self._set_dead(link, None, lost=True, reason=_why(error))
                return
            # Our shortage, not the peer's fault: retry, and never call the peer lost.
            now = time.monotonic()
            if starved_since is None:
                log.warning("deploy.channels: cannot open a socket to %s: %s; retrying", link.pid, error)
                starved_since = now
            if now - starved_since >= SETUP_TIMEOUT:
                log.warning(
                    "deploy.channels: still no descriptor for a socket to %s after %gs: %s; "
                    "trying again when more is sent",
                    link.pid,
                    SETUP_TIMEOUT,
                    error,
                )
                return
            self._starved.add(link.pid.hex)
            self._loop.call_later(delay, self._retry_connect, link, starved_since, min(delay * 2, _BACKOFF_MAX))
            return
        conn = Connection(self, sock, link=link, addr=link.pid.addr)
        link.pending = conn
        self._conns.add(conn)
        conn.start_connect()

    def _attach(self, link: Link, conn: Connection) -> None:
        conn.opened()
        link.setup_since = None
        link.setup_failures = 0
        link.setup_timeout = SETUP_TIMEOUT
        link.conn = conn
        link.closing = False
        conn.set_reading(not link.paused)
        with link.out_lock:
            link.wconn = conn
        if self._draining:
            # A peer that reaches us while we exit learns it from a goodbye, not a reset.
            self._queue_goodbye(link)
        link.flush()

    def _queue_goodbye(self, link: Link) -> None:
        if link.goodbye_queued:
            return
        link.goodbye_queued = True
        with link.out_lock:
            link.out.append(self._goodbye_frame)
            link.out_bytes += len(self._goodbye_frame)

    def _outgoing_hello(self, conn: Connection, pid: Pid) -> None:
        link = _link_of(conn)
        if link.pending is conn:
            link.pending = None
        if pid.hex != link.pid.hex:
            log.info("deploy.channels: %s now listens at %s: peer %s is gone", pid, link.pid.addr, link.pid)
            conn.close()
            self._set_dead(link, None, lost=False)
            return
        if link.conn is not None and not link.closing or link.death is not None:
            log.debug("deploy.channels: %s accepted our connection, but we have %r", pid, link.conn)
            conn.close()
            return
        self._attach(link, conn)

    def _incoming_hello(self, conn: Connection, pid: Pid, wanted: Pid | None) -> None:
        if wanted is None or wanted.hex != self.pid.hex:
            # The connector checks our pid and treats a mismatch as "peer gone".
            conn.send_setup(_wire.hello_frame(self.pid))
            conn.close()
            return
        with self._lock:
            link = self._links.get(pid.hex)
            if link is None:
                self._exited.pop(pid.hex, None)
                link = self._links[pid.hex] = Link(self, pid)
        conn.link = link
        if link.death is not None:
            conn.close()
            return
        # A connection we asked to tear down is still ours until the peer agrees: it may
        # refuse and keep using it, so a newcomer is a duplicate. Only once both sides
        # agreed (the peer is about to close it, or has) may a new connection replace it.
        current = link.conn if link.conn is not None and not link.conn.agreed_close else None
        if current is not None or (link.pending is not None and self.pid.hex < pid.hex):
            # Keep the connection already carrying data, or the one the lower pid initiated.
            log.debug("deploy.channels: refused a duplicate connection from %s", pid)
            conn.send_setup(_wire.control_frame(_wire.DUPLICATE))
            conn.link = None
            conn.close()
            return
        # Our own attempt, if any, is left to be refused as a duplicate by the peer: closing
        # it mid-handshake would only make the peer log a failed connection.
        conn.send_setup(_wire.hello_frame(self.pid))
        self._attach(link, conn)

    def _duplicate(self, conn: Connection) -> None:
        link = _link_of(conn)
        log.debug("deploy.channels: %s refused our connection as a duplicate", link.pid)
        conn.close()
        if link.pending is conn:
            link.pending = None
        # The peer keeps its own connection to us, which is on its way (or already adopted);
        # retry in case it fails.
        if link.conn is None:
            self._loop.call_later(_RETRY_DUPLICATE, self._ensure_connected, link)

    def _connection_failed(
        self,
        conn: Connection,
        error: BaseException,
        *,
        refused: bool = False,
        logged: bool = False,
        final: bool = False,
    ) -> None:
        # refused: the peer is gone (PeerExited). logged: already reported (a failed
        # handshake, a protocol error), and like final, never retried into success.
        was = conn.state
        conn.close()
        link = conn.link
        if link is None:
            if not logged and was != "open":
                # A stranger that hangs up, or a peer closing a duplicate: nothing to report.
                level = logging.WARNING if isinstance(error, TimeoutError) else logging.DEBUG
                log.log(level, "deploy.channels: dropped a connection during set-up: %s", error)
            return
        if link.pending is conn:
            link.pending = None
            if link.conn is None:
                log.debug("deploy.channels: connecting to %s failed: %s", link.pid, error)
                if refused:
                    self._set_dead(link, None, lost=False)
                elif logged or final:
                    self._set_dead(link, None, lost=True, reason=_why(error))
                else:
                    self._setup_failed(link, error, conn.started)
        elif link.conn is conn:
            link.conn = None
            with link.out_lock:
                link.wconn = None
            if conn.agreed_close:
                self._after_close(link)
            else:
                log.debug("deploy.channels: connection to %s broke: %s", link.pid, error)
                self._set_dead(link, None, lost=True, reason=_why(error))

    def _setup_failed(self, link: Link, error: BaseException, started: float) -> None:
        # The peer may well be alive (see the module comment): try again, for a while.
        if self._links.get(link.pid.hex) is not link:
            return
        if not (link.has_sender or link.has_receiver or link.out):
            self._forget_setup(link)  # nobody needs the connection now: the next one starts afresh
            return
        now = time.monotonic()
        if link.setup_since is None:
            link.setup_since = started  # the series began with the first attempt
        link.setup_failures += 1
        elapsed = now - link.setup_since
        if isinstance(error, TimeoutError):  # a loaded peer: give the next attempt longer, within the bound
            link.setup_timeout = max(1.0, min(link.setup_timeout * 2, SETUP_RETRY_FOR - elapsed))
        if elapsed >= SETUP_RETRY_FOR:
            log.warning(
                "deploy.channels: gave up connecting to %s after %d failed attempts in %.0fs: %s",
                link.pid,
                link.setup_failures,
                elapsed,
                error,
            )
            self._set_dead(
                link, None, lost=True, reason=f"no connection set-up succeeded in {elapsed:.0f}s: {_why(error)}"
            )
            return
        if link.setup_failures == 1 or isinstance(error, TimeoutError):
            log.info("deploy.channels: connecting to %s failed (%s); retrying", link.pid, error)
        delay = min(_BACKOFF_FIRST * 2 ** (link.setup_failures - 1), _BACKOFF_MAX)
        link.setup_retry = True
        self._loop.call_later(delay, self._retry_setup, link)

    def _retry_setup(self, link: Link) -> None:
        link.setup_retry = False
        if link.death is not None or link.conn is not None or link.pending is not None:
            return
        if self._links.get(link.pid.hex) is not link:
            return
        if self._draining and not link.out:
            return
        if not (link.has_sender or link.has_receiver or link.out):
            self._forget_setup(link)
            return
        self._ensure_connected(link)

    def _forget_setup(self, link: Link) -> None:
        link.setup_since = None
        link.setup_failures = 0
        link.setup_timeout = SETUP_TIMEOUT
        self._maybe_forget(link)

    def _goodbye(self, conn: Connection, code: int | None) -> None:
        link = _link_of(conn)
        conn.close()
        if link.conn is conn:
            link.conn = None
        self._set_dead(link, code, lost=False)

    def _set_dead(self, link: Link, code: int | None, *, lost: bool, reason: str | None = None) -> None:
        if link.death is not None:
            return
        link.death = (code, lost, reason)
        with link.out_lock:
            link.wconn = None
        link.discard_output()
        self._exited[link.pid.hex] = link.death
        while len(self._exited) > _EXITED_RECORD:
            self._exited.popitem(last=False)
        for conn in (link.conn, link.pending):
            if conn is not None:
                conn.close()
        link.conn = link.pending = None
        link.wake_all()
        self._maybe_forget(link)

    def _maybe_forget(self, link: Link) -> bool:
        with self._lock:
            if link.has_sender or link.has_receiver or link.inbox or link.out:
                return False
            if link.conn is not None or link.pending is not None:
                return False
            if self._links.get(link.pid.hex) is link:
                del self._links[link.pid.hex]
            return True

    # --- reading back-pressure --------------------------------------------------------------

    def _after_delivery(self, link: Link) -> None:
        if link.paused or link.total_in_bytes - link.base[1] <= self._high_water:
            return
        if link.buffered_bytes() <= self._high_water:
            return
        link.paused = True
        link.resume_at = link.resume_threshold(self._high_water // 2)
        if link.conn is not None:
            link.conn.set_reading(False)
        if len(link.inbox) <= link.resume_at:
            self._resume_reading(link)

    def _resume_reading(self, link: Link) -> None:
        link.resume_requested = False
        if not link.paused:
            return
        if link.buffered_bytes() > self._high_water // 2:
            link.resume_at = link.resume_threshold(self._high_water // 2)
            if len(link.inbox) > link.resume_at:
                return
        link.paused = False
        if link.conn is not None:
            link.conn.set_reading(True)

    # --- tearing idle connections down --------------------------------------------------------

    def _channel_released(self, link: Link) -> None:
        if link.has_sender or link.has_receiver:
            return
        if link.death is not None:
            self._maybe_forget(link)
            return
        link.idle_token += 1
        self._loop.call_later(self._linger, self._linger_over, link, link.idle_token)

    def _is_idle(self, link: Link) -> bool:
        return not (link.has_sender or link.has_receiver or link.inbox or link.out or link.pending)

    def _stop_writers(self, link: Link) -> bool:
        """Stop user threads writing to the link's connection, if nothing is queued (then
        no data frame is partly written and a control frame may go out at once)."""
        with link.out_lock:
            if link.out:
                return False
            link.wconn = None
        return True

    def _send_control(self, conn: Connection, kind: int) -> None:
        # Never inside a data frame: behind what is queued while writers use this
        # connection, else at once (writers were stopped with nothing queued, see
        # `_stop_writers`, so nothing queued since was partly written here).
        link = _link_of(conn)
        frame = _wire.control_frame(kind)
        with link.out_lock:
            now = link.wconn is not conn
            if not now:
                link.out.append(frame)
                link.out_bytes += len(frame)
        if now:
            conn.send_setup(frame)
        else:
            link.flush()

    def _linger_over(self, link: Link, token: int) -> None:
        if token != link.idle_token or link.has_sender or link.has_receiver or link.death is not None:
            return
        if self._maybe_forget(link):
            return
        conn = link.conn
        # A frame partly received is a message on its way: not idle.
        if (
            self._is_idle(link)
            and conn is not None
            and not link.closing
            and not conn.decoder.buffered()
            and conn.held is None
            and self._stop_writers(link)
        ):
            link.closing = True
            log.debug("deploy.channels: asking %s to close the idle connection", link.pid)
            conn.send_setup(_wire.control_frame(_wire.CLOSE_REQUEST))
            return
        # Still flushing, or unread messages wait for a Receiver: look again later.
        self._loop.call_later(self._linger, self._linger_over, link, token)

    def _close_request(self, conn: Connection) -> None:
        link = _link_of(conn)
        if self._is_idle(link) and not self._draining and self._stop_writers(link):
            link.closing = True
            conn.agreed_close = True
            # We wait for the requester to close: it has then read all we ever sent.
            conn.send_setup(_wire.control_frame(_wire.CLOSE_OK))
        else:
            self._send_control(conn, _wire.CLOSE_NO)

    def _close_ok(self, conn: Connection) -> None:
        link = _link_of(conn)
        conn.agreed_close = True
        conn.close()
        if link.conn is conn:
            link.conn = None
            self._after_close(link)

    def _after_close(self, link: Link) -> None:
        link.closing = False
        if self._maybe_forget(link):
            return
        if link.has_sender or link.has_receiver or link.out:
            self._ensure_connected(link)

    def _close_no(self, conn: Connection) -> None:
        link = _link_of(conn)
        if link.conn is not conn or conn.agreed_close:
            # Both sides asked at once and we agreed to the peer's request: the peer closes
            # this connection as soon as it reads our agreement, so it must carry no more.
            return
        link.closing = False
        with link.out_lock:
            link.wconn = conn
        link.flush()
        if not (link.has_sender or link.has_receiver):
            link.idle_token += 1
            self._loop.call_later(self._linger, self._linger_over, link, link.idle_token)

    def _retry_connect(self, link: Link, starved_since: float, delay: float) -> None:
        self._starved.discard(link.pid.hex)
        if link.death is not None or link.conn is not None or link.pending is not None:
            return
        if self._links.get(link.pid.hex) is not link or (self._draining and not link.out):
            return
        self._connect(link, starved_since, delay)

    # --- accepting ----------------------------------------------------------------------------

    def _on_listener(self, mask: int) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in _NO_DESCRIPTORS:
                    self._pause_accepting(error)
                else:
                    log.warning("deploy.channels: accept failed: %s", error)
                return
            if self._accept_backoff:
                log.info("deploy.channels: accepting connections again")
                self._accept_backoff = 0.0
            self._make_room()
            conn = Connection(self, sock, link=None, addr=addr)
            self._conns.add(conn)
            self._authenticating.append(conn)
            conn.start_accept()
            conn.on_event(READ)  # an honest peer's hello usually came with the connection

    def _unauthenticated(self) -> deque[Connection]:
        pending = self._authenticating
        if len(pending) >= MAX_UNAUTHENTICATED or (pending and pending[0].state != "auth"):
            pending = self._authenticating = deque(conn for conn in pending if conn.state == "auth")
        return pending

    def _make_room(self, cap: int = MAX_UNAUTHENTICATED) -> None:
        pending = self._unauthenticated()
        while len(pending) >= cap:
            oldest = pending.popleft()
            self._evicted += 1
            now = time.monotonic()
            if now - self._evicted_logged >= _EVICTION_LOG_EVERY:
                self._evicted_logged = now
                log.warning(
                    "deploy.channels: over %d connections authenticating at once: closed the oldest "
                    "(from %s; %d so far)",
                    MAX_UNAUTHENTICATED,
                    oldest.addr,
                    self._evicted,
                )
            self._connection_failed(oldest, ConnectionAbortedError("too many connections authenticating"), logged=True)

    def _pause_accepting(self, error: OSError) -> None:
        if not self._accept_backoff:
            log.warning("deploy.channels: cannot accept connections: %s; pausing", error)
        self._accept_backoff = min(max(self._accept_backoff * 2, _BACKOFF_FIRST), _BACKOFF_MAX)
        if self._unauthenticated():
            self._make_room(cap=len(self._authenticating))  # one descriptor back from a stranger
        self._loop.modify(self._listener.fileno(), 0)
        self._loop.call_later(self._accept_backoff, self._resume_accepting)

    def _resume_accepting(self) -> None:
        if self._listener.fileno() != -1:  # not closed (it still accepts while draining)
            self._loop.modify(self._listener.fileno(), READ)

    # --- closing ------------------------------------------------------------------------------

    def _peer_status(self, pid: Pid) -> PeerExited | PeerLost | None:
        # User thread (Link.death_error): the runtime's word on a peer gone without a code.
        if self._peer_status_of is None:
            return None
        try:
            return self._peer_status_of(pid)
        except Exception as error:  # no better answer than the channel's own
            log.debug("deploy.channels: could not learn how %s ended: %s", pid, error)
            return None

    def close(self, exit_code: int | None = None, timeout: float = 10.0) -> None:
        """Deliver what was sent, say goodbye (with ``exit_code``) and close; idempotent.

        Waits while data still flows, until every peer's kernel has acknowledged every
        byte (``TIOCOUTQ`` is 0), giving up after a few seconds without progress or
        ``timeout`` seconds in all (only the latter while messages wait for a live peer
        that has not accepted our connection yet). Channels of this endpoint then raise `ChannelClosed`.
        """
        with self._lock:
            if self._closed or self._loop.forked:
                first = False
            else:
                self._closed = first = True
        if first:
            if self._loop.in_loop_thread():
                raise RuntimeError("Endpoint.close() cannot be called from its own loop thread")
            self._loop.call_soon(self._begin_drain, exit_code, time.monotonic() + max(0.0, timeout))
        if not self._loop.forked:
            self._drained.wait(max(0.0, timeout) + 2.0)
            self._loop.join(2.0)
        EndpointState.live.discard(self)

    def _begin_drain(self, exit_code: int | None, deadline: float) -> None:
        self._draining = True
        self._goodbye_frame = _wire.goodbye_frame(exit_code)
        self._setup_wait_until = time.monotonic() + _SETUP_WAIT
        for link in list(self._links.values()):
            with link.out_lock:
                link.shut = True
            conn = link.conn
            agreed_idle = conn is not None and conn.agreed_close and not link.out
            if link.death is None and (conn is not None or link.pending is not None or link.out) and not agreed_idle:
                # (A connection both sides agreed to close is idle: the peer learns of our
                # exit when it next connects and is refused.)
                self._queue_goodbye(link)
                link.flush()
                self._ensure_connected(link)
            link.wake_all()
        self._drain_tick(deadline, None, time.monotonic())

    def _drain_tick(self, deadline: float, last: int | None, progress_at: float) -> None:
        # Everything that may still carry bytes to a peer counts: queued output even while
        # no connection exists (a refused duplicate waits for the peer's own connection),
        # attempts in progress, connections being torn down, and (briefly) connections
        # from peers still in set-up, which are owed a goodbye rather than a reset.
        unsent = unsettled = 0
        # A live peer whose kernel completed our connect but whose process has not
        # accepted it yet: no progress shows, yet the bytes are owed (DESIGN §2); wait for
        # it up to the deadline (its set-up times out after SETUP_TIMEOUT, then it is lost).
        held = False
        for link in list(self._links.values()):
            if link.death is not None:
                continue
            if link.pending is not None or link.setup_retry or (link.conn is not None and link.closing):
                unsettled += 1
                owed = link.out_bytes - (len(self._goodbye_frame) if link.goodbye_queued else 0)
                if owed > 0 and (link.setup_retry or link.pending is not None and link.pending.state != "connecting"):
                    held = True
            unsent += link.out_bytes
            if link.conn is not None:
                unsent += link.conn.unsent()
        now = time.monotonic()
        if now < self._setup_wait_until:
            unsettled += sum(1 for conn in self._conns if conn.link is None and conn.state in ("auth", "hello"))
        pending = unsent + unsettled
        if last is None or pending < last:
            progress_at = now
        if pending and now < deadline and (held or now - progress_at < _DRAIN_STALL):
            self._loop.call_later(_DRAIN_TICK, self._drain_tick, deadline, pending, progress_at)
            return
        if pending:
            log.warning(
                "deploy.channels: gave up at close with %d bytes undelivered and %d connections unsettled",
                unsent,
                unsettled,
            )
        self._finish_close()

    def _finish_close(self) -> None:
        for conn in list(self._conns):
            conn.close()
        self._loop.unregister(self._listener.fileno())
        self._listener.close()
        for link in list(self._links.values()):
            link.discard_output()  # given up: nothing may still refer to a sender's buffers
            link.wake_all()
        self._drained.set()
        self._loop.stop()

    def _after_fork_in_child(self) -> None:
        # The loop thread does not exist here and every descriptor is shared with the
        # parent: close ours (never shutdown, which would cut the parent's connections).
        self._loop.close_after_fork()
        for conn in list(self._conns):
            try:
                conn.sock.close()
            except OSError:
                pass
        self._conns.clear()
        try:
            self._listener.close()
        except OSError:
            pass
        self._closed = True
        self._lock = threading.RLock()
        for link in list(self._links.values()):
            link.shut = True
            link.out_lock = threading.Lock()
            link.in_lock = threading.Lock()
            # Copies of the parent's messages, in and out: the parent delivers them.
            link.inbox.clear()
            link.out.clear()
            link.out_bytes = 0
            link.conn = link.pending = None
            link.rx_watchers.clear()
            link.tx_watchers.clear()


def _advertised_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return "127.0.0.1"
    return host
