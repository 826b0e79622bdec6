"""The process-wide default endpoint, the exit drain and the fork hook.

Facts relied on:
- ``atexit`` handlers run after non-daemon threads are joined but while daemon threads,
  such as every endpoint's loop thread, still run; so the drain can use the loop.
- ``os.register_at_fork(after_in_child=...)`` runs in the child right after ``fork``,
  where only the forking thread exists: inherited endpoints have no loop thread and any
  lock they held may stay locked forever, so the hook takes no lock of theirs.
"""

from __future__ import annotations

import atexit
import os
import threading
from typing import TYPE_CHECKING

from deploy_core import DeployError

if TYPE_CHECKING:
    from ._endpoint import Endpoint

__all__ = ["default_endpoint", "set_default_endpoint"]

_default: Endpoint | None = None
_lock = threading.Lock()


def set_default_endpoint(endpoint: Endpoint | None) -> None:
    """Make ``endpoint`` the one channels use when no ``endpoint=`` is given (None clears it)."""
    global _default
    from ._endpoint import Endpoint

    if endpoint is not None and not isinstance(endpoint, Endpoint):
        raise TypeError(f"expected an Endpoint, not {type(endpoint).__name__}")
    with _lock:
        _default = endpoint


def default_endpoint() -> Endpoint:
    """The process-wide endpoint; raises `DeployError` if there is none yet."""
    endpoint = _default
    if endpoint is None:
        raise DeployError(
            "no default channel endpoint in this process: call deploy.init() first "
            "(or deploy_channels.set_default_endpoint(Endpoint(...)), or pass endpoint=)"
        )
    return endpoint


def _drain_at_exit() -> None:
    from ._endpoint import EndpointState

    for endpoint in list(EndpointState.live):
        try:
            endpoint.close(None)
        except Exception:
            pass


def _after_fork_in_child() -> None:
    global _default, _lock
    from ._endpoint import EndpointState

    _lock = threading.Lock()
    _default = None
    for endpoint in list(EndpointState.live):
        endpoint._after_fork_in_child()
    EndpointState.live.clear()


atexit.register(_drain_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
