"""A worker daemon (`serve_worker`): a node that waits for its master or joins one.

Its agent serves the master's connection; a master silent for 4 s is lost, and so are
its runs on this node. A joining worker reconnects when it loses its master.
"""

from __future__ import annotations

import functools
import logging
import socket
import threading
import time

from deploy_core import DeployError, Resources

from ._agent import Agent
from ._bundle import BundleCache
from ._connections import (
    CONNECT_RETRY,
    LOST_AFTER,
    MASTER,
    NODE,
    Loop,
    accept_authenticated,
    announce,
    bound,
    cache_directory,
    connect_authenticated,
    daemon_setup,
    kill_descendants,
    listen,
    parse_addr,
)

__all__ = ["serve_worker"]

log = logging.getLogger("deploy.fabric")


def serve_worker(bind: str, capacity: Resources, secret: bytes, *, join: str | None = None) -> int:
    """Run a worker daemon until SIGINT/SIGTERM: it waits for the master (or joins ``join``)."""
    daemon_setup()
    loop = Loop()
    host = parse_addr(bind)[0]
    listener = listen(bind)
    bind = bound(listener, bind)  # (BIND may say port 0)
    cache = BundleCache(cache_directory())
    agents: list[Agent] = []

    def on_closed(agent: Agent) -> None:
        if agent in agents:
            agents.remove(agent)
        if join is not None and loop.stopping is None:
            joining()

    def adopt(sock: socket.socket) -> None:
        agent = Agent(sock, loop.selector, name=bind, host=host, capacity=capacity, cache=cache, on_closed=on_closed)
        agents.append(agent)

    def joining() -> None:
        assert join is not None

        def attempt() -> None:
            while loop.stopping is None:
                try:
                    sock = connect_authenticated(join, secret, f"node:{bind}", MASTER, timeout=5.0)
                except DeployError as error:
                    log.info("joining %s: %s; retrying", join, error)
                    time.sleep(CONNECT_RETRY)
                    continue
                loop.post(functools.partial(adopt, sock))
                return

        threading.Thread(target=attempt, daemon=True).start()

    accept_authenticated(listener, secret, NODE, (MASTER,), loop, adopt)
    announce(f"worker {bind} ({capacity}), " + (f"joining {join}" if join else "waiting for its master"))
    if join is not None:
        joining()
    loop.install_signals()
    while loop.stopping is None:
        now = time.monotonic()
        for agent in list(agents):
            if now - agent.seen > LOST_AFTER:
                log.warning("the master has been silent for %.0f s: dropping its runs", LOST_AFTER)
                agent.close()
            agent.reap()
        loop.once(0.5)
    for agent in list(agents):
        agent.close()
    time.sleep(0.1)
    kill_descendants()
    return 0
