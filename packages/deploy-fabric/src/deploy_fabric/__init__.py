"""deploy-fabric: the runtime behind deploy.init() and deploy.spawn().

One module per role: the process side (`init`/`spawn`), the node (its fork server, which
monitors its processes), the master (nodes, placement, spawns waiting for room), the
bridge (events to output, the run's code) and the control protocol between them. Local
mode is a master with one node sized to this machine and the bridge, in the process tree
of ``python job.py``. Cluster mode spreads the same objects over machines: the daemons
(`serve_master`, `serve_worker`: each node's agent starts a run's zygote as ``python SCRIPT
ARGS``) and the clients of the master's bridge port (`push`, which holds the run's bridge,
and `status`).
"""

from ._cluster import serve_master
from ._output import HumanFormatter, JsonFormatter
from ._process import init, pid, resources, spawn, try_spawn
from ._push import push, status
from ._scheduler import Node, Scheduler
from ._version import __version__
from ._worker import serve_worker

__all__ = [
    "HumanFormatter",
    "JsonFormatter",
    "Node",
    "Scheduler",
    "__version__",
    "init",
    "pid",
    "push",
    "resources",
    "serve_master",
    "serve_worker",
    "spawn",
    "status",
    "try_spawn",
]
