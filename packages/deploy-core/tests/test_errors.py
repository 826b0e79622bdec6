"""The error hierarchy: who subclasses what, and errors that survive pickling."""

from __future__ import annotations

import pickle

import deploy_core
import pytest
from deploy_core import (
    AuthenticationError,
    ChannelClosed,
    ChannelExists,
    DeployError,
    FrameError,
    NoCapacity,
    PeerExited,
    PeerLost,
    Pid,
    SerializationError,
)

LEAVES = [PeerExited, PeerLost, ChannelClosed, ChannelExists, NoCapacity, AuthenticationError, FrameError]
PID = Pid("0123456789abcdef0123456789abcdef", "127.0.0.1", 9000)


@pytest.mark.parametrize("cls", [*LEAVES, SerializationError])
def test_every_error_is_a_deploy_error(cls: type[Exception]) -> None:
    assert issubclass(cls, DeployError)
    assert issubclass(DeployError, Exception)
    with pytest.raises(DeployError):
        raise cls()


def test_every_public_error_class_is_a_deploy_error() -> None:
    errors = [
        value
        for name in deploy_core.__all__
        if isinstance(value := getattr(deploy_core, name), type) and issubclass(value, BaseException)
    ]
    assert set(errors) == {DeployError, SerializationError, *LEAVES}
    assert all(issubclass(error, DeployError) for error in errors)


def test_serialization_error_is_also_a_type_error() -> None:
    assert issubclass(SerializationError, TypeError)
    with pytest.raises(TypeError):
        raise SerializationError("cannot pickle it")
    assert not issubclass(DeployError, TypeError)


def test_peer_exited_carries_peer_and_code() -> None:
    error = PeerExited(PID, 3)
    assert error.peer == PID
    assert error.code == 3
    assert str(PID) in str(error) and "3" in str(error) and "exited" in str(error)


def test_peer_exited_without_details() -> None:
    error = PeerExited()
    assert error.peer is None and error.code is None
    assert str(error) == "peer has exited"
    assert "code" not in str(PeerExited(PID))


def test_peer_exited_custom_message() -> None:
    error = PeerExited(PID, -9, "killed by SIGKILL")
    assert str(error) == "killed by SIGKILL"
    assert error.code == -9


def test_peer_exited_says_the_exit_code_or_signal_and_why() -> None:
    assert str(PeerExited(PID, 1)) == f"peer {PID} has exited with code 1"
    killed = PeerExited(PID, signal="SIGKILL", reason="memory limit 20MiB exceeded")
    assert (killed.code, killed.signal, killed.reason) == (None, "SIGKILL", "memory limit 20MiB exceeded")
    assert str(killed) == f"peer {PID} was killed by SIGKILL (memory limit 20MiB exceeded)"
    assert str(PeerExited(PID, 0, reason="interrupted")) == f"peer {PID} has exited with code 0 (interrupted)"


@pytest.mark.parametrize(
    "error",
    [
        PeerExited(PID, 3),
        PeerExited(),
        PeerExited(PID, None, "gone for good"),
        PeerExited(PID, signal="SIGTERM", reason="interrupted"),
    ],
)
def test_peer_exited_pickles(error: PeerExited) -> None:
    copied = pickle.loads(pickle.dumps(error))
    assert type(copied) is PeerExited
    assert copied.peer == error.peer
    assert copied.code == error.code
    assert (copied.signal, copied.reason) == (error.signal, error.reason)
    assert str(copied) == str(error)


def test_peer_lost_carries_peer() -> None:
    error = PeerLost(PID)
    assert error.peer == PID
    assert str(PID) in str(error) and "lost" in str(error)
    assert str(PeerLost()) == "lost the connection to peer"


def test_peer_lost_says_why() -> None:
    error = PeerLost(PID, reason="connection reset")
    assert error.reason == "connection reset"
    assert str(error) == f"lost the connection to peer {PID}: connection reset"
    assert PeerLost(PID).reason is None


@pytest.mark.parametrize(
    "error", [PeerLost(PID), PeerLost(), PeerLost(PID, "node lost"), PeerLost(PID, reason="timed out")]
)
def test_peer_lost_pickles(error: PeerLost) -> None:
    copied = pickle.loads(pickle.dumps(error))
    assert type(copied) is PeerLost
    assert copied.peer == error.peer
    assert copied.reason == error.reason
    assert str(copied) == str(error)


@pytest.mark.parametrize(
    "cls", [ChannelClosed, ChannelExists, NoCapacity, AuthenticationError, FrameError, SerializationError]
)
def test_plain_errors_pickle_with_their_message(cls: type[DeployError]) -> None:
    copied = pickle.loads(pickle.dumps(cls("one clear sentence")))
    assert type(copied) is cls
    assert str(copied) == "one clear sentence"
