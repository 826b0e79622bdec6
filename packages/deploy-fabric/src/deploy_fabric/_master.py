"""The master: a run's nodes, the placement of its processes and the spawns waiting for room.

One thread and one selector. Processes' control connections arrive on the master's port
and must pass the handshake before anything they send is decoded; then a process says
who it is and sends spawn requests. The master places each on a node (`Scheduler`),
queues a blocking spawn that does not fit yet (in order: capacity returns when a process
exits), asks the node's zygote for the process, answers the requester first (it is
waiting) and then tells the bridge. The run ends when every process has exited.

The control port (issue 13). A process authenticates as its pid's hex, wanting
`wire.BRIDGE`; its hello must name that pid and its spawn requests must name it as the
parent. Messages are plain values (`wire.load`); one that is malformed, claims another
identity, or fails in any way while handled closes its connection with one log line,
and the master goes on serving the others.

At most `MAX_UNAUTHENTICATED` connections may be authenticating at once: a newcomer over
the cap closes the oldest (an honest handshake takes one round trip, and its hello
usually arrives with the connection and is read at once); a wake-up accepts at most
`_ACCEPT_BATCH`. ``accept`` failing for lack of descriptors (EMFILE, ENFILE, ENOBUFS,
ENOMEM) leaves the connection in the backlog and the listener readable, so accepting
pauses for a back-off that doubles up to 1 s (resumed by `housekeeping`) instead of
spinning.
"""

from __future__ import annotations

import errno
import functools
import logging
import selectors
import signal
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from deploy_core import (
    AuthenticationError,
    DeployError,
    Handshake,
    Pid,
    ProtectedSocket,
    Resources,
    SpawnReply,
    SpawnRequest,
)

from . import _wire as wire
from ._bridge import Bridge
from ._node import flush_kept, send_or_keep
from ._scheduler import Node, Scheduler
from ._wire import Kind

__all__ = ["Master", "NodeHandle"]

log = logging.getLogger("deploy.fabric")

# How long processes get to report their exit after Ctrl-C.
_INTERRUPT_GRACE = 2.0
# After Ctrl-C, what the monitors say of the processes they stop (or of themselves being
# stopped) is reported as "interrupted".
_STOPPED_BY_INTERRUPT = (None, "bridge lost", "its monitor died", "interrupted")
_HANDSHAKE_TIMEOUT = 10.0
#: Connections that may be authenticating at once (see the module comment).
MAX_UNAUTHENTICATED = 128
_ACCEPT_BATCH = 32
_BACKOFF_FIRST, _BACKOFF_MAX = 0.01, 1.0
_NO_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_EVICTION_LOG_EVERY = 10.0


class NodeHandle(Protocol):
    """How the master reaches a node: it answers through the master's `forked`/`output`/`exited`."""

    def fork(self, ticket: int, request: bytes | None, resources: Resources) -> None: ...
    def stop(self) -> None: ...


@dataclass
class _Conn:
    sock: socket.socket
    handshake: Handshake | None
    reader: wire.MessageReader = field(default_factory=wire.MessageReader)
    peer: str | None = None  # the identity it authenticated as
    pid: str | None = None  # the process it speaks for, once it has said so
    outbox: bytearray = field(default_factory=bytearray)
    opened: float = field(default_factory=time.monotonic)
    on_ready: Callable[[int], None] | None = None  # what the selector calls


@dataclass
class _Process:
    pid: Pid
    parent: Pid | None
    resources: Resources
    node: Node
    exited: bool = False
    status: tuple[int | None, str | None, str | None] = (None, None, None)  # code, signal, reason
    asking: list[_Conn] = field(default_factory=list)  # waiting to hear how it ends (PEER_EXIT)
    started: float = field(default_factory=time.time)


@dataclass
class _Pending:
    """A spawn that is waiting for capacity or for its node."""

    requester: _Conn | None  # None: the top process
    request: bytes | None  # the encoded SpawnRequest, forwarded to the node as it came
    resources: Resources
    parent: Pid | None
    node: Node | None = None


class Master:
    """One run's master. Local mode runs it alone (`run`); the cluster's master daemon drives
    one per run from its own loop (`start`, `finished`, `finish`), all sharing its nodes."""

    def __init__(
        self,
        listener: socket.socket,
        secret: bytes,
        bridge: Bridge,
        *,
        selector: selectors.BaseSelector | None = None,
        scheduler: Scheduler | None = None,
        handle_for: Callable[[Node], NodeHandle] | None = None,
        protect: str = "off",
    ):
        wire.protects(protect, "127.0.0.1")  # a bad setting fails here, not at the first connection
        self._protect = protect  # which control connections carry protected records
        self.selector = selector or selectors.DefaultSelector()
        self._listener = listener
        self._secret = secret
        self._bridge = bridge
        self._scheduler = scheduler
        self._nodes: dict[str, NodeHandle] = {}
        self._handle_for = handle_for
        self.started = time.time()
        self._conns: dict[int, _Conn] = {}
        self._processes: dict[str, _Process] = {}
        self._tickets: dict[int, _Pending] = {}
        self._next_ticket = 0
        self._queue: deque[_Pending] = deque()
        self._interrupted: float | None = None
        self._wakeup_r, self._wakeup_w = socket.socketpair()
        self._accept_backoff = 0.0
        self._accept_paused_until: float | None = None
        self._evicted = 0
        self._evicted_logged = -_EVICTION_LOG_EVERY

    def add_node(self, node: Node, handle: NodeHandle) -> None:
        self._nodes[node.name] = handle
        if self._scheduler is None:
            self._scheduler = Scheduler([node])
        else:
            self._scheduler.nodes.append(node)

    def _node_handle(self, node: Node) -> NodeHandle:
        handle = self._nodes.get(node.name)
        if handle is None:
            assert self._handle_for is not None
            handle = self._nodes[node.name] = self._handle_for(node)
        return handle

    # -- the loop ---------------------------------------------------------------------

    def run(self, top: Resources) -> int:
        """Start the top process, serve until every process has exited; return the run's code."""
        self._wakeup_r.setblocking(False)
        self._wakeup_w.setblocking(False)
        self.selector.register(self._wakeup_r, selectors.EVENT_READ, self._read_signals)
        signal.set_wakeup_fd(self._wakeup_w.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        problem = self.start(top)
        if problem is not None:
            raise DeployError(f"cannot start: {problem}")
        while not self.finished():
            timeout = self.housekeeping()
            for key, mask in self.selector.select(timeout):
                key.data(mask)
        return self.finish()

    def start(self, top: Resources) -> str | None:
        """Place and start the top process, or queue it until there is room; why no node
        could ever hold it, or None."""
        assert self._scheduler is not None, "a master needs a node"
        problem = self._scheduler.impossible(top)
        if problem is not None:
            return problem
        self._listener.setblocking(False)
        self.selector.register(self._listener, selectors.EVENT_READ, self._accept)
        pending = _Pending(None, None, top, None)
        if not self._try_place(pending):
            self._queue.append(pending)
        return None

    def finish(self) -> int:
        """Report what is still silent and close; the run's exit code."""
        for process in self._processes.values():
            if not process.exited:  # still silent after Ctrl-C: its monitor has the lifeline
                self.exited(process.pid, None, "SIGKILL", "interrupted")
        for conn in list(self._conns.values()):
            self._drop(conn)
        try:
            self.selector.unregister(self._listener)
        except (KeyError, ValueError):
            pass
        self._listener.close()
        return self._bridge.close()

    @property
    def processes(self) -> list[tuple[Pid, Resources, str]]:
        """Every live process: its pid, resources and node's name."""
        return [(p.pid, p.resources, p.node.name) for p in self._processes.values() if not p.exited]

    @property
    def addr(self) -> tuple[str, int]:
        """Where this run's processes reach their master."""
        return self._listener.getsockname()[:2]

    def spawned_at(self, pid: Pid) -> float:
        return self._processes[pid.hex].started

    def started_on(self) -> list[NodeHandle]:
        return list(self._nodes.values())

    def finished(self) -> bool:
        if self._interrupted is not None and time.monotonic() - self._interrupted > _INTERRUPT_GRACE:
            return True
        live = any(not process.exited for process in self._processes.values())
        return not live and not self._tickets and not self._queue

    def housekeeping(self) -> float:
        """Flush held partial lines and expire stale state; return the select timeout."""
        now = time.monotonic()
        timeout = 1.0
        due = self._bridge.tick()
        if due is not None:
            timeout = min(timeout, due)
        for conn in list(self._conns.values()):
            if conn.handshake is not None and now - conn.opened > _HANDSHAKE_TIMEOUT:
                log.warning("dropped a connection that did not authenticate in time")
                self._drop(conn)
        if self._accept_paused_until is not None:
            if now >= self._accept_paused_until:
                self._accept_paused_until = None
                if self._listener.fileno() != -1:
                    self.selector.register(self._listener, selectors.EVENT_READ, self._accept)
            else:
                timeout = min(timeout, self._accept_paused_until - now)
        if self._interrupted is not None:
            timeout = min(timeout, 0.1)
        return timeout

    # -- processes' control connections ------------------------------------------------

    def _accept(self, mask: int) -> None:
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
            conn.on_ready = functools.partial(self._ready, conn)
            self._conns[sock.fileno()] = conn
            self.selector.register(sock, selectors.EVENT_READ, conn.on_ready)
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
        self.selector.unregister(self._listener)
        self._accept_paused_until = time.monotonic() + self._accept_backoff

    def _ready(self, conn: _Conn, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)
        if mask & selectors.EVENT_READ and conn.sock.fileno() >= 0:
            self._read(conn)

    def _read(self, conn: _Conn) -> None:
        try:
            if conn.handshake is not None:
                data = conn.sock.recv(conn.handshake.bytes_needed())
                conn.handshake.receive_data(data)
                self._send(conn, conn.handshake.data_to_send())
                if conn.handshake.done:
                    handshake, conn.handshake = conn.handshake, None
                    conn.peer = handshake.peer
                    if wire.protects(self._protect, conn.sock.getpeername()[0]):
                        conn.sock = ProtectedSocket(  # type: ignore[assignment]
                            conn.sock, handshake.key, initiator=False, peer=handshake.peer[:7]
                        )
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
            data = b""
        if not data or conn.reader.closed:
            self._drop(conn)
            self._queue = deque(pending for pending in self._queue if pending.requester is not conn)

    def _send(self, conn: _Conn, data: bytes) -> None:
        if data and (send_or_keep(conn.sock, conn.outbox, data) or _sealed_waiting(conn)):
            self.selector.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn.on_ready)

    def _flush(self, conn: _Conn) -> None:
        if isinstance(conn.sock, ProtectedSocket):
            try:
                if not conn.sock.flush():
                    return  # sealed bytes still wait: WRITE stays on
            except OSError:
                conn.outbox.clear()
        if not flush_kept(conn.sock, conn.outbox) and not _sealed_waiting(conn):
            self.selector.modify(conn.sock, selectors.EVENT_READ, conn.on_ready)

    def _drop(self, conn: _Conn) -> None:
        if self._conns.pop(conn.sock.fileno(), None) is not None:
            self.selector.unregister(conn.sock)
        conn.sock.close()

    def _handle(self, conn: _Conn, message: tuple) -> None:
        """Act on one message; raises (and the caller drops the connection) on a bad one."""
        kind = message[0]
        if conn.pid is None:
            if kind != Kind.HELLO_PROCESS or len(message) != 2:
                raise DeployError(f"it sent {kind.value!r} before introducing itself")
            pid = Pid.parse(message[1])
            if pid.hex != conn.peer:
                raise DeployError(f"its hello names pid {pid}, but it authenticated as {conn.peer!r}")
            conn.pid = pid.hex
            self._send(conn, wire.encode((Kind.HELLO_PROCESS, message[1])))  # set-up is done
        elif kind == Kind.SPAWN and len(message) == 2:
            self._spawn_requested(conn, message[1])
        elif kind == Kind.PEER_EXIT and len(message) == 2 and isinstance(message[1], str):
            self._peer_exit_asked(conn, message[1])
        else:
            raise DeployError(f"unexpected {kind.value!r} message")

    # -- what the nodes report ---------------------------------------------------------

    def forked(self, ticket: int, pid: Pid | None, error: str | None) -> None:
        pending = self._tickets.pop(ticket)
        if pid is None:
            self._fail(pending, error or "the fork server could not start the process")
            return
        assert pending.node is not None
        self._processes[pid.hex] = _Process(pid, pending.parent, pending.resources, pending.node)
        if pending.requester is not None:  # first: the requester is waiting
            self._reply(pending.requester, SpawnReply(pid=pid))
        self._bridge.spawned(pid, pending.parent, pending.resources)

    def output(self, pid: Pid, fd: int, data: bytes) -> None:
        process = self._processes.get(pid.hex)
        if process is not None and not process.exited:
            self._bridge.output(pid, fd, data)

    def exited(self, pid: Pid, code: int | None, signal_name: str | None, reason: str | None) -> None:
        process = self._processes.get(pid.hex)
        if process is None or process.exited:
            return
        if self._interrupted is not None and signal_name is not None and reason in _STOPPED_BY_INTERRUPT:
            reason = "interrupted"  # DESIGN §5: the user stopped the run, whatever killed it
        process.exited = True
        process.status = (code, signal_name, reason)
        for conn in process.asking:
            if conn.sock.fileno() >= 0:
                self._send(conn, wire.encode((Kind.PEER_EXITED, *process.status)))
        process.asking.clear()
        self._bridge.exited(pid, code, signal_name, reason)
        assert self._scheduler is not None
        self._scheduler.release(process.node, process.resources)
        self.place_queued()

    def zygote_lost(self, link: NodeHandle, why: str = "the fork server exited") -> None:
        if self._interrupted is None:
            log.error("%s", why)
        lost = [name for name, handle in self._nodes.items() if handle is link]
        for ticket, pending in list(self._tickets.items()):
            if pending.node is not None and pending.node.name in lost:
                del self._tickets[ticket]
                self._fail(pending, why)
        if self._handle_for is None and len(lost) == len(self._nodes):
            for pending in self._queue:
                self._fail(pending, why)
            self._queue.clear()

    def _peer_exit_asked(self, conn: _Conn, pid_hex: str) -> None:
        process = self._processes.get(pid_hex)
        if process is None:
            self._send(conn, wire.encode((Kind.PEER_EXITED, None, None, None)))
        elif process.exited:
            self._send(conn, wire.encode((Kind.PEER_EXITED, *process.status)))
        else:  # its channels saw it go before its monitor reported: answer on its exit
            process.asking.append(conn)

    def node_lost(self, name: str) -> None:
        """A node is gone: its processes exited with reason 'node lost'."""
        handle = self._nodes.pop(name, None)
        for process in list(self._processes.values()):
            if process.node.name == name and not process.exited:
                self.exited(process.pid, None, "SIGKILL", "node lost")
        for ticket, pending in list(self._tickets.items()):
            if pending.node is not None and pending.node.name == name:
                del self._tickets[ticket]
                self._fail(pending, "node lost")
        del handle

    # -- spawning ---------------------------------------------------------------------

    def _spawn_requested(self, conn: _Conn, data: bytes) -> None:
        assert self._scheduler is not None
        try:
            request = SpawnRequest.decode(data)
        except DeployError as error:
            self._reply(conn, SpawnReply(error=str(error)))
            return
        assert conn.pid is not None
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
        # First come, first placed: while blocking spawns wait, a new one, even a small one
        # that fits, waits behind them (else a stream of small spawns could starve a big one).
        if self._queue or not self._try_place(pending):
            if request.block:
                self._queue.append(pending)
            else:
                self._reply(conn, SpawnReply(error=self._no_capacity(request.resources), no_capacity=True))

    def _no_capacity(self, resources: Resources) -> str:
        """Why ``resources`` cannot be placed now, true to what is free and what waits."""
        assert self._scheduler is not None
        free = self._scheduler.describe_free()
        waiting = len(self._queue)
        if not waiting:
            return f"no capacity for {resources} now: {free}"
        spawns = "1 blocking spawn is" if waiting == 1 else f"{waiting} blocking spawns are"
        return f"no capacity for {resources} now: {spawns} waiting ahead of it, first for {self._queue[0].resources} ({free})"

    def _try_place(self, pending: _Pending) -> bool:
        assert self._scheduler is not None
        node = self._scheduler.place(pending.resources)
        if node is None:
            return False
        pending.node = node
        self._fork(pending)
        return True

    def place_queued(self) -> None:
        while self._queue and self._try_place(self._queue[0]):
            self._queue.popleft()

    def _fork(self, pending: _Pending) -> None:
        assert pending.node is not None
        ticket = self._next_ticket
        self._next_ticket += 1
        self._tickets[ticket] = pending
        self._node_handle(pending.node).fork(ticket, pending.request, pending.resources)

    def _fail(self, pending: _Pending, why: str) -> None:
        if pending.node is not None:
            assert self._scheduler is not None
            self._scheduler.release(pending.node, pending.resources)
        if pending.requester is not None:
            self._reply(pending.requester, SpawnReply(error=why))
        else:
            self._bridge.failed(1)

    def _reply(self, conn: _Conn, reply: SpawnReply) -> None:
        if conn.sock.fileno() >= 0:
            self._send(conn, wire.encode((Kind.SPAWNED, reply.encode())))

    # -- stopping ---------------------------------------------------------------------

    def _on_signal(self, signum: int, frame: object) -> None:
        pass  # the wakeup fd carries the signal number to the loop

    def _read_signals(self, mask: int) -> None:
        try:
            data = self._wakeup_r.recv(512)
        except (BlockingIOError, InterruptedError):
            return
        if data and self._interrupted is None:
            self.interrupt(signal.Signals(data[0]))

    def interrupt(self, signum: signal.Signals) -> None:
        """Stop the run: every monitor kills its process and reports; no new spawns."""
        if self._interrupted is not None:
            return
        log.info("%s: stopping every process of the run", signum.name)
        self._interrupted = time.monotonic()
        self._bridge.failed(128 + signum.value)
        for pending in self._queue:
            self._fail(pending, "the run is being stopped")
        self._queue.clear()
        for handle in self._nodes.values():
            handle.stop()


def _sealed_waiting(conn: _Conn) -> bool:
    return isinstance(conn.sock, ProtectedSocket) and conn.sock.pending_out() > 0


def _who(conn: _Conn) -> str:
    if conn.pid is not None:
        return f"process {conn.pid[:7]}"
    return repr(conn.peer) if conn.peer is not None else "an unauthenticated peer"


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."
