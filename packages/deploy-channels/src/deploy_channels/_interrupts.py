"""Ctrl-C in a thread waiting in `recv`: deferred until the stream is consistent again.

Facts relied on:
- CPython runs Python signal handlers only in the main thread, between bytecodes (after
  a C call returns, at a function's entry, on a backward jump). SIGINT's default handler
  raises KeyboardInterrupt there, so it can land between any two steps of a read: after
  ``recv`` returned bytes but before they are fed to the decoder, after a frame was taken
  but before it is handed over, inside the ``finally`` that releases the read lock.
- The C-level handler only sets a flag; the Python handler that runs is whichever is
  installed when the flag is checked. ``_signal.signal`` (which ``signal.signal`` wraps
  with enum conversions) swaps it in about 0.2 µs.
- A blocking call interrupted by a signal is retried after the handler returns (PEP 475),
  so a handler that only records the signal must also wake the wait itself.

While a `DeferredInterrupt` is installed, SIGINT only records itself and wakes the
waiting thread; the waiter stops at a point where nothing is half done, puts back a
message it already holds, restores the user's handler and runs it (normally raising
KeyboardInterrupt in the caller of `recv`). Other threads never run signal handlers.
"""

from __future__ import annotations

import _signal
import os
import threading
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["DeferredInterrupt", "Interrupted"]

_SIGINT = _signal.SIGINT
_main_ident = threading.main_thread().ident  # (the one thread that runs signal handlers)


def _forked() -> None:
    global _main_ident
    _main_ident = threading.get_ident()  # the thread that forked is the child's main thread


os.register_at_fork(after_in_child=_forked)


class Interrupted(Exception):
    """Raised inside the wait, at a safe point, once SIGINT arrived (never escapes recv)."""


class _Waker(Protocol):
    def wake(self) -> None: ...


class DeferredInterrupt:
    """SIGINT recorded instead of raised, for the length of one wait in the main thread."""

    __slots__ = ("_handler", "_waiter", "pending", "direct")

    def __init__(self, handler: Callable, waiter: _Waker):
        self._handler = handler
        self._waiter = waiter
        self.pending: tuple[int, Any] | None = None
        self.direct = False  # the message in hand was read off the socket, not the inbox

    @classmethod
    def install(cls, waiter: _Waker) -> DeferredInterrupt | None:
        """Defer SIGINT if it could raise here (main thread, a Python handler), else None."""
        handler = _signal.getsignal(_SIGINT)
        if threading.get_ident() != _main_ident or not callable(handler):
            return None
        deferred = cls(handler, waiter)
        _signal.signal(_SIGINT, deferred._record)
        return deferred

    def _record(self, signum: int, frame: Any) -> None:
        self.pending = (signum, frame)
        self._waiter.wake()

    def uninstall(self) -> tuple[int, Any] | None:
        """Give SIGINT back to the user's handler; the signal that arrived meanwhile, if any."""
        _signal.signal(_SIGINT, self._handler)
        pending, self.pending = self.pending, None
        return pending

    def deliver(self, pending: tuple[int, Any]) -> None:
        """Run the user's handler for a deferred signal (KeyboardInterrupt, by default)."""
        self._handler(*pending)
