"""deploy-channels: typed channels between processes over authenticated TCP.

Each process makes one `Endpoint` (its pid, one listening port and a background loop
thread); `Sender[T](pid)` and `Receiver[T](pid)` then exchange pickled values with the
process ``pid``, over one duplex connection per pair of processes. `select`/`aselect`
wait on several channels at once. `framing` is the sans-IO frame codec underneath.
"""

from deploy_core import ChannelClosed, ChannelExists, PeerExited, PeerLost

from . import framing
from ._channel import Receiver, Sender
from ._default import default_endpoint, set_default_endpoint
from ._endpoint import Endpoint
from ._select import aselect, select
from ._version import __version__

__all__ = [
    "ChannelClosed",
    "ChannelExists",
    "Endpoint",
    "PeerExited",
    "PeerLost",
    "Receiver",
    "Sender",
    "__version__",
    "aselect",
    "default_endpoint",
    "framing",
    "select",
    "set_default_endpoint",
]
