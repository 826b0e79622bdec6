"""The per-peer state: one `Link` per peer, and what happens to its connections.

`Peers` is what every `Connection` reports to (its `ConnectionOwner`): pid exchange,
duplicates, set-up failures and their retries, goodbyes, the negotiated close of an
idle connection, and reading back-pressure. It runs in the loop thread, except where a
method says otherwise. `Endpoint` is the public front over it.

Connection lifetime: a link connects when a Sender to its peer is opened, or a Receiver
whose peer has not connected within the endpoint's ``_RECEIVER_CONNECT_DELAY``; an incoming connection is
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

OS facts relied on:
- ``socket()`` failing with EMFILE/ENFILE (no descriptor) or ENOBUFS/ENOMEM says nothing
  about the peer: the connect is
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
from collections import OrderedDict
from collections.abc import Callable

from deploy_core import PeerExited, PeerLost, Pid

from . import _wire
from ._connection import SETUP_TIMEOUT, Connection
from ._link import Link
from ._loop import EventLoop

__all__ = ["SETUP_RETRY_FOR", "Peers"]

log = logging.getLogger("deploy.channels")

_EXITED_RECORD = 4096
_RETRY_DUPLICATE = 0.05
# How long exit waits for connections from peers that are still authenticating.
_SETUP_WAIT = 1.0
_BACKOFF_FIRST, _BACKOFF_MAX = 0.01, 1.0
#: How long set-up that failed with the peer possibly alive is retried (see above).
SETUP_RETRY_FOR = 60.0
_NO_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


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


def _link_of(conn: Connection[Link]) -> Link:
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


class Peers:
    """Every peer's `Link` and connections (see the module comment); the `ConnectionOwner`
    of every connection and the `LinkOwner` of every link."""

    def __init__(
        self,
        pid: Pid,
        loop: EventLoop,
        *,
        lock: threading.RLock,
        secret: bytes,
        protect: str,
        max_frame_size: int,
        high_water: int,
        linger: float,
        keepalive: float | None,
        peer_status: Callable[[Pid], PeerExited | PeerLost | None] | None,
    ):
        self.pid = pid
        self.loop = loop
        # Guards `links` (user threads open channels; the loop adopts and forgets links).
        self.lock = lock
        self.secret = secret
        self.protect = protect
        self.max_frame_size = max_frame_size
        self.high_water = high_water
        self.linger = linger
        self.keepalive = keepalive
        self._peer_status_of = peer_status
        # Keyed by the peer's 32-hex id, its identity; its address is only where to reach it.
        self.links: dict[str, Link] = {}
        self.exited: OrderedDict[str, tuple[int | None, bool, str | None]] = OrderedDict()
        self.conns: set[Connection[Link]] = set()
        self._starved: set[str] = set()  # links (by pid hex) whose connect waits for a descriptor
        self.draining = False
        self.goodbye_frame = b""  # the goodbye frame, once draining
        self.setup_wait_until = 0.0

    def link_for(self, pid: Pid) -> Link:
        """User thread, under `lock`: the link to ``pid``, made if there is none."""
        key = pid.hex
        link = self.links.get(key)
        if link is None:
            link = self.links[key] = Link(self, pid)
            if key in self.exited:
                link.death = self.exited[key]
        return link

    def connection_closed(self, conn: Connection[Link]) -> None:
        self.conns.discard(conn)

    def peer_status(self, pid: Pid) -> PeerExited | PeerLost | None:
        # User thread (Link.death_error): the runtime's word on a peer gone without a code.
        if self._peer_status_of is None:
            return None
        try:
            return self._peer_status_of(pid)
        except Exception as error:  # no better answer than the channel's own
            log.debug("deploy.channels: could not learn how %s ended: %s", pid, error)
            return None

    # --- links (loop thread) --------------------------------------------------------------

    def protects(self, host: str) -> bool:
        """Whether a connection with a peer at ``host`` carries protected frames."""
        if self.protect == "off":
            return False
        return self.protect == "all" or not _is_loopback(host)

    # --- links (loop thread) --------------------------------------------------------------

    def ensure_connected(self, link: Link) -> None:
        if link.death is not None or link.conn is not None or link.pending is not None or link.setup_retry:
            return
        if self.draining and not link.out:
            return
        if self.links.get(link.pid.hex) is not link or link.pid.hex in self._starved:
            return
        self._connect(link, None, _BACKOFF_FIRST)

    def _connect(self, link: Link, starved_since: float | None, delay: float) -> None:
        family = socket.AF_INET6 if ":" in link.pid.host else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as error:
            if error.errno not in _NO_DESCRIPTORS:
                log.warning("deploy.channels: cannot open a socket to %s: %s", link.pid, error)
                self.set_dead(link, None, lost=True, reason=_why(error))
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
            self.loop.call_later(delay, self._retry_connect, link, starved_since, min(delay * 2, _BACKOFF_MAX))
            return
        conn = Connection(self, sock, link=link, addr=link.pid.addr)
        link.pending = conn
        self.conns.add(conn)
        conn.start_connect()

    def _attach(self, link: Link, conn: Connection[Link]) -> None:
        conn.opened()
        link.setup_since = None
        link.setup_failures = 0
        link.setup_timeout = SETUP_TIMEOUT
        link.conn = conn
        link.closing = False
        conn.set_reading(not link.paused)
        with link.out_lock:
            link.wconn = conn
        if self.draining:
            # A peer that reaches us while we exit learns it from a goodbye, not a reset.
            self.queue_goodbye(link)
        link.flush()

    def queue_goodbye(self, link: Link) -> None:
        if link.goodbye_queued:
            return
        link.goodbye_queued = True
        with link.out_lock:
            link.out.append(self.goodbye_frame)
            link.out_bytes += len(self.goodbye_frame)

    def hello_answered(self, conn: Connection[Link], pid: Pid) -> None:
        link = _link_of(conn)
        if link.pending is conn:
            link.pending = None
        if pid.hex != link.pid.hex:
            log.info("deploy.channels: %s now listens at %s: peer %s is gone", pid, link.pid.addr, link.pid)
            conn.close()
            self.set_dead(link, None, lost=False)
            return
        if link.conn is not None and not link.closing or link.death is not None:
            log.debug("deploy.channels: %s accepted our connection, but we have %r", pid, link.conn)
            conn.close()
            return
        self._attach(link, conn)

    def hello_received(self, conn: Connection[Link], pid: Pid, wanted: Pid | None) -> None:
        if wanted is None or wanted.hex != self.pid.hex:
            # The connector checks our pid and treats a mismatch as "peer gone".
            conn.send_setup(_wire.hello_frame(self.pid))
            conn.close()
            return
        with self.lock:
            link = self.links.get(pid.hex)
            if link is None:
                self.exited.pop(pid.hex, None)
                link = self.links[pid.hex] = Link(self, pid)
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

    def refused_as_duplicate(self, conn: Connection[Link]) -> None:
        link = _link_of(conn)
        log.debug("deploy.channels: %s refused our connection as a duplicate", link.pid)
        conn.close()
        if link.pending is conn:
            link.pending = None
        # The peer keeps its own connection to us, which is on its way (or already adopted);
        # retry in case it fails.
        if link.conn is None:
            self.loop.call_later(_RETRY_DUPLICATE, self.ensure_connected, link)

    def connection_failed(
        self,
        conn: Connection[Link],
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
                    self.set_dead(link, None, lost=False)
                elif logged or final:
                    self.set_dead(link, None, lost=True, reason=_why(error))
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
                self.set_dead(link, None, lost=True, reason=_why(error))

    def _setup_failed(self, link: Link, error: BaseException, started: float) -> None:
        # The peer may well be alive (see the module comment): try again, for a while.
        if self.links.get(link.pid.hex) is not link:
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
            self.set_dead(
                link, None, lost=True, reason=f"no connection set-up succeeded in {elapsed:.0f}s: {_why(error)}"
            )
            return
        if link.setup_failures == 1 or isinstance(error, TimeoutError):
            log.info("deploy.channels: connecting to %s failed (%s); retrying", link.pid, error)
        delay = min(_BACKOFF_FIRST * 2 ** (link.setup_failures - 1), _BACKOFF_MAX)
        link.setup_retry = True
        self.loop.call_later(delay, self._retry_setup, link)

    def _retry_setup(self, link: Link) -> None:
        link.setup_retry = False
        if link.death is not None or link.conn is not None or link.pending is not None:
            return
        if self.links.get(link.pid.hex) is not link:
            return
        if self.draining and not link.out:
            return
        if not (link.has_sender or link.has_receiver or link.out):
            self._forget_setup(link)
            return
        self.ensure_connected(link)

    def _forget_setup(self, link: Link) -> None:
        link.setup_since = None
        link.setup_failures = 0
        link.setup_timeout = SETUP_TIMEOUT
        self.maybe_forget(link)

    def goodbye(self, conn: Connection[Link], code: int | None) -> None:
        link = _link_of(conn)
        conn.close()
        if link.conn is conn:
            link.conn = None
        self.set_dead(link, code, lost=False)

    def set_dead(self, link: Link, code: int | None, *, lost: bool, reason: str | None = None) -> None:
        if link.death is not None:
            return
        link.death = (code, lost, reason)
        with link.out_lock:
            link.wconn = None
        link.discard_output()
        self.exited[link.pid.hex] = link.death
        while len(self.exited) > _EXITED_RECORD:
            self.exited.popitem(last=False)
        for conn in (link.conn, link.pending):
            if conn is not None:
                conn.close()
        link.conn = link.pending = None
        link.wake_all()
        self.maybe_forget(link)

    def maybe_forget(self, link: Link) -> bool:
        with self.lock:
            if link.has_sender or link.has_receiver or link.inbox or link.out:
                return False
            if link.conn is not None or link.pending is not None:
                return False
            if self.links.get(link.pid.hex) is link:
                del self.links[link.pid.hex]
            return True

    # --- reading back-pressure --------------------------------------------------------------

    def delivered(self, link: Link) -> None:
        # (What a receiver took and still decodes counts too: `Link.take`.)
        if link.paused or link.total_in_bytes - link.base[1] + link.in_hand <= self.high_water:
            return
        if link.buffered_bytes() + link.in_hand <= self.high_water:
            return
        link.paused = True
        link.resume_at = link.resume_threshold(self.high_water // 2)
        if link.conn is not None:
            link.conn.set_reading(False)
        if len(link.inbox) <= link.resume_at:
            self.resume_reading(link)

    def resume_reading(self, link: Link) -> None:
        link.resume_requested = False
        if not link.paused:
            return
        if link.in_hand > self.high_water // 2:
            return  # a receiver still decodes a large message: `Link.done_with` asks again
        if link.buffered_bytes() + link.in_hand > self.high_water // 2:
            link.resume_at = link.resume_threshold(self.high_water // 2)
            if len(link.inbox) > link.resume_at:
                return
        link.paused = False
        if link.conn is not None:
            link.conn.set_reading(True)

    # --- tearing idle connections down --------------------------------------------------------

    def channel_released(self, link: Link) -> None:
        if link.has_sender or link.has_receiver:
            return
        if link.death is not None:
            self.maybe_forget(link)
            return
        link.idle_token += 1
        self.loop.call_later(self.linger, self._linger_over, link, link.idle_token)

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

    def _send_control(self, conn: Connection[Link], kind: int) -> None:
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
        if self.maybe_forget(link):
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
        self.loop.call_later(self.linger, self._linger_over, link, token)

    def close_requested(self, conn: Connection[Link]) -> None:
        link = _link_of(conn)
        if self._is_idle(link) and not self.draining and self._stop_writers(link):
            link.closing = True
            conn.agreed_close = True
            # We wait for the requester to close: it has then read all we ever sent.
            conn.send_setup(_wire.control_frame(_wire.CLOSE_OK))
        else:
            self._send_control(conn, _wire.CLOSE_NO)

    def close_agreed(self, conn: Connection[Link]) -> None:
        link = _link_of(conn)
        conn.agreed_close = True
        conn.close()
        if link.conn is conn:
            link.conn = None
            self._after_close(link)

    def _after_close(self, link: Link) -> None:
        link.closing = False
        if self.maybe_forget(link):
            return
        if link.has_sender or link.has_receiver or link.out:
            self.ensure_connected(link)

    def close_refused(self, conn: Connection[Link]) -> None:
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
            self.loop.call_later(self.linger, self._linger_over, link, link.idle_token)

    def _retry_connect(self, link: Link, starved_since: float, delay: float) -> None:
        self._starved.discard(link.pid.hex)
        if link.death is not None or link.conn is not None or link.pending is not None:
            return
        if self.links.get(link.pid.hex) is not link or (self.draining and not link.out):
            return
        self._connect(link, starved_since, delay)

    # --- closing ------------------------------------------------------------------------------

    def begin_drain(self, exit_code: int | None) -> None:
        """The endpoint closes: no new sends; every peer we talk to is told goodbye."""
        self.draining = True
        self.goodbye_frame = _wire.goodbye_frame(exit_code)
        self.setup_wait_until = time.monotonic() + _SETUP_WAIT
        for link in list(self.links.values()):
            with link.out_lock:
                link.shut = True
            conn = link.conn
            if conn is not None:
                conn.unpark()  # (the peer's goodbye and replies are read at once)
            agreed_idle = conn is not None and conn.agreed_close and not link.out
            if link.death is None and (conn is not None or link.pending is not None or link.out) and not agreed_idle:
                # (A connection both sides agreed to close is idle: the peer learns of our
                # exit when it next connects and is refused.)
                self.queue_goodbye(link)
                link.flush()
                self.ensure_connected(link)
            link.wake_all()

    def owed(self) -> tuple[int, int, bool]:
        """While draining: (bytes not yet acknowledged, connections not settled, whether a
        live peer is owed bytes it has not accepted a connection for yet)."""
        # Everything that may still carry bytes to a peer counts: queued output even while
        # no connection exists (a refused duplicate waits for the peer's own connection),
        # attempts in progress, connections being torn down, and (briefly) connections
        # from peers still in set-up, which are owed a goodbye rather than a reset.
        unsent = unsettled = 0
        # A live peer whose kernel completed our connect but whose process has not
        # accepted it yet: no progress shows, yet the bytes are owed (DESIGN §2); wait for
        # it up to the deadline (its set-up times out after SETUP_TIMEOUT, then it is lost).
        held = False
        for link in list(self.links.values()):
            if link.death is not None:
                continue
            if link.pending is not None or link.setup_retry or (link.conn is not None and link.closing):
                unsettled += 1
                owed = link.out_bytes - (len(self.goodbye_frame) if link.goodbye_queued else 0)
                if owed > 0 and (link.setup_retry or link.pending is not None and link.pending.state != "connecting"):
                    held = True
            unsent += link.out_bytes
            if link.conn is not None:
                unsent += link.conn.unsent()
        if time.monotonic() < self.setup_wait_until:
            unsettled += sum(1 for conn in self.conns if conn.link is None and conn.state in ("auth", "hello"))
        return unsent, unsettled, held

    def close_all(self) -> None:
        """Close every connection, dropping what is still queued (the endpoint gave up)."""
        for conn in list(self.conns):
            conn.close()
        for link in list(self.links.values()):
            link.discard_output()  # nothing may still refer to a sender's buffers
            link.wake_all()

    def after_fork_in_child(self) -> None:
        # Every descriptor is shared with the parent: close ours (never shutdown, which
        # would cut the parent's connections).
        for conn in list(self.conns):
            try:
                conn.sock.close()
            except OSError:
                pass
        self.conns.clear()
        for link in list(self.links.values()):
            link.shut = True
            link.out_lock = threading.Lock()
            link.in_lock = threading.Lock()
            # Copies of the parent's messages, in and out: the parent delivers them.
            link.inbox.clear()
            link.out.clear()
            link.out_bytes = 0
            link.in_hand = 0
            link.conn = link.pending = None
            link.rx_watchers.clear()
            link.tx_watchers.clear()
