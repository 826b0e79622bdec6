"""How a user thread waits: for a wake-up, or a wake-up and its connection's socket at once.

The loop thread wakes the waiters a `_link.Link` keeps (``rx_watchers``/``tx_watchers``)
when its state changes; a waiter always looks again at what it waits for, so a wake-up
that comes early or twice is harmless.
"""

from __future__ import annotations

import os
import select
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["AsyncWaiter", "FdWaiter", "Waiter", "deadline_after", "remaining", "woken_or_ready"]


def deadline_after(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    return time.monotonic() + max(0.0, timeout)


def remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("timed out")
    return left


class Waiter:
    """A one-shot-per-wait wake-up for a blocked user thread (a lock used as an event)."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()

    def wake(self) -> None:
        try:
            self._lock.release()
        except RuntimeError:
            pass

    def wait(self, timeout: float | None) -> None:
        self._lock.acquire(timeout=-1 if timeout is None else timeout)


class _ThreadWaiter(threading.local):
    waiter: FdWaiter | None = None  # a default every thread sees until it sets its own


class FdWaiter:
    """A thread's wake-up that can be waited on together with a socket: an eventfd.

    One per thread (`for_this_thread`), so a blocked `recv` can poll its connection's
    socket and its wake-up at once. A wake-up left over from an earlier wait only makes
    a later wait return early; every waiter re-checks what it waits for.
    """

    __slots__ = ("_fd", "_poll", "_watched", "__weakref__")

    local = _ThreadWaiter()

    def __init__(self) -> None:
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)
        self._watched = -1
        weakref.finalize(self, os.close, self._fd)

    @classmethod
    def for_this_thread(cls) -> FdWaiter:
        waiter = cls.local.waiter
        if waiter is None:
            waiter = cls.local.waiter = cls()
        return waiter

    @classmethod
    def forget_after_fork(cls) -> None:
        # A forked child shares the parent's eventfd: the thread that forked gets a new one.
        cls.local = _ThreadWaiter()

    def wake(self) -> None:
        try:
            os.eventfd_write(self._fd, 1)
        except OSError:
            pass  # the counter is already non-zero

    def _drain(self) -> None:
        try:
            os.eventfd_read(self._fd)
        except OSError:
            pass

    def wait(self, timeout: float | None) -> None:
        self.poll(-1, timeout)

    def poll(self, fd: int, timeout: float | None) -> tuple[bool, bool]:
        """Wait until ``fd`` is readable (or hung up) or `wake` is called; returns
        (fd ready, woken). ``fd`` -1 waits for the wake-up alone."""
        if fd != self._watched:
            if self._watched >= 0:
                self._poll.unregister(self._watched)
            if fd >= 0:
                self._poll.register(fd, select.POLLIN)
            self._watched = fd
        events = self._poll.poll(None if timeout is None else timeout * 1000.0)
        ready = woken = False
        for ready_fd, _ in events:
            if ready_fd == self._fd:
                woken = True
            else:
                ready = True
        if woken:
            self._drain()
        return ready, woken


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=FdWaiter.forget_after_fork)


class AsyncWaiter:
    """The asyncio twin of `Waiter`: wakes a future on the event loop it was made on."""

    __slots__ = ("_loop", "future", "_woken")

    def __init__(self) -> None:
        # Imported here: asyncio (with ssl) adds ~7 MiB to a process, and every deploy process
        # is forked, so a program that never awaits a channel should not carry it.
        import asyncio

        self._loop = asyncio.get_running_loop()
        self.future = self._loop.create_future()
        self._woken = False

    def wake(self) -> None:
        if not self._woken:
            self._woken = True
            try:
                self._loop.call_soon_threadsafe(self._set)
            except RuntimeError:
                pass  # the asyncio loop is closed: nobody is waiting any more

    def _set(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


async def woken_or_ready(ready: Callable[[], bool], watchers: Iterable[set[Any]]) -> None:
    """asyncio: return at once if ``ready()``, else once a wake-up comes through any of the
    ``watchers`` sets (the one wait that `asend`, `arecv` and `aselect` loop over; a wake-up
    need not mean ready, so callers look again)."""
    waiter = AsyncWaiter()
    sets = list(watchers)
    for watcher_set in sets:
        watcher_set.add(waiter)
    try:
        if not ready():  # (checked after registering: a wake-up in between is not missed)
            await waiter.future
    finally:
        for watcher_set in sets:
            watcher_set.discard(waiter)
