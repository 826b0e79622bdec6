"""The fabric's control messages: pickled tuples of plain values in deploy_channels frames.

A process's control connection to the bridge is a TCP connection that first passes
deploy_core's handshake, as the process's pid and wanting `BRIDGE`; the bridge then
checks every claim a message makes (the pid a hello announces, a spawn request's
parent) against that identity. Messages are decoded with `deploy_core.loads_plain`,
which looks up no global, so a crafted message cannot call anything: a user's function
and argument cross as opaque bytes and are only unpickled by the process that runs them.
Blocking helpers serve the simple clients (a process asking for a spawn, a monitor
streaming events); the bridge reads the same frames without blocking through
`MessageReader`.
"""

from __future__ import annotations

import pickle
import socket
from typing import Any

from deploy_channels.framing import CLOSED, NEED_DATA, FrameDecoder, encode_frame
from deploy_core import DeployError, authenticate, loads_plain

__all__ = ["FrameDecoder", "MessageReader", "connect", "encode", "load", "recv_message", "send_message"]

# Control messages are small; a spawn request carries the user's pickled function and
# argument, so leave room for big arguments.
MAX_MESSAGE = 1 << 30

#: The bridge's identity in the handshake; a process's is its pid's hex.
BRIDGE = "bridge"

# Message kinds.
HELLO_PROCESS = "process"  # (kind, pid_text): a user process's control connection
MONITOR = "monitor"  # the role of a monitor's event stream (a socketpair from the zygote)
SPAWN = "spawn"  # (kind, SpawnRequest bytes) -> reply (SPAWNED, SpawnReply bytes)
SPAWNED = "spawned"
OUTPUT = "output"  # (kind, fd, data)
EXIT = "exit"  # (kind, code, signal, reason)
FORK = "fork"  # bridge -> zygote: (kind, ticket, SpawnRequest bytes | None for the top process, resources)
FORKED = "forked"  # zygote -> bridge, one packet: (kind, ticket, pid_text | None, error | None) + the monitor's fd


def encode(message: tuple) -> bytes:
    return encode_frame(pickle.dumps(message, protocol=5))


def send_message(sock: socket.socket, message: tuple) -> None:
    sock.sendall(encode(message))


def recv_message(sock: socket.socket, decoder: FrameDecoder) -> tuple | None:
    """The next message from a blocking socket, or None at a clean end of stream."""
    while True:
        frame = decoder.next_frame()
        if frame is CLOSED:
            return None
        if frame is not NEED_DATA:
            return load(frame)
        decoder.feed(sock.recv(1 << 16))


def connect(
    addr: tuple[str, int], secret: bytes, identity: str, hello: tuple, *, timeout: float = 10.0
) -> socket.socket:
    """A blocking control connection to the fabric, authenticated as ``identity``, that has
    introduced itself."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        introduce(sock, addr, secret, identity, hello, timeout=timeout)
    except BaseException:
        sock.close()
        raise
    return sock


def introduce(
    sock: socket.socket, addr: tuple[str, int], secret: bytes, identity: str, hello: tuple, *, timeout: float = 10.0
) -> None:
    """Connect ``sock`` to the fabric, authenticate as ``identity`` and send ``hello``."""
    sock.settimeout(timeout)
    sock.connect(addr)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    authenticate(sock, secret, initiator=True, identity=identity, wanted=BRIDGE, timeout=timeout)
    sock.settimeout(None)
    send_message(sock, hello)


def load(frame: Any) -> tuple:
    """A control message from a frame; `DeployError` if it is not a tuple of plain values."""
    message = loads_plain(frame)
    if not isinstance(message, tuple) or not message or not isinstance(message[0], str):
        raise DeployError("malformed control message")
    return message


class MessageReader:
    """Decodes control messages from bytes fed by a non-blocking reader."""

    def __init__(self) -> None:
        self._decoder = FrameDecoder(max_frame_size=MAX_MESSAGE)
        self.closed = False

    def feed(self, data: bytes) -> list[tuple]:
        """Messages completed by ``data`` (``b""`` marks the end of the stream)."""
        self._decoder.feed(data)
        messages = []
        while True:
            frame = self._decoder.next_frame()
            if frame is NEED_DATA:
                return messages
            if frame is CLOSED:
                self.closed = True
                return messages
            messages.append(load(frame))
