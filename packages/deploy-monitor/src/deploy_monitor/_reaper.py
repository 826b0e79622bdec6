"""Adopting the orphans of monitored processes, and ending them: a process's descendants
belong to it and never outlive it.

Facts this module relies on (prctl(2), proc(5), wait(2)):
- ``prctl(PR_SET_CHILD_SUBREAPER, 1)`` (``PR_SET_CHILD_SUBREAPER`` is 36, Linux >= 3.4) makes
  the caller the "init" of its descendants: one whose parent exits is reparented to the
  nearest living subreaper among its ancestors instead of pid 1, ``setsid`` and double forks
  included. The attribute is not inherited by ``fork``.
- The kernel reparents a dying process's children before its parent is told (before the
  pidfd polls readable or ``waitpid`` reports it): once we see a child's exit, its orphans
  are our children already.
- ``/proc/self/task/TID/children`` lists the direct children of thread TID (Linux >= 4.2
  with ``CONFIG_PROC_CHILDREN``); psutil, which scans ``/proc``, finds them otherwise.
- A SIGKILLed child stays a zombie until ``waitpid`` reaps it; ``waitpid(pid, WNOHANG)`` on
  one pid never takes another child's status (``waitpid(-1)`` would steal the monitored
  children's).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection

import psutil

from ._child import load_libc
from ._limits import kill_tree

__all__ = ["OrphanReaper", "become_subreaper", "child_pids"]

log = logging.getLogger("deploy.monitor")

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants; False where that is impossible."""
    libc = load_libc()
    if libc is None or libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        log.debug("cannot become a child subreaper: orphans go to init")
        return False
    return True


def child_pids() -> set[int]:
    """The pids of this process's direct children, zombies included."""
    found: set[int] = set()
    try:
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/children") as file:
                found.update(int(word) for word in file.read().split())
        return found
    except (OSError, ValueError):
        pass
    try:
        return {child.pid for child in psutil.Process().children()}
    except psutil.Error:
        return found


class OrphanReaper:
    """Kills and reaps the children of a subreaper that it does not know: orphans.

    Only for a process whose every child it knows about (a fork server and its monitored
    children): any other child is taken for an orphan of one of them.
    """

    def __init__(self) -> None:
        self.pending: set[int] = set()  # killed, not reaped yet

    def sweep(self, known: Collection[int]) -> int:
        """SIGKILL every child not in ``known`` (with its descendants) and reap what has died;
        how many such children are left (not dead yet, or reparented to us meanwhile)."""
        known = set(known)
        for pid in child_pids() - known:
            if pid not in self.pending:
                log.debug("monitor: killing pid %s, left behind by a process that exited", pid)
                kill_tree(pid)
                self.pending.add(pid)
        reaped_any = False
        for pid in list(self.pending):
            try:
                reaped, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                reaped = pid
            if reaped:
                self.pending.discard(pid)
                reaped_any = True
        # A reaped orphan's own children were reparented to us before it died.
        return len(child_pids() - known) if self.pending or reaped_any else 0
