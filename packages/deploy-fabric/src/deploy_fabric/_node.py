"""The node: a run's fork server (zygote) and the processes it monitors.

The zygote is a snapshot of the program taken at init(), forked per process. It is also
the monitor of every process of the run on its node: one `deploy_monitor.Supervisor` loop
captures their output, enforces their resources, reaps them and streams each process's
events to the node over a socketpair of its own, so a process costs one fork.

Facts relied on:
- A fork copies the whole interpreter, the user's imported modules included, so a new
  process costs one fork, not an interpreter start; the zygote runs no threads, so forking
  it is safe.
- A listening socket accepts connections into its backlog before anyone calls accept(),
  so binding the new process's port here, before forking, lets its pid (which holds the
  port) be handed out at once while the process is still starting.
- A freshly forked process runs slowly at first (every page it writes is copied), and
  joining a cgroup waits for the kernel to synchronise every CPU, so the zygote forks the
  next processes ahead of need (spares, with their cgroups joined and their endpoints
  listening) and lets them warm up until spawns give them their jobs.
- The same holds for the spare: the code a spawn runs (decoding the request, the first
  handshake and message) runs once in the spare beforehand, so the pages it writes are
  copied before the job arrives rather than while the parent waits for the reply.
- After a fork the zygote's own pages are shared again, so the zygote too pays a copy for
  each page it writes next: it forks its spares in a batch, paying that once per batch.
- SCM_RIGHTS over a unix socket hands the node its end of each process's event stream; a
  SOCK_SEQPACKET socket keeps each reply and its fd together in one message.
- A pipe holds 64 KiB: a bigger job is written as the process reads it, from the loop,
  through memoryviews (slicing one copies nothing); the process reads it into one buffer
  of the announced size, so a job of N bytes costs the process N, not a chunk list and
  its join. The request decodes into views of that buffer, and it is let go of once the
  function and argument are unpickled, before the function runs.
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import select
import selectors
import signal
import socket
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import deploy_channels
from deploy_core import DeployError, Handshake, Pid, Resources, SpawnRequest
from deploy_monitor import Child, Exit, Output, Supervisor, detect_enforcement

from . import _wire as wire
from ._wire import Kind

__all__ = ["ProcessRun", "ProcessStart", "TopProcess", "ZygoteLink", "serve"]

log = logging.getLogger("deploy.fabric")

_JOB_LENGTH = struct.Struct(">Q")
_SPARES = 4  # processes forked ahead of need, in one batch


@dataclass
class TopProcess:
    """What the top process takes with it when it returns out of the zygote into main."""

    pid: Pid
    listener: socket.socket
    resources: Resources


# The process side, handed in by whoever starts the zygote (the zygote does not import it):
# the new process's endpoint on the port bound for it, then the run of its request.
ProcessStart = Callable[[Pid, socket.socket], deploy_channels.Endpoint]
ProcessRun = Callable[[SpawnRequest, Pid, deploy_channels.Endpoint], int]


def serve(
    requests: socket.socket,
    replies: socket.socket,
    secret: bytes,
    host: str,
    start: ProcessStart,
    run: ProcessRun,
    *,
    top: bool = True,
) -> TopProcess:
    """Serve fork requests from the node; returns only in the top process (whose fork is the
    first request, unless ``top`` is False: a cluster node that runs none)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the bridge's to handle
    detect_enforcement()  # once, here: every process inherits the answer
    # A collection writes to every object it visits, which copies those pages in whichever
    # forked process runs it. What exists now is the snapshot: move it where collections
    # never look, here and so in every process forked from here.
    gc.collect()
    gc.freeze()
    return _Zygote(requests, replies, secret, host, start, run).run(top)


@dataclass
class _Process:
    """One process the zygote started, and where its events go."""

    pid: Pid
    events: socket.socket | None = None  # None until a spawn takes this spare
    backlog: list = field(default_factory=list)  # events from before that
    child: Child | None = None
    job: list[memoryview] = field(default_factory=list)  # what is still to be written to the process
    job_fd: int = -1

    def on_event(self, event: Output | Exit) -> None:
        message = (
            (Kind.OUTPUT, event.fd, event.data)
            if isinstance(event, Output)
            else (Kind.EXIT, event.code, event.signal, event.reason)
        )
        if self.events is None:
            self.backlog.append(message)
            return
        try:
            wire.send_message(self.events, message)
        except OSError:
            pass  # the node is gone: the lifeline has the process killed
        if isinstance(event, Exit):
            self.events.close()


class _Zygote:
    def __init__(
        self,
        requests: socket.socket,
        replies: socket.socket,
        secret: bytes,
        host: str,
        start: ProcessStart,
        run: ProcessRun,
    ):
        self.requests = requests
        self.replies = replies
        self.secret = secret
        self.host = host
        self.start = start
        self.run_process = run
        # Every child of the zygote is a process it started: an orphan of one of them (a
        # subprocess left running, a setsid daemon) is killed when that process exits.
        self.supervisor = Supervisor(subreaper=True)
        self.reader = wire.MessageReader()
        self.spares: deque[_Process] = deque()
        # A request like those spawns carry, for the spares to warm up with.
        self.sample = SpawnRequest.build(
            _sample_function, 0, Resources.default(), Pid.new(host, 1), block=True
        ).encode()
        self.spare_error = ""

    def run(self, with_top: bool) -> TopProcess:
        top = self._start_top() if with_top else None
        if top is not None:
            return top
        self.supervisor.watch(self.requests.fileno(), self._on_requests)
        while True:
            if not self.spares and not self.spare_error:
                # In a batch: every fork makes the zygote's pages shared again, and the
                # zygote's own work copies each page it then writes, once per fork.
                for _ in range(_SPARES):
                    self._fork_spare()
            self.supervisor.poll()

    def _read_request(self) -> tuple:
        while True:
            try:
                data = self.requests.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                os._exit(0)  # the node is gone before the run began
            for message in self.reader.feed(data):
                return message

    # --- the top process ---------------------------------------------------------------------

    def _start_top(self) -> TopProcess | None:
        """The first request is for the top process, which returns out of init()."""
        _, ticket, _, resources = self._read_request()
        resources = Resources(**resources)
        try:
            listener, pid = self._bind()
            events, node_end = socket.socketpair()
        except OSError as error:
            self._reply(ticket, None, f"cannot open a port for the top process: {error}", None)
            os._exit(1)
        process = _Process(pid, events)
        child = self.supervisor.start(
            None,
            on_event=process.on_event,
            resources=resources,
            keep_stdin=True,
            lifeline=events.fileno(),
            close=[self.requests.fileno(), self.replies.fileno(), node_end.fileno()],
        )
        if child is None:
            # The top process: those descriptors are closed already, and their numbers will
            # be reused; the socket objects must not close them again.
            for sock in (self.requests, self.replies, events, node_end):
                sock.detach()
            return TopProcess(pid, listener, resources)
        process.child = child
        listener.close()
        self._reply(ticket, pid, None, node_end, child.pid)
        return None

    # --- spawned processes -------------------------------------------------------------------

    def _bind(self) -> tuple[socket.socket, Pid]:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.bind((self.host, 0))
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        return listener, Pid.new(self.host, listener.getsockname()[1])

    def _fork_spare(self) -> None:
        try:
            listener, pid = self._bind()
        except OSError as error:
            self.spare_error = f"cannot open a port for the new process: {error}"
            return
        try:
            job_r, job_w = os.pipe()
        except OSError as error:  # out of fds: this spawn fails, the zygote serves on
            listener.close()
            self.spare_error = f"cannot make a pipe for the new process: {error}"
            return
        process = _Process(pid)

        def target() -> int:
            endpoint = self.start(pid, listener)
            _warm_up(self.sample, self.secret)
            job = _read_job(job_r)
            if job is None:
                return 0  # a spare that never got a job
            request = SpawnRequest.decode(job)
            del job  # (the request's views hold it, until it lets go of them)
            return self.run_process(request, pid, endpoint)

        try:
            process.child = self.supervisor.start(
                target,
                on_event=process.on_event,
                limits_later=True,
                close=[self.requests.fileno(), self.replies.fileno(), job_w, *(s.job_fd for s in self.spares)],
            )
        except OSError as error:
            self.spare_error = f"cannot fork the new process: {error}"
            os.close(job_w)
            return
        finally:
            listener.close()
            os.close(job_r)
        process.job_fd = job_w
        self.spares.append(process)

    def _on_requests(self, events: int) -> None:
        try:
            data = self.requests.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        for message in self.reader.feed(data):
            if message[0] == Kind.FORK:
                self._assign(*message[1:])
        if not data or self.reader.closed:
            # The node is gone: so is the run.
            self.supervisor.close()
            os._exit(0)

    def _assign(self, ticket: int, request: bytes, resources: dict) -> None:
        """Give the spare its job: the node learns the pid and gets the event stream."""
        spare = None
        while self.spares and spare is None:
            spare = self.spares.popleft()
            if spare.child is None or spare.child.exit is not None:
                os.close(spare.job_fd)  # it died while waiting
                spare = None
        if spare is None:
            self.spare_error = ""
            self._fork_spare()
            spare = self.spares.pop() if self.spares else None
        if spare is None or spare.child is None:
            self._reply(ticket, None, self.spare_error or "the fork server could not start the process", None)
            return
        try:
            events, node_end = socket.socketpair()
        except OSError as error:  # out of fds: this spawn fails, the spare waits for the next
            self.spares.appendleft(spare)
            self._reply(ticket, None, f"the fork server cannot connect the new process: {error}", None)
            return
        self._reply(ticket, spare.pid, None, node_end, spare.child.pid)
        spare.child.set_limits(Resources(**resources))  # (before the job: user code runs limited)
        spare.events = events
        for message in spare.backlog:
            try:
                wire.send_message(events, message)
            except OSError:
                break
        spare.backlog.clear()
        spare.child.set_lifeline(events.fileno())
        spare.job = [memoryview(_JOB_LENGTH.pack(len(request))), memoryview(request)]
        self._write_job(spare)

    def _write_job(self, process: _Process, events: int = 0) -> None:
        written = 0
        try:
            written = os.writev(process.job_fd, process.job)
        except BlockingIOError:
            pass
        except OSError:
            process.job = []  # it died: its exit says so
        while process.job and written >= len(process.job[0]):
            written -= len(process.job.pop(0))
        if process.job and written:
            process.job[0] = process.job[0][written:]
        if process.job:
            if not events:
                os.set_blocking(process.job_fd, False)
                self.supervisor.watch(process.job_fd, lambda events: self._write_job(process, events), select.POLLOUT)
            return
        if events:
            self.supervisor.unwatch(process.job_fd)
        os.close(process.job_fd)
        process.job_fd = -1

    def _reply(
        self,
        ticket: int,
        pid: Pid | None,
        error: str | None,
        node_end: socket.socket | None,
        os_pid: int | None = None,
    ) -> None:
        fds = [node_end.fileno()] if node_end is not None else []
        message = (Kind.FORKED, ticket, pid and pid.format(), error, os_pid)
        try:
            socket.send_fds(self.replies, [wire.dumps(message)], fds)
        except OSError:
            self.supervisor.close()
            os._exit(0)  # the node is gone; so is the run
        finally:
            if node_end is not None:
                node_end.close()


def _sample_function(parent: Pid, value: int) -> int:
    return value


def _warm_up(sample: bytes, secret: bytes) -> None:
    """Run, once, what a spawned process runs first (see the module's facts)."""
    request = SpawnRequest.decode(sample)
    _ = dict(os.environ) == request.env
    function, argument = request.function_and_argument()
    function(request.parent, argument)
    assert request.parent is not None, "the sample request names a parent"
    initiator = Handshake(secret, initiator=True, identity=request.parent.hex, wanted=wire.BRIDGE)
    acceptor = Handshake(secret, initiator=False, identity=wire.BRIDGE)
    for source, target in ((initiator, acceptor), (acceptor, initiator), (initiator, acceptor)):
        data = source.data_to_send()  # the hello, the acceptor's answer, the proof
        while data:
            size = target.bytes_needed()
            target.receive_data(data[:size])
            data = data[size:]
    pickle.loads(pickle.dumps(0, protocol=5))  # as a message is
    deploy_channels.Sender[int], deploy_channels.Receiver[int]  # noqa: B018  (the typed classes are cached)


def _read_job(fd: int) -> bytearray | None:
    """The spawn request the zygote writes: its length, then itself (None if none comes)."""
    with open(fd, "rb", buffering=0, closefd=True) as pipe:
        head = _read_exactly(pipe, _JOB_LENGTH.size)
        if head is None:
            return None
        (length,) = _JOB_LENGTH.unpack(head)
        return _read_exactly(pipe, length)


def _read_exactly(pipe, size: int) -> bytearray | None:
    """``size`` bytes read into one buffer of that size; None if the pipe ends before."""
    buffer = bytearray(size)
    with memoryview(buffer) as view:
        done = 0
        while done < size:
            count = pipe.readinto(view[done:])
            if not count:
                return None
            done += count
    return buffer


# --- the node's end of the zygote ---------------------------------------------------------


class NodeEvents(Protocol):
    """Who hears what the zygote and its processes report (the master, in local mode)."""

    def forked(self, ticket: int, pid: Pid | None, error: str | None) -> None: ...
    def output(self, pid: Pid, fd: int, data: bytes) -> None: ...
    def exited(self, pid: Pid, code: int | None, signal_name: str | None, reason: str | None) -> None: ...
    def zygote_lost(self, link: ZygoteLink) -> None: ...


@dataclass
class _Monitor:
    """Our end of one process's event stream from the zygote."""

    pid: Pid
    sock: socket.socket
    os_pid: int | None
    reader: wire.MessageReader = field(default_factory=wire.MessageReader)
    exited: bool = False


class ZygoteLink:
    """The node's end of one run's zygote, served from the caller's selector loop.

    Fork requests go to the zygote over a stream that is never written with a blocking
    write: the zygote forwards every process's output here and may be waiting for us to
    read it. Each reply comes back as one packet with our end of the new process's event
    stream (SCM_RIGHTS), on which the zygote, its monitor, streams its output and exit: no
    connection set-up and no handshake. A stream that ends before its exit event means
    the monitor died, and so did its process (PR_SET_PDEATHSIG).
    """

    def __init__(
        self,
        to_zygote: socket.socket,
        from_zygote: socket.socket,
        selector: selectors.BaseSelector,
        events: NodeEvents,
    ):
        self._to_zygote = to_zygote
        self._to_zygote_outbox = bytearray()
        self._from_zygote: socket.socket | None = from_zygote
        self._selector = selector
        self._events = events
        self._monitors: dict[int, _Monitor] = {}
        self.stopping = False
        for sock in (to_zygote, from_zygote):
            sock.setblocking(False)
        selector.register(from_zygote, selectors.EVENT_READ, self._read_zygote)

    @property
    def alive(self) -> bool:
        return self._from_zygote is not None

    def fork(self, ticket: int, request: bytes | None, resources: Resources) -> None:
        """Ask for a process (``request`` None: the top process); `forked` answers."""
        data = wire.encode((Kind.FORK, ticket, request, resources.to_dict()))
        if send_or_keep(self._to_zygote, self._to_zygote_outbox, data):
            self._selector.register(self._to_zygote, selectors.EVENT_WRITE, self._flush_to_zygote)

    def stop(self) -> None:
        """Every monitor kills its process and reports; the zygote exits at the end of its stream."""
        self.stopping = True
        for monitor in self._monitors.values():
            _stop_monitor(monitor)
        if self._to_zygote_outbox:
            self._to_zygote_outbox.clear()
            self._selector.unregister(self._to_zygote)
        self._to_zygote.close()

    def _flush_to_zygote(self, mask: int) -> None:
        if not flush_kept(self._to_zygote, self._to_zygote_outbox):
            self._selector.unregister(self._to_zygote)

    def _read_zygote(self, mask: int) -> None:
        while self._from_zygote is not None:
            try:
                data, fds, _, _ = socket.recv_fds(self._from_zygote, 1 << 16, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, fds = b"", []
            if not data:
                self._selector.unregister(self._from_zygote)
                self._from_zygote.close()
                self._from_zygote = None
                self._events.zygote_lost(self)
                return
            message = wire.load(data)
            if message[0] == Kind.FORKED:
                self._forked(*message[1:], monitor_fd=fds[0] if fds else None)
            for fd in fds[1:]:
                os.close(fd)

    def os_pids(self) -> dict[Pid, int]:
        """The operating system's pid of each live process."""
        return {m.pid: m.os_pid for m in self._monitors.values() if not m.exited and m.os_pid is not None}

    def _forked(
        self, ticket: int, pid_text: str | None, error: str | None, os_pid: int | None, *, monitor_fd: int | None
    ) -> None:
        if error is not None or pid_text is None or monitor_fd is None:
            if monitor_fd is not None:
                os.close(monitor_fd)
            self._events.forked(ticket, None, error or "the fork server could not start the process")
            return
        pid = Pid.parse(pid_text)
        self._events.forked(ticket, pid, None)  # first: the requester is waiting
        monitor = _Monitor(pid, socket.socket(fileno=monitor_fd), os_pid)
        monitor.sock.setblocking(False)
        self._monitors[monitor.sock.fileno()] = monitor
        self._selector.register(monitor.sock, selectors.EVENT_READ, lambda mask: self._read_monitor(monitor))
        if self.stopping:
            _stop_monitor(monitor)

    def _read_monitor(self, monitor: _Monitor) -> None:
        try:
            data = monitor.sock.recv(1 << 18)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        try:
            messages = monitor.reader.feed(data)
        except DeployError as error:
            log.warning("dropped a monitor stream that sent a bad frame: %s", error)
            messages, data = [], b""
        for message in messages:
            if monitor.exited:
                break
            if message[0] == Kind.OUTPUT:
                self._events.output(monitor.pid, message[1], message[2])
            elif message[0] == Kind.EXIT:
                monitor.exited = True
                self._events.exited(monitor.pid, *message[1:4])
        if not data or monitor.reader.closed:
            self._monitors.pop(monitor.sock.fileno(), None)
            self._selector.unregister(monitor.sock)
            monitor.sock.close()
            if not monitor.exited:
                monitor.exited = True
                self._events.exited(monitor.pid, None, "SIGKILL", "its monitor died")


def _stop_monitor(monitor: _Monitor) -> None:
    try:
        monitor.sock.shutdown(socket.SHUT_WR)  # the monitor's lifeline: it kills its process
    except OSError:
        pass


def send_or_keep(sock: socket.socket, outbox: bytearray, data: bytes) -> bool:
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


def flush_kept(sock: socket.socket, outbox: bytearray) -> bool:
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


def sealed_waiting(sock: socket.socket) -> bool:
    """Whether a `ProtectedSocket` holds sealed bytes the kernel has not taken yet."""
    pending = getattr(sock, "pending_out", None)
    return bool(pending is not None and pending())


def flush_all(sock: socket.socket, outbox: bytearray) -> bool:
    """On a writable socket: send what waits (sealed bytes first, then ``outbox``); True
    while something still does."""
    if sealed_waiting(sock):
        try:
            if not sock.flush():  # type: ignore[attr-defined]
                return True
        except OSError:
            outbox.clear()
            return False
    return flush_kept(sock, outbox) or sealed_waiting(sock)
