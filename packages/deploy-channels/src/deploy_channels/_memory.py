"""New buffers for received messages, allocated without being written first.

A message's bytes are read straight into the object the receiver gets (see `_wire`), so
that object must exist, empty, before its bytes arrive. ``bytearray(n)`` writes n zero
bytes first: for a 64 MiB message that is 64 MiB made resident (and cleared) before the
first byte comes, while the previous message may still be in use. These take the C API's
own way to build an object whose "contents are uninitialized" (``PyBytes_FromStringAndSize``
and ``PyByteArray_FromStringAndSize`` with NULL): a large one, unless it reuses memory
freed before, becomes resident only as the reads fill it. A new ``bytes`` may be written
until it is shared, which ``PyBytes_AsString`` documents as the one time that is
allowed. Without ctypes (another interpreter), plain ``bytearray(n)``, and bytes are
copied out of one.

Received messages are allocated by the loop thread and freed by the user's, usually a
few behind: the loop reads ahead while the user digests. glibc returns the top of an
arena to the kernel once more than its trim threshold lies free there, and that
threshold starts at twice the largest mmap'd block the process has freed so far
(mallopt(3), "dynamic mmap threshold"; for 1 MiB messages, 2 MiB). So three 1 MiB
messages read ahead and then freed are given back, and the next ones fault every page in
again: on a small VM, 60 to 90 faults a message and half the throughput. `_settle` tells
malloc what it would learn by itself once the program freed a bigger block: the first
message of each larger size frees one mmap'd block of eight times its size (at most
glibc's 32 MiB ceiling). That raises the mmap threshold to the block's size (smaller
messages come from the heap, not from an mmap of their own each) and the trim threshold
to twice it: up to 16 messages' worth of freed memory stays in each arena to be reused,
the most a process now keeps that it would otherwise give back. Nothing is done with
another C library.
"""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["new_bytearray", "new_bytes"]

_api: Any = None  # resolved on first use: ctypes costs an import that small messages never need

# glibc's default mmap threshold: smaller blocks come from the heap anyway.
_SETTLE_MIN = 128 * 1024
# glibc's ceiling for the dynamic mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX).
_SETTLE_MAX = 32 * 1024 * 1024
_settled = 0  # the largest block `_settle` has freed (never: 0; not glibc: -1)
_settle_lock = threading.Lock()


def new_bytearray(size: int) -> bytearray:
    """A bytearray of ``size`` bytes whose contents are whatever the memory held."""
    if size >= _SETTLE_MIN:
        _settle(size)
    api = _api or _resolve()
    if not api:
        return bytearray(size)
    made: bytearray = api[1](None, size)
    return made


def new_bytes(size: int) -> tuple[bytes | bytearray, memoryview]:
    """A new ``bytes`` of ``size`` and a writable view of its memory, to fill before the
    object is handed to anyone (or a bytearray, where ctypes is missing)."""
    if size >= _SETTLE_MIN:
        _settle(size)
    api = _api or _resolve()
    if not api:
        buffer = bytearray(size)
        return buffer, memoryview(buffer)
    new, _, address_of, char = api
    made = new(None, size)
    return made, memoryview((char * size).from_address(address_of(made))).cast("B")


def _settle(size: int) -> None:
    """Raise glibc's mmap and trim thresholds for messages of ``size`` (see above)."""
    global _settled
    block = min(8 * size, _SETTLE_MAX)
    if block <= _settled or _settled < 0:
        return  # (the common case, without the lock)
    with _settle_lock:
        if block <= _settled or _settled < 0:
            return
        try:
            import ctypes

            libc = ctypes.CDLL(None)
            libc.gnu_get_libc_version  # noqa: B018 (glibc only: the thresholds are its)
            malloc, free = libc.malloc, libc.free
        except (ImportError, OSError, AttributeError):
            _settled = -1
            return
        malloc.restype = ctypes.c_void_p
        malloc.argtypes = (ctypes.c_size_t,)
        free.restype = None
        free.argtypes = (ctypes.c_void_p,)
        # (Over the mmap threshold unless that is higher already: mmap'd, freed untouched.)
        free(malloc(block))
        _settled = block


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
