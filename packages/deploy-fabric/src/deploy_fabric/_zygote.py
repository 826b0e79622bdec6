"""The fork server (zygote): a snapshot of the program taken at init(), forked per process.

The zygote is also every local process's monitor: one `deploy_monitor.Supervisor` loop
captures their output, enforces their resources, reaps them and streams each process's
events to the bridge over a socketpair of its own, so a process costs one fork.

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
- SCM_RIGHTS over a unix socket hands the bridge its end of each process's event stream; a
  SOCK_SEQPACKET socket keeps each reply and its fd together in one message.
- A pipe holds 64 KiB: a bigger job is written as the process reads it, from the loop.
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import select
import signal
import socket
import struct
from collections import deque
from dataclasses import dataclass, field

import deploy_channels
from deploy_core import Handshake, Pid, Resources, SpawnRequest
from deploy_monitor import Child, Exit, Output, Supervisor, detect_enforcement

from . import _wire as wire

__all__ = ["TopProcess", "serve"]

log = logging.getLogger("deploy.fabric")

_JOB_LENGTH = struct.Struct(">Q")
_SPARES = 4  # processes forked ahead of need, in one batch


@dataclass
class TopProcess:
    """What the top process takes with it when it returns out of the zygote into main."""

    pid: Pid
    listener: socket.socket
    resources: Resources


def serve(
    requests: socket.socket, replies: socket.socket, fabric: tuple[str, int], secret: bytes, host: str
) -> TopProcess:
    """Serve fork requests from the bridge; returns only in the top process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the bridge's to handle
    detect_enforcement()  # once, here: every process inherits the answer
    # A collection writes to every object it visits, which copies those pages in whichever
    # forked process runs it. What exists now is the snapshot: move it where collections
    # never look, here and so in every process forked from here.
    gc.collect()
    gc.freeze()
    return _Zygote(requests, replies, fabric, secret, host).run()


@dataclass
class _Process:
    """One process the zygote started, and where its events go."""

    pid: Pid
    events: socket.socket | None = None  # None until a spawn takes this spare
    backlog: list = field(default_factory=list)  # events from before that
    child: Child | None = None
    job: bytes = b""  # what is still to be written to the process
    job_fd: int = -1

    def on_event(self, event: Output | Exit) -> None:
        message = (
            (wire.OUTPUT, event.fd, event.data)
            if isinstance(event, Output)
            else (wire.EXIT, event.code, event.signal, event.reason)
        )
        if self.events is None:
            self.backlog.append(message)
            return
        try:
            wire.send_message(self.events, message)
        except OSError:
            pass  # the bridge is gone: the lifeline has the process killed
        if isinstance(event, Exit):
            self.events.close()


class _Zygote:
    def __init__(
        self, requests: socket.socket, replies: socket.socket, fabric: tuple[str, int], secret: bytes, host: str
    ):
        self.requests = requests
        self.replies = replies
        self.fabric = fabric
        self.secret = secret
        self.host = host
        self.supervisor = Supervisor()
        self.reader = wire.MessageReader()
        self.spares: deque[_Process] = deque()
        # A request like those spawns carry, for the spares to warm up with.
        self.sample = SpawnRequest.build(
            _sample_function, 0, Resources.default(), Pid.new(host, 1), block=True
        ).encode()
        self.spare_error = ""

    def run(self) -> TopProcess:
        top = self._start_top()
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
                os._exit(0)  # the bridge is gone before the run began
            for message in self.reader.feed(data):
                return message

    # --- the top process ---------------------------------------------------------------------

    def _start_top(self) -> TopProcess | None:
        """The bridge's first request is for the top process, which returns out of init()."""
        _, ticket, _, resources = self._read_request()
        resources = Resources(**resources)
        try:
            listener, pid = self._bind()
            events, bridge_end = socket.socketpair()
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
            close=[self.requests.fileno(), self.replies.fileno(), bridge_end.fileno()],
        )
        if child is None:
            # The top process: those descriptors are closed already, and their numbers will
            # be reused; the socket objects must not close them again.
            for sock in (self.requests, self.replies, events, bridge_end):
                sock.detach()
            return TopProcess(pid, listener, resources)
        process.child = child
        listener.close()
        self._reply(ticket, pid, None, bridge_end)
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
        job_r, job_w = os.pipe()
        process = _Process(pid)
        context = (self.fabric, self.secret)

        def target() -> int:
            from ._runtime import run_spawned, start_endpoint

            endpoint = start_endpoint(pid, listener, context[1])
            _warm_up(self.sample, context[1])
            request = _read_job(job_r)
            if not request:
                return 0  # a spare that never got a job
            return run_spawned(SpawnRequest.decode(request), pid, endpoint, *context)

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
            if message[0] == wire.FORK:
                self._assign(*message[1:])
        if not data or self.reader.closed:
            # The bridge is gone: so is the run.
            self.supervisor.close()
            os._exit(0)

    def _assign(self, ticket: int, request: bytes, resources: dict) -> None:
        """Give the spare its job: the bridge learns the pid and gets the event stream."""
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
        events, bridge_end = socket.socketpair()
        self._reply(ticket, spare.pid, None, bridge_end)
        spare.child.set_limits(Resources(**resources))  # (before the job: user code runs limited)
        spare.events = events
        for message in spare.backlog:
            try:
                wire.send_message(events, message)
            except OSError:
                break
        spare.backlog.clear()
        spare.child.set_lifeline(events.fileno())
        spare.job = _JOB_LENGTH.pack(len(request)) + request
        self._write_job(spare)

    def _write_job(self, process: _Process, events: int = 0) -> None:
        try:
            written = os.write(process.job_fd, process.job)
        except BlockingIOError:
            written = 0
        except OSError:
            written = len(process.job)  # it died: its exit says so
        process.job = process.job[written:]
        if process.job:
            if not events:
                os.set_blocking(process.job_fd, False)
                self.supervisor.watch(process.job_fd, lambda events: self._write_job(process, events), select.POLLOUT)
            return
        if events:
            self.supervisor.unwatch(process.job_fd)
        os.close(process.job_fd)
        process.job_fd = -1

    def _reply(self, ticket: int, pid: Pid | None, error: str | None, bridge_end: socket.socket | None) -> None:
        fds = [bridge_end.fileno()] if bridge_end is not None else []
        try:
            socket.send_fds(self.replies, [pickle.dumps((wire.FORKED, ticket, pid and pid.format(), error))], fds)
        except OSError:
            self.supervisor.close()
            os._exit(0)  # the bridge is gone; so is the run
        finally:
            if bridge_end is not None:
                bridge_end.close()


def _sample_function(parent: Pid, value: int) -> int:
    return value


def _warm_up(sample: bytes, secret: bytes) -> None:
    """Run, once, what a spawned process runs first (see the module's facts)."""
    request = SpawnRequest.decode(sample)
    _ = dict(os.environ) == request.env
    function, argument = request.function_and_argument()
    function(request.parent, argument)
    initiator, acceptor = Handshake(secret, initiator=True), Handshake(secret, initiator=False)
    acceptor.receive_data(initiator.data_to_send())  # the initiator's nonce
    initiator.receive_data(acceptor.data_to_send())  # the acceptor's nonce and proof
    acceptor.receive_data(initiator.data_to_send())  # the initiator's proof
    pickle.loads(pickle.dumps(0, protocol=5))  # as a message is
    deploy_channels.Sender[int], deploy_channels.Receiver[int]  # noqa: B018  (the typed classes are cached)


def _read_job(fd: int) -> bytes:
    """The spawn request the zygote writes: its length, then itself (b"" if none comes)."""
    with open(fd, "rb", buffering=0, closefd=True) as pipe:
        head = _read_exactly(pipe, _JOB_LENGTH.size)
        if len(head) < _JOB_LENGTH.size:
            return b""
        (length,) = _JOB_LENGTH.unpack(head)
        return _read_exactly(pipe, length)


def _read_exactly(pipe, size: int) -> bytes:
    chunks = []
    while size:
        chunk = pipe.read(size)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)
