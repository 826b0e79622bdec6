"""The spawn protocol: what a spawn request and its reply carry, with versioned encoding.

A message is ``MAGIC + VERSION + pickle(tuple of plain values)``: plain values only
(bytes, str, int, float, tuples, dicts), so decoding never runs user code. The user's
function and argument travel inside as opaque cloudpickle bytes and are only loaded by
the process that runs them.
"""

from __future__ import annotations

import io
import os
import pickle
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cloudpickle

from ._env import strip_deploy_vars
from ._errors import DeployError, SerializationError
from ._pid import Pid
from ._resources import Resources

__all__ = ["SpawnReply", "SpawnRequest", "dumps_user", "loads_plain", "loads_user"]

VERSION = 1
_REQUEST = b"DSQ"
_REPLY = b"DSR"


def dumps_user(value: Any, what: str) -> bytes:
    """Cloudpickle a user's function or value; on failure name it and say why."""
    try:
        return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as error:
        try:
            shown = repr(value)
        except Exception:  # a broken __repr__ must not hide the real error
            shown = f"<{type(value).__name__} object>"
        if len(shown) > 80:
            shown = shown[:77] + "..."
        raise SerializationError(f"cannot send the {what} {shown} to another process: {error}") from error


def loads_user(data: bytes) -> Any:
    """Unpickle a user's function or value: only in the process that runs it."""
    return pickle.loads(data)


class _PlainUnpickler(pickle.Unpickler):
    # Messages hold plain values only, which unpickle without looking up any global;
    # refusing globals keeps a crafted message from calling anything while decoding.
    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a message")


def loads_plain(data: bytes | bytearray | memoryview) -> Any:
    """Unpickle a message of plain values (bytes, str, numbers, None, tuples, lists,
    dicts, sets) without looking up any global, so decoding never calls anything.

    Raises `DeployError` for anything else or for malformed data.
    """
    try:
        return _PlainUnpickler(io.BytesIO(data)).load()
    except Exception as error:
        raise DeployError(f"malformed message: {error}") from None


def _bytes(value: object) -> bytes:
    if not isinstance(value, (bytes, bytearray)):
        raise TypeError(f"expected bytes, not {type(value).__name__}")
    return bytes(value)


def _encode(magic: bytes, fields: tuple) -> bytes:
    return magic + bytes([VERSION]) + pickle.dumps(fields, protocol=5)


def _decode(magic: bytes, data: bytes, name: str) -> tuple:
    if not isinstance(data, (bytes, bytearray, memoryview)) or bytes(data[:3]) != magic or len(data) < 4:
        raise DeployError(f"not a {name} message")
    if data[3] != VERSION:
        raise DeployError(f"{name} message version {data[3]} is not supported (this side speaks {VERSION})")
    try:
        fields = _PlainUnpickler(io.BytesIO(memoryview(data)[4:])).load()
    except Exception as error:  # whatever a crafted pickle makes the unpickler raise
        raise DeployError(f"malformed {name} message: {error}") from None
    if not isinstance(fields, tuple):
        raise DeployError(f"malformed {name} message")
    return fields


@dataclass(frozen=True)
class SpawnRequest:
    """Ask the fabric to start ``function(parent, argument)`` in a new process."""

    function: bytes
    argument: bytes
    resources: Resources
    parent: Pid | None
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    block: bool = True

    @classmethod
    def build(
        cls,
        function: Callable[..., Any],
        argument: Any,
        resources: Resources,
        parent: Pid | None,
        *,
        block: bool = True,
    ) -> SpawnRequest:
        """A request for ``function(parent, argument)`` with this process's argv and environment."""
        if not callable(function):
            raise TypeError(f"spawn needs a callable, not {type(function).__name__}")
        if not isinstance(resources, Resources):
            raise TypeError(f"resources must be a deploy.Resources, not {type(resources).__name__}")
        return cls(
            function=dumps_user(function, "function"),
            argument=dumps_user(argument, "argument"),
            resources=resources,
            parent=parent,
            argv=tuple(sys.argv),
            env=strip_deploy_vars(dict(os.environ)),
            block=block,
        )

    def encode(self) -> bytes:
        parent = self.parent.format() if self.parent is not None else None
        resources = (int(self.resources.mem), float(self.resources.cpu))
        return _encode(_REQUEST, (self.function, self.argument, resources, parent, self.argv, self.env, self.block))

    @classmethod
    def decode(cls, data: bytes) -> SpawnRequest:
        fields = _decode(_REQUEST, data, "spawn request")
        try:
            function, argument, (mem, cpu), parent, argv, env, block = fields
            return cls(
                function=_bytes(function),
                argument=_bytes(argument),
                resources=Resources(mem, cpu),
                parent=Pid.parse(parent) if parent is not None else None,
                argv=tuple(str(arg) for arg in argv),
                env={str(key): str(value) for key, value in dict(env).items()},
                block=bool(block),
            )
        except (TypeError, ValueError) as error:
            raise DeployError(f"malformed spawn request: {error}") from None


@dataclass(frozen=True)
class SpawnReply:
    """The new process's pid, or why none was started (``no_capacity`` for NoCapacity)."""

    pid: Pid | None = None
    error: str | None = None
    no_capacity: bool = False

    def encode(self) -> bytes:
        pid = self.pid.format() if self.pid is not None else None
        return _encode(_REPLY, (pid, self.error, self.no_capacity))

    @classmethod
    def decode(cls, data: bytes) -> SpawnReply:
        fields = _decode(_REPLY, data, "spawn reply")
        try:
            pid, error, no_capacity = fields
            return cls(
                pid=Pid.parse(pid) if pid is not None else None,
                error=None if error is None else str(error),
                no_capacity=bool(no_capacity),
            )
        except (TypeError, ValueError) as error:
            raise DeployError(f"malformed spawn reply: {error}") from None
