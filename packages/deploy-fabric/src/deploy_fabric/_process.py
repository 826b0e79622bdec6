"""The process side: init(), spawn(), try_spawn(), pid(), resources() in a user process.

Local mode: init() forks; the original process becomes the master of a one-node fabric
sized to this machine, with the run's bridge, and never returns; a zygote (the node's
fork server) forked at that moment serves every later spawn, and the top process is its
first fork, returning out of init() into main. Spawns go to the master over a control
connection per thread.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import json
import logging
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import deploy_channels
from deploy_channels.framing import FrameDecoder
from deploy_core import (
    AuthenticationError,
    DeployError,
    NoCapacity,
    PeerExited,
    PeerLost,
    Pid,
    Resources,
    SpawnReply,
    SpawnRequest,
    env,
    snapshot_main,
)
from deploy_monitor import OrphanReaper, become_subreaper, child_pids, exit_code, flush_stdio

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
# How long a channel's error waits for the master to hear of a peer's exit from its monitor.
_PEER_STATUS_WAIT = 2.0
_SETUP_TIMEOUT = 10.0  # for the master's echo of our hello, once authenticated
_SETUP_RETRY_FOR = 60.0  # how long a control connection's failed set-up is retried
A = TypeVar("A")  # what a spawned function takes as its argument

# Internal variables with which a cluster node starts `python SCRIPT ARGS` as a run's zygote.
ZYGOTE = "DEPLOY_ZYGOTE"  # "top": its first fork is the top process; "spawns": forks only
ZYGOTE_FDS = "DEPLOY_ZYGOTE_FDS"  # "R,W": the request stream and the reply packet socket
RUN_SECRET = "DEPLOY_RUN_SECRET"  # hex: the run's own secret
NODE_HOST = "DEPLOY_NODE_HOST"  # the host the node's processes listen on
BUNDLE = "DEPLOY_BUNDLE"  # the unpacked bundle's root on this node (its name is the bundle's hash)
# In cluster mode a peer on a machine that is cut off is PeerLost within this many seconds
# (DESIGN: 5 s; a second of room for the moment the cut happens between probes).
PEER_LOST_AFTER = 4.0
# Frame protection (issue 13) of this process's channel and control connections: local
# mode is all loopback ("off"); a cluster node's processes protect every connection that
# leaves the machine. Set before the zygote forks, so every process of the node has it.
_protect = "off"


@dataclass
class _Process:
    pid: Pid
    parent: Pid | None
    resources: Resources
    fabric: tuple[str, int]
    secret: bytes
    endpoint: deploy_channels.Endpoint


_me: _Process | None = None
_bundle_root: str | None = None  # cluster mode: this node's copy of the run's bundle
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
    snapshot_main()  # what every process forked from the zygote will have
    flush_stdio()
    become_subreaper()  # if the zygote dies, what its processes started comes to us (see _end_orphans)
    before = child_pids()  # the script's own, from before init(): not the run's to end
    zygote = os.fork()
    if zygote == 0:
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
    link = None
    try:
        master = Master(listener, secret, Bridge(formatter))
        link = ZygoteLink(requests_out, replies_in, master.selector, master)
        master.add_node(Node("local", capacity), link)
        code = master.run(resources)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            _end_orphans(zygote, before, lost=link is None or not link.alive)
        finally:
            os._exit(code)


def _end_orphans(zygote: int, before: set[int], *, lost: bool, patience: float = 2.0) -> None:
    """The run is over. If the zygote (every process's monitor, and their subreaper) died,
    what its processes started was reparented to us, the next subreaper up: once the zygote
    is gone for good, kill and reap all of that. (A living zygote ends its processes itself
    when we exit.)"""
    deadline = time.monotonic() + patience
    if lost:  # its sockets are closed, but its children come to us only once it has exited
        while not os.waitpid(zygote, os.WNOHANG)[0] and time.monotonic() < deadline:
            time.sleep(0.01)
    reaper = OrphanReaper()
    while reaper.sweep(before if lost else {zygote, *before}) and time.monotonic() < deadline:
        time.sleep(0.01)


def _serve_cluster_node() -> None:
    """Become this run's fork server on this node (the node started us); returns in the top process."""
    mode = os.environ.pop(ZYGOTE)
    requests_fd, replies_fd = (int(fd) for fd in os.environ.pop(ZYGOTE_FDS).split(","))
    secret = bytes.fromhex(os.environ.pop(RUN_SECRET))
    host, port = os.environ.pop(env.FABRIC).rsplit(":", 1)
    fabric = (host, int(port))
    node_host = os.environ.pop(NODE_HOST)
    global _bundle_root, _protect
    _bundle_root = os.environ.pop(BUNDLE, None)
    _protect = "remote"
    _configure_logging()
    snapshot_main()  # every node ran the script this far: what its zygote's forks will have
    flush_stdio()
    top = serve(
        socket.socket(fileno=requests_fd),
        socket.socket(fileno=replies_fd),
        secret,
        node_host,
        functools.partial(start_endpoint, secret=secret, keepalive=PEER_LOST_AFTER, protect=_protect),
        functools.partial(run_spawned, fabric=fabric, secret=secret),
        top=mode == "top",
    )
    endpoint = start_endpoint(top.pid, top.listener, secret=secret, keepalive=PEER_LOST_AFTER, protect=_protect)
    _become(top.pid, None, top.resources, fabric, secret, endpoint)


def spawn(fn: Callable[[Pid, A], object], arg: A, resources: Resources | None = None) -> Pid:
    """Start ``fn(deploy.pid(), arg)`` in a new process; blocks while there is no capacity."""
    return _spawn(fn, arg, resources, block=True)


def try_spawn(fn: Callable[[Pid, A], object], arg: A, resources: Resources | None = None) -> Pid:
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


def _ask(
    me: _Process, parts: list[bytes | bytearray | memoryview], *, timeout: float | None = None
) -> tuple[object, ...] | None:
    """Send one frame of ``parts`` to the master on this thread's control connection; its
    answer, or None if the connection failed or no answer came within ``timeout`` seconds."""
    connection = getattr(_control, "connection", None)
    if connection is None:
        connection = _control_connection(me)
    try:
        wire.send_parts(connection, parts)
        connection.settimeout(timeout)
        reply = wire.recv_message(connection, _control.decoder)
        connection.settimeout(None)
    except OSError as error:  # a timeout too: the late answer would be read as the next one's
        reply = None
        log.debug("control connection failed: %s", error)
    if reply is None:
        connection.close()
        _control.connection = None
    return reply


def _control_connection(me: _Process) -> socket.socket:
    # This thread's control connection, set up once the master has echoed our hello: only
    # then is the set-up done and a request sent on it surely read. A connection that
    # ends or times out before that proves nothing (the fabric port evicts the oldest of
    # its connections authenticating when a flood holds it): it is retried with back-off
    # for `_SETUP_RETRY_FOR`, no request having been sent on it. A refused connect (the
    # fabric is gone), a descriptor shortage or a failed authentication is reported at once.
    hello = (Kind.HELLO_PROCESS, me.pid.format())
    give_up = time.monotonic() + _SETUP_RETRY_FOR
    delay = 0.01
    while True:
        decoder = FrameDecoder(max_frame_size=wire.MAX_MESSAGE)
        connection = None
        try:
            connection = wire.connect(me.fabric, me.secret, me.pid.hex, hello, protect=_protect)
            connection.settimeout(_SETUP_TIMEOUT)
            echo = wire.recv_message(connection, decoder)
            connection.settimeout(None)
            if echo is None:
                raise ConnectionResetError("the fabric closed the connection before answering the hello")
            if echo[0] != Kind.HELLO_PROCESS:
                raise DeployError(f"the fabric answered the hello with {echo[0].value!r}")
            _control.connection, _control.decoder = connection, decoder
            return connection
        except (ConnectionRefusedError, AuthenticationError, DeployError) as error:
            _close_quietly(connection)
            raise DeployError(f"cannot connect to the fabric to spawn: {_why_failed(error)}") from None
        except OSError as error:
            _close_quietly(connection)
            # Reset, closed, not connected (a reset before TCP_NODELAY could be set) or timed
            # out: retried. Anything else (out of fds here or there) is reported.
            ended = isinstance(error, (ConnectionError, TimeoutError)) or error.errno == errno.ENOTCONN
            if not ended or time.monotonic() + delay >= give_up:
                raise DeployError(f"cannot connect to the fabric to spawn: {_why_failed(error)}") from None
            log.debug("control connection set-up failed (%s); retrying", error)
        time.sleep(delay)  # back-off before the next attempt (this thread waits for it anyway)
        delay = min(delay * 2, 1.0)


def _close_quietly(connection: Any) -> None:
    if connection is not None:
        try:
            connection.close()
        except OSError:
            pass


def _why_failed(error: BaseException) -> str:
    return error.strerror if isinstance(error, OSError) and error.strerror else str(error)


def _spawn(fn: Callable[[Pid, A], object], arg: A, resources: Resources | None, *, block: bool) -> Pid:
    me = _require("spawn" if block else "try_spawn")
    request = SpawnRequest.build(fn, arg, Resources.default() if resources is None else resources, me.pid, block=block)
    message = _ask(me, request.encode_parts())  # (the argument is not copied again)
    if message is None:
        raise DeployError("lost the connection to the fabric while spawning")
    assert isinstance(message[1], bytes)
    reply = SpawnReply.decode(message[1])
    if reply.no_capacity:
        raise NoCapacity(reply.error)
    if reply.error is not None or reply.pid is None:
        raise DeployError(reply.error or "the fabric did not start the process")
    return reply.pid


def _peer_status(peer: Pid) -> PeerExited | PeerLost | None:
    # The channels' question (Endpoint peer_status) for a peer gone without an exit code:
    # the master has every exit, or has it as soon as the peer's monitor reports.
    if _me is None:
        return None
    answer = _ask(_me, [wire.dumps((Kind.PEER_EXIT, peer.hex))], timeout=_PEER_STATUS_WAIT)
    if answer is None or len(answer) != 4 or answer[1:] == (None, None, None):
        return None
    _, code, signal_name, reason = answer
    if reason == "node lost":  # DESIGN §3: reported exited, but its peers lost it
        return PeerLost(peer, reason="node lost")
    return PeerExited(
        peer,
        code if isinstance(code, int) else None,
        signal=signal_name if isinstance(signal_name, str) else None,
        reason=reason if isinstance(reason, str) else None,
    )


def start_endpoint(
    pid: Pid, listener: socket.socket, *, secret: bytes, keepalive: float | None = None, protect: str = "off"
) -> deploy_channels.Endpoint:
    """This process's endpoint, on the port the zygote bound for it."""
    endpoint = deploy_channels.Endpoint(
        secret=secret, sock=listener, pid=pid, keepalive=keepalive, protect=protect, peer_status=_peer_status
    )
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
    """Run a spawned process's function in this (monitored) process, with the spawner's argv,
    environment, sys.path and working directory; return its exit code."""
    _take_environment(request.env)
    sys.argv[:] = list(request.argv)
    if _bundle_root is not None:
        request = _localised(request, _bundle_root)
    sys.path[:] = list(request.path)  # (before unpickling: the function's module may need it)
    _become(pid, request.parent, request.resources, fabric, secret, endpoint)
    try:
        _enter(request.cwd)
    except OSError as error:  # one sentence, not our traceback
        print(f"deploy: cannot work in the spawner's directory {request.cwd}: {error.strerror}", file=sys.stderr)
        code = 1
    else:
        code = _call(request)
    flush_stdio()
    assert _me is not None
    _me.endpoint.close(exit_code=code)
    return code


def _take_environment(wanted: dict[str, str]) -> None:
    """Make os.environ equal the spawner's, changing only what differs: it usually differs by
    the internal DEPLOY_ variables alone, and rewriting all of it costs a fresh process ~1 ms."""
    for key in [key for key in os.environ if key not in wanted]:
        del os.environ[key]
    for key, value in wanted.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def _call(request: SpawnRequest) -> int:
    """Run the request's function as a process's main, then wait for its non-daemon threads;
    its exit code, as the interpreter gives it."""
    try:
        function, argument = request.function_and_argument(release=True)  # (the received job freed)
    except BaseException as error:  # one sentence: the traceback would be the unpickler's
        print(f"deploy: this process could not load the function it was spawned to run: {error!r}", file=sys.stderr)
        return 1
    try:
        function(request.parent, argument)
        code = 0
    except SystemExit as exit:
        code = exit_code(exit.code)
    except BaseException as error:
        _print_user_traceback(error)
        code = 1
    _wait_for_threads()
    return code


def _localised(request: SpawnRequest, root: str) -> SpawnRequest:
    """The spawner's directory and sys.path, which name places in its node's copy of the
    bundle, as the same places in this node's copy (the copies' roots differ, their last
    component, the bundle's hash, does not)."""
    name = os.path.basename(root)

    def here(path: str) -> str:
        parts = path.split(os.sep)
        if not path or name not in parts:
            return path
        return os.path.join(root, *parts[parts.index(name) + 1 :])

    fields: dict[str, Any] = {"cwd": here(request.cwd)}
    if hasattr(request, "path"):
        fields["path"] = tuple(here(entry) for entry in request.path)
    return dataclasses.replace(request, **fields)


def _wait_for_threads() -> None:
    """Join every non-daemon thread, those they start included, as the interpreter does at
    exit (``threading._shutdown``); an exception in one is printed by ``threading.excepthook``
    and leaves the exit code alone, as in plain Python."""
    me = threading.current_thread()
    while waiting := [t for t in threading.enumerate() if t is not me and not t.daemon and t.is_alive()]:
        for thread in waiting:
            thread.join()


def _enter(directory: str) -> None:
    """Work in the spawner's directory ("" if it had been removed: stay where we are)."""
    if not directory:
        return
    try:
        if os.getcwd() == directory:
            return
    except OSError:
        pass
    os.chdir(directory)


def _print_user_traceback(error: BaseException) -> None:
    # The traceback starts at the user's function: the frame that called it is ours.
    tb = error.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename == __file__:
        tb = tb.tb_next
    traceback.print_exception(type(error), error, tb)


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
