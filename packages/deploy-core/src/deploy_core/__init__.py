"""deploy-core: the pieces every deploy package shares.

Process ids, resource requirements, the error hierarchy, the shared-secret handshake, the
protection of the frames that follow it, and the spawn protocol messages.
"""

import logging

from . import _env as env
from ._auth import Handshake, authenticate
from ._errors import (
    AuthenticationError,
    ChannelClosed,
    ChannelExists,
    DeployError,
    FrameError,
    NoCapacity,
    PeerExited,
    PeerLost,
    SerializationError,
)
from ._pid import Pid
from ._pid import _from_wire as _from_wire  # pickled pids refer to it here
from ._protect import Opener, ProtectedSocket, Sealer
from ._protocol import SpawnReply, SpawnRequest, dumps_message, dumps_user, loads_plain, loads_user, snapshot_main
from ._resources import Cpu, Mem, Resources
from ._version import __version__

# deploy logs under "deploy.*" and shows nothing unless the application (or DEPLOY_LOG)
# configures logging: without this, Python's last-resort handler would print our
# warnings into every user process's stderr.
logging.getLogger("deploy").addHandler(logging.NullHandler())

__all__ = [
    "AuthenticationError",
    "ChannelClosed",
    "ChannelExists",
    "Cpu",
    "DeployError",
    "FrameError",
    "Handshake",
    "Mem",
    "NoCapacity",
    "Opener",
    "PeerExited",
    "PeerLost",
    "Pid",
    "ProtectedSocket",
    "Resources",
    "Sealer",
    "SerializationError",
    "SpawnReply",
    "SpawnRequest",
    "__version__",
    "authenticate",
    "dumps_message",
    "dumps_user",
    "env",
    "loads_plain",
    "loads_user",
    "snapshot_main",
]
