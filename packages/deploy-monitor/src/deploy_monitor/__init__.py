"""deploy-monitor: the parent of user processes.

`run_monitored` forks a child with its stdout/stderr captured through pipes, forwards its
output as `Output` events while it runs, enforces its `deploy_core.Resources` (a cgroup when
the host allows one, else memory polling), reaps it and reports an `Exit`.
`Supervisor` does the same for many children from one loop (a fork server's), and
`detect_enforcement` says which enforcement this host gets.
"""

from ._cgroups import Enforcement, detect_enforcement
from ._child import exit_code, flush_stdio
from ._events import Exit, Output
from ._monitor import run_monitored
from ._reaper import OrphanReaper, become_subreaper, child_pids
from ._supervisor import Child, Supervisor
from ._version import __version__

__all__ = [
    "Child",
    "Enforcement",
    "Exit",
    "OrphanReaper",
    "Output",
    "Supervisor",
    "__version__",
    "become_subreaper",
    "child_pids",
    "detect_enforcement",
    "exit_code",
    "flush_stdio",
    "run_monitored",
]
