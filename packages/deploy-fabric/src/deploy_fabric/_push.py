"""`deploy push` and `deploy status`: the clients of the master's bridge port.

A push says its version and names its bundle by hash; the master answers whether it
needs the bytes, runs the recce, places the top process and streams the run's events
back. Here they go to a `Bridge` with the same formatter as local mode, so the output and
the exit code are exactly local mode's. Stdin is forwarded to the top process; Ctrl-C
asks the master to stop the run (a second one leaves at once, which stops it too).
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys
import threading
import time
from typing import Any

from deploy_core import DeployError, Pid, Resources
from deploy_core._protect import TamperedError  # (a ConnectionError, so not a public DeployError)

from . import _wire as wire
from ._bridge import Bridge
from ._bundle import Bundle
from ._connections import BRIDGE, PUSH, STATUS, connect_authenticated
from ._output import HumanFormatter, JsonFormatter
from ._version import __version__
from ._wire import Kind

__all__ = ["push", "status"]


def push(
    bridge: str,
    secret: bytes,
    bundle: Bundle,
    program: list[str],
    args: list[str],
    env: dict[str, str],
    cwd: str,
    fmt: str,
) -> int:
    """Run ``program`` from ``bundle`` on the cluster behind ``bridge``; the run's exit code."""
    if fmt not in ("human", "json"):
        raise DeployError(f"{fmt!r} is not a format: use 'human' or 'json'")
    sock = connect_authenticated(bridge, secret, PUSH, BRIDGE)
    lock = threading.Lock()

    def send(message: tuple) -> None:
        with lock:
            sock.sendall(wire.encode(message))

    events = Bridge(HumanFormatter() if fmt == "human" else JsonFormatter())
    decoder = wire.FrameDecoder(max_frame_size=wire.MAX_MESSAGE)
    interrupted: list[float] = []

    def interrupt() -> None:
        try:
            send((Kind.INTERRUPT,))
        except OSError:
            pass

    def on_sigint(signum: int, frame: Any) -> None:
        if interrupted:
            raise KeyboardInterrupt
        interrupted.append(time.monotonic())
        # Not from this handler: the main thread may be amid a send (a frame half written,
        # the lock of a protected socket held), so another thread waits its turn.
        threading.Thread(target=interrupt, daemon=True).start()

    previous = signal.signal(signal.SIGINT, on_sigint)
    started_stdin = False
    try:
        send((Kind.PUSH, __version__, bundle.digest, list(program), list(args), dict(env), cwd))
        while True:
            message = _next(sock, decoder, events)
            if message is None:
                raise DeployError(f"lost the connection to the fabric at {bridge}")
            kind = message[0]
            if kind == Kind.BUNDLE_WANTED:
                if message[1]:
                    send((Kind.BUNDLE, bundle.digest, bundle.data))
                if not started_stdin:
                    started_stdin = True
                    threading.Thread(target=_forward_stdin, args=(send,), daemon=True).start()
            elif kind == Kind.STARTED:
                parent = Pid.parse(message[2]) if message[2] else None
                events.spawned(Pid.parse(message[1]), parent, Resources(**message[3]))
            elif kind == Kind.OUTPUT:
                events.output(Pid.parse(message[1]), message[2], bytes(message[3]))
            elif kind == Kind.EXIT:
                events.exited(Pid.parse(message[1]), message[2], message[3], message[4])
            elif kind == Kind.FAILED:
                events.failed(int(message[1]))
            elif kind == Kind.END:
                return events.close()
            elif kind == Kind.ERROR:
                events.close()
                raise DeployError(str(message[1]))
    finally:
        signal.signal(signal.SIGINT, previous)
        sock.close()


def _next(sock: socket.socket, decoder: wire.FrameDecoder, events: Bridge) -> tuple | None:
    while True:
        frame = decoder.next_frame()
        if frame is wire.CLOSED:
            return None
        if frame is not wire.NEED_DATA:
            return wire.load(frame)
        due = events.tick()
        ready, _, _ = select.select([sock], [], [], due)
        if ready:
            try:
                data = sock.recv(1 << 18)
            except TamperedError as error:
                raise DeployError(f"dropped the protected connection with the bridge: {error}") from None
            except OSError:
                data = b""
            decoder.feed(data)


def _forward_stdin(send: Any) -> None:
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):
        return
    while True:
        try:
            data = os.read(fd, 1 << 16)
        except OSError:
            data = b""
        try:
            send((Kind.STDIN, data))
        except OSError:
            return
        if not data:
            return


def status(bridge: str, secret: bytes) -> dict:
    """The cluster's nodes, runs and running processes, as the master behind ``bridge`` sees them."""
    sock = connect_authenticated(bridge, secret, STATUS, BRIDGE)
    try:
        sock.sendall(wire.encode((Kind.STATUS, __version__)))
        sock.settimeout(10.0)
        try:
            message = wire.recv_message(sock, wire.FrameDecoder(max_frame_size=wire.MAX_MESSAGE))
        except TamperedError as error:
            raise DeployError(f"dropped the protected connection with the bridge: {error}") from None
        except (OSError, TimeoutError):
            message = None
        if message is None:
            raise DeployError(f"the fabric at {bridge} did not answer")
        if message[0] == Kind.ERROR:
            raise DeployError(str(message[1]))
        return dict(message[1])
    finally:
        sock.close()
