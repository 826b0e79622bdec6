"""The fork server (zygote): a snapshot of the program taken at init(), forked per process.

Facts relied on:
- A fork copies the whole interpreter, the user's imported modules included, so a new
  process costs one fork, not an interpreter start; the zygote runs no threads, so forking
  it is safe.
- A listening socket accepts connections into its backlog before anyone calls accept(),
  so binding the new process's port here, before forking, lets its pid (which holds the
  port) be handed out at once while the process is still starting.
- Monitors are the zygote's children and must be reaped (waitpid WNOHANG) or they stay
  zombies; the monitor reaps the user process itself.
- A freshly forked process runs slowly at first (every page it writes is copied), so the
  zygote forks the next monitor ahead of need and lets it warm up while idle.
- SCM_RIGHTS over a unix socket hands the bridge its end of each monitor's socketpair; a
  SOCK_SEQPACKET socket keeps each reply and its fd together in one message.
"""

from __future__ import annotations

import gc
import logging
import os
import pickle
import selectors
import signal
import socket
import traceback
from dataclasses import dataclass

from deploy_core import Pid, Resources, SpawnRequest
from deploy_monitor import Exit, Output, detect_enforcement, flush_stdio, run_monitored

from . import _wire as wire

__all__ = ["TopProcess", "serve"]

log = logging.getLogger("deploy.fabric")


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
    detect_enforcement()  # once, here: every monitor inherits the answer
    # A collection writes to every object it visits, which copies those pages in whichever
    # forked process runs it. What exists now is the snapshot: move it where collections
    # never look, here and so in every process forked from here.
    gc.collect()
    gc.freeze()
    selector = selectors.DefaultSelector()
    selector.register(requests, selectors.EVENT_READ)
    reader = wire.MessageReader()
    context = _Context(requests, replies, fabric, secret, host)
    spare: _Spare | None = None
    top = True  # the bridge's first request is for the top process
    while True:
        if spare is None:
            spare = _Spare.fork(context, top=top)
            if isinstance(spare, TopProcess):
                return spare
        ready = selector.select(timeout=0.5)
        _reap()
        if not ready:
            continue
        data = requests.recv(1 << 16)
        for message in reader.feed(data):
            if message[0] != wire.FORK:
                continue
            _, ticket, request, resources = message
            if spare is None:
                spare = _Spare.fork(context, top=top)
                if isinstance(spare, TopProcess):
                    return spare
            spare.assign(replies, ticket, request, resources)
            spare, top = None, False
        if not data or reader.closed:
            os._exit(0)


def _reap() -> None:
    while True:
        try:
            ospid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if ospid == 0:
            return


def _reply(replies: socket.socket, message: tuple, fds: list[int]) -> None:
    try:
        socket.send_fds(replies, [pickle.dumps(message, protocol=5)], fds)
    except OSError:
        os._exit(0)  # the bridge is gone; so is the run


@dataclass
class _Context:
    requests: socket.socket
    replies: socket.socket
    fabric: tuple[str, int]
    secret: bytes
    host: str


class _NoJob(Exception):
    """The zygote went away before giving a spare its job."""


class _Spare:
    """A process forked ahead of need, with its port, pid and event stream ready.

    Every spare but the first is a pair: a monitor and, under it, the user process with
    its endpoint already listening, both waiting for a job. Handing over a spawn then costs
    no fork at all; the zygote forks the next pair while the process starts. The first
    spare is a monitor alone, for the top process, which must fork from the zygote's own
    call stack to return out of init() into main.
    """

    def __init__(self, pid: Pid | None, bridge_end: socket.socket | None, orders: socket.socket | None, error: str):
        self.pid = pid
        self.bridge_end = bridge_end
        self.orders = orders
        self.error = error

    @classmethod
    def fork(cls, context: _Context, *, top: bool) -> _Spare | TopProcess:
        try:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind((context.host, 0))
            listener.listen(128)
            pid = Pid.new(context.host, listener.getsockname()[1])
            events, bridge_end = socket.socketpair()
            orders, order_end = socket.socketpair()
        except OSError as error:
            return cls(None, None, None, f"cannot open a port for the new process: {error}")
        flush_stdio()
        try:
            ospid = os.fork()
        except OSError as error:
            for sock in (listener, events, bridge_end, orders, order_end):
                sock.close()
            return cls(None, None, None, f"cannot fork a monitor: {error}")
        if ospid:
            for sock in (listener, events, order_end):
                sock.close()
            return cls(pid, bridge_end, orders, "")
        try:
            for sock in (context.requests, context.replies, bridge_end, orders):
                sock.close()
            monitor = _Monitor(events, pid, listener, order_end, context)
            found = monitor.serve_top() if top else monitor.serve_spawned()
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        if found is None:
            os._exit(0)
        return found

    def assign(self, replies: socket.socket, ticket: int, request: bytes | None, resources: dict) -> None:
        """Hand this spare a spawn: the bridge learns the pid and gets the monitor's event stream."""
        if self.pid is None or self.bridge_end is None or self.orders is None:
            _reply(replies, (wire.FORKED, ticket, None, self.error), [])
            return
        # If the monitor has died meanwhile, the bridge reads EOF on its end and reports the process lost.
        _reply(replies, (wire.FORKED, ticket, self.pid.format(), None), [self.bridge_end.fileno()])
        self.bridge_end.close()
        try:
            wire.send_message(self.orders, (wire.FORK, request, resources))
        except OSError:
            pass
        self.orders.close()


class _Monitor:
    """A spare's monitor side: waits for its job, then monitors one user process.

    ``events`` carries its events to the bridge and is its lifeline: when the bridge goes,
    or shuts its end, the monitor kills the process.
    """

    def __init__(
        self, events: socket.socket, pid: Pid, listener: socket.socket, orders: socket.socket, context: _Context
    ):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self.events = events
        self.pid = pid
        self.listener = listener
        self.orders = orders
        self.context = context

    def on_event(self, event: Output | Exit) -> None:
        if isinstance(event, Output):
            message: tuple = (wire.OUTPUT, event.fd, event.data)
        else:
            message = (wire.EXIT, event.code, event.signal, event.reason)
        try:
            wire.send_message(self.events, message)
        except OSError:
            pass  # the bridge is gone: the lifeline has told the monitor to kill the process

    def wait_for_job(self) -> tuple[bytes | None, Resources]:
        message = wire.recv_message(self.orders, wire.FrameDecoder(max_frame_size=wire.MAX_MESSAGE))
        if message is None:
            raise _NoJob()
        _, request, resources = message
        self.orders.close()
        return request, Resources(**resources)

    def serve_top(self) -> TopProcess | None:
        try:
            _, resources = self.wait_for_job()
        except _NoJob:
            return None
        result = run_monitored(
            None,
            resources=resources,
            on_event=self.on_event,
            keep_stdin=True,
            lifeline=self.events.fileno(),
            on_start=lambda ospid: self.listener.close(),
        )
        if result is None:  # in the top process, where the monitor already closed the lifeline's fd
            self.events.detach()
            return TopProcess(self.pid, self.listener, resources)
        self.events.close()
        return None

    def serve_spawned(self) -> None:
        job_r, job_w = os.pipe()
        job: list[bytes] = []

        def learn_resources() -> Resources:
            request, resources = self.wait_for_job()
            if request is None:
                raise _NoJob()
            job.append(request)
            return resources

        def start(ospid: int) -> None:
            # The process is under its limits now: give it its job.
            self.listener.close()
            os.close(job_r)
            with open(job_w, "wb") as pipe:
                pipe.write(job[0])

        def process() -> int:
            self.events.detach()  # the lifeline's fd, which the monitor closed in this child
            self.orders.close()
            os.close(job_w)
            from ._runtime import run_spawned, start_endpoint

            endpoint = start_endpoint(self.pid, self.listener, self.context.secret)
            with open(job_r, "rb") as pipe:
                request = pipe.read()
            if not request:
                return 0  # a spare that never got a job
            return run_spawned(
                SpawnRequest.decode(request), self.pid, endpoint, self.context.fabric, self.context.secret
            )

        try:
            run_monitored(
                process,
                resources=learn_resources,
                on_event=self.on_event,
                lifeline=self.events.fileno(),
                on_start=start,
            )
        except _NoJob:
            pass
        self.events.close()
