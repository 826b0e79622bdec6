"""The background event loop thread every Endpoint runs.

OS facts relied on:
- epoll is used level-triggered: a socket stays reported until drained, so a handler may
  read once per wake-up and still lose nothing.
- A non-blocking socketpair wakes ``epoll_wait`` from other threads; when its buffer is
  full (``BlockingIOError``) a wake-up is already pending, so the error is ignored.
- After ``fork`` only the forking thread exists in the child. The child's epoll fd refers
  to the SAME epoll instance as the parent's, so the child must only close its copy
  (never register, modify or unregister through it).

Only the loop thread touches the poller, with one exception: a user thread reading its
connection directly (see _connection) drops and restores READ on that connection's fd,
under the connection's lock. `modify` is written for that: it touches only its fd's
entry. Other threads hand the loop work with `call_soon`.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable

__all__ = ["EventLoop", "READ", "WRITE"]

log = logging.getLogger("deploy.channels")

READ = select.EPOLLIN
WRITE = select.EPOLLOUT


class EventLoop:
    """A thread running ``epoll`` with thread-safe `call_soon` and loop-only timers."""

    def __init__(self, name: str):
        self._poller = select.epoll()
        self._handlers: dict[int, Callable[[int], None]] = {}
        self._masks: dict[int, int] = {}
        self._calls: deque = deque()
        self._timers: list = []
        self._sequence = itertools.count()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._woken = False
        self._stopping = False
        # Wake-ups of user threads are deferred to just before the loop blocks again, so a
        # woken thread finds the GIL free instead of sleeping on it a second time.
        self.deferred_wakes: list = []
        self.forked = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def is_running(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float | None) -> None:
        if self._thread.is_alive() and not self.in_loop_thread():
            self._thread.join(timeout)

    # --- any thread ---------------------------------------------------------------------

    def call_soon(self, fn: Callable, *args) -> None:
        self._calls.append((fn, args))
        # The loop clears _woken before it drains _calls, so a call appended before this
        # read is either seen by the current drain or by the one the wake-up triggers.
        if not self._woken:
            self._woken = True
            try:
                self._wake_w.send(b"\0")
            except OSError:
                pass

    def stop(self) -> None:
        self.call_soon(self._set_stopping)

    # --- loop thread only ---------------------------------------------------------------

    def call_later(self, delay: float, fn: Callable, *args) -> None:
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._sequence), fn, args))

    def register(self, fd: int, mask: int, handler: Callable[[int], None]) -> None:
        self._handlers[fd] = handler
        self._masks[fd] = mask
        self._poller.register(fd, mask)

    def modify(self, fd: int, mask: int) -> None:
        # Also called by a user thread for the fd of the connection it reads directly,
        # under that connection's mask_lock (which every change of that fd takes).
        if self._masks.get(fd, mask) != mask:
            self._masks[fd] = mask
            self._poller.modify(fd, mask)

    def mask(self, fd: int) -> int:
        return self._masks.get(fd, 0)

    def unregister(self, fd: int) -> None:
        if self._handlers.pop(fd, None) is not None:
            del self._masks[fd]
            try:
                self._poller.unregister(fd)
            except OSError:
                pass

    def _set_stopping(self) -> None:
        self._stopping = True

    def _run(self) -> None:
        wake_fd = self._wake_r.fileno()
        poll = self._poller.poll
        handlers = self._handlers
        self._poller.register(wake_fd, READ)
        try:
            while not self._stopping:
                timeout = -1.0
                if self.deferred_wakes:
                    wakes, self.deferred_wakes = self.deferred_wakes, []
                    for wake in wakes:
                        wake()
                if self._calls:
                    timeout = 0.0
                elif self._timers:
                    timeout = max(0.0, self._timers[0][0] - time.monotonic())
                try:
                    events = poll(timeout)
                except InterruptedError:
                    continue
                for fd, mask in events:
                    if fd == wake_fd:
                        # Clear the flag before draining the calls (see call_soon).
                        self._woken = False
                        try:
                            self._wake_r.recv(4096)
                        except OSError:
                            pass
                        continue
                    handler = handlers.get(fd)
                    if handler is not None:
                        try:
                            handler(mask)
                        except Exception:
                            log.exception("deploy.channels: internal error in the event loop (continuing)")
                calls = self._calls
                if calls:
                    self._woken = False
                    for _ in range(len(calls)):
                        fn, args = calls.popleft()
                        self._guard(fn, *args)
                if self._timers:
                    now = time.monotonic()
                    while self._timers and self._timers[0][0] <= now:
                        _, _, fn, args = heapq.heappop(self._timers)
                        self._guard(fn, *args)
        finally:
            self._close_fds()

    def _guard(self, fn: Callable, *args) -> None:
        # Handlers route their own failures to the affected channels; this is the last
        # line that keeps one bug from killing every channel of the process.
        try:
            fn(*args)
        except Exception:
            log.exception("deploy.channels: internal error in the event loop (continuing)")

    def _close_fds(self) -> None:
        for sock in (self._wake_r, self._wake_w):
            sock.close()
        self._poller.close()

    def close_after_fork(self) -> None:
        """In a forked child: drop this loop's fds without touching the shared epoll set."""
        self.forked = True
        self._stopping = True
        self._close_fds()
