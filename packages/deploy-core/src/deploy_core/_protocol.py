"""The spawn protocol: what a spawn request and its reply carry, with versioned encoding.

A message is ``MAGIC + VERSION + pickle(tuple of plain values)``: plain values only
(bytes, str, int, float, tuples, dicts), so decoding never runs user code. The user's
function and argument travel inside as opaque cloudpickle bytes and are only loaded by
the process that runs them.

How user values are pickled, so that a traceback in the receiving process points at the
user's code:
- Every process of a run starts from the program's ``__main__`` as it was at ``init()``
  (forked from that snapshot locally; on a cluster node, the script run up to
  ``init()``). A function or class of ``__main__`` that was already there then is found
  by module and name, so it travels by reference, like a function of an imported module.
- Anything else of ``__main__`` (lambdas, closures, what was defined after ``init()``)
  travels by value with cloudpickle, which renames every code object it ships
  ``<dynamic-code>``; here code objects travel through ``marshal`` instead and keep their
  file name and line numbers (``marshal``, like cloudpickle's own code reducer, needs the
  same Python version at both ends). The code's own source lines travel with it: where
  the file is not at that path (another machine, the bundle unpacked elsewhere), they
  are registered with ``linecache``, so the traceback still shows them.
"""

from __future__ import annotations

import io
import linecache
import marshal
import os
import pickle
import sys
import types
from collections import ChainMap
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import cloudpickle

from ._env import strip_deploy_vars
from ._errors import DeployError, SerializationError
from ._pid import Pid
from ._resources import Resources

__all__ = ["SpawnReply", "SpawnRequest", "dumps_user", "loads_plain", "loads_user", "snapshot_main"]

VERSION = 1
_REQUEST = b"DSQ"
_REPLY = b"DSR"


# The functions and classes __main__ held when snapshot_main() was called (at init()), by
# name; only those, so that nothing else the script drops later is kept alive here.
_main_at_init: dict[str, object] = {}


def snapshot_main() -> None:
    """Record ``__main__`` as every process of the run starts with it (call it at ``init()``,
    where the fork server is snapshotted): its functions and classes then travel by reference."""
    main = sys.modules.get("__main__")
    _main_at_init.clear()
    if main is not None:
        _main_at_init.update(
            (name, obj) for name, obj in vars(main).items() if isinstance(obj, (types.FunctionType, type))
        )


def _in_main_at_init(obj: object) -> bool:
    names = getattr(obj, "__qualname__", "").split(".")
    if "<locals>" in names or names == [""]:
        return False
    found = _main_at_init.get(names[0])
    for name in names[1:]:
        found = getattr(found, name, None)
    return found is obj


def _last_line(code: types.CodeType) -> int:
    last = max((line for _, _, line in code.co_lines() if line is not None), default=code.co_firstlineno)
    nested = (_last_line(const) for const in code.co_consts if isinstance(const, types.CodeType))
    return max([last, *nested])


def _code_reduce(code: types.CodeType) -> tuple[Any, ...]:
    first = code.co_firstlineno
    source = linecache.getlines(code.co_filename)[first - 1 : _last_line(code)]
    return _load_code, (marshal.dumps(code), first, source)


def _load_code(data: bytes, first: int, source: list[str]) -> types.CodeType:
    code: types.CodeType = marshal.loads(data)
    filename = code.co_filename
    if source and not os.path.exists(filename):
        entry = linecache.cache.get(filename)
        lines = list(entry[2]) if entry is not None and len(entry) == 4 else []  # 1-tuples: lazy
        lines += [""] * max(0, first - 1 + len(source) - len(lines))
        lines[first - 1 : first - 1 + len(source)] = source
        # No mtime: linecache.checkcache keeps the entry instead of looking for the file.
        linecache.cache[filename] = (sum(map(len, lines)), None, lines, filename)
    return code


class _UserPickler(cloudpickle.Pickler):  # type: ignore[misc]  # cloudpickle has no annotations
    dispatch_table = ChainMap({types.CodeType: _code_reduce}, cloudpickle.Pickler.dispatch_table)

    def reducer_override(self, obj: Any) -> Any:
        if (
            isinstance(obj, (types.FunctionType, type))
            and getattr(obj, "__module__", None) == "__main__"
            and _in_main_at_init(obj)
        ):
            return obj.__qualname__  # pickled as the global __main__.<qualname>
        return super().reducer_override(obj)


def dumps_user(value: Any, what: str) -> bytes:
    """Pickle a user's function or value for another process of the run; on failure name
    it and say why. Functions and classes of ``__main__`` that `snapshot_main` saw travel
    by reference, anything else by value with cloudpickle, code keeping its file name."""
    try:
        buffer = io.BytesIO()
        _UserPickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
        return buffer.getvalue()
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


def _encode(magic: bytes, fields: tuple[object, ...]) -> bytes:
    return magic + bytes([VERSION]) + pickle.dumps(fields, protocol=5)


def _decode(magic: bytes, data: bytes, name: str) -> tuple[Any, ...]:
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
