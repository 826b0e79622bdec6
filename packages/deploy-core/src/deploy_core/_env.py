"""Names of the environment variables deploy reads (DESIGN §7). All start with ``DEPLOY_``."""

from __future__ import annotations

PREFIX = "DEPLOY_"

FORMAT = "DEPLOY_FORMAT"  # "human" (default) or "json"
SECRET = "DEPLOY_SECRET"  # cluster mode's shared secret
RECCE = "DEPLOY_RECCE"  # "1": init() reports the requested resources and exits
LOG = "DEPLOY_LOG"  # debug tracing to stderr

# Internal: how a process started by the runtime finds its way back.
FABRIC = "DEPLOY_FABRIC"  # host:port of the fabric serving this process


def strip_deploy_vars(env: dict[str, str]) -> dict[str, str]:
    """A copy of ``env`` without the runtime's own ``DEPLOY_*`` variables."""
    return {key: value for key, value in env.items() if not key.startswith(PREFIX)}
