"""The process side: init(), spawn(), try_spawn(), pid(), resources() in a user process.

Local mode: init() forks; the original process becomes the master of a one-node fabric
sized to this machine, with the run's bridge, and never returns; a zygote (the node's
fork server) forked at that moment serves every later spawn, and the top process is its
first fork, returning out of init() into main. Spawns go to the master over a control
connection per thread.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import socket
import sys
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import deploy_channels
from deploy_channels.framing import FrameDecoder
from deploy_core import DeployError, NoCapacity, Pid, Resources, SpawnReply, SpawnRequest, env, loads_user
from deploy_monitor import exit_code, flush_stdio

from . import _wire as wire
from ._bridge import Bridge
from ._master import Master
from ._node import ZygoteLink, serve
from ._output import HumanFormatter, JsonFormatter
from ._scheduler import Node
from ._wire import Kind

__all__ = ["init", "pid", "resources", "spawn", "try_spawn"]

log = logging.getLogger("deploy.fabric")
_HOST = "127.0.0.1"

# Internal variables with which a cluster node starts `python SCRIPT ARGS` as a run's zygote.
ZYGOTE = "DEPLOY_ZYGOTE"  # "top": its first fork is the top process; "spawns": forks only
ZYGOTE_FDS = "DEPLOY_ZYGOTE_FDS"  # "R,W": the request stream and the reply packet socket
RUN_SECRET = "DEPLOY_RUN_SECRET"  # hex: the run's own secret
NODE_HOST = "DEPLOY_NODE_HOST"  # the host the node's processes listen on
# In cluster mode a peer on a machine that is cut off is PeerLost within this many seconds.
PEER_LOST_AFTER = 5.0


@dataclass
class _Process:
    pid: Pid
    parent: Pid | None
    resources: Resources
    fabric: tuple[str, int]
    secret: bytes
    endpoint: deploy_channels.Endpoint


_me: _Process | None = None
_init_called = False
_control = threading.local()


def _forget_control_connections() -> None:
    global _control
    _control = threading.local()


os.register_at_fork(after_in_child=_forget_control_connections)


def init(resources: Resources | None = None) -> None:
    """Start the runtime. Call it first in the program's main path.

    The calling process becomes the bridge (and the master of a one-node fabric), which shows every process's output and exits
    with the run's code once all have exited; init() returns in the top process, which
    goes on running main with ``resources`` reserved for it.
    """
    global _init_called
    resources = Resources.default() if resources is None else resources
    if not isinstance(resources, Resources):
        raise TypeError(f"init() takes a deploy.Resources, not {type(resources).__name__}")
    if _init_called or _me is not None:
        raise DeployError("deploy.init() has already been called in this process")
    if os.environ.get(env.RECCE) == "1":
        os.write(1, (json.dumps({"resources": resources.to_dict()}) + "\n").encode())
        os._exit(0)
    threads = [thread.name for thread in threading.enumerate() if thread is not threading.main_thread()]
    if threads:
        raise DeployError(f"deploy.init() must run before any thread is started; running: {', '.join(threads)}")
    if ZYGOTE in os.environ:
        _init_called = True
        _serve_cluster_node()
        return
    formatter = _formatter()
    _configure_logging()
    capacity = _machine()
    if not resources.fits_in(capacity):
        raise NoCapacity(f"this machine has {capacity} in all; init() asked for {resources}")
    _init_called = True

    secret = os.urandom(32)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((_HOST, 0))
    listener.listen(512)
    fabric = listener.getsockname()[:2]
    requests_out, requests_in = socket.socketpair()
    replies_in, replies_out = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    flush_stdio()
    if os.fork() == 0:
        for sock in (listener, requests_out, replies_in):
            sock.close()
        top = serve(
            requests_in,
            replies_out,
            secret,
            _HOST,
            functools.partial(start_endpoint, secret=secret),
            functools.partial(run_spawned, fabric=fabric, secret=secret),
        )
        _become(top.pid, None, top.resources, fabric, secret, start_endpoint(top.pid, top.listener, secret=secret))
        return
    requests_in.close()
    replies_out.close()
    code = 1
    try:
        master = Master(listener, secret, Bridge(formatter))
        master.add_node(Node("local", capacity), ZygoteLink(requests_out, replies_in, master.selector, master))
        code = master.run(resources)
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)


def _serve_cluster_node() -> None:
    """Become this run's fork server on this node (the node started us); returns in the top process."""
    mode = os.environ.pop(ZYGOTE)
    requests_fd, replies_fd = (int(fd) for fd in os.environ.pop(ZYGOTE_FDS).split(","))
    secret = bytes.fromhex(os.environ.pop(RUN_SECRET))
    host, port = os.environ.pop(env.FABRIC).rsplit(":", 1)
    fabric = (host, int(port))
    node_host = os.environ.pop(NODE_HOST)
    _configure_logging()
    flush_stdio()
    top = serve(
        socket.socket(fileno=requests_fd),
        socket.socket(fileno=replies_fd),
        secret,
        node_host,
        functools.partial(start_endpoint, secret=secret, keepalive=PEER_LOST_AFTER),
        functools.partial(run_spawned, fabric=fabric, secret=secret),
        top=mode == "top",
    )
    endpoint = start_endpoint(top.pid, top.listener, secret=secret, keepalive=PEER_LOST_AFTER)
    _become(top.pid, None, top.resources, fabric, secret, endpoint)


def spawn(fn: Callable[[Pid, Any], Any], arg: Any, resources: Resources | None = None) -> Pid:
    """Start ``fn(deploy.pid(), arg)`` in a new process; blocks while there is no capacity."""
    return _spawn(fn, arg, resources, block=True)


def try_spawn(fn: Callable[[Pid, Any], Any], arg: Any, resources: Resources | None = None) -> Pid:
    """Like spawn(), but raises NoCapacity at once when no node has room."""
    return _spawn(fn, arg, resources, block=False)


def pid() -> Pid:
    """This process's pid."""
    return _require("pid").pid


def resources() -> Resources:
    """The resources reserved for this process."""
    return _require("resources").resources


def _require(what: str) -> _Process:
    if _me is None:
        raise DeployError(f"deploy.{what}() needs the runtime: call deploy.init() first")
    return _me


def _spawn(fn: Callable[[Pid, Any], Any], arg: Any, resources: Resources | None, *, block: bool) -> Pid:
    me = _require("spawn" if block else "try_spawn")
    request = SpawnRequest.build(fn, arg, Resources.default() if resources is None else resources, me.pid, block=block)
    connection = getattr(_control, "connection", None)
    if connection is None:
        try:
            connection = wire.connect(me.fabric, me.secret, me.pid.hex, (Kind.HELLO_PROCESS, me.pid.format()))
        except OSError as error:  # AuthenticationError is a DeployError already
            if error.errno in (errno.EMFILE, errno.ENFILE):
                raise DeployError(
                    f"cannot connect to the fabric to spawn: this process is out of file descriptors ({error.strerror})"
                ) from None
            raise DeployError(f"cannot connect to the fabric to spawn: {error}") from None
        _control.connection, _control.decoder = connection, FrameDecoder(max_frame_size=wire.MAX_MESSAGE)
    try:
        wire.send_message(connection, (Kind.SPAWN, request.encode()))
        message = wire.recv_message(connection, _control.decoder)
    except OSError as error:
        message = None
        log.debug("control connection failed: %s", error)
    if message is None:
        connection.close()
        _control.connection = None
        raise DeployError("lost the connection to the fabric while spawning")
    reply = SpawnReply.decode(message[1])
    if reply.no_capacity:
        raise NoCapacity(reply.error)
    if reply.error is not None or reply.pid is None:
        raise DeployError(reply.error or "the fabric did not start the process")
    return reply.pid


def start_endpoint(
    pid: Pid, listener: socket.socket, *, secret: bytes, keepalive: float | None = None
) -> deploy_channels.Endpoint:
    """This process's endpoint, on the port the zygote bound for it."""
    endpoint = deploy_channels.Endpoint(secret=secret, sock=listener, pid=pid, keepalive=keepalive)
    deploy_channels.set_default_endpoint(endpoint)
    return endpoint


def _become(
    pid: Pid,
    parent: Pid | None,
    resources: Resources,
    fabric: tuple[str, int],
    secret: bytes,
    endpoint: deploy_channels.Endpoint,
) -> None:
    """Make this freshly forked process a deploy process."""
    global _me, _init_called
    _me = _Process(pid, parent, resources, fabric, secret, endpoint)
    _init_called = True


def run_spawned(
    request: SpawnRequest, pid: Pid, endpoint: deploy_channels.Endpoint, *, fabric: tuple[str, int], secret: bytes
) -> int:
    """Run a spawned process's function in this (monitored) process; return its exit code."""
    if dict(os.environ) != request.env:  # usually equal: rewriting it costs a fresh process ~1 ms
        os.environ.clear()
        os.environ.update(request.env)
    sys.argv[:] = list(request.argv)
    _become(pid, request.parent, request.resources, fabric, secret, endpoint)
    try:
        function, argument = loads_user(request.function), loads_user(request.argument)
        function(request.parent, argument)
        code = 0
    except SystemExit as exit:
        code = exit_code(exit.code)
    except BaseException:
        traceback.print_exc()
        code = 1
    flush_stdio()
    assert _me is not None
    _me.endpoint.close(exit_code=code)
    return code


def _machine() -> Resources:
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return Resources(memory, cores)


def _formatter() -> HumanFormatter | JsonFormatter:
    chosen = os.environ.get(env.FORMAT, "human").strip().lower() or "human"
    if chosen == "human":
        return HumanFormatter()
    if chosen == "json":
        return JsonFormatter()
    raise DeployError(f"{env.FORMAT}={chosen!r} is not a format: use 'human' or 'json'")


def _configure_logging() -> None:
    if os.environ.get(env.LOG):
        logging.basicConfig(
            level=logging.DEBUG,
            stream=sys.stderr,
            format="deploy[%(process)d] %(name)s: %(message)s",
        )
