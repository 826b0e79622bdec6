"""The bridge: collects every process's events, shows them, schedules spawns, ends the run.

One thread and one selector. Connections arrive on the fabric port and must pass the
handshake (as a pid, wanting the bridge) before anything they send is decoded; then a
user process says who it is (the pid it authenticated as) and sends spawn requests
(whose parent must be that pid). Messages are plain values (see `_wire`); one that is
malformed, or that claims another identity, or that fails in any way while handled,
closes its connection with one log line, and the bridge goes on serving the others.

At most `MAX_UNAUTHENTICATED` connections may be authenticating at once: a newcomer over
the cap closes the oldest (an honest handshake takes one round trip; its hello usually
arrives with the connection and is read at once). ``accept`` failing for lack of
descriptors (EMFILE, ENFILE, ENOBUFS, ENOMEM) leaves the connection in the backlog and
the listener readable, so accepting pauses for a back-off that doubles up to 1 s
instead of spinning. The zygote is reached over two socketpairs made before it was
forked: a stream that carries fork requests to it (written from this loop, never with a
blocking write: the zygote forwards every process's output here and may be waiting for
us to read it), and a packet socket that brings back each new process's pid together
with our end of that process's event stream (SCM_RIGHTS), on which its monitor (the
zygote) streams its output and exit: no connection set-up and no handshake. The run ends
when every process has exited; its code is 0 if all exited 0, else the first failure's
code (128+N for a signal N).
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import signal
import socket
import time
from collections import deque
from dataclasses import dataclass, field

from deploy_core import AuthenticationError, DeployError, Handshake, Pid, Resources, SpawnReply, SpawnRequest

from . import _wire as wire
from ._output import Formatter
from ._scheduler import Node, Scheduler

__all__ = ["Bridge"]

log = logging.getLogger("deploy.fabric")

# How long processes get to report their exit after Ctrl-C.
_INTERRUPT_GRACE = 2.0
_HANDSHAKE_TIMEOUT = 10.0
#: Connections that may be authenticating at once (see the module comment).
MAX_UNAUTHENTICATED = 128
_ACCEPT_BATCH = 32
_BACKOFF_FIRST, _BACKOFF_MAX = 0.01, 1.0
_NO_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_EVICTION_LOG_EVERY = 10.0


@dataclass
class _Conn:
    sock: socket.socket
    handshake: Handshake | None
    reader: wire.MessageReader = field(default_factory=wire.MessageReader)
    role: str | None = None
    peer: str | None = None  # the identity it authenticated as
    pid: str | None = None  # the process it speaks for
    outbox: bytearray = field(default_factory=bytearray)
    opened: float = field(default_factory=time.monotonic)


@dataclass
class _Process:
    pid: Pid
    parent: Pid | None
    resources: Resources
    node: Node
    exited: bool = False


@dataclass
class _Pending:
    """A spawn that is waiting for capacity or for the zygote."""

    requester: _Conn | None  # None: the top process
    request: bytes | None  # the encoded SpawnRequest, forwarded to the zygote as it came
    resources: Resources
    parent: Pid | None
    node: Node | None = None


class Bridge:
    def __init__(
        self,
        listener: socket.socket,
        to_zygote: socket.socket,
        from_zygote: socket.socket,
        secret: bytes,
        formatter: Formatter,
        scheduler: Scheduler,
    ):
        self._listener = listener
        self._to_zygote = to_zygote
        # Never a blocking write to the zygote: it forwards every process's output to us,
        # and may be waiting for us to read it.
        self._to_zygote_outbox = bytearray()
        self._from_zygote = from_zygote
        self._secret = secret
        self._out = formatter
        self._scheduler = scheduler
        self._selector = selectors.DefaultSelector()
        self._conns: dict[int, _Conn] = {}
        self._processes: dict[str, _Process] = {}
        self._tickets: dict[int, _Pending] = {}
        self._next_ticket = 0
        self._queue: deque[_Pending] = deque()
        self._code: int | None = None
        self._interrupted: float | None = None
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._accept_backoff = 0.0
        self._accept_paused_until: float | None = None
        self._evicted = 0
        self._evicted_logged = -_EVICTION_LOG_EVERY

    # -- the loop ---------------------------------------------------------------------

    def run(self, top: Resources) -> int:
        """Start the top process, serve until every process has exited; return the run's code."""
        for sock in (self._listener, self._to_zygote, self._from_zygote, self._wakeup_r, self._wakeup_w):
            sock.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._from_zygote, selectors.EVENT_READ, "zygote")
        self._selector.register(self._wakeup_r, selectors.EVENT_READ, "signal")
        signal.set_wakeup_fd(self._wakeup_w.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._on_signal)

        node = self._scheduler.place(top)
        if node is None:
            raise DeployError(f"cannot start: {self._scheduler.impossible(top) or 'no capacity'}")
        self._fork(_Pending(None, None, top, None, node))
        while not self._finished():
            timeout = self._housekeeping()
            for key, mask in self._selector.select(timeout):
                self._dispatch(key, mask)
        for process in self._processes.values():
            if not process.exited:  # still silent after Ctrl-C: its monitor has the lifeline
                self._exited(process, None, "SIGKILL", "run interrupted")
        self._out.close()
        return self._code or 0

    def _finished(self) -> bool:
        if self._interrupted is not None and time.monotonic() - self._interrupted > _INTERRUPT_GRACE:
            return True
        live = any(not process.exited for process in self._processes.values())
        return not live and not self._tickets and not self._queue

    def _housekeeping(self) -> float:
        """Flush held partial lines and expire stale state; return the select timeout."""
        now = time.monotonic()
        timeout = 1.0
        due = self._out.tick()
        if due is not None:
            timeout = min(timeout, due)
        for conn in list(self._conns.values()):
            if conn.handshake is not None and now - conn.opened > _HANDSHAKE_TIMEOUT:
                log.warning("dropped a connection that did not authenticate in time")
                self._drop(conn)
        if self._accept_paused_until is not None:
            if now >= self._accept_paused_until:
                self._accept_paused_until = None
                self._selector.register(self._listener, selectors.EVENT_READ, "accept")
            else:
                timeout = min(timeout, self._accept_paused_until - now)
        if self._interrupted is not None:
            timeout = min(timeout, 0.1)
        return timeout

    def _dispatch(self, key: selectors.SelectorKey, mask: int) -> None:
        what = key.data
        if what == "accept":
            self._accept()
        elif what == "zygote":
            self._read_zygote()
        elif what == "to-zygote":
            self._flush_to_zygote()
        elif what == "signal":
            self._read_signals()
        else:
            conn: _Conn = what
            if mask & selectors.EVENT_WRITE:
                self._flush(conn)
            if mask & selectors.EVENT_READ and conn.sock.fileno() >= 0:
                self._read(conn)

    # -- connections ------------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in _NO_DESCRIPTORS:
                    self._pause_accepting(error)
                    return
                raise
            if self._accept_backoff:
                log.info("accepting connections again")
                self._accept_backoff = 0.0
            self._make_room(MAX_UNAUTHENTICATED)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = _Conn(sock, Handshake(self._secret, initiator=False, identity=wire.BRIDGE))
            self._conns[sock.fileno()] = conn
            self._selector.register(sock, selectors.EVENT_READ, conn)
            self._read(conn)  # an honest process's hello usually came with the connection

    def _make_room(self, cap: int) -> None:
        """Close the oldest authenticating connections until fewer than ``cap`` remain."""
        authenticating = [conn for conn in self._conns.values() if conn.handshake is not None]
        for oldest in authenticating[: max(0, len(authenticating) - cap + 1)]:
            self._evicted += 1
            now = time.monotonic()
            if now - self._evicted_logged >= _EVICTION_LOG_EVERY:
                self._evicted_logged = now
                log.warning(
                    "over %d connections authenticating at once: closed the oldest (%d so far)",
                    MAX_UNAUTHENTICATED,
                    self._evicted,
                )
            self._drop(oldest)

    def _pause_accepting(self, error: OSError) -> None:
        if not self._accept_backoff:
            log.warning("cannot accept connections: %s; pausing", error)
        self._accept_backoff = min(max(self._accept_backoff * 2, _BACKOFF_FIRST), _BACKOFF_MAX)
        authenticating = sum(1 for conn in self._conns.values() if conn.handshake is not None)
        if authenticating:
            self._make_room(authenticating)  # one descriptor back from a stranger
        self._selector.unregister(self._listener)
        self._accept_paused_until = time.monotonic() + self._accept_backoff

    def _read(self, conn: _Conn) -> None:
        try:
            if conn.handshake is not None:
                data = conn.sock.recv(conn.handshake.bytes_needed())
                conn.handshake.receive_data(data)
                self._send(conn, conn.handshake.data_to_send())
                if conn.handshake.done:
                    conn.peer, conn.handshake = conn.handshake.peer, None
                return
            data = conn.sock.recv(1 << 18)
        except (BlockingIOError, InterruptedError):
            return
        except AuthenticationError as error:
            log.warning("dropped a connection that failed authentication: %s", error)
            self._drop(conn)
            return
        except OSError:
            data = b""
        try:
            for message in conn.reader.feed(data):
                self._handle(conn, message)
        except Exception as error:  # anything a malformed message makes us raise
            log.warning("dropped the control connection of %s: %s", _who(conn), _one_line(error))
            self._lost(conn)
            return
        if not data or conn.reader.closed:
            self._lost(conn)

    def _send(self, conn: _Conn, data: bytes) -> None:
        if data and _send_or_keep(conn.sock, conn.outbox, data):
            self._selector.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)

    def _flush(self, conn: _Conn) -> None:
        if not _flush_kept(conn.sock, conn.outbox):
            self._selector.modify(conn.sock, selectors.EVENT_READ, conn)

    def _drop(self, conn: _Conn) -> None:
        if self._conns.pop(conn.sock.fileno(), None) is not None:
            self._selector.unregister(conn.sock)
        conn.sock.close()

    def _lost(self, conn: _Conn) -> None:
        """A connection ended: a monitor that ends before its exit event means a lost process."""
        self._drop(conn)
        if conn.role == wire.MONITOR and conn.pid in self._processes:
            process = self._processes[conn.pid]
            if not process.exited:
                self._exited(process, None, "SIGKILL", "its monitor died")
        elif conn.role == wire.HELLO_PROCESS:
            self._queue = deque(pending for pending in self._queue if pending.requester is not conn)

    # -- messages ---------------------------------------------------------------------

    def _handle(self, conn: _Conn, message: tuple) -> None:
        """Act on one message; raises (and the caller drops the connection) on a bad one."""
        kind = message[0]
        if conn.role is None:
            if kind != wire.HELLO_PROCESS or len(message) != 2:
                raise DeployError(f"it sent {kind!r} before introducing itself")
            pid = Pid.parse(message[1])
            if pid.hex != conn.peer:
                raise DeployError(f"its hello names pid {pid}, but it authenticated as {conn.peer!r}")
            conn.role, conn.pid = kind, pid.hex
        elif conn.role == wire.HELLO_PROCESS and kind == wire.SPAWN and len(message) == 2:
            self._spawn_requested(conn, message[1])
        elif conn.role == wire.MONITOR and kind in (wire.OUTPUT, wire.EXIT):
            self._event(conn.pid, message)
        else:
            raise DeployError(f"unexpected {kind!r} message")

    def _event(self, pid: str, message: tuple) -> None:
        process = self._processes[pid]
        if process.exited:
            return
        if message[0] == wire.OUTPUT:
            _, fd, data = message
            self._out.output(process.pid, fd, data)
        else:
            _, code, signal_name, reason = message
            if self._interrupted is not None and reason == "bridge lost":
                reason = "run interrupted"
            self._exited(process, code, signal_name, reason)

    def _exited(self, process: _Process, code: int | None, signal_name: str | None, reason: str | None) -> None:
        process.exited = True
        self._out.exit(process.pid, code, signal_name, reason)
        if self._code is None and (code != 0 or signal_name is not None):
            self._code = code if signal_name is None else 128 + signal.Signals[signal_name].value
        self._scheduler.release(process.node, process.resources)
        self._place_queued()

    # -- spawning ---------------------------------------------------------------------

    def _spawn_requested(self, conn: _Conn, data: bytes) -> None:
        try:
            request = SpawnRequest.decode(data)
        except DeployError as error:
            self._reply(conn, SpawnReply(error=str(error)))
            return
        if request.parent is None or request.parent.hex != conn.pid:
            raise DeployError(f"its spawn request names parent {request.parent}, but it is process {conn.pid[:7]}")
        if self._interrupted is not None:
            self._reply(conn, SpawnReply(error="the run is being stopped"))
            return
        problem = self._scheduler.impossible(request.resources)
        if problem is not None:
            self._reply(conn, SpawnReply(error=problem, no_capacity=True))
            return
        pending = _Pending(conn, data, request.resources, request.parent)
        if self._queue or not self._try_place(pending):
            if request.block:
                self._queue.append(pending)
            else:
                free = self._scheduler.describe_free()
                self._reply(
                    conn, SpawnReply(error=f"no capacity for {request.resources} now: {free}", no_capacity=True)
                )

    def _try_place(self, pending: _Pending) -> bool:
        node = self._scheduler.place(pending.resources)
        if node is None:
            return False
        pending.node = node
        self._fork(pending)
        return True

    def _place_queued(self) -> None:
        while self._queue and self._try_place(self._queue[0]):
            self._queue.popleft()

    def _fork(self, pending: _Pending) -> None:
        ticket = self._next_ticket
        self._next_ticket += 1
        self._tickets[ticket] = pending
        # (If the zygote is gone, its packet socket reports that.)
        data = wire.encode((wire.FORK, ticket, pending.request, pending.resources.to_dict()))
        if _send_or_keep(self._to_zygote, self._to_zygote_outbox, data):
            self._selector.register(self._to_zygote, selectors.EVENT_WRITE, "to-zygote")

    def _flush_to_zygote(self) -> None:
        if not _flush_kept(self._to_zygote, self._to_zygote_outbox):
            self._selector.unregister(self._to_zygote)

    def _read_zygote(self) -> None:
        while True:
            try:
                data, fds, _, _ = socket.recv_fds(self._from_zygote, 1 << 16, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, fds = b"", []
            if not data:
                self._zygote_lost()
                return
            message = wire.load(data)
            if message[0] == wire.FORKED:
                self._forked(*message[1:], monitor_fd=fds[0] if fds else None)
            for fd in fds[1:]:
                os.close(fd)

    def _zygote_lost(self) -> None:
        self._selector.unregister(self._from_zygote)
        self._from_zygote.close()
        if self._interrupted is None:
            log.error("the fork server exited")
        for pending in list(self._tickets.values()):
            self._fail(pending, "the fork server exited")
        self._tickets.clear()
        for pending in self._queue:
            self._fail(pending, "the fork server exited")
        self._queue.clear()

    def _fail(self, pending: _Pending, why: str) -> None:
        if pending.node is not None:
            self._scheduler.release(pending.node, pending.resources)
        if pending.requester is not None:
            self._reply(pending.requester, SpawnReply(error=why))
        elif self._code is None:
            self._code = 1

    def _forked(self, ticket: int, pid_text: str | None, error: str | None, *, monitor_fd: int | None) -> None:
        pending = self._tickets.pop(ticket)
        if error is not None or pid_text is None or monitor_fd is None:
            if monitor_fd is not None:
                os.close(monitor_fd)
            self._fail(pending, error or "the fork server could not start the process")
            return
        pid = Pid.parse(pid_text)
        self._processes[pid.hex] = _Process(pid, pending.parent, pending.resources, pending.node)
        if pending.requester is not None:  # first: the requester is waiting
            self._reply(pending.requester, SpawnReply(pid=pid))
        self._out.spawn(pid, pending.parent, pending.resources)
        # The monitor's events: if it dies before reporting an exit, this reads EOF.
        monitor = _Conn(socket.socket(fileno=monitor_fd), None, role=wire.MONITOR, pid=pid.hex)
        monitor.sock.setblocking(False)
        self._conns[monitor.sock.fileno()] = monitor
        self._selector.register(monitor.sock, selectors.EVENT_READ, monitor)
        if self._interrupted is not None:
            self._stop_monitor(monitor)

    def _reply(self, conn: _Conn, reply: SpawnReply) -> None:
        if conn.sock.fileno() >= 0:
            self._send(conn, wire.encode((wire.SPAWNED, reply.encode())))

    # -- stopping ---------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: object) -> None:
        pass  # the wakeup fd carries the signal number to the loop

    def _read_signals(self) -> None:
        try:
            data = self._wakeup_r.recv(512)
        except (BlockingIOError, InterruptedError):
            return
        if data and self._interrupted is None:
            self.interrupt(signal.Signals(data[0]))

    def interrupt(self, signum: signal.Signals) -> None:
        """Stop the run: every monitor kills its process and reports; no new spawns."""
        log.info("%s: stopping every process of the run", signum.name)
        self._interrupted = time.monotonic()
        if self._code is None:
            self._code = 128 + signum.value
        for pending in self._queue:
            self._fail(pending, "the run is being stopped")
        self._queue.clear()
        for conn in list(self._conns.values()):
            if conn.role == wire.MONITOR:
                self._stop_monitor(conn)
        if self._to_zygote_outbox:
            self._to_zygote_outbox.clear()
            self._selector.unregister(self._to_zygote)
        self._to_zygote.close()  # the zygote exits at the end of its stream

    def _stop_monitor(self, conn: _Conn) -> None:
        try:
            conn.sock.shutdown(socket.SHUT_WR)  # the monitor's lifeline: it kills its process
        except OSError:
            pass


def _who(conn: _Conn) -> str:
    if conn.pid is not None:
        return f"process {conn.pid[:7]}"
    return repr(conn.peer) if conn.peer is not None else "an unauthenticated peer"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _send_or_keep(sock: socket.socket, outbox: bytearray, data: bytes) -> bool:
    """Send ``data`` after what ``outbox`` holds, as far as the socket takes it now, and keep
    the rest; True when the outbox just began waiting for the socket to be writable. On a
    broken socket the data is dropped: its reader sees the end."""
    if outbox:
        outbox += data
        return False
    try:
        sent = sock.send(data)
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        return False
    outbox += memoryview(data)[sent:]
    return bool(outbox)


def _flush_kept(sock: socket.socket, outbox: bytearray) -> bool:
    """Send what the socket takes of ``outbox`` now; True while some is left."""
    try:
        sent = sock.send(outbox)
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        outbox.clear()
        return False
    del outbox[:sent]
    return bool(outbox)
