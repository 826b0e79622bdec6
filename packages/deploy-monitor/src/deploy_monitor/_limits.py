"""Enforcing one monitored process's `Resources`: through its own cgroup, or by polling its memory.

Facts this module relies on (proc(5), psutil):
- USS ("unique set size", psutil's ``memory_full_info().uss``, from ``/proc/PID/smaps_rollup``
  or ``smaps``) counts the pages mapped by this process alone. Pages a forked child still
  shares with the process it was forked from count in the parent's and child's RSS but in
  neither's USS, so USS is the memory the child owns: a small child of a big fork server
  stays small (DESIGN §2).
- A process's descendants are found by scanning ``/proc`` (psutil ``children(recursive=True)``);
  a grandchild whose parent already exited is reparented away and no longer found, unless
  the child is a child subreaper (`Supervisor(subreaper=True)` makes it one): then orphans
  are reparented to the child and stay in its tree.
- SIGKILL cannot be caught or ignored; ``kill`` on an exited but unreaped child (a zombie)
  succeeds and does nothing; on a reaped one it raises ``ProcessLookupError``.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Protocol

import psutil
from deploy_core import Mem, Resources

from ._cgroups import Cgroup, CgroupPool, Enforcement, detect_enforcement
from ._events import Exit

__all__ = ["CgroupLimits", "Limits", "PollLimits", "kill_tree", "limits_for", "memory_reason"]

log = logging.getLogger("deploy.monitor")

POLL_INTERVAL = 0.2  # seconds between two memory checks when polling


def memory_reason(limit: int) -> str:
    return f"memory limit {Mem(limit)} exceeded"


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and the descendants still attached to it (best effort)."""
    try:
        descendants = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        descendants = []
    for target in [pid, *(child.pid for child in descendants)]:
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Limits(Protocol):
    """How the monitor loop enforces one child's resources."""

    interval: float | None  # seconds between two `check` calls; None: nothing to poll

    def join(self) -> None:
        """In the child, before user code runs: put ourselves under the limits."""

    def attach(self, pid: int) -> None:
        """In the monitor, right after fork; ``OSError`` if the child cannot be limited this way."""

    def update(self, pid: int, resources: Resources | None) -> Limits:
        """In the monitor, for limits made before ``resources`` were known: apply them to the
        child (which joined already; None: no limits); returns the limits now in force."""

    def check(self) -> str | None:
        """In the monitor loop: a reason to kill the child now, or None."""

    def reason(self, exit: Exit) -> str | None:
        """After reaping: why enforcement killed the child, or None."""

    def kill(self, pid: int) -> None:
        """SIGKILL the child and whatever it started."""

    def kill_rest(self) -> None:
        """After reaping: SIGKILL whatever the child left running that these limits can find."""

    def close(self) -> None:
        """After reaping: release what was made for this child."""


class CgroupLimits:
    """The kernel enforces memory (OOM kill inside the group) and the CPU weight."""

    interval: float | None = None

    def __init__(self, group: Cgroup, pool: CgroupPool | None = None):
        self.group = group
        self.pool = pool  # where the group goes once its process is reaped
        self.polling: PollLimits | None = None  # when the child could not be moved into the group

    def join(self) -> None:
        try:
            self.group.add(0)
        except OSError:
            pass  # the monitor moved us already, or noticed it could not and polls instead

    def attach(self, pid: int) -> None:
        try:
            self.group.add(pid)
        except OSError as exc:
            log.debug(
                "cgroup %s: cannot move pid %s into it, polling its memory instead: %s", self.group.memory_dir, pid, exc
            )
            self.polling = PollLimits(self.group.limit)
            self.polling.attach(pid)
            self.interval = self.polling.interval

    def update(self, pid: int, resources: Resources | None) -> Limits:
        try:
            if resources is None:
                self.group.lift_limits()
            else:
                self.group.set_limits(resources)
            if pid not in self.group.pids():  # it could not join, or has not yet
                self.group.add(pid)
        except OSError as exc:
            # Never removed here: that would kill what is inside.
            log.debug(
                "cgroup %s: not usable for pid %s, polling its memory instead: %s", self.group.memory_dir, pid, exc
            )
            self.polling = PollLimits(None if resources is None else int(resources.mem))
            self.polling.attach(pid)
            self.interval = self.polling.interval
        return self

    def check(self) -> str | None:
        return self.polling.check() if self.polling is not None else None

    def reason(self, exit: Exit) -> str | None:
        if exit.signal == "SIGKILL" and self.group.oom_killed():
            return memory_reason(self.group.limit)
        return self.polling.reason(exit) if self.polling is not None else None

    def kill(self, pid: int) -> None:
        kill_tree(pid)
        self.group.kill_all()

    def kill_rest(self) -> None:
        self.group.kill_all()  # (its process is gone: the rest are its descendants)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.give(self.group)
        else:
            self.group.remove()


class PollLimits:
    """Memory checked every `POLL_INTERVAL` from the monitor loop: USS of the child and its descendants."""

    interval: float | None = POLL_INTERVAL

    def __init__(self, limit: int | None):
        self.limit = limit  # None: not known yet, nothing to check
        self.process: psutil.Process | None = None
        self.tripped: str | None = None

    def join(self) -> None:
        pass

    def attach(self, pid: int) -> None:
        self.process = psutil.Process(pid)

    def update(self, pid: int, resources: Resources | None) -> Limits:
        self.limit = None if resources is None else int(resources.mem)
        if self.process is None:
            self.attach(pid)
        return self

    def usage(self) -> int:
        """Bytes the child and its descendants own (0 once it is gone)."""
        if self.process is None:
            return 0
        try:
            processes = [self.process, *self.process.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for process in processes:
            try:
                total += process.memory_full_info().uss
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                pass
        return total

    def check(self) -> str | None:
        if self.process is None or self.limit is None:
            return None
        try:
            used = self.usage()
        except psutil.AccessDenied as exc:
            log.debug("memory polling: cannot read the memory of pid %s, not enforcing: %s", self.process.pid, exc)
            self.process = None
            return None
        if used > self.limit:
            log.debug(
                "memory polling: pid %s owns %s, past its limit of %s", self.process.pid, Mem(used), Mem(self.limit)
            )
            self.tripped = memory_reason(self.limit)
            self.process = None  # one kill is enough
            return self.tripped
        return None

    def reason(self, exit: Exit) -> str | None:
        return self.tripped if exit.signal == "SIGKILL" else None

    def kill(self, pid: int) -> None:
        kill_tree(pid)

    def kill_rest(self) -> None:
        pass  # its orphans were reparented away: only a subreaper finds them

    def close(self) -> None:
        self.process = None


def limits_for(
    resources: Resources | None, enforcement: Enforcement | None, *, later: bool = False, pool: CgroupPool | None = None
) -> Limits | None:
    """The enforcement for one child: its own cgroup when the host allows, else polling.

    ``later``: the resources come later (`Limits.update`); the cgroup is made without limits.
    ``pool``: where cgroups are taken from and given back to, if anywhere.
    """
    if resources is None and not later:
        return None
    enforcement = enforcement or detect_enforcement()
    if enforcement.kind != "poll":
        try:
            return CgroupLimits(Cgroup.create(enforcement, resources, pool), pool)
        except OSError as exc:
            log.debug("cannot make a cgroup (%s), polling memory instead: %s", enforcement, exc)
    return PollLimits(None if resources is None else int(resources.mem))
