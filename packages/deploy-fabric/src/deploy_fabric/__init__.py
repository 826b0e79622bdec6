"""deploy-fabric: the runtime behind deploy.init() and deploy.spawn().

Local mode today: the bridge, a one-node fabric sized to this machine, and the fork
server that starts every process.
"""

from ._output import HumanFormatter, JsonFormatter
from ._runtime import init, pid, resources, spawn, try_spawn
from ._scheduler import Node, Scheduler
from ._version import __version__

__all__ = [
    "HumanFormatter",
    "JsonFormatter",
    "Node",
    "Scheduler",
    "__version__",
    "init",
    "pid",
    "resources",
    "spawn",
    "try_spawn",
]
