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
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import sys
import traceback
from dataclasses import dataclass

from deploy_core import Pid, Resources, SpawnRequest
from deploy_monitor import Exit, Output, run_monitored

from . import _wire as wire

__all__ = ["TopProcess", "serve"]

log = logging.getLogger("deploy.fabric")


@dataclass
class TopProcess:
    """What the top process takes with it when it returns out of the zygote into main."""

    pid: Pid
    listener: socket.socket
    resources: Resources


def serve(bridge: socket.socket, fabric: tuple[str, int], secret: bytes, host: str) -> TopProcess:
    """Serve fork requests from the bridge; returns only in the top process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the bridge's to handle
    selector = selectors.DefaultSelector()
    selector.register(bridge, selectors.EVENT_READ)
    reader = wire.MessageReader()
    monitors: dict[int, Pid] = {}
    while True:
        ready = selector.select(timeout=0.5)
        _reap(bridge, monitors)
        if not ready:
            continue
        data = bridge.recv(1 << 16)
        for message in reader.feed(data):
            if message[0] != wire.FORK:
                continue
            _, ticket, request, resources = message
            top = _fork(bridge, ticket, request, Resources(**resources), fabric, secret, host, monitors)
            if top is not None:
                selector.close()
                return top
        if not data or reader.closed:
            os._exit(0)


def _reap(bridge: socket.socket, monitors: dict[int, Pid]) -> None:
    while True:
        try:
            ospid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if ospid == 0:
            return
        pid = monitors.pop(ospid, None)
        if pid is not None:
            _tell(bridge, (wire.REAPED, pid.format()))


def _tell(bridge: socket.socket, message: tuple) -> None:
    try:
        wire.send_message(bridge, message)
    except OSError:
        os._exit(0)  # the bridge is gone; so is the run


def _fork(
    bridge: socket.socket,
    ticket: int,
    request: bytes | None,
    resources: Resources,
    fabric: tuple[str, int],
    secret: bytes,
    host: str,
    monitors: dict[int, Pid],
) -> TopProcess | None:
    try:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind((host, 0))
        listener.listen(128)
        pid = Pid.new(host, listener.getsockname()[1])
    except OSError as error:
        _tell(bridge, (wire.FORKED, ticket, None, f"cannot open a port for the new process: {error}"))
        return None
    # The pid is known now; the spawner may start connecting while the fork goes on.
    _tell(bridge, (wire.FORKED, ticket, pid.format(), None))
    _flush_stdio()
    try:
        ospid = os.fork()
    except OSError as error:
        log.error("cannot fork process %s: %s", pid, error)
        listener.close()
        _tell(bridge, (wire.REAPED, pid.format()))
        return None
    if ospid:
        listener.close()
        monitors[ospid] = pid
        return None
    try:
        top = _monitor(bridge, pid, listener, request, resources, fabric, secret)
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    if top is None:
        os._exit(0)
    return top


def _monitor(
    zygote_end: socket.socket,
    pid: Pid,
    listener: socket.socket,
    request: bytes | None,
    resources: Resources,
    fabric: tuple[str, int],
    secret: bytes,
) -> TopProcess | None:
    """The monitor process of one user process; returns a TopProcess only in the top process."""
    zygote_end.close()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    # The socket exists now (its fd is the lifeline) but connects only once the user process
    # is forked, so the process starts while the monitor introduces itself to the bridge.
    conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)

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
        wire.introduce(conn, fabric, secret, (wire.HELLO_MONITOR, pid.format()))

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
