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

import logging
import os
import pickle
import selectors
import signal
import socket
import sys
import traceback
from dataclasses import dataclass

from deploy_core import Pid, Resources, SpawnRequest
from deploy_monitor import Exit, Output, detect_enforcement, run_monitored

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
    selector = selectors.DefaultSelector()
    selector.register(requests, selectors.EVENT_READ)
    reader = wire.MessageReader()
    spare: _Spare | None = None
    while True:
        if spare is None:
            spare = _Spare.fork(requests, replies, fabric, secret, host)
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
                spare = _Spare.fork(requests, replies, fabric, secret, host)
                if isinstance(spare, TopProcess):
                    return spare
            if spare.pid is None:
                _reply(replies, (wire.FORKED, ticket, None, spare.error), [])
            else:
                spare.assign(replies, ticket, request, resources)
            spare = None
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


class _Spare:
    """A monitor forked ahead of need, with its port, pid and event stream ready.

    The zygote forks the next spare while the current one serves a request, so a spawn
    waits for one fork (the monitor's of the user process), not two.
    """

    def __init__(self, pid: Pid | None, bridge_end: socket.socket | None, orders: socket.socket | None, error: str):
        self.pid = pid
        self.bridge_end = bridge_end
        self.orders = orders
        self.error = error

    @classmethod
    def fork(
        cls, requests: socket.socket, replies: socket.socket, fabric: tuple[str, int], secret: bytes, host: str
    ) -> _Spare | TopProcess:
        try:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind((host, 0))
            listener.listen(128)
            pid = Pid.new(host, listener.getsockname()[1])
            events, bridge_end = socket.socketpair()
            orders, order_end = socket.socketpair()
        except OSError as error:
            return cls(None, None, None, f"cannot open a port for the new process: {error}")
        _flush_stdio()
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
            for sock in (requests, replies, bridge_end, orders):
                sock.close()
            message = wire.recv_message(order_end, wire.FrameDecoder(max_frame_size=wire.MAX_MESSAGE))
            order_end.close()
            if message is None:
                os._exit(0)  # the zygote is gone without a job for us
            _, request, resources = message
            top = _monitor(events, pid, listener, request, Resources(**resources), fabric, secret)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        if top is None:
            os._exit(0)
        return top

    def assign(self, replies: socket.socket, ticket: int, request: bytes | None, resources: dict) -> None:
        """Hand this spare a spawn: the bridge learns the pid and gets the monitor's event stream."""
        assert self.bridge_end is not None and self.orders is not None and self.pid is not None
        # If the monitor has died meanwhile, the bridge reads EOF on its end and reports the process lost.
        _reply(replies, (wire.FORKED, ticket, self.pid.format(), None), [self.bridge_end.fileno()])
        self.bridge_end.close()
        try:
            wire.send_message(self.orders, (wire.FORK, request, resources))
        except OSError:
            pass
        self.orders.close()


def _monitor(
    conn: socket.socket,
    pid: Pid,
    listener: socket.socket,
    request: bytes | None,
    resources: Resources,
    fabric: tuple[str, int],
    secret: bytes,
) -> TopProcess | None:
    """The monitor process of one user process; returns a TopProcess only in the top process.

    ``conn`` carries its events to the bridge and is its lifeline: when the bridge goes, or
    shuts its end, the monitor kills the process.
    """
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)

    def on_event(event: Output | Exit) -> None:
        if isinstance(event, Output):
            message: tuple = (wire.OUTPUT, event.fd, event.data)
        else:
            message = (wire.EXIT, event.code, event.signal, event.reason)
        try:
            wire.send_message(conn, message)
        except OSError:
            pass  # the bridge is gone: the lifeline has told the monitor to kill the process

    def on_start(ospid: int) -> None:
        listener.close()

    if request is None:
        result = run_monitored(
            None, resources=resources, on_event=on_event, keep_stdin=True, lifeline=conn.fileno(), on_start=on_start
        )
        if result is None:  # in the top process, where the monitor already closed the lifeline's fd
            conn.detach()
            return TopProcess(pid, listener, resources)
        conn.close()
        return None

    def target() -> int:
        conn.detach()  # the lifeline's fd, which the monitor closed in this child
        from ._runtime import run_spawned

        return run_spawned(SpawnRequest.decode(request), pid, listener, fabric, secret)

    run_monitored(target, resources=resources, on_event=on_event, lifeline=conn.fileno(), on_start=on_start)
    conn.close()
    return None


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError, OSError):
            pass
