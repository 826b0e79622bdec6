"""The monitor loop: the parent of one or many user processes, in one thread.

A `Supervisor` forks children, forwards their output as it arrives, enforces their
resources, reaps them and reports each exit; `run_monitored` is a supervisor with one child.
A fork server uses one supervisor for every process it starts, so a process costs one fork.

Facts this module relies on (fork(2), pipe(7), poll(2), waitpid(2), pidfd_open(2)):
- ``fork`` copies Python's unflushed stdio buffers: we flush them first, or the child would
  write the monitor's pending output a second time. It also copies every descriptor: a
  child closes the supervisor's (its siblings' pipes, pidfds and lifelines) at once.
- ``pidfd_open(pid)`` (Linux >= 5.3) returns an fd that polls readable once the child has
  exited. Until we ``waitpid`` it the child stays a zombie and its pid cannot be reused, so
  opening the pidfd after ``fork`` is race-free. Without pidfds we wake every `REAP_TICK`
  and ``waitpid(WNOHANG)``: a SIGCHLD handler is not ours to install (signal dispositions
  are process-wide and belong to the runtime; ``set_wakeup_fd`` works in the main thread only).
- A pipe's read end polls POLLIN while data is buffered and POLLHUP once every write end is
  closed; ``read`` returns ``b""`` (EOF) when it is drained. Every process holding a copy of
  the write end keeps it open, grandchildren included: EOF can come long after the child
  exits, or never. Whatever the child wrote before exiting is in the pipe by the time
  ``waitpid`` reports the exit, and what a killed grandchild wrote is there once it is dead.
- The rule for a child's own subprocesses: they belong to it. Once it has exited, whatever
  it left running is SIGKILLed (its cgroup's processes; with ``subreaper``, every orphan,
  which the kernel reparents to us, see `_reaper`), then its pipes are read to EOF (at most
  `DRAIN_LIMIT` seconds, from the loop) and only then is its `Exit` reported.
- A socket polls POLLRDHUP when its peer shut down or closed, POLLERR|POLLHUP when reset;
  a pipe polls POLLHUP when its other end is closed. POLLHUP and POLLERR are reported even
  when not asked for; POLLRDHUP only when asked. Not asking for POLLIN on the lifeline means
  data on it neither wakes us nor gets read.
- A descriptor number is reused as soon as it is closed. Descriptors are therefore closed
  only between two rounds of events, so an event is never taken for a newcomer's.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import select
import time
from collections.abc import Callable, Iterable

from deploy_core import Resources

from ._cgroups import CgroupPool, Enforcement
from ._child import flush_stdio, load_libc, run_child
from ._events import Exit, Output, exit_from_status
from ._limits import Limits, kill_tree, limits_for
from ._reaper import OrphanReaper, become_subreaper

__all__ = ["Child", "Supervisor"]

log = logging.getLogger("deploy.monitor")

CHUNK = 64 * 1024  # bytes read from a pipe at a time
REAP_TICK = 0.05  # seconds between two waitpid(WNOHANG) when there is no pidfd
DRAIN_LIMIT = 1.0  # seconds the pipes may stay open after the child exited and its rest was killed
LOST_REASON = "bridge lost"
_USE_PIDFD = hasattr(os, "pidfd_open")  # tests turn it off to exercise the polling fallback
_POLLRDHUP = getattr(select, "POLLRDHUP", 0)
_ALWAYS = select.POLLHUP | select.POLLERR | select.POLLNVAL


def _pipe() -> tuple[int, int]:
    """A pipe whose ends are not 0, 1 or 2 (the monitor's own stdio may be closed)."""
    ends = list(os.pipe())
    try:
        for index, fd in enumerate(ends):
            if fd <= 2:
                ends[index] = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
                os.close(fd)
    except OSError:
        for fd in ends:
            os.close(fd)
        raise
    return ends[0], ends[1]


class Child:
    """One process a `Supervisor` started: its pipes, pidfd, lifeline and limits.

    ``exit`` is set, and ``on_event`` has had the `Exit`, once it has been reaped.
    """

    def __init__(
        self,
        supervisor: Supervisor,
        pid: int,
        pipes: dict[int, int],
        on_event: Callable[[Output | Exit], None],
        limits: Limits | None,
    ):
        self.supervisor = supervisor
        self.pid = pid
        self.pipes = pipes  # our read end -> the child's fd (1 or 2)
        self.on_event = on_event
        self.limits = limits
        self.pidfd: int | None = None
        self.lifeline: int | None = None
        self.status: int | None = None
        self.status_lost = False
        self.kill_reason: str | None = None
        self.next_check: float | None = None
        self.exited = False  # its pidfd said so: reap it after this round
        self.drain_until: float | None = None  # reaped: its Exit waits for its pipes' EOF until then
        self.exit: Exit | None = None

    def __repr__(self) -> str:
        return f"<Child {self.pid} {'exited' if self.exit is not None else 'running'}>"

    @property
    def reaped(self) -> bool:
        return self.status is not None or self.status_lost

    def set_limits(self, resources: Resources | None) -> None:
        """Put a child started with ``limits_later=True`` under ``resources`` (None: none);
        call it before letting the child run anything that should be limited."""
        if self.limits is not None:
            self.limits = self.limits.update(self.pid, resources)
            self._schedule_check()

    def set_lifeline(self, fd: int) -> None:
        """Kill the child when ``fd`` hangs up (its peer closed or shut it down); never read."""
        if self.lifeline is not None:
            self.supervisor._forget(self.lifeline, close=False)
        self.lifeline = fd
        self.supervisor._listen(fd, _POLLRDHUP, self._lifeline_lost)

    def kill(self, reason: str) -> None:
        """SIGKILL the child and what it started; its exit reports ``reason``."""
        if self.kill_reason is not None or self.reaped:
            return  # a reaped pid may already belong to someone else
        self.kill_reason = reason
        if self.limits is not None:
            self.limits.kill(self.pid)
        else:
            kill_tree(self.pid)

    # --- the supervisor's loop ---------------------------------------------------------------

    def _schedule_check(self) -> None:
        interval = self.limits.interval if self.limits is not None else None
        self.next_check = time.monotonic() + interval if interval else None

    def _check(self, now: float) -> None:
        if self.next_check is None or now < self.next_check or self.reaped:
            return
        reason = self.limits.check() if self.limits is not None else None
        if reason is not None:
            self.kill(reason)
        self._schedule_check()

    def _lifeline_lost(self, events: int) -> None:
        if self.lifeline is not None:
            self.supervisor._forget(self.lifeline, close=False)
            self.lifeline = None
        log.debug("monitor: lifeline lost, killing pid %s", self.pid)
        self.kill(LOST_REASON)

    def _readable(self, fd: int) -> bool:
        """Read once from one of the child's pipes; False at EOF (the pipe is then forgotten)."""
        try:
            data = os.read(fd, CHUNK)
        except BlockingIOError:
            return True
        except OSError as exc:
            log.debug("monitor: reading the child's fd %s failed, treating it as closed: %s", self.pipes[fd], exc)
            data = b""
        if data:
            self.on_event(Output(self.pipes[fd], data))
            return True
        del self.pipes[fd]
        self.supervisor._forget(fd)
        return False

    def _reap(self) -> bool:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            log.debug("monitor: pid %s was reaped by someone else, its exit status is lost", self.pid)
            self.status_lost = True
            return True
        if pid == 0:
            return False
        self.status = status
        return True

    def _ended(self, now: float) -> None:
        """Just reaped: end what it left running, then let the loop drain its pipes."""
        for fd in (self.pidfd, self.lifeline):  # both would poll ready on every round from now
            if fd is not None:
                self.supervisor._forget(fd, close=fd != self.lifeline)
        self.pidfd = self.lifeline = None
        if self.limits is not None:
            self.limits.kill_rest()
        self.supervisor._sweep_orphans()
        self.drain_until = now + DRAIN_LIMIT

    def _finish(self) -> None:
        if self.status is None:
            exit = Exit(code=255, signal=None, reason="exit status lost: the process was reaped by someone else")
        else:
            exit = exit_from_status(self.status)
            reason = self.kill_reason if exit.signal == "SIGKILL" else None
            if reason is None and self.limits is not None:
                reason = self.limits.reason(exit)
            if reason is not None:
                exit = Exit(code=exit.code, signal=exit.signal, reason=reason)
        log.debug("monitor: pid %s ended: %s", self.pid, exit)
        self._release()  # the cgroup goes before anyone hears of the exit
        self.exit = exit
        self.on_event(exit)

    def _release(self) -> None:
        supervisor = self.supervisor
        supervisor._children.pop(self.pid, None)
        for fd in [*self.pipes, *(fd for fd in (self.pidfd, self.lifeline) if fd is not None)]:
            supervisor._forget(fd, close=fd != self.lifeline)
        self.pipes = {}
        self.pidfd = self.lifeline = None
        if self.limits is not None:
            limits, self.limits = self.limits, None
            limits.close()

    def _stop(self) -> None:
        """Kill and reap it if it still runs, and release everything, without reporting."""
        if not self.reaped:
            self.kill("monitor stopped")
            try:
                _, self.status = os.waitpid(self.pid, 0)
            except ChildProcessError:
                self.status_lost = True
        self._release()


class Supervisor:
    """The parent of many monitored processes, driven by `poll` from one thread.

    ``watch`` lets the caller's own descriptors (a fork server's request socket) share the
    loop. ``enforcement`` overrides what `detect_enforcement` found for every child.

    A child's own subprocesses belong to it: when it exits they are killed, what they wrote
    is forwarded, then its `Exit` is reported. The cgroup finds them; ``subreaper=True``
    finds them in every mode (polling included, ``setsid`` ones too): this process becomes
    a child subreaper, each child another, and any child of this process that it did not
    start here is taken for an orphan and killed. Use it only in a process whose children
    are all this supervisor's (a fork server).
    """

    def __init__(self, enforcement: Enforcement | None = None, *, subreaper: bool = False):
        self.enforcement = enforcement
        # Every child of this process not started here is an orphan of one of ours.
        self._reaper = OrphanReaper() if subreaper and become_subreaper() else None
        self._poller = select.poll()
        self._handlers: dict[int, Callable[[int], object]] = {}
        self._owned: set[int] = set()  # descriptors the supervisor closes itself
        self._closing: list[int] = []  # closed once the current round of events is over
        self._children: dict[int, Child] = {}
        self._cgroups = CgroupPool()

    @property
    def children(self) -> list[Child]:
        """The children not reaped and reported yet."""
        return list(self._children.values())

    def watch(self, fd: int, callback: Callable[[int], object], events: int = select.POLLIN) -> None:
        """Call ``callback(events)`` from `poll` when ``fd`` is ready. The supervisor never closes
        it, but a child closes it at once."""
        self._listen(fd, events, callback)

    def unwatch(self, fd: int) -> None:
        self._forget(fd, close=False)

    def start(
        self,
        target: Callable[[], int] | None,
        *,
        on_event: Callable[[Output | Exit], None],
        resources: Resources | None = None,
        limits_later: bool = False,
        keep_stdin: bool = False,
        lifeline: int | None = None,
        close: Iterable[int] = (),
    ) -> Child | None:
        """Fork a child that runs ``target`` (its return value is the exit code).

        ``resources`` are enforced from the start; with ``limits_later`` the child joins a
        cgroup of its own without limits (when the host allows one) and `Child.set_limits`
        gives it its limits later, cheaply. ``close``: more descriptors the child must not
        keep. With ``target=None`` this returns None in the child, wired up, like ``fork``.
        """
        limits = limits_for(resources, self.enforcement, later=limits_later, pool=self._cgroups)
        made: list[int] = []
        try:
            out_r, out_w = _pipe()
            made += (out_r, out_w)
            err_r, err_w = _pipe()
            made += (err_r, err_w)
            load_libc()
            flush_stdio()
            monitor_pid = os.getpid()
            pid = os.fork()
        except BaseException:  # out of descriptors or processes: nothing made for it stays
            for fd in made:
                os.close(fd)
            if limits is not None:
                limits.close()
            raise
        if pid == 0:
            lifelines = [] if lifeline is None else [lifeline]
            inherited = [out_r, err_r, *lifelines, *self._owned, *self._handlers, *self._closing, *close]
            run_child(
                target,
                stdout=out_w,
                stderr=err_w,
                close=dict.fromkeys(inherited),
                keep_stdin=keep_stdin,
                monitor_pid=monitor_pid,
                limits=limits,
                subreaper=self._reaper is not None,
            )
            # Only with target=None does run_child return: this child goes back to the caller
            # and must never touch the supervisor's descriptors (their numbers may be reused)
            # nor its children's cgroups.
            self._poller = select.poll()
            self._handlers, self._owned, self._closing, self._children = {}, set(), [], {}
            self._reaper = None
            return None
        os.close(out_w)
        os.close(err_w)
        child = Child(self, pid, {out_r: 1, err_r: 2}, on_event, limits)
        self._children[pid] = child
        for fd in (out_r, err_r):
            os.set_blocking(fd, False)
            self._listen(fd, select.POLLIN, lambda events, fd=fd: child._readable(fd), owned=True)  # type: ignore[misc]
        if _USE_PIDFD:
            try:
                child.pidfd = os.pidfd_open(pid)
                self._listen(child.pidfd, select.POLLIN, lambda events: setattr(child, "exited", True), owned=True)
            except OSError as exc:
                log.debug("monitor: no pidfd (%s), checking pid %s every %ss", exc, pid, REAP_TICK)
        if limits is not None and not limits_later:
            limits.attach(pid)
        child._schedule_check()
        if lifeline is not None:
            child.set_lifeline(lifeline)
        log.debug("monitor %s: started pid %s", monitor_pid, pid)
        return child

    def poll(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` seconds (None: until something happens) and handle what did:
        output, exits (each child reports its `Exit` after its last output), lifelines,
        limit checks and the watched descriptors."""
        now = time.monotonic()
        deadline = math.inf if timeout is None else now + timeout
        for child in self._children.values():
            if (child.pidfd is None and not child.reaped) or (self._reaper is not None and self._reaper.pending):
                deadline = min(deadline, now + REAP_TICK)
            if child.next_check is not None:
                deadline = min(deadline, child.next_check)
            if child.drain_until is not None:
                deadline = min(deadline, child.drain_until)
        wait = None if deadline == math.inf else max(0, math.ceil((deadline - now) * 1000))
        try:
            ready = self._poller.poll(wait)
            for fd, events in ready:
                handler = self._handlers.get(fd)
                if handler is not None:
                    handler(events)
            self._after_round()
        finally:
            closing, self._closing = self._closing, []
            for fd in closing:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _after_round(self) -> None:
        now = time.monotonic()
        if self._reaper is not None and self._reaper.pending:
            self._sweep_orphans()
        for child in list(self._children.values()):
            if not child.reaped:
                if (child.exited or child.pidfd is None) and child._reap():
                    child._ended(now)
                else:
                    child._check(now)
            if child.drain_until is not None and (not child.pipes or now >= child.drain_until):
                child._finish()

    def _sweep_orphans(self) -> None:
        if self._reaper is not None:
            self._reaper.sweep(self._children)

    def run_until(self, child: Child) -> Exit:
        """Run the loop until ``child`` has exited and been reported."""
        while child.exit is None:
            self.poll()
        return child.exit

    def close(self) -> None:
        """Kill and reap every child still running, close everything; no events are reported."""
        for child in list(self._children.values()):
            child._stop()
        self._sweep_orphans()
        self._cgroups.close()
        for fd in self._closing:
            try:
                os.close(fd)
            except OSError:
                pass
        self._closing = []

    # --- descriptors -------------------------------------------------------------------------

    def _listen(self, fd: int, events: int, handler: Callable[[int], object], *, owned: bool = False) -> None:
        self._poller.register(fd, events)
        self._handlers[fd] = handler
        if owned:
            self._owned.add(fd)

    def _forget(self, fd: int, *, close: bool = True) -> None:
        if self._handlers.pop(fd, None) is not None:
            self._poller.unregister(fd)
        if fd in self._owned:
            self._owned.discard(fd)
            if close:
                self._closing.append(fd)
