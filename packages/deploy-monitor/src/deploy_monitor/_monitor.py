"""`run_monitored`: the monitor of a single process, a `Supervisor` with one child."""

from __future__ import annotations

from collections.abc import Callable

from deploy_core import Resources

from ._cgroups import Enforcement
from ._events import Exit, Output
from ._supervisor import Supervisor

__all__ = ["run_monitored"]


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
      known (a process forked ahead of need): it joins a cgroup of its own at once, whose
      limits are written when the call returns, before ``on_start``.
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
    supervisor = Supervisor(enforcement)
    later = callable(resources)
    child = supervisor.start(
        target,
        on_event=on_event,
        resources=None if callable(resources) else resources,
        limits_later=later,
        keep_stdin=keep_stdin,
        lifeline=lifeline,
    )
    if child is None:
        return None  # in the child, wired up: the caller goes on as the monitored process
    try:
        if callable(resources):
            child.set_limits(resources())
        if on_start is not None:
            on_start(child.pid)
        return supervisor.run_until(child)
    finally:
        supervisor.close()
