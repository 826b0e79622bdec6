"""The control protocol: the messages between a run's processes, its nodes and its master.

A message is a tuple ``(Kind, field, ...)`` of plain values (str, bytes, int, float, None,
tuples, lists, dicts), pickled with protocol 5 into one deploy_channels frame. Decoding
refuses every global, so a control message can never make its reader call anything; the
kind travels as its string value and comes back as a `Kind`.

A spawn request is the exception: it travels as the encoded `SpawnRequest` itself, one
frame whose payload starts with the request's magic (which no pickle starts with), so the
user's pickled function and argument are never pickled a second time; `send_parts` writes
it with one scatter-gather call, without joining its parts.

Every control connection over TCP (a process asking its master for spawns) first passes
deploy_core's handshake, as the process's pid's hex wanting `BRIDGE`, so by the time a
message is decoded its sender has proven it knows the run's secret, and the master
checks every claim a message makes against that identity. Decoding is
`deploy_core.loads_plain` (the one restricted unpickler): a user's function and argument
cross as opaque bytes and are only unpickled by the process that runs them. Blocking
helpers serve the simple clients; loops read the same frames without blocking through
`MessageReader`.
"""

from __future__ import annotations

import enum
import ipaddress
import pickle
import socket
import time
from typing import Any

from deploy_channels.framing import CLOSED, NEED_DATA, FrameDecoder, encode_frame, frame_header
from deploy_core import DeployError, Handshake, ProtectedSocket, SpawnRequest, loads_plain

__all__ = [
    "FrameDecoder",
    "Kind",
    "MessageReader",
    "connect",
    "encode",
    "load",
    "recv_message",
    "send_message",
    "send_parts",
]

# Control messages are small; a spawn request carries the user's pickled function and
# argument, so leave room for big arguments.
MAX_MESSAGE = 1 << 30

#: The bridge's identity in the handshake; a process's is its pid's hex.
BRIDGE = "bridge"
#: Which control connections carry protected records after the handshake (as
#: `deploy_channels.Endpoint`'s ``protect``): none, those with a non-loopback peer, all.
PROTECT_CHOICES = ("off", "remote", "all")


def protects(setting: str, host: str) -> bool:
    """Whether a connection with a peer at ``host`` is protected under ``setting``.

    Both ends must decide alike, so each passes the address its connected socket reports
    for the other (``getpeername``), never a name it dialed: a name of this machine, or
    0.0.0.0, reaches loopback, and the acceptor sees 127.0.0.1. An IPv4-mapped address
    (a dual-stack listener's view) counts as the IPv4 address it maps."""
    if setting not in PROTECT_CHOICES:
        raise ValueError(f"protect must be one of {', '.join(PROTECT_CHOICES)}, not {setting!r}")
    if setting == "off":
        return False
    if setting == "all":
        return True
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host != "localhost"
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not address.is_loopback


class Kind(str, enum.Enum):
    """What a control message is; its fields follow it in the tuple."""

    HELLO_PROCESS = "process"  # process -> master: (kind, pid_text), first on its connection;
    # master -> process: the same back once it has authenticated and read it (set-up done)
    SPAWN = "spawn"  # process -> master: (kind, SpawnRequest bytes), sent as the raw request
    SPAWNED = "spawned"  # master -> process: (kind, SpawnReply bytes)
    PEER_EXIT = "peer-exit"  # process -> master: (kind, pid hex): how did it end?
    # master -> process, once that process has exited: (kind, code, signal, reason); all
    # None at once for a pid that is not one of the run's
    PEER_EXITED = "peer-exited"
    OUTPUT = "output"  # monitor -> node: (kind, fd, data)
    EXIT = "exit"  # monitor -> node: (kind, code, signal, reason)
    FORK = "fork"  # node -> zygote: (kind, ticket, SpawnRequest bytes | None for the top process, resources)
    # zygote -> node, one packet with the monitor's fd: (kind, ticket, pid_text | None, error, os pid | None)
    FORKED = "forked"

    # Cluster mode. Between the master and a node (fields after the kind; `run` is the run's id):
    NODE_HELLO = "node-hello"  # node -> master: (name, capacity dict, version)
    RUN = "run"  # master -> node: (run, secret hex, digest, program, args, env, cwd, top, master addr)
    NEED_BUNDLE = "need-bundle"  # node -> master: (digest,)
    BUNDLE = "bundle"  # master -> node, push -> master: (digest, data)
    STOP = "stop"  # master -> node: (run,)
    STDIN = "stdin"  # push -> master: (data,); master -> node: (run, data); b"" is the end
    PING = "ping"  # master -> node: (sent, measure: bool) — a heartbeat, or a status request
    PONG = "pong"  # node -> master: (sent, {pid hex: memory bytes} if measured else None)
    RUN_FAILED = "run-failed"  # node -> master: (run, why): its zygote is gone
    # FORK/FORKED/OUTPUT/EXIT between master and node carry (run, ...) before their fields.

    # Between `deploy push`/`deploy status` and the master's bridge port:
    PUSH = "push"  # (version, digest, program, args, env, cwd)
    BUNDLE_WANTED = "bundle-wanted"  # master -> push: (wanted: bool)
    STARTED = "started"  # master -> push: (pid, parent | None, resources dict)
    FAILED = "failed"  # master -> push: (code,)
    END = "end"  # master -> push: (code,)
    ERROR = "error"  # master -> push/status: (sentence,)
    INTERRUPT = "interrupt"  # push -> master: ()
    STATUS = "status"  # status -> master: (version,); master -> status: (report dict,)


def dumps(message: tuple) -> bytes:
    """The pickled message (unframed), its kind as a plain string."""
    return pickle.dumps((message[0].value, *message[1:]), protocol=5)


def encode(message: tuple) -> bytes:
    return encode_frame(dumps(message))


def send_message(sock: socket.socket, message: tuple) -> None:
    sock.sendall(encode(message))


def send_parts(sock: socket.socket, parts: list) -> None:
    """Send one frame made of ``parts`` (buffers) with scatter-gather writes, copying none."""
    views = [memoryview(part).cast("B") for part in parts]
    views = [memoryview(frame_header(sum(view.nbytes for view in views))), *(v for v in views if v.nbytes)]
    while views:
        sent = sock.sendmsg(views[:512])  # (IOV_MAX is at least 1024 on Linux)
        while views and sent >= views[0].nbytes:
            sent -= views.pop(0).nbytes
        if sent:
            views[0] = views[0][sent:]


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
    addr: tuple[str, int],
    secret: bytes,
    identity: str,
    hello: tuple,
    *,
    timeout: float = 10.0,
    protect: str = "off",
) -> socket.socket:
    """A blocking control connection to the fabric, authenticated as ``identity``, that has
    introduced itself; a `ProtectedSocket` when ``protect`` says so for ``addr``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        return introduce(sock, addr, secret, identity, hello, timeout=timeout, protect=protect)
    except BaseException:
        sock.close()
        raise


def introduce(
    sock: socket.socket,
    addr: tuple[str, int],
    secret: bytes,
    identity: str,
    hello: tuple,
    *,
    timeout: float = 10.0,
    protect: str = "off",
) -> socket.socket:
    """Connect ``sock`` to the fabric, authenticate as ``identity`` and send ``hello``;
    returns the socket to use from then on (``sock``, or a `ProtectedSocket` around it)."""
    sock.settimeout(timeout)
    sock.connect(addr)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    handshake = _authenticate(sock, secret, identity, timeout)
    sock.settimeout(None)
    channel: socket.socket = sock
    if protects(protect, sock.getpeername()[0]):
        channel = ProtectedSocket(sock, handshake.key, initiator=True, peer=BRIDGE)  # type: ignore[assignment]
    send_message(channel, hello)
    return channel


def _authenticate(sock: socket.socket, secret: bytes, identity: str, timeout: float) -> Handshake:
    # deploy_core.authenticate, except that a connection that ends or times out during
    # the handshake raises the OSError it is (ConnectionResetError, TimeoutError): that
    # proves nothing about either side (the fabric port may have evicted it, over its cap
    # of connections authenticating), so the caller may retry it. AuthenticationError is
    # kept for an answer that fails the check, which a retry cannot mend.
    handshake = Handshake(secret, initiator=True, identity=identity, wanted=BRIDGE)
    deadline = time.monotonic() + timeout
    while True:
        out = handshake.data_to_send()
        if out:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.sendall(out)
        if handshake.done:
            return handshake
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        data = sock.recv(handshake.bytes_needed())
        if not data:
            raise ConnectionResetError("the fabric closed the connection during the handshake")
        handshake.receive_data(data)


def load(frame: Any) -> tuple:
    """Decode one message; DeployError for anything but a tuple of plain values led by a kind
    (or a raw spawn request, which is ``(Kind.SPAWN, frame)``)."""
    if SpawnRequest.recognise(frame):
        return (Kind.SPAWN, frame)
    message = loads_plain(frame)  # DeployError if it is not plain values
    if not isinstance(message, tuple) or not message or not isinstance(message[0], str):
        raise DeployError("malformed control message")
    try:
        return (Kind(message[0]), *message[1:])
    except ValueError:
        raise DeployError(f"unknown control message kind {message[0]!r}") from None


class MessageReader:
    """Decodes control messages from bytes fed by a non-blocking reader."""

    def __init__(self) -> None:
        self._decoder = FrameDecoder(max_frame_size=MAX_MESSAGE)
        self.closed = False

    def feed(self, data: bytes) -> list[tuple]:
        """Messages completed by ``data`` (``b""`` marks the end of the stream)."""
        self._decoder.feed(data)
        messages: list[tuple[Any, ...]] = []
        while True:
            frame = self._decoder.next_frame()
            if frame is NEED_DATA:
                return messages
            if frame is CLOSED:
                self.closed = True
                return messages
            messages.append(load(frame))
