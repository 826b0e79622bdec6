"""deploy: write, debug and deploy distributed Python programs.

``deploy.init()``, then ``deploy.spawn(fn, arg, Resources(...))`` to start processes and
typed ``Sender``/``Receiver`` channels between their pids. See the README.
"""

from deploy_channels import Receiver, Sender, aselect, select
from deploy_core import (
    AuthenticationError,
    ChannelClosed,
    ChannelExists,
    Cpu,
    DeployError,
    Mem,
    NoCapacity,
    PeerExited,
    PeerLost,
    Pid,
    Resources,
    SerializationError,
)
from deploy_fabric import init, pid, resources, spawn, try_spawn

from ._version import __version__

__all__ = [
    "AuthenticationError",
    "ChannelClosed",
    "ChannelExists",
    "Cpu",
    "DeployError",
    "Mem",
    "NoCapacity",
    "PeerExited",
    "PeerLost",
    "Pid",
    "Receiver",
    "Resources",
    "Sender",
    "SerializationError",
    "__version__",
    "aselect",
    "init",
    "pid",
    "resources",
    "select",
    "spawn",
    "try_spawn",
]
