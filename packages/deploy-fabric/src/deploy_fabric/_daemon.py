"""The cluster's daemons: the master (`serve_master`) and a worker (`serve_worker`).

The master daemon holds the cluster's nodes (its own, the static list, those that join),
serves pushes and status on its bridge port and drives one `Master` per run from its one
selector loop, every run sharing the nodes' capacity. A run's processes reach their
master on a port of the run's own, authenticated with the run's own secret, so they can
reach neither another run nor the fabric's ports (which use the cluster secret).

Facts relied on:
- A node that dies or is cut off without a FIN sends nothing more: the master pings every
  node each second and takes one silent for 5 s as lost; a node does the same with a
  master that stops pinging.
- With PR_SET_CHILD_SUBREAPER a daemon becomes the parent of any orphan among its
  descendants (a process whose zygote was killed), so it can find and kill them at exit.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import queue
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from deploy_core import AuthenticationError, DeployError, Pid, Resources, authenticate, env

from . import _wire as wire
from ._agent import Agent, command, inside
from ._bundle import BundleCache
from ._master import Master
from ._node import flush_kept, send_or_keep
from ._scheduler import Node, Scheduler
from ._version import __version__
from ._wire import Kind

__all__ = ["serve_master", "serve_worker"]

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
PING_EVERY = 1.0
LOST_AFTER = 5.0
_RECCE_TIMEOUT = 60.0
_CONNECT_RETRY = 1.0
_STOP_GRACE = 3.0


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


def keepalive(sock: socket.socket) -> None:
    """Cut-off peers show as errors within about 5 s, not the kernel's two hours."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 2), ("TCP_KEEPINTVL", 1), ("TCP_KEEPCNT", 3), ("TCP_USER_TIMEOUT", 5000)):
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


def _daemon_setup() -> None:
    if os.environ.get(env.LOG):
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="deploy[%(process)d] %(name)s: %(message)s")
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


class _Loop:
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


class _Channel:
    """A non-blocking, authenticated connection that carries control messages both ways."""

    def __init__(self, sock: socket.socket, loop: _Loop, on_message: Callable, on_closed: Callable):
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
        if not self.closed and send_or_keep(self.sock, self._outbox, wire.encode(message)):
            self._loop.selector.modify(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, self._ready)

    def _ready(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE and not flush_kept(self.sock, self._outbox) and not self.closed:
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
            except (TypeError, ValueError, KeyError) as error:
                log.warning("ignored a malformed %s message: %s", message[0].value, error)
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


def _accept_authenticated(
    listener: socket.socket,
    secret: bytes,
    identity: str,
    peers: tuple[str, ...],
    loop: _Loop,
    on_ready: Callable[[socket.socket], None],
) -> None:
    """Accept connections as ``identity`` from peers whose identity starts with one of ``peers``;
    each is authenticated on a thread of its own, then handed to the loop."""

    def handshake(sock: socket.socket) -> None:
        try:
            peer = authenticate(sock, secret, initiator=False, identity=identity, timeout=10.0).peer
        except (AuthenticationError, OSError) as error:
            log.warning("dropped a connection that failed authentication: %s", error)
            sock.close()
            return
        if not peer.startswith(peers):
            log.warning("dropped a connection from %r, which has no business on the %s port", peer, identity)
            sock.close()
            return
        sock.settimeout(None)
        loop.post(lambda: on_ready(sock))

    def accept(mask: int) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                log.warning("cannot accept a connection: %s", error)
                return
            keepalive(sock)
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
        authenticate(sock, secret, initiator=True, identity=identity, wanted=wanted, timeout=timeout)
    except AuthenticationError as error:
        sock.close()
        raise AuthenticationError(f"{addr} refused this secret ({error})") from None
    except OSError as error:
        sock.close()
        if isinstance(error, (ConnectionResetError, BrokenPipeError)) or not error.strerror:
            raise AuthenticationError(f"{addr} closed the connection during authentication: wrong secret?") from None
        raise DeployError(f"lost {addr} during authentication: {error.strerror}") from None
    sock.settimeout(None)
    return sock


# --- the master daemon -----------------------------------------------------------------------


@dataclass
class _NodeRecord:
    """A node as the master daemon knows it."""

    node: Node
    channel: _Channel
    host: str
    up_since: float = field(default_factory=time.time)
    memory: dict[str, int] = field(default_factory=dict)
    bundles_received: int = 0


@dataclass
class _ClusterRun:
    run_id: str
    push: _Channel
    program: list[str]
    secret: bytes
    digest: str
    start_fields: tuple  # program, args, env, cwd
    master: Master | None = None
    top_node: str | None = None
    started: float = field(default_factory=time.time)
    stdin_early: list[bytes] = field(default_factory=list)


class _RunOnNode:
    """One run's view of one node: what `Master` calls to fork there."""

    def __init__(self, daemon: _MasterDaemon, run: _ClusterRun, record: _NodeRecord):
        self._daemon = daemon
        self._run = run
        self._record = record
        self._started = False

    def fork(self, ticket: int, request: bytes | None, resources: Resources) -> None:
        channel = self._record.channel
        if not self._started:
            self._started = True
            top = request is None
            if top:
                self._run.top_node = self._record.node.name
            program, args, environment, cwd = self._run.start_fields
            assert self._run.master is not None
            host, port = self._daemon.run_addr(self._run)
            channel.send(
                (
                    Kind.RUN,
                    self._run.run_id,
                    self._run.secret.hex(),
                    self._run.digest,
                    program,
                    args,
                    environment,
                    cwd,
                    top,
                    f"{host}:{port}",
                )
            )
            if top:
                for data in self._run.stdin_early:
                    channel.send((Kind.STDIN, self._run.run_id, data))
                self._run.stdin_early.clear()
        channel.send((Kind.FORK, self._run.run_id, ticket, request, resources.to_dict()))

    def stop(self) -> None:
        if self._started:
            self._record.channel.send((Kind.STOP, self._run.run_id))


class _ForwardingBridge:
    """The bridge of a cluster run, as the master sees it: events go on to `deploy push`."""

    def __init__(self, push: _Channel):
        self._push = push
        self.code: int | None = None

    def spawned(self, pid: Pid, parent: Pid | None, resources: Resources) -> None:
        self._push.send((Kind.STARTED, pid.format(), parent and parent.format(), resources.to_dict()))

    def output(self, pid: Pid, fd: int, data: bytes) -> None:
        self._push.send((Kind.OUTPUT, pid.format(), fd, data))

    def exited(self, pid: Pid, code: int | None, signal_name: str | None, reason: str | None) -> None:
        self._push.send((Kind.EXIT, pid.format(), code, signal_name, reason))

    def failed(self, code: int) -> None:
        self._push.send((Kind.FAILED, code))

    def tick(self) -> float | None:
        return None

    def close(self) -> int:
        return 0


class _MasterDaemon:
    def __init__(
        self,
        bind: str,
        capacity: Resources,
        secret: bytes,
        bridge_bind: str | None,
        workers: list[tuple[str, Resources]],
    ):
        self.loop = _Loop()
        self.secret = secret
        self.bind = bind
        self.host = parse_addr(bind)[0]
        self.listener = listen(bind)
        self.bridge_listener = listen(bridge_bind) if bridge_bind else None
        self.cache = BundleCache(cache_directory())
        self.nodes: dict[str, _NodeRecord] = {}
        self.static: dict[str, Resources] = dict(workers)
        self.scheduler: Scheduler | None = None
        self.runs: dict[str, _ClusterRun] = {}
        self.bundles: dict[str, bytes] = {}
        self.next_ping = 0.0
        # Status requests waiting for every node's fresh memory figures: (channel, nodes, deadline).
        self.status_waiting: list[tuple[_Channel, set[str], float]] = []
        # The master's own node: an agent on a socketpair in this same loop.
        ours, theirs = socket.socketpair()
        self.own_agent = Agent(
            theirs,
            self.loop.selector,
            name=bind,
            host=self.host,
            capacity=capacity,
            cache=self.cache,
        )
        self._node_channel(ours, expected=(bind, capacity))
        _accept_authenticated(
            self.listener, secret, MASTER, ("node:",), self.loop, lambda sock: self._node_channel(sock, None)
        )
        if self.bridge_listener is not None:
            _accept_authenticated(self.bridge_listener, secret, BRIDGE, (PUSH, STATUS), self.loop, self._client)
        for addr in self.static:
            self._connect_worker(addr)

    # -- nodes ------------------------------------------------------------------------------

    def _connect_worker(self, addr: str) -> None:
        def attempt() -> None:
            while self.loop.stopping is None:
                try:
                    sock = connect_authenticated(addr, self.secret, MASTER, NODE, timeout=5.0)
                except DeployError as error:
                    log.info("worker %s: %s; retrying", addr, error)
                    time.sleep(_CONNECT_RETRY)
                    continue
                self.loop.post(functools.partial(self._node_channel, sock, (addr, self.static[addr])))
                return

        threading.Thread(target=attempt, daemon=True).start()

    def _node_channel(self, sock: socket.socket, expected: tuple[str, Resources] | None) -> None:
        state: dict[str, _NodeRecord] = {}

        def on_message(channel: _Channel, message: tuple) -> None:
            kind = message[0]
            if "record" not in state:
                if kind != Kind.NODE_HELLO:
                    channel.close()
                    return
                name, size, version = message[1], Resources(**message[2]), message[3]
                if version != __version__:
                    log.error("node %s runs deploy-fabric %s, this master %s: not used", name, version, __version__)
                    channel.close()
                    return
                if expected is not None:
                    name, size = expected  # a listed worker's size is the list's
                state["record"] = self._node_up(name, size, channel, sock)
                return
            self._from_node(state["record"], message)

        def on_closed(channel: _Channel) -> None:
            record = state.get("record")
            if record is not None:
                self._node_lost(record, "connection closed")

        _Channel(sock, self.loop, on_message, on_closed)

    def _node_up(self, name: str, size: Resources, channel: _Channel, sock: socket.socket) -> _NodeRecord:
        old = self.nodes.get(name)
        if old is not None:
            self._node_lost(old, "replaced")
        try:
            host = sock.getpeername()[0] if sock.family in (socket.AF_INET, socket.AF_INET6) else self.host
        except OSError:
            host = self.host
        record = _NodeRecord(Node(name, size), channel, host)
        self.nodes[name] = record
        if self.scheduler is None:
            self.scheduler = Scheduler([record.node])
        else:
            self.scheduler.nodes.append(record.node)
        log.info("node %s is up with %s", name, size)
        for run in self.runs.values():
            if run.master is not None:
                run.master.place_queued()
        return record

    def _node_lost(self, record: _NodeRecord, why: str) -> None:
        if self.nodes.get(record.node.name) is not record:
            return
        log.warning("node %s lost: %s", record.node.name, why)
        del self.nodes[record.node.name]
        assert self.scheduler is not None
        self.scheduler.nodes.remove(record.node)
        record.channel.close()
        for run in self.runs.values():
            if run.master is not None:
                run.master.node_lost(record.node.name)
        if record.node.name in self.static and self.loop.stopping is None:
            self._connect_worker(record.node.name)

    def _from_node(self, record: _NodeRecord, message: tuple) -> None:
        kind = message[0]
        if kind == Kind.PONG:
            record.memory = {str(key): int(value) for key, value in dict(message[2]).items()}
            for _, waiting, _ in self.status_waiting:
                waiting.discard(record.node.name)
            self._answer_status()
            return
        if kind == Kind.NEED_BUNDLE:
            data = self.bundles.get(message[1])
            if data is not None:
                record.channel.send((Kind.BUNDLE, message[1], data))
                record.bundles_received += 1
            return
        run = self.runs.get(message[1])
        if run is None or run.master is None:
            return
        master = run.master
        if kind == Kind.FORKED:
            _, _, ticket, pid_text, error = message
            master.forked(ticket, Pid.parse(pid_text) if pid_text else None, error)
        elif kind == Kind.OUTPUT:
            _, _, pid_text, fd, data = message
            master.output(Pid.parse(pid_text), fd, bytes(data))
        elif kind == Kind.EXIT:
            _, _, pid_text, code, signal_name, reason = message
            master.exited(Pid.parse(pid_text), code, signal_name, reason)
        elif kind == Kind.RUN_FAILED:
            why = str(message[2])
            handle = next((h for h in master.started_on() if getattr(h, "_record", None) is record), None)
            if handle is not None:
                master.zygote_lost(handle, why)
            if run.top_node == record.node.name and not master.processes:
                run.push.send((Kind.ERROR, why))
                master.interrupt(signal.SIGTERM)

    # -- pushes and status --------------------------------------------------------------------

    def _client(self, sock: socket.socket) -> None:
        state: dict[str, object] = {}

        def on_message(channel: _Channel, message: tuple) -> None:
            kind = message[0]
            run = state.get("run")
            if run is None and "pending" not in state:
                if kind == Kind.STATUS:
                    if message[1] != __version__:
                        channel.send((Kind.ERROR, _version_mismatch("status", message[1])))
                    else:
                        self._ask_status(channel)
                    return
                if kind != Kind.PUSH:
                    channel.close()
                    return
                version, digest, program, args, environment, cwd = message[1:]
                if version != __version__:
                    channel.send((Kind.ERROR, _version_mismatch("push", version)))
                    return
                state["pending"] = (digest, list(program), list(args), dict(environment), str(cwd))
                wanted = not self.cache.has(digest)
                channel.send((Kind.BUNDLE_WANTED, wanted))
                if not wanted:
                    self._recce(channel, state)
                return
            if run is None and kind == Kind.BUNDLE:
                digest = state["pending"][0]  # type: ignore[index]
                try:
                    self.cache.store(digest, bytes(message[2]))
                    self.bundles[digest] = bytes(message[2])  # for the nodes that lack it
                    self.nodes[self.bind].bundles_received += 1  # the master's node shares its cache
                except DeployError as error:
                    channel.send((Kind.ERROR, str(error)))
                    return
                self._recce(channel, state)
                return
            if kind == Kind.STDIN:
                self._stdin(state, bytes(message[1]))
            elif kind == Kind.INTERRUPT and isinstance(run, _ClusterRun) and run.master is not None:
                run.master.interrupt(signal.SIGINT)

        def on_closed(channel: _Channel) -> None:
            run = state.get("run")
            if isinstance(run, _ClusterRun) and run.master is not None:
                run.master.interrupt(signal.SIGINT)

        _Channel(sock, self.loop, on_message, on_closed)

    def _stdin(self, state: dict, data: bytes) -> None:
        run = state.get("run")
        if not isinstance(run, _ClusterRun):
            state.setdefault("stdin", []).append(data)
            return
        record = self.nodes.get(run.top_node or "")
        if record is None:
            run.stdin_early.append(data)
        else:
            record.channel.send((Kind.STDIN, run.run_id, data))

    def _recce(self, channel: _Channel, state: dict) -> None:
        digest, program, args, environment, cwd = state["pending"]
        root = self.cache.path(digest)
        directory = inside(root, cwd)

        def recce() -> None:
            outcome = _run_recce(root, program, args, environment, directory)
            self.loop.post(lambda: self._start_run(channel, state, outcome))

        threading.Thread(target=recce, daemon=True).start()

    def _start_run(self, channel: _Channel, state: dict, outcome: Resources | str) -> None:
        if channel.closed:
            return
        if isinstance(outcome, str):
            channel.send((Kind.ERROR, outcome))
            return
        if self.loop.stopping is not None:
            channel.send((Kind.ERROR, "the fabric is stopping"))
            return
        digest, program, args, environment, cwd = state.pop("pending")
        run = _ClusterRun(
            os.urandom(8).hex(), channel, program, os.urandom(32), digest, (program, args, environment, cwd)
        )
        for data in state.pop("stdin", []):
            run.stdin_early.append(data)
        listener = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        listener.bind((self.host, 0))
        listener.listen(512)
        assert self.scheduler is not None
        run.master = Master(
            listener,
            run.secret,
            _ForwardingBridge(channel),  # type: ignore[arg-type]
            selector=self.loop.selector,
            scheduler=self.scheduler,
            handle_for=lambda node: _RunOnNode(self, run, self.nodes[node.name]),
        )
        self.runs[run.run_id] = run
        state["run"] = run
        problem = run.master.start(outcome)
        if problem is not None:
            run.master.finish()
            del self.runs[run.run_id]
            channel.send((Kind.ERROR, f"cannot start {' '.join(program)}: {problem}"))

    def run_addr(self, run: _ClusterRun) -> tuple[str, int]:
        assert run.master is not None
        return run.master.addr

    def _ask_status(self, channel: _Channel) -> None:
        """Answer once every node has reported its processes' memory afresh (1 s at most)."""
        for record in self.nodes.values():
            record.channel.send((Kind.PING, time.time()))
        self.status_waiting.append((channel, set(self.nodes), time.monotonic() + 1.0))
        self._answer_status()

    def _answer_status(self) -> None:
        now = time.monotonic()
        for entry in list(self.status_waiting):
            channel, waiting, deadline = entry
            waiting.intersection_update(self.nodes)
            if not waiting or now > deadline:
                self.status_waiting.remove(entry)
                channel.send((Kind.STATUS, self.status()))

    def status(self) -> dict:
        now = time.time()
        nodes = [
            {
                "addr": record.node.name,
                "capacity": record.node.capacity.to_dict(),
                "used": record.node.used.to_dict(),
                "free": record.node.free.to_dict(),
                "up_since": record.up_since,
                "bundles_received": record.bundles_received,
            }
            for record in self.nodes.values()
        ]
        runs, processes = [], []
        for run in self.runs.values():
            assert run.master is not None
            live = run.master.processes
            runs.append(
                {"id": run.run_id, "program": " ".join(run.program), "started": run.started, "processes": len(live)}
            )
            for pid, resources, node in live:
                record = self.nodes.get(node)
                processes.append(
                    {
                        "pid": pid.hex,
                        "run": run.run_id,
                        "node": node,
                        "resources": resources.to_dict(),
                        "age": round(now - run.master.spawned_at(pid), 3),
                        "memory": record.memory.get(pid.hex) if record is not None else None,
                    }
                )
        return {"nodes": nodes, "runs": runs, "processes": processes}

    # -- the loop -----------------------------------------------------------------------------

    def serve(self) -> int:
        self.loop.install_signals()
        while True:
            now = time.monotonic()
            if now >= self.next_ping:
                self.next_ping = now + PING_EVERY
                for record in list(self.nodes.values()):
                    if now - record.channel.seen > LOST_AFTER:
                        self._node_lost(record, f"no heartbeat for {LOST_AFTER:.0f} s")
                    else:
                        record.channel.send((Kind.PING, time.time()))
                self.own_agent.reap()
            timeout = min(0.2, max(0.0, self.next_ping - now))
            self._answer_status()
            for run in list(self.runs.values()):
                assert run.master is not None
                run.master.housekeeping()
                if run.master.finished():
                    self._end(run)
            if self.loop.stopping is not None:
                for run in self.runs.values():
                    assert run.master is not None
                    run.master.interrupt(signal.SIGTERM)
                if not self.runs or time.monotonic() - self.loop.stopping > _STOP_GRACE:
                    break
            self.loop.once(timeout)
        for run in list(self.runs.values()):
            self._end(run)
        self.own_agent.stop_all()
        for record in list(self.nodes.values()):
            record.channel.close()
        time.sleep(0.1)
        kill_descendants()
        return 0

    def _end(self, run: _ClusterRun) -> None:
        assert run.master is not None
        run.master.finish()
        for handle in run.master.started_on():
            handle.stop()
        run.push.send((Kind.END,))
        del self.runs[run.run_id]


def _version_mismatch(command: str, version: object) -> str:
    return f"deploy {command} is deploy-fabric {version}, the fabric runs {__version__}: use the same version on both"


def _run_recce(
    root: Path, program: list[str], args: list[str], environment: dict[str, str], directory: Path
) -> Resources | str:
    """The top process's resources, from ``python SCRIPT ARGS`` with DEPLOY_RECCE=1, or why not."""
    clean = {key: value for key, value in environment.items() if not key.startswith("DEPLOY_")}
    for key in ("PATH", "HOME", "SHELL", "TMPDIR"):
        if key in os.environ:
            clean[key] = os.environ[key]
    clean[env.RECCE] = "1"
    clean["PWD"] = str(directory)
    shown = " ".join(program)
    try:
        done = subprocess.run(
            command(root, program, args, clean),
            cwd=directory,
            env=clean,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=_RECCE_TIMEOUT,
        )
    except subprocess.TimeoutExpired:
        return f"the recce run of {shown} did not reach deploy.init() within {_RECCE_TIMEOUT:.0f} s"
    except OSError as error:
        return f"cannot run {shown} for its recce: {error.strerror or error}"
    import json

    for line in reversed(done.stdout.decode(errors="replace").splitlines()):
        try:
            reported = json.loads(line)
            return Resources(**reported["resources"])
        except (ValueError, KeyError, TypeError):
            continue
    errors = [line.strip() for line in done.stderr.decode(errors="replace").splitlines() if line.strip()]
    why = errors[-1] if errors else f"it exited {done.returncode} without calling deploy.init()"
    return f"the recce run of {shown} failed: {why}"


def serve_master(
    bind: str,
    capacity: Resources,
    secret: bytes,
    *,
    bridge_bind: str | None,
    workers: list[tuple[str, Resources]],
) -> int:
    """Run the master daemon (with a node of its own of size ``capacity``) until SIGINT/SIGTERM."""
    _daemon_setup()
    daemon = _MasterDaemon(bind, capacity, secret, bridge_bind, workers)
    return daemon.serve()


# --- the worker daemon -----------------------------------------------------------------------


def serve_worker(bind: str, capacity: Resources, secret: bytes, *, join: str | None = None) -> int:
    """Run a worker daemon until SIGINT/SIGTERM: it waits for the master (or joins ``join``)."""
    _daemon_setup()
    loop = _Loop()
    host = parse_addr(bind)[0]
    listener = listen(bind)
    cache = BundleCache(cache_directory())
    agents: list[Agent] = []
    last_ping: dict[int, float] = {}

    def on_closed(agent: Agent) -> None:
        if agent in agents:
            agents.remove(agent)
        last_ping.pop(id(agent), None)
        if join is not None and loop.stopping is None:
            joining()

    def adopt(sock: socket.socket) -> None:
        agent = Agent(sock, loop.selector, name=bind, host=host, capacity=capacity, cache=cache, on_closed=on_closed)
        agents.append(agent)
        last_ping[id(agent)] = time.monotonic()

    def joining() -> None:
        assert join is not None

        def attempt() -> None:
            while loop.stopping is None:
                try:
                    sock = connect_authenticated(join, secret, f"node:{bind}", MASTER, timeout=5.0)
                except DeployError as error:
                    log.info("joining %s: %s; retrying", join, error)
                    time.sleep(_CONNECT_RETRY)
                    continue
                loop.post(functools.partial(adopt, sock))
                return

        threading.Thread(target=attempt, daemon=True).start()

    _accept_authenticated(listener, secret, NODE, (MASTER,), loop, adopt)
    if join is not None:
        joining()
    loop.install_signals()
    while loop.stopping is None:
        now = time.monotonic()
        for agent in list(agents):
            if now - agent.seen > LOST_AFTER:
                log.warning("the master has been silent for %.0f s: dropping its runs", LOST_AFTER)
                agent.close()
            agent.reap()
        loop.once(0.5)
    for agent in list(agents):
        agent.close()
    time.sleep(0.1)
    kill_descendants()
    return 0
