"""The master daemon (`serve_master`): the cluster's nodes, its runs, pushes and status.

It holds the cluster's nodes (its own, an agent on a socketpair in this loop; the static
list; those that join), serves pushes and status on its bridge port and drives one
`Master` per run from its one selector loop, every run sharing the nodes' capacity. A
run's processes reach their master on a port of the run's own, authenticated with the
run's own secret, so they can reach neither another run nor the fabric's ports (which
use the cluster secret).

Facts relied on:
- A node that dies or is cut off without a FIN sends nothing more: the master pings every
  node each second and takes one silent for 4 s as lost (DESIGN: within 5 s).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from deploy_core import DeployError, Pid, Resources, env

from ._agent import Agent, command, inside
from ._bundle import BundleCache
from ._connections import (
    BRIDGE,
    CONNECT_RETRY,
    LOST_AFTER,
    MASTER,
    NODE,
    PING_EVERY,
    PROTECT,
    PUSH,
    STATUS,
    Channel,
    Loop,
    accept_authenticated,
    announce,
    bound,
    cache_directory,
    connect_authenticated,
    daemon_setup,
    kill_descendants,
    listen,
    parse_addr,
)
from ._master import Master
from ._scheduler import Node, Scheduler
from ._version import __version__
from ._wire import Kind

__all__ = ["serve_master"]

log = logging.getLogger("deploy.fabric")

_RECCE_TIMEOUT = 60.0
_STOP_GRACE = 3.0


@dataclass
class _NodeRecord:
    """A node as the master daemon knows it."""

    node: Node
    channel: Channel
    host: str
    up_since: float = field(default_factory=time.time)
    memory: dict[str, int] = field(default_factory=dict)
    bundles_received: int = 0


@dataclass
class _ClusterRun:
    run_id: str
    push: Channel
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

    def __init__(self, push: Channel):
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
        self.loop = Loop()
        self.secret = secret
        self.host = parse_addr(bind)[0]
        self.listener = listen(bind)
        self.bind = bind = bound(self.listener, bind)  # (BIND may say port 0)
        self.bridge_listener = listen(bridge_bind) if bridge_bind else None
        bridge = bound(self.bridge_listener, bridge_bind) if self.bridge_listener and bridge_bind else "none"
        listed = ", ".join(f"{addr} ({size})" for addr, size in workers) or "none"
        announce(f"master {bind} ({capacity}), bridge {bridge}, listed workers: {listed}")
        self.cache = BundleCache(cache_directory())
        self.nodes: dict[str, _NodeRecord] = {}
        self.static: dict[str, Resources] = dict(workers)
        self.scheduler: Scheduler | None = None
        self.runs: dict[str, _ClusterRun] = {}
        self.bundles: dict[str, bytes] = {}
        self.next_ping = 0.0
        # Status requests waiting for every node's fresh memory figures: (channel, nodes, deadline).
        self.status_waiting: list[tuple[Channel, set[str], float]] = []
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
        accept_authenticated(
            self.listener, secret, MASTER, ("node:",), self.loop, lambda sock: self._node_channel(sock, None)
        )
        if self.bridge_listener is not None:
            accept_authenticated(self.bridge_listener, secret, BRIDGE, (PUSH, STATUS), self.loop, self._client)
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
                    time.sleep(CONNECT_RETRY)
                    continue
                self.loop.post(functools.partial(self._node_channel, sock, (addr, self.static[addr])))
                return

        threading.Thread(target=attempt, daemon=True).start()

    def _node_channel(self, sock: socket.socket, expected: tuple[str, Resources] | None) -> None:
        state: dict[str, _NodeRecord] = {}

        def on_message(channel: Channel, message: tuple) -> None:
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

        def on_closed(channel: Channel) -> None:
            record = state.get("record")
            if record is not None:
                self._node_lost(record, "connection closed")

        Channel(sock, self.loop, on_message, on_closed)

    def _node_up(self, name: str, size: Resources, channel: Channel, sock: socket.socket) -> _NodeRecord:
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
            absent = [Node(addr, size) for addr, size in self.static.items() if addr != name]
            self.scheduler = Scheduler([record.node], absent)
        else:
            self.scheduler.nodes.append(record.node)
            self.scheduler.absent = [node for node in self.scheduler.absent if node.name != name]
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
        if record.node.name in self.static:  # listed: it is waited for until it is back
            self.scheduler.absent.append(Node(record.node.name, record.node.capacity))
        record.channel.close()
        for run in self.runs.values():
            if run.master is not None:
                run.master.node_lost(record.node.name)
        if record.node.name in self.static and self.loop.stopping is None:
            self._connect_worker(record.node.name)

    def _from_node(self, record: _NodeRecord, message: tuple) -> None:
        kind = message[0]
        if kind == Kind.PONG:
            if message[2] is None:  # a heartbeat's answer
                return
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

        def on_message(channel: Channel, message: tuple) -> None:
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

        def on_closed(channel: Channel) -> None:
            run = state.get("run")
            if isinstance(run, _ClusterRun) and run.master is not None:
                run.master.interrupt(signal.SIGINT)

        Channel(sock, self.loop, on_message, on_closed)

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

    def _recce(self, channel: Channel, state: dict) -> None:
        digest, program, args, environment, cwd = state["pending"]
        root = self.cache.path(digest)
        directory = inside(root, cwd)

        def recce() -> None:
            outcome = _run_recce(root, program, args, environment, directory)
            self.loop.post(lambda: self._start_run(channel, state, outcome))

        threading.Thread(target=recce, daemon=True).start()

    def _start_run(self, channel: Channel, state: dict, outcome: Resources | str) -> None:
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
            protect=PROTECT,
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

    def _ask_status(self, channel: Channel) -> None:
        """Answer once every node has reported its processes' memory afresh (1 s at most)."""
        for record in self.nodes.values():
            record.channel.send((Kind.PING, time.time(), True))
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
                        record.channel.send((Kind.PING, time.time(), False))
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
            for run in list(self.runs.values()):  # room another run's exits made
                assert run.master is not None
                run.master.place_queued()
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
    daemon_setup()
    daemon = _MasterDaemon(bind, capacity, secret, bridge_bind, workers)
    return daemon.serve()
