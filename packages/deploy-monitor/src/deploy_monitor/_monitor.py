"""The monitor: parent of one user process, forwarding its output and reporting its exit.

Facts this module relies on (fork(2), pipe(7), poll(2), waitpid(2), pidfd_open(2)):
- ``fork`` copies Python's unflushed stdio buffers: we flush them first, or the child would
  write the monitor's pending output a second time.
- ``pidfd_open(pid)`` (Linux >= 5.3) returns an fd that polls readable once the child has
  exited. Until we ``waitpid`` it the child stays a zombie and its pid cannot be reused, so
  opening the pidfd after ``fork`` is race-free. Without pidfds we wake every `REAP_TICK`
  and ``waitpid(WNOHANG)``: a SIGCHLD handler is not ours to install (signal dispositions
  are process-wide and belong to the runtime; ``set_wakeup_fd`` works in the main thread only).
- A pipe's read end polls POLLIN while data is buffered and POLLHUP once every write end is
  closed; ``read`` returns ``b""`` (EOF) when it is drained. Every process holding a copy of
  the write end keeps it open, grandchildren included: EOF can come long after the child
  exits, or never. Whatever the child wrote before exiting is in the pipe by the time
  ``waitpid`` reports the exit, so after reaping we read only what is already there.
- A socket polls POLLRDHUP when its peer shut down or closed, POLLERR|POLLHUP when reset;
  a pipe polls POLLHUP when its other end is closed. POLLHUP and POLLERR are reported even
  when not asked for; POLLRDHUP only when asked. Not asking for POLLIN on the lifeline means
  data on it neither wakes us nor gets read.
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import select
import time
from collections.abc import Callable

from deploy_core import Resources

from ._cgroups import Enforcement
from ._child import flush_stdio, load_libc, run_child
from ._events import Exit, Output, exit_from_status
from ._limits import Limits, kill_tree, limits_for

__all__ = ["run_monitored"]

log = logging.getLogger("deploy.monitor")

CHUNK = 64 * 1024  # bytes read from a pipe at a time
REAP_TICK = 0.05  # seconds between two waitpid(WNOHANG) when there is no pidfd
DRAIN_LIMIT = 1.0  # seconds spent reading what is left in the pipes after the child exited
LOST_REASON = "bridge lost"
_USE_PIDFD = hasattr(os, "pidfd_open")  # tests turn it off to exercise the polling fallback
_POLLRDHUP = getattr(select, "POLLRDHUP", 0)


def _pipe() -> tuple[int, int]:
    """A pipe whose ends are not 0, 1 or 2 (the monitor's own stdio may be closed)."""
    ends = []
    for fd in os.pipe():
        if fd <= 2:
            high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
            os.close(fd)
            fd = high
        ends.append(fd)
    return ends[0], ends[1]


class _Monitor:
    def __init__(self, on_event: Callable[[Output | Exit], None], lifeline: int | None, limits: Limits | None):
        self.on_event = on_event
        self.lifeline = lifeline
        self.limits = limits
        self.pid: int | None = None
        self.pidfd: int | None = None
        self.status: int | None = None
        self.status_lost = False
        self.pipes: dict[int, int] = {}  # our read end -> the child's fd (1 or 2)
        self.kill_reason: str | None = None
        self.poller = select.poll()

    def start(
        self,
        target: Callable[[], int] | None,
        keep_stdin: bool,
        on_start: Callable[[int], None] | None,
        deferred: Callable[[], Limits | None] | None = None,
    ) -> bool:
        """Fork the child; False in the child itself (only when ``target`` is None)."""
        out_r, out_w = _pipe()
        err_r, err_w = _pipe()
        self.pipes = {out_r: 1, err_r: 2}
        load_libc()
        flush_stdio()
        monitor_pid = os.getpid()
        try:
            pid = os.fork()
        except BaseException:
            for fd in (out_w, err_w):
                os.close(fd)
            raise
        if pid == 0:
            close = [out_r, err_r] + ([self.lifeline] if self.lifeline is not None else [])
            run_child(
                target,
                stdout=out_w,
                stderr=err_w,
                close=close,
                keep_stdin=keep_stdin,
                monitor_pid=monitor_pid,
                limits=self.limits,
            )
            # Only with target=None does run_child return: this child goes back to the caller
            # and must never close the monitor's fds (their numbers may be reused) nor its cgroup.
            self.pipes, self.limits, self.lifeline = {}, None, None
            return False
        self.pid = pid
        os.close(out_w)
        os.close(err_w)
        if _USE_PIDFD:
            try:
                self.pidfd = os.pidfd_open(pid)
            except OSError as exc:
                log.debug("monitor: no pidfd (%s), checking pid %s every %ss", exc, pid, REAP_TICK)
        if deferred is not None:
            self.limits = deferred()  # the child is running already: it is moved under its limits
        if self.limits is not None:
            self.limits.attach(pid)
        log.debug("monitor %s: started pid %s", monitor_pid, pid)
        if on_start is not None:
            on_start(pid)
        return True

    def run(self) -> Exit:
        for fd in self.pipes:
            self.poller.register(fd, select.POLLIN)
        if self.lifeline is not None:
            self.poller.register(self.lifeline, _POLLRDHUP)
        if self.pidfd is not None:
            self.poller.register(self.pidfd, select.POLLIN)
        interval = self.limits.interval if self.limits is not None else None
        next_check = time.monotonic() + interval if interval else None
        drain_until = math.inf
        while True:
            now = time.monotonic()
            if self.status is not None or self.status_lost:
                timeout: float | None = 0.0  # only what is already in the pipes
            else:
                timeout = None if self.pidfd is not None else REAP_TICK
                if next_check is not None:
                    timeout = max(0.0, min(timeout if timeout is not None else math.inf, next_check - now))
            events = self.poller.poll(None if timeout is None else math.ceil(timeout * 1000))
            read_any = False
            for fd, _ in events:
                if fd in self.pipes:
                    self._read(fd)
                    read_any = True
                elif fd == self.lifeline:
                    self.poller.unregister(fd)
                    self.lifeline = None
                    log.debug("monitor: lifeline lost, killing pid %s", self.pid)
                    self._kill(LOST_REASON)
            if self.status is None and not self.status_lost:
                if self._reap():
                    drain_until = time.monotonic() + DRAIN_LIMIT
                    if self.pidfd is not None:
                        self.poller.unregister(self.pidfd)
                    continue
                if next_check is not None and time.monotonic() >= next_check:
                    reason = self.limits.check() if self.limits is not None else None
                    if reason is not None:
                        self._kill(reason)
                    next_check = time.monotonic() + (interval or 0)
            elif not self.pipes or not read_any or time.monotonic() >= drain_until:
                break
        return self._finish()

    def _read(self, fd: int) -> None:
        try:
            data = os.read(fd, CHUNK)
        except OSError as exc:
            log.debug("monitor: reading the child's fd %s failed, treating it as closed: %s", self.pipes[fd], exc)
            data = b""
        if data:
            self.on_event(Output(self.pipes[fd], data))
            return
        self.poller.unregister(fd)
        os.close(fd)
        del self.pipes[fd]

    def _reap(self) -> bool:
        assert self.pid is not None
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

    def _kill(self, reason: str) -> None:
        if self.kill_reason is not None or self.pid is None or self.status is not None or self.status_lost:
            return  # a reaped pid may already belong to someone else
        self.kill_reason = reason
        if self.limits is not None:
            self.limits.kill(self.pid)
        else:
            kill_tree(self.pid)

    def _finish(self) -> Exit:
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
        self.close()  # release the cgroup before anyone hears of the exit
        self.on_event(exit)
        return exit

    def close(self) -> None:
        """Leave nothing behind: kill and reap the child if it still runs, close fds, drop limits."""
        if self.pid is not None and self.status is None and not self.status_lost:
            self._kill("monitor stopped")
            try:
                _, self.status = os.waitpid(self.pid, 0)
            except ChildProcessError:
                self.status_lost = True
        for fd in [*self.pipes, *([self.pidfd] if self.pidfd is not None else [])]:
            try:
                os.close(fd)
            except OSError:
                pass
        self.pipes = {}
        self.pidfd = None
        if self.limits is not None:
            limits, self.limits = self.limits, None
            limits.close()


def run_monitored(
    target: Callable[[], int] | None,
    *,
    resources: Resources | None | Callable[[], Resources | None],
    on_event: Callable[[Output | Exit], None],
    keep_stdin: bool = False,
    lifeline: int | None = None,
    on_start: Callable[[int], None] | None = None,
    enforcement: Enforcement | None = None,
) -> Exit | None:
    """Fork a child that runs ``target``, forward its output, reap it and return how it ended.

    Call it in the process that is to be the monitor; it returns once the child has exited
    and been reaped. ``target`` runs in the child and returns its exit code (``sys.exit`` and
    uncaught exceptions are handled as Python does: traceback on stderr and code 1).

    - ``resources``: limits to enforce (``None``: none); ``enforcement`` overrides what
      `detect_enforcement` found, e.g. ``detect_enforcement(force="poll")``. A callable is
      called here right after the fork, so the child can be started before its limits are
      known (a process forked ahead of need): the child runs unlimited until the call
      returns, then is moved under the limits before ``on_start``. Memory it touched before
      that stays charged where it was.
    - ``on_event``: called in this process, from this loop, with each `Output` as it arrives
      and finally with the `Exit`, exactly once.
    - ``keep_stdin``: the child inherits fd 0; otherwise its stdin is ``/dev/null``.
    - ``lifeline``: an fd that is never read; when it hangs up (EOF, error, peer closed) the
      child is killed and the exit reports ``reason="bridge lost"``.
    - ``on_start``: called here with the child's OS pid right after the fork.

    If ``on_event`` or ``on_start`` raises, the child is killed and reaped before the
    exception propagates.

    With ``target=None`` it works like ``fork``: in the child, once its stdio is wired up and
    its limits joined, it returns ``None`` and the caller goes on as the monitored process
    (whose exit status is then whatever that process exits with).
    """
    deferred = None
    if callable(resources):
        ask = resources

        def deferred() -> Limits | None:
            return limits_for(ask(), enforcement)

        resources = None
    monitor = _Monitor(on_event, lifeline, limits_for(resources, enforcement))
    in_child = False
    try:
        if not monitor.start(target, keep_stdin, on_start, deferred):
            in_child = True
            return None
        return monitor.run()
    finally:
        if not in_child:  # the child must not tear down the monitor's pipes and cgroup
            monitor.close()
