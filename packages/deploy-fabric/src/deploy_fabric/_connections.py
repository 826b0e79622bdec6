"""The fabric's own connections: a selector loop for daemons and their authenticated,
non-blocking control connections, with the identities each port accepts.

Facts relied on:
- An idle TCP connection to a machine that vanished without a FIN stays "established"
  for hours; keepalive probes and TCP_USER_TIMEOUT make it an error within seconds.
- With PR_SET_CHILD_SUBREAPER a daemon becomes the parent of any orphan among its
  descendants (a process whose zygote was killed), so it can find and kill them at exit.
- The handshake reads and writes a few small messages; it runs on a thread of its own per
  connection (bounded in number), so a slow or silent peer never holds up the loop.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
from deploy_core import AuthenticationError, DeployError, ProtectedSocket, authenticate, env

from . import _wire as wire
from ._node import flush_all, sealed_waiting, send_or_keep

__all__ = ["Channel", "Loop", "accept_authenticated", "connect_authenticated"]

log = logging.getLogger("deploy.fabric")

CACHE = "DEPLOY_CACHE"  # a daemon's bundle cache directory

# Identities in the handshake (deploy_core.Handshake): a worker's port accepts only the
# master, the master's port only nodes, its bridge port only push and status. A joining
# worker names itself "node:BIND".
MASTER = "master"
NODE = "node"
BRIDGE = "bridge"
PUSH = "push"
STATUS = "status"

# Frame protection (deploy_core.ProtectedSocket) on every fabric connection whose peer is
# not on this machine: daemons, pushes, a run's control connections and its channels.
PROTECT = "remote"
# Internal, for tests: "1" protects the daemons' own connections (node<->master,
# push/status<->bridge) on loopback too, so that one machine can exercise them. Every
# daemon, push and status of the cluster must then have it (there is no negotiation).
PROTECT_ALL = "DEPLOY_PROTECT_ALL"

PING_EVERY = 1.0  # the master pings each node this often
LOST_AFTER = 4.0  # a peer daemon silent this long is lost (DESIGN: within 5 s)
CONNECT_RETRY = 1.0  # seconds between attempts to reach a worker or a master
_MAX_UNAUTHENTICATED = 128
_EVICTION_LOG_EVERY = 10.0  # seconds between log lines counting evicted handshakes


def parse_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit():
        raise DeployError(f"{addr!r} is not an address: expected HOST:PORT")
    return host.strip("[]"), int(port)


def listen(addr: str) -> socket.socket:
    host, port = parse_addr(addr)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as error:
        sock.close()
        raise DeployError(f"cannot listen on {addr}: {error.strerror or error}") from None
    return sock


def bound(listener: socket.socket, addr: str) -> str:
    """``addr`` with the port the listener really has (BIND may ask for port 0)."""
    host = parse_addr(addr)[0]
    port = listener.getsockname()[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def announce(line: str) -> None:
    """One line on stderr when a daemon starts serving, so its terminal does not look hung."""
    print(f"deploy fabric: {line}", file=sys.stderr, flush=True)


def keepalive(sock: socket.socket) -> None:
    """Cut-off peers show as errors within about 5 s, not the kernel's two hours."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 2), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 3), ("TCP_USER_TIMEOUT", 5000)):
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


def daemon_setup() -> None:
    # A daemon's stderr is its log: warnings (a dropped connection, a lost node) always go
    # there (DESIGN §4: a bad connection is closed and logged), tracing with DEPLOY_LOG.
    level = logging.DEBUG if os.environ.get(env.LOG) else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr, format="deploy[%(process)d] %(name)s: %(message)s")
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def cache_directory() -> Path:
    """Where a daemon keeps its bundles: DEPLOY_CACHE, else the user's cache directory."""
    chosen = os.environ.get(CACHE)
    if chosen:
        return Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "deploy" / "bundles"


def kill_descendants() -> None:
    """Kill whatever is left below this daemon (orphans adopted as a subreaper included)."""
    try:
        children = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(children, timeout=2)


class Loop:
    """One selector, calls posted from other threads, signals, and a stop flag."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self._calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, self._drain)
        self._signal_r, self._signal_w = socket.socketpair()
        self._signal_r.setblocking(False)
        self._signal_w.setblocking(False)
        self.selector.register(self._signal_r, selectors.EVENT_READ, self._signals)
        self.stopping: float | None = None

    def install_signals(self) -> None:
        signal.set_wakeup_fd(self._signal_w.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, lambda signum, frame: None)

    def post(self, call: Callable[[], None]) -> None:
        self._calls.put(call)
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass

    def _drain(self, mask: int) -> None:
        try:
            self._wake_r.recv(4096)
        except (BlockingIOError, InterruptedError):
            pass
        while True:
            try:
                call = self._calls.get_nowait()
            except queue.Empty:
                return
            call()

    def _signals(self, mask: int) -> None:
        try:
            data = self._signal_r.recv(512)
        except (BlockingIOError, InterruptedError):
            return
        if data and self.stopping is None:
            log.info("%s: stopping", signal.Signals(data[0]).name)
            self.stopping = time.monotonic()

    def once(self, timeout: float) -> None:
        for key, mask in self.selector.select(timeout):
            key.data(mask)


class Channel:
    """A non-blocking, authenticated connection that carries control messages both ways."""

    def __init__(self, sock: socket.socket, loop: Loop, on_message: Callable, on_closed: Callable):
        self.sock = sock
        self._loop = loop
        self._reader = wire.MessageReader()
        self._outbox = bytearray()
        self._on_message = on_message
        self._on_closed = on_closed
        self.closed = False
        self.seen = time.monotonic()
        sock.setblocking(False)
        loop.selector.register(sock, selectors.EVENT_READ, self._ready)

    def send(self, message: tuple) -> None:
        if self.closed:
            return
        if send_or_keep(self.sock, self._outbox, wire.encode(message)) or sealed_waiting(self.sock):
            self._loop.selector.modify(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, self._ready)

    def _ready(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE and not flush_all(self.sock, self._outbox) and not self.closed:
            self._loop.selector.modify(self.sock, selectors.EVENT_READ, self._ready)
        if not mask & selectors.EVENT_READ or self.closed:
            return
        try:
            data = self.sock.recv(1 << 18)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        self.seen = time.monotonic()
        try:
            messages = self._reader.feed(data)
        except DeployError as error:
            log.warning("dropped a connection that sent a bad frame: %s", error)
            messages, data = [], b""
        for message in messages:
            if self.closed:
                return
            try:
                self._on_message(self, message)
            except Exception as error:  # whatever a malformed message makes us raise
                log.warning("dropped a connection after a bad %s message: %r", message[0].value, error)
                self.close()
                return
        if not data or self._reader.closed:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._loop.selector.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()
        self._on_closed(self)


def accept_authenticated(
    listener: socket.socket,
    secret: bytes,
    identity: str,
    peers: tuple[str, ...],
    loop: Loop,
    on_ready: Callable[[socket.socket], None],
) -> None:
    """Accept connections as ``identity`` from peers whose identity starts with one of ``peers``;
    each is authenticated on a thread of its own (each within 10 s), then handed to the loop.
    At most `_MAX_UNAUTHENTICATED` authenticate at once: a newcomer over the cap closes the
    oldest (an honest handshake takes one round trip, so a flood of idle connections cannot
    keep legitimate clients out). Out of descriptors, accepting pauses."""
    lock = threading.Lock()
    pending: dict[socket.socket, None] = {}  # authenticating, oldest first
    evicted: set[socket.socket] = set()
    evictions = {"count": 0, "logged": 0, "at": 0.0}

    def handshake(sock: socket.socket) -> None:
        try:
            done = authenticate(sock, secret, initiator=False, identity=identity, timeout=10.0)
            ready = protected(sock, done.key, initiator=False, peer=done.peer)
        except (AuthenticationError, OSError) as error:
            with lock:
                was_evicted = sock in evicted
                evicted.discard(sock)
            if not was_evicted:  # (an eviction is counted, not logged one by one)
                log.warning("dropped a connection that failed authentication: %s", error)
            sock.close()
            return
        finally:
            with lock:
                pending.pop(sock, None)
        if not done.peer.startswith(peers):
            log.warning("dropped a connection from %r, which has no business on the %s port", done.peer, identity)
            sock.close()
            return
        sock.settimeout(None)
        loop.post(lambda: on_ready(ready))

    def make_room() -> None:
        with lock:
            if len(pending) < _MAX_UNAUTHENTICATED:
                return
            oldest = next(iter(pending))
            del pending[oldest]
            evicted.add(oldest)
            evictions["count"] += 1
        try:  # wakes its handshake thread, which closes it
            oldest.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        now = time.monotonic()
        if now - evictions["at"] >= _EVICTION_LOG_EVERY:
            log.warning(
                "closed %d connection(s) still authenticating to make room for newer ones (at most %d at once)",
                evictions["count"] - evictions["logged"],
                _MAX_UNAUTHENTICATED,
            )
            evictions["at"], evictions["logged"] = now, evictions["count"]

    def resume() -> None:
        if listener.fileno() >= 0:
            loop.selector.register(listener, selectors.EVENT_READ, accept)

    def accept(mask: int) -> None:
        for _ in range(32):  # then let the loop serve the others
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                log.warning("cannot accept a connection (pausing for 1 s): %s", error)
                loop.selector.unregister(listener)
                threading.Timer(1.0, loop.post, args=(resume,)).start()
                return
            make_room()
            keepalive(sock)
            with lock:
                pending[sock] = None
            threading.Thread(target=handshake, args=(sock,), daemon=True).start()

    listener.setblocking(False)
    loop.selector.register(listener, selectors.EVENT_READ, accept)


def connect_authenticated(
    addr: str, secret: bytes, identity: str, wanted: str, *, timeout: float = 10.0
) -> socket.socket:
    """A blocking TCP connection to a fabric port, authenticated as ``identity`` to ``wanted``."""
    host, port = parse_addr(addr)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as error:
        raise DeployError(f"cannot reach {addr}: {error.strerror or error}") from None
    keepalive(sock)
    try:
        done = authenticate(sock, secret, initiator=True, identity=identity, wanted=wanted, timeout=timeout)
        sock.settimeout(None)
        return protected(sock, done.key, initiator=True, peer=wanted)
    except AuthenticationError as error:
        sock.close()
        raise AuthenticationError(f"{addr} refused this secret ({error})") from None
    except OSError as error:
        sock.close()
        if isinstance(error, (ConnectionResetError, BrokenPipeError)) or not error.strerror:
            raise AuthenticationError(f"{addr} closed the connection during authentication: wrong secret?") from None
        raise DeployError(f"lost {addr} during authentication: {error.strerror}") from None


def protected(sock: socket.socket, key: bytes, *, initiator: bool, peer: str) -> socket.socket:
    """``sock``, or a `ProtectedSocket` around it when its peer is on another machine
    (DESIGN §4: connections that cross machines protect every frame). Both ends judge the
    address their socket reports for the other, so they agree without negotiating."""
    setting = "all" if os.environ.get(PROTECT_ALL) == "1" else PROTECT
    if not wire.protects(setting, sock.getpeername()[0]):
        return sock
    return ProtectedSocket(sock, key, initiator=initiator, peer=peer)  # type: ignore[return-value]
