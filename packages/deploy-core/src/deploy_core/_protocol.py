"""The spawn protocol: what a spawn request and its reply carry, with versioned encoding.

A reply is ``MAGIC + VERSION + pickle(tuple of plain values)``: plain values only (bytes,
str, int, float, tuples, dicts), so decoding never runs user code. A request is::

    b"DSQ" VERSION  header length (4 bytes, big-endian)  pickle(header)
    function  argument  buffer 1 ... buffer n

The header is a tuple of plain values (the lengths of what follows, resources, parent,
argv, environment, flags, directory, sys.path). The user's function and argument follow
it as opaque cloudpickle bytes, only loaded by the process that runs them; the argument's
pickle-5 out-of-band buffers (numpy arrays, `pickle.PickleBuffer`) follow as they are.

An argument of N bytes costs about N once on each side: it is pickled once, never pickled
again inside another pickle; `SpawnRequest.encode_parts` gives the pieces to write with one
scatter-gather call (no concatenation), and `SpawnRequest.decode` slices the received
buffer with memoryviews instead of copying. Out-of-band buffers are not copied at all
before they are written, and unpickle as views of the received buffer.

How user values are pickled, so that a traceback in the receiving process points at the
user's code:
- Every process of a run starts from the program's ``__main__`` as it was at ``init()``
  (forked from that snapshot locally; on a cluster node, the script run up to
  ``init()``). A function or class of ``__main__`` that was already there then is found
  by module and name, so it travels by reference, like a function of an imported module,
  as long as what it reads of ``__main__``'s globals is what the receiving side has too:
  every global name its code uses is bound to the same object as at ``init()``, and that
  object is not mutable data (a list, a dict, an instance...) that may have changed in
  place. Otherwise it travels by value, with those globals as they are now, as
  cloudpickle sends them.
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
import struct
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

__all__ = [
    "SpawnReply",
    "SpawnRequest",
    "dumps_message",
    "dumps_user",
    "loads_plain",
    "loads_user",
    "snapshot_main",
]

# 2: requests carry the working directory and sys.path; 3: a request is a header and raw parts.
VERSION = 3
_REQUEST = b"DSQ"
_REPLY = b"DSR"
_HEADER_LENGTH = struct.Struct(">I")
_PREFIX = len(_REQUEST) + 1 + _HEADER_LENGTH.size

Buffer = bytes | bytearray | memoryview


# The functions and classes __main__ held when snapshot_main() was called (at init()), by
# name; and every global's value then if it is immutable (a global rebound since is not
# what the receiving side has), or a marker if it is not (mutable data may have changed in
# place, so a function that reads it goes by value).
_main_at_init: dict[str, object] = {}
_globals_at_init: dict[str, object] = {}
_MISSING = object()
_MUTABLE = object()
# Values a function may read from __main__ without going by value: they cannot have changed
# in place since init(), so the same object there means the same value here.
_IMMUTABLE = (
    types.ModuleType,
    types.FunctionType,
    types.BuiltinFunctionType,
    type,
    int,
    float,
    complex,
    str,
    bytes,
    bool,
    frozenset,
    type(None),
)


def snapshot_main() -> None:
    """Record ``__main__`` as every process of the run starts with it (call it at ``init()``,
    where the fork server is snapshotted): its functions and classes then travel by reference."""
    main = sys.modules.get("__main__")
    _main_at_init.clear()
    _globals_at_init.clear()
    if main is not None:
        namespace = vars(main)
        _main_at_init.update(
            (name, obj) for name, obj in namespace.items() if isinstance(obj, (types.FunctionType, type))
        )
        _globals_at_init.update((name, obj if _immutable(obj) else _MUTABLE) for name, obj in namespace.items())


def _in_main_at_init(obj: object) -> bool:
    names = getattr(obj, "__qualname__", "").split(".")
    if "<locals>" in names or names == [""]:
        return False
    found = _main_at_init.get(names[0])
    for name in names[1:]:
        found = getattr(found, name, None)
    return found is obj and _reads_main_as_at_init(obj)


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _reads_main_as_at_init(obj: object) -> bool:
    """Whether every global of ``__main__`` that ``obj``'s code (a function's, or a class's
    methods') names is the object it was at init() and cannot have changed in place."""
    if isinstance(obj, type):
        codes = [member.__code__ for member in vars(obj).values() if isinstance(member, types.FunctionType)]
    else:
        codes = [obj.__code__] if isinstance(obj, types.FunctionType) else []
    main = sys.modules.get("__main__")
    namespace = vars(main) if main is not None else {}
    for code in codes:
        for name in _global_names(code):
            value = namespace.get(name, _MISSING)
            if value is _MISSING:
                if name in _globals_at_init:  # deleted since init(): the other side still has it
                    return False
                continue  # a builtin, an attribute's name, or not a global at all
            if _globals_at_init.get(name, _MISSING) is not value:
                return False
    return True


def _immutable(value: object) -> bool:
    if isinstance(value, tuple):
        return all(_immutable(item) for item in value)
    return isinstance(value, _IMMUTABLE)


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


def _out_of_band(buffers: list[memoryview]) -> Callable[[pickle.PickleBuffer], bool]:
    def keep(buffer: pickle.PickleBuffer) -> bool:
        try:
            buffers.append(buffer.raw())
        except BufferError:  # not contiguous: pickle copies it in band
            return True
        return False

    return keep


def dumps_user(value: Any, what: str, buffers: list[memoryview] | None = None) -> bytes:
    """Pickle a user's function or value for another process of the run; on failure name
    it and say why. Functions and classes of ``__main__`` that `snapshot_main` saw travel
    by reference, anything else by value with cloudpickle, code keeping its file name.

    With ``buffers``, pickle-5 out-of-band buffers are appended there instead of copied in.
    """
    try:
        out = io.BytesIO()
        if buffers is None:
            _UserPickler(out, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
        else:
            _UserPickler(out, protocol=5, buffer_callback=_out_of_band(buffers)).dump(value)
        return out.getvalue()
    except Exception as error:
        raise SerializationError(f"cannot send the {what} {_shown(value)} to another process: {error}") from error


def dumps_message(value: Any, buffers: list[memoryview] | None = None) -> bytes:
    """Pickle a channel message: with the standard pickler where it can (plain values,
    importable classes and functions: the fast way), else as `dumps_user` does (lambdas,
    closures, what ``__main__`` defined). With ``buffers``, as `dumps_user`."""
    try:
        if buffers is None:
            return pickle.dumps(value, protocol=5)
        return pickle.dumps(value, protocol=5, buffer_callback=_out_of_band(buffers))
    except Exception:
        if buffers is not None:
            buffers.clear()
    return dumps_user(value, "message", buffers)


def _shown(value: Any) -> str:
    try:
        shown = repr(value)
    except Exception:  # a broken __repr__ must not hide the real error
        shown = f"<{type(value).__name__} object>"
    return shown if len(shown) <= 80 else shown[:77] + "..."


def loads_user(data: Buffer, buffers: tuple[Buffer, ...] = ()) -> Any:
    """Unpickle a user's function or value (with its out-of-band ``buffers``): only in the
    process that runs it."""
    return pickle.loads(data, buffers=buffers)


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


def _length(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TypeError(f"expected a length, not {value!r}")
    return value


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected str, not {type(value).__name__}")
    return value


def _cwd() -> str:
    try:
        return os.getcwd()
    except OSError:  # removed since we entered it
        return ""


def _encode(magic: bytes, fields: tuple[object, ...]) -> bytes:
    return magic + bytes([VERSION]) + pickle.dumps(fields, protocol=5)


def _decode(magic: bytes, data: bytes, name: str) -> tuple[Any, ...]:
    if not isinstance(data, (bytes, bytearray, memoryview)) or bytes(data[:3]) != magic or len(data) < 4:
        raise DeployError(f"not a {name} message")
    if data[3] != VERSION:
        raise DeployError(f"{name} message version {data[3]} is not supported (this side speaks {VERSION})")
    return _decode_plain(memoryview(data)[4:], name)


def _decode_plain(data: memoryview, name: str) -> tuple[Any, ...]:
    try:
        fields = _PlainUnpickler(io.BytesIO(data)).load()
    except Exception as error:  # whatever a crafted pickle makes the unpickler raise
        raise DeployError(f"malformed {name} message: {error}") from None
    if not isinstance(fields, tuple):
        raise DeployError(f"malformed {name} message")
    return fields


@dataclass(frozen=True)
class SpawnRequest:
    """Ask the fabric to start ``function(parent, argument)`` in a new process."""

    function: Buffer
    argument: Buffer
    resources: Resources
    parent: Pid | None
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    block: bool = True
    cwd: str = ""  # "" when the spawner's working directory no longer exists
    path: tuple[str, ...] = ()  # sys.path
    buffers: tuple[Buffer, ...] = ()  # the argument's out-of-band pickle buffers

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
        """A request for ``function(parent, argument)`` with this process's argv, environment,
        working directory and ``sys.path`` as they are now."""
        if not callable(function):
            raise TypeError(f"spawn needs a callable, not {type(function).__name__}")
        if not isinstance(resources, Resources):
            raise TypeError(f"resources must be a deploy.Resources, not {type(resources).__name__}")
        buffers: list[memoryview] = []
        return cls(
            function=dumps_user(function, "function"),
            argument=dumps_user(argument, "argument", buffers),
            resources=resources,
            parent=parent,
            argv=tuple(sys.argv),
            env=strip_deploy_vars(dict(os.environ)),
            block=block,
            cwd=_cwd(),
            path=tuple(str(entry) for entry in sys.path),
            buffers=tuple(buffers),
        )

    def function_and_argument(self, *, release: bool = False) -> tuple[Callable[..., Any], Any]:
        """Unpickle the function and the argument (user code runs: only where it is to run).

        ``release``: then let go of their pickles, so that the buffer they were received in
        can be freed before the function runs (out-of-band buffers stay: the argument is
        made of them). The request's ``function`` and ``argument`` are empty afterwards.
        """
        loaded = loads_user(self.function), loads_user(self.argument, self.buffers)
        if release:
            for name in ("function", "argument"):
                part = getattr(self, name)
                if isinstance(part, memoryview):
                    part.release()  # (a copy of this request, dataclasses.replace's, shares it)
                # Frozen for everyone else; the owner of a received request may drop its pickles.
                object.__setattr__(self, name, b"")
        return loaded

    @staticmethod
    def recognise(data: Buffer) -> bool:
        """Whether ``data`` starts as an encoded request does (a pickle never does)."""
        return bytes(memoryview(data)[: len(_REQUEST)]) == _REQUEST

    def encode_parts(self) -> list[Buffer]:
        """The encoded request as pieces to write in order, the big ones not copied."""
        parent = self.parent.format() if self.parent is not None else None
        resources = (int(self.resources.mem), float(self.resources.cpu))
        sizes = tuple(memoryview(part).nbytes for part in (self.function, self.argument, *self.buffers))
        header = pickle.dumps(
            (sizes, resources, parent, self.argv, self.env, self.block, self.cwd, self.path), protocol=5
        )
        prefix = _REQUEST + bytes([VERSION]) + _HEADER_LENGTH.pack(len(header)) + header
        return [prefix, self.function, self.argument, *self.buffers]

    def encode(self) -> bytes:
        """The encoded request as one bytes object (a copy; see `encode_parts`)."""
        return b"".join(self.encode_parts())

    @classmethod
    def decode(cls, data: Buffer) -> SpawnRequest:
        """Decode a request without copying its parts: they are views of ``data``."""
        view = memoryview(data).cast("B") if isinstance(data, memoryview) else memoryview(data)
        if len(view) < _PREFIX or bytes(view[:3]) != _REQUEST:
            raise DeployError("not a spawn request message")
        if view[3] != VERSION:
            raise DeployError(f"spawn request message version {view[3]} is not supported (this side speaks {VERSION})")
        (header_length,) = _HEADER_LENGTH.unpack_from(view, 4)
        fields = _decode_plain(view[_PREFIX : _PREFIX + header_length], "spawn request")
        try:
            sizes, (mem, cpu), parent, argv, env, block, cwd, path = fields
            sizes = [_length(size) for size in sizes]
            if len(sizes) < 2:
                raise ValueError("a request has a function and an argument")
            offset = _PREFIX + header_length
            parts = []
            for size in sizes:
                parts.append(view[offset : offset + size])
                offset += size
            if offset != len(view):
                raise ValueError(f"{len(view)} bytes where the header announces {offset}")
            return cls(
                function=parts[0],
                argument=parts[1],
                buffers=tuple(parts[2:]),
                resources=Resources(mem, cpu),
                parent=Pid.parse(parent) if parent is not None else None,
                argv=tuple(str(arg) for arg in argv),
                env={str(key): str(value) for key, value in dict(env).items()},
                block=bool(block),
                cwd=_str(cwd),
                path=tuple(_str(entry) for entry in path),
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
