"""The error hierarchy shared by every deploy package.

Each leaf is named for who caused the failure: the peer (`PeerExited`, `PeerLost`),
the caller (`ChannelClosed`, `ChannelExists`), the cluster (`NoCapacity`), the other
end of a connection (`AuthenticationError`, `FrameError`) or the value being sent
(`SerializationError`).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuthenticationError",
    "ChannelClosed",
    "ChannelExists",
    "DeployError",
    "FrameError",
    "NoCapacity",
    "PeerExited",
    "PeerLost",
    "SerializationError",
]


class DeployError(Exception):
    """Base class of every error raised by deploy."""


class PeerExited(DeployError):
    """The process at the other end of a channel has exited.

    ``code`` is its exit code, or ``signal`` the name of the signal that killed it
    (``"SIGKILL"``), when known (``None`` otherwise); ``reason`` is what the runtime
    knows of why, such as ``"memory limit 20MiB exceeded"``. The message says all three.
    """

    def __init__(
        self,
        peer: object = None,
        code: int | None = None,
        message: str | None = None,
        *,
        signal: str | None = None,
        reason: str | None = None,
    ):
        self.peer = peer
        self.code = code
        self.signal = signal
        self.reason = reason
        if message is None:
            who = f"peer {peer}" if peer is not None else "peer"
            if signal is not None:
                message = f"{who} was killed by {signal}"
            elif code is not None:
                message = f"{who} has exited with code {code}"
            else:
                message = f"{who} has exited"
            if reason is not None:
                message += f" ({reason})"
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.peer, self.code, str(self)), {"signal": self.signal, "reason": self.reason})


class PeerLost(DeployError):
    """The connection to a peer broke without the peer exiting cleanly.

    ``reason`` says how when known: ``"connection reset"``, ``"node lost"``, ``"timed out"``.
    """

    def __init__(self, peer: object = None, message: str | None = None, *, reason: str | None = None):
        self.peer = peer
        self.reason = reason
        if message is None:
            who = f"peer {peer}" if peer is not None else "peer"
            message = f"lost the connection to {who}" + (f": {reason}" if reason is not None else "")
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.peer, str(self)), {"reason": self.reason})


class ChannelClosed(DeployError):
    """The channel was closed by this process."""


class ChannelExists(DeployError):
    """A Sender (or Receiver) to that pid already exists in this process."""


class NoCapacity(DeployError):
    """No node has the free memory and CPU that a spawn asked for."""


class AuthenticationError(DeployError):
    """The other end of a connection failed the shared-secret handshake."""


class FrameError(DeployError):
    """A connection sent bytes that are not a valid frame (malformed or oversized)."""


class SerializationError(DeployError, TypeError):
    """A function or value could not be pickled to send it to another process."""


# Tracebacks name an error by its module: users import these from deploy_core (or deploy).
for _error in (
    DeployError,
    PeerExited,
    PeerLost,
    ChannelClosed,
    ChannelExists,
    NoCapacity,
    AuthenticationError,
    FrameError,
    SerializationError,
):
    _error.__module__ = "deploy_core"
