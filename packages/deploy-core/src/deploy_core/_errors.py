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

    ``code`` is its exit code when known (``None`` otherwise).
    """

    def __init__(self, peer: object = None, code: int | None = None, message: str | None = None):
        self.peer = peer
        self.code = code
        if message is None:
            who = f"peer {peer}" if peer is not None else "peer"
            status = f" with code {code}" if code is not None else ""
            message = f"{who} has exited{status}"
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.peer, self.code, str(self)))


class PeerLost(DeployError):
    """The connection to a peer broke without the peer exiting cleanly."""

    def __init__(self, peer: object = None, message: str | None = None):
        self.peer = peer
        if message is None:
            who = f"peer {peer}" if peer is not None else "peer"
            message = f"lost the connection to {who}"
        super().__init__(message)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.peer, str(self)))


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
