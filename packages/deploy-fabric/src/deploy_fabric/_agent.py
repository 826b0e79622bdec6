"""A cluster node's agent: the runs' zygotes on this machine, driven by the master.

The agent serves one connection to the master (TCP for a worker daemon, a socketpair for
the master's own node). For each run the master places processes on, it starts
``python SCRIPT ARGS`` from the unpacked bundle with internal ``DEPLOY_`` variables, so
that init() there becomes the run's zygote on this node, and reaches that zygote exactly
as local mode does (`ZygoteLink`: a request stream and a reply packet socket handed over
as inherited descriptors). Every fork request, output and exit passes between the master
and the zygote tagged with the run's id.

Facts relied on:
- The zygote exits at the end of its request stream, and every process it monitors is
  killed when its event stream ends or the zygote dies (PR_SET_PDEATHSIG): closing our
  end of a run ends the run on this node, and so does this agent dying.
- A pipe to the top process's stdin is written without blocking; what does not fit waits.
"""

from __future__ import annotations

import logging
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from deploy_core import DeployError, Pid, Resources

from . import _process as process_side
from . import _wire as wire
from ._bundle import BundleCache
from ._node import ZygoteLink, flush_all, sealed_waiting, send_or_keep
from ._version import __version__
from ._wire import Kind

__all__ = ["Agent"]

log = logging.getLogger("deploy.fabric")

# The node keeps these of its own environment; the rest comes from the caller (DESIGN §3).
_NODE_KEEPS = ("PATH", "HOME", "PWD", "SHELL", "TMPDIR")


@dataclass
class _Run:
    run_id: str
    link: ZygoteLink
    zygote_ends: tuple[socket.socket, socket.socket]  # the zygote's ends, until it starts
    start: tuple  # the RUN message's fields
    process: subprocess.Popen | None = None
    stderr: object = None
    stdin_outbox: bytearray = field(default_factory=bytearray)
    stdin_closed: bool = False
    stopped: bool = False


class Agent:
    """Serves one master connection from the caller's selector loop."""

    def __init__(
        self,
        sock: socket.socket,
        selector: selectors.BaseSelector,
        *,
        name: str,
        host: str,
        capacity: Resources,
        cache: BundleCache,
        on_closed: object = None,
    ):
        self.sock = sock
        self.name = name
        self.host = host
        self.capacity = capacity
        self._cache = cache
        self._selector = selector
        self._reader = wire.MessageReader()
        self._outbox = bytearray()
        self._runs: dict[str, _Run] = {}
        self._waiting_for: dict[str, list[_Run]] = {}
        self._on_closed = on_closed
        self.closed = False
        self.seen = time.monotonic()
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, self._ready)
        self.send((Kind.NODE_HELLO, name, capacity.to_dict(), __version__))

    # -- the master's connection --------------------------------------------------------

    def send(self, message: tuple) -> None:
        if self.closed:
            return
        if send_or_keep(self.sock, self._outbox, wire.encode(message)) or sealed_waiting(self.sock):
            self._selector.modify(self.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, self._ready)

    def _ready(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE and not flush_all(self.sock, self._outbox):
            self._selector.modify(self.sock, selectors.EVENT_READ, self._ready)
        if not mask & selectors.EVENT_READ:
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
            log.warning("the master sent a bad frame: %s", error)
            messages, data = [], b""
        for message in messages:
            try:
                self._handle(message)
            except Exception as error:  # whatever a malformed message makes us raise
                log.warning("ignored a bad %s message from the master: %r", message[0].value, error)
        if not data or self._reader.closed:
            self.close()

    def close(self) -> None:
        """The master is gone: so are the runs on this node."""
        if self.closed:
            return
        self.closed = True
        self._selector.unregister(self.sock)
        self.sock.close()
        for run in list(self._runs.values()):
            self._stop(run)
        if callable(self._on_closed):
            self._on_closed(self)

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == Kind.PING:
            self.send((Kind.PONG, message[1], self._memory() if message[2] else None))
        elif kind == Kind.RUN:
            self._run(*message[1:])
        elif kind == Kind.BUNDLE:
            self._bundle(message[1], message[2])
        elif kind == Kind.FORK:
            run = self._runs.get(message[1])
            if run is not None:
                run.link.fork(message[2], message[3], Resources(**message[4]))
        elif kind == Kind.STOP:
            run = self._runs.get(message[1])
            if run is not None:
                self._stop(run)
        elif kind == Kind.STDIN:
            run = self._runs.get(message[1])
            if run is not None:
                self._stdin(run, bytes(message[2]))
        else:
            log.warning("ignored an unexpected %r message from the master", kind.value)

    # -- runs ---------------------------------------------------------------------------

    def _run(self, run_id: str, *start: object) -> None:
        if run_id in self._runs:
            return
        to_zygote, zygote_requests = socket.socketpair()
        from_zygote, zygote_replies = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        events = _RunEvents(self, run_id)
        link = ZygoteLink(to_zygote, from_zygote, self._selector, events)
        run = _Run(run_id, link, (zygote_requests, zygote_replies), start)
        events.run = run
        self._runs[run_id] = run
        digest = start[1]
        assert isinstance(digest, str)
        if self._cache.has(digest):
            self._start(run)
        else:
            first = digest not in self._waiting_for
            self._waiting_for.setdefault(digest, []).append(run)
            if first:
                self.send((Kind.NEED_BUNDLE, digest))

    def _bundle(self, digest: str, data: bytes) -> None:
        waiting = self._waiting_for.pop(digest, [])
        try:
            self._cache.store(digest, bytes(data))
        except DeployError as error:
            for run in waiting:
                self._failed(run, f"node {self.name} cannot store the bundle: {error}")
            return
        for run in waiting:
            if not run.stopped:
                self._start(run)

    def _start(self, run: _Run) -> None:
        secret, digest, program, args, env, cwd, top, master = run.start
        root = self._cache.path(digest)
        directory = inside(root, cwd)
        requests, replies = run.zygote_ends
        environment = {key: value for key, value in dict(env).items() if not key.startswith("DEPLOY_")}
        for key in _NODE_KEEPS:
            if key in os.environ:
                environment[key] = os.environ[key]
            else:
                environment.pop(key, None)
        environment["PWD"] = str(directory)
        for key in ("DEPLOY_FORMAT", "DEPLOY_LOG"):
            if key in env:
                environment[key] = env[key]
        environment.update(
            {
                process_side.ZYGOTE: "top" if top else "spawns",
                process_side.ZYGOTE_FDS: f"{requests.fileno()},{replies.fileno()}",
                process_side.RUN_SECRET: secret,
                process_side.NODE_HOST: self.host,
                process_side.BUNDLE: str(root),
                "DEPLOY_FABRIC": master,
            }
        )
        run.stderr = tempfile.TemporaryFile()
        try:
            run.process = subprocess.Popen(
                command(root, program, args, environment),
                cwd=directory,
                env=environment,
                pass_fds=(requests.fileno(), replies.fileno()),
                stdin=subprocess.PIPE if top else subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=run.stderr,
            )
        except OSError as error:
            self._failed(run, f"node {self.name} cannot start {Path(*program[-1:])}: {error}")
            return
        finally:
            requests.close()
            replies.close()
        if run.process.stdin is not None:
            os.set_blocking(run.process.stdin.fileno(), False)
            if run.stdin_outbox or run.stdin_closed:
                self._flush_stdin(run)

    def _stdin(self, run: _Run, data: bytes) -> None:
        if run.stdin_closed:
            return
        if not data:
            run.stdin_closed = True
        run.stdin_outbox += data
        if run.process is not None and run.process.stdin is not None:
            self._flush_stdin(run)

    def _flush_stdin(self, run: _Run, mask: int = 0) -> None:
        assert run.process is not None and run.process.stdin is not None
        pipe = run.process.stdin
        try:
            if run.stdin_outbox:
                written = os.write(pipe.fileno(), run.stdin_outbox)
                del run.stdin_outbox[:written]
        except BlockingIOError:
            pass
        except OSError:
            run.stdin_outbox.clear()
        registered = mask != 0
        if run.stdin_outbox and not registered:
            self._selector.register(pipe, selectors.EVENT_WRITE, lambda mask: self._flush_stdin(run, mask))
        elif not run.stdin_outbox:
            if registered:
                self._selector.unregister(pipe)
            if run.stdin_closed:
                pipe.close()

    def _failed(self, run: _Run, why: str) -> None:
        self.send((Kind.RUN_FAILED, run.run_id, why))
        self._stop(run)

    def zygote_lost(self, run: _Run) -> None:
        why = f"the fork server on node {self.name} exited"
        if run.process is not None and run.stderr is not None:
            run.process.wait()
            tail = _last_line(run.stderr)
            if tail:
                why += f": {tail}"
        if not run.stopped:
            self._failed(run, why)

    def _stop(self, run: _Run) -> None:
        if run.stopped:
            return
        run.stopped = True
        if run.link.alive:
            run.link.stop()
        for sock in run.zygote_ends:
            sock.close()
        self._runs.pop(run.run_id, None)
        if run.process is not None:
            _reap_later.append(run.process)

    def stop_all(self) -> None:
        for run in list(self._runs.values()):
            self._stop(run)

    def reap(self) -> None:
        """Collect zygotes that have exited."""
        for process in list(_reap_later):
            if process.poll() is not None:
                _reap_later.remove(process)

    def _memory(self) -> dict[str, int]:
        """Memory each live process on this node owns, by pid: its USS (what it does not
        share with the zygote it was forked from, as its limits count it), else its RSS."""
        usage: dict[str, int] = {}
        for run in self._runs.values():
            for pid, os_pid in run.link.os_pids().items():
                try:
                    process = psutil.Process(os_pid)
                    try:
                        usage[pid.hex] = process.memory_full_info().uss
                    except (psutil.AccessDenied, AttributeError):
                        usage[pid.hex] = process.memory_info().rss
                except psutil.Error:
                    pass
        return usage


_reap_later: list[subprocess.Popen] = []


class _RunEvents:
    """One run's zygote reports, passed on to the master tagged with the run's id."""

    def __init__(self, agent: Agent, run_id: str):
        self.agent = agent
        self.run_id = run_id
        self.run: _Run | None = None

    def forked(self, ticket: int, pid: Pid | None, error: str | None) -> None:
        self.agent.send((Kind.FORKED, self.run_id, ticket, pid and pid.format(), error))

    def output(self, pid: Pid, fd: int, data: bytes) -> None:
        self.agent.send((Kind.OUTPUT, self.run_id, pid.format(), fd, data))

    def exited(self, pid: Pid, code: int | None, signal_name: str | None, reason: str | None) -> None:
        self.agent.send((Kind.EXIT, self.run_id, pid.format(), code, signal_name, reason))

    def zygote_lost(self, link: ZygoteLink) -> None:
        if self.run is not None:
            self.agent.zygote_lost(self.run)


def command(root: Path, program: list[str], args: list[str], environment: dict[str, str]) -> list[str]:
    """``python SCRIPT ARGS`` (SCRIPT relative to the bundle's root), or ``python -m MODULE ARGS``
    with the root on PYTHONPATH."""
    if program[:1] == ["-m"]:
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), environment.get("PYTHONPATH")]))
        return [sys.executable, *program, *args]
    return [sys.executable, str(root / program[0]), *program[1:], *args]


def inside(root: Path, cwd: str) -> Path:
    """``root / cwd`` (made if the bundle holds no such directory) when it lies inside ``root``, else ``root``."""
    directory = (root / cwd).resolve() if cwd else root
    if directory != root.resolve() and root.resolve() not in directory.parents:
        return root
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def _last_line(file: object) -> str:
    try:
        file.seek(0)  # type: ignore[attr-defined]
        lines = [line.strip() for line in file.read().decode(errors="replace").splitlines() if line.strip()]  # type: ignore[attr-defined]
    except OSError:
        return ""
    return lines[-1] if lines else ""
