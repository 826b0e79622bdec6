"""The Endpoint: one listening port, one event loop thread, and the channels over them.

The public front: the listener (accepting, and the cap on strangers below), the
registry of channels and closing. What each peer's connections go through is in
`_peers`.

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
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable

from deploy_core import ChannelExists, DeployError, PeerExited, PeerLost, Pid

from ._connection import Connection
from ._link import INHERITED, Link
from ._loop import READ, EventLoop
from ._peers import _BACKOFF_FIRST, _BACKOFF_MAX, _NO_DESCRIPTORS, Peers
from .framing import DEFAULT_MAX_FRAME_SIZE

__all__ = ["Endpoint", "EndpointState"]

log = logging.getLogger("deploy.channels")

DEFAULT_HIGH_WATER = 8 * 1024 * 1024
DEFAULT_LINGER = 1.0
_DRAIN_STALL = 3.0
_DRAIN_TICK = 0.005
# A Receiver connects only if its peer has not connected first by then: a process that
# will send opens the connection itself, and two connections for one pair (one of them
# refused) cost both processes a handshake. The connection is still made to learn of a
# peer that dies without ever connecting.
_RECEIVER_CONNECT_DELAY = 0.05
#: Accepted connections that may be authenticating at once (see the module comment).
MAX_UNAUTHENTICATED = 128
_ACCEPT_BATCH = 32
_EVICTION_LOG_EVERY = 10.0
PROTECT_CHOICES = ("off", "remote", "all")


class EndpointState:
    """Module-level registry of live endpoints (for atexit and fork)."""

    live: weakref.WeakSet = weakref.WeakSet()


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
        # Seconds after which a peer that went silent without a FIN (a cut-off machine) is
        # lost: TCP keepalive probes and TCP_USER_TIMEOUT on every connection. None: the
        # kernel's defaults (hours), fine on one machine where a dead peer always resets.
        keepalive = None if keepalive is None else float(keepalive)
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
        self._senders: dict[str, weakref.ref] = {}
        self._receivers: dict[str, weakref.ref] = {}
        self._authenticating: deque[Connection[Link]] = deque()  # accepted, oldest first
        self._accept_backoff = 0.0  # while accepting is paused for lack of descriptors
        self._evicted = 0
        self._evicted_logged = -_EVICTION_LOG_EVERY
        self._closed = False
        self._drained = threading.Event()
        self._loop = EventLoop(f"deploy-channels-{pid}")
        self._peers = Peers(
            pid,
            self._loop,
            lock=self._lock,
            secret=bytes(secret),
            protect=protect,
            max_frame_size=int(max_frame_size),
            high_water=int(high_water),
            linger=float(linger),
            # Seconds after which a peer that went silent without a FIN (a cut-off machine)
            # is lost: TCP keepalive probes and TCP_USER_TIMEOUT on every connection. None:
            # the kernel's defaults (hours), fine on one machine where a dead peer always resets.
            keepalive=keepalive,
            peer_status=peer_status,
        )
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
            link = self._peers.link_for(pid)

            def collected(ref: weakref.ref[object]) -> None:
                self._close_channel(kind, pid, ref)

            ref = weakref.ref(channel, collected)
            registry[key] = ref
            if kind == "sender":
                link.has_sender = True
            else:
                link.has_receiver = True
        connect = self._peers.ensure_connected
        if kind == "sender":
            self._loop.call_soon(connect, link)
        else:
            self._loop.call_soon(self._loop.call_later, _RECEIVER_CONNECT_DELAY, connect, link)
        return link, ref

    def _close_channel(self, kind: str, pid: Pid, ref: weakref.ref) -> None:
        registry = self._senders if kind == "sender" else self._receivers
        with self._lock:
            if registry.get(pid.hex) is not ref:
                return
            del registry[pid.hex]
            link = self._peers.links.get(pid.hex)
            if link is not None:
                if kind == "sender":
                    link.has_sender = False
                else:
                    link.has_receiver = False
        if link is not None and not self._loop.forked and self._loop.is_running():
            self._loop.call_soon(self._peers.channel_released, link)

    def _check_usable(self) -> None:
        if self._loop.forked:
            raise DeployError(INHERITED)
        if self._closed:
            raise DeployError(f"the endpoint {self.pid} is closed")

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
            conn = Connection(self._peers, sock, link=None, addr=addr)
            self._peers.conns.add(conn)
            self._authenticating.append(conn)
            conn.start_accept()
            conn.on_event(READ)  # an honest peer's hello usually came with the connection

    def _unauthenticated(self) -> deque[Connection[Link]]:
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
            self._peers.connection_failed(
                oldest, ConnectionAbortedError("too many connections authenticating"), logged=True
            )

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
        self._peers.begin_drain(exit_code)
        self._drain_tick(deadline, None, time.monotonic())

    def _drain_tick(self, deadline: float, last: int | None, progress_at: float) -> None:
        unsent, unsettled, held = self._peers.owed()
        now = time.monotonic()
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
        self._loop.unregister(self._listener.fileno())
        self._listener.close()
        self._peers.close_all()
        self._drained.set()
        self._loop.stop()

    def _after_fork_in_child(self) -> None:
        # The loop thread does not exist here and every descriptor is shared with the
        # parent: close ours (never shutdown, which would cut the parent's connections).
        self._loop.close_after_fork()
        self._peers.after_fork_in_child()
        try:
            self._listener.close()
        except OSError:
            pass
        self._closed = True
        self._lock = self._peers.lock = threading.RLock()


def _advertised_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return "127.0.0.1"
    return host
