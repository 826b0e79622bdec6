"""New buffers for received messages, allocated without being written first.

A message's bytes are read straight into the object the receiver gets (see `_wire`), so
that object must exist, empty, before its bytes arrive. ``bytearray(n)`` writes n zero
bytes first: for a 64 MiB message that is 64 MiB made resident (and cleared) before the
first byte comes, while the previous message may still be in use. These take the C API's
own way to build an object whose "contents are uninitialized" (``PyBytes_FromStringAndSize``
and ``PyByteArray_FromStringAndSize`` with NULL): a large one is fresh mmap'd memory,
resident only as the reads fill it. A new ``bytes`` may be written until it is shared,
which ``PyBytes_AsString`` documents as the one time that is allowed. Without ctypes
(another interpreter), plain ``bytearray(n)``, and bytes are copied out of one.
"""

from __future__ import annotations

from typing import Any

__all__ = ["new_bytearray", "new_bytes"]

_api: Any = None  # resolved on first use: ctypes costs an import that small messages never need


def new_bytearray(size: int) -> bytearray:
    """A bytearray of ``size`` bytes whose contents are whatever the memory held."""
    api = _api or _resolve()
    if not api:
        return bytearray(size)
    made: bytearray = api[1](None, size)
    return made


def new_bytes(size: int) -> tuple[bytes | bytearray, memoryview]:
    """A new ``bytes`` of ``size`` and a writable view of its memory, to fill before the
    object is handed to anyone (or a bytearray, where ctypes is missing)."""
    api = _api or _resolve()
    if not api:
        buffer = bytearray(size)
        return buffer, memoryview(buffer)
    new, _, address_of, char = api
    made = new(None, size)
    return made, memoryview((char * size).from_address(address_of(made))).cast("B")


def _resolve() -> Any:
    global _api
    try:
        import ctypes

        api = ctypes.pythonapi
        new_bytes_fn, new_bytearray_fn, address_of = (
            api.PyBytes_FromStringAndSize,
            api.PyByteArray_FromStringAndSize,
            api.PyBytes_AsString,
        )
    except (ImportError, AttributeError):  # not CPython
        _api = False
        return _api
    for function in (new_bytes_fn, new_bytearray_fn):
        function.restype = ctypes.py_object
        function.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
    address_of.restype = ctypes.c_void_p
    address_of.argtypes = (ctypes.py_object,)
    _api = (new_bytes_fn, new_bytearray_fn, address_of, ctypes.c_char)
    return _api
