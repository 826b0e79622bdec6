"""Real clusters of ``deploy fabric`` daemons for the integration tests.

A cluster is a master (with its own node and the bridge) and workers of different sizes,
each a ``python -m deploy_cli fabric ...`` process on a free loopback port, sharing a
random secret, each with its own working directory and bundle cache under the cluster's
root. Pushes go through ``python -m deploy_cli push --format json``, as a user's would.

Leftovers: every daemon carries ``DEPLOYTEST_CLUSTER=<tag>`` in its environment and every
push ``DEPLOYTEST_RUN=<tag>`` (the runtime passes the caller's environment on to the run's
processes); a process is also the cluster's when its working directory lies under the
cluster's root (the nodes run programs from their bundle caches there). Teardown is
terminate → wait → kill, then none of these may be alive.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from conftest import TAG, Run, survivors

CLUSTER_TAG = "DEPLOYTEST_CLUSTER"
DEPLOY = [sys.executable, "-m", "deploy_cli"]
BOOT_TIMEOUT = 60.0

# Node sizes: three different ones, so placement by size is observable. The largest
# (BIG) cannot hold two HOLDER-sized processes; the master's node cannot hold one.
MASTER_SIZE = ("1GiB", "2")
WORKER_SIZES = [("1536MiB", "2"), ("2GiB", "2")]
HOLDER_MEM = "1200MiB"


_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing is bound to now, below the kernel's ephemeral range (32768 and up), so
    that the outgoing connections of everything else running on this machine cannot take it
    between this check and the daemon's bind; never the same one twice in a session."""
    while True:
        port = random.randrange(20000, 32000)
        if port in _handed_out:
            continue
        with socket.socket() as probe:
            try:
                probe.bind((host, port))
            except OSError:
                continue
        _handed_out.add(port)
        return port


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Poll ``condition`` until it returns something true; fail naming ``what`` past ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def project(directory: Path, source: str, name: str = "job.py", **files: str) -> Path:
    """A directory holding the script ``name`` (and ``files``); returns the script's path."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_text(textwrap.dedent(source))
    for other, content in files.items():
        (directory / other).write_text(textwrap.dedent(content))
    return directory / name


@dataclass
class Daemon:
    name: str
    addr: str
    argv: list[str]
    directory: Path
    env: dict[str, str]
    process: subprocess.Popen | None = None

    def start(self, prefix: list[str] | None = None) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        log = open(self.directory / "daemon.log", "ab")  # noqa: SIM115 - the daemon owns it
        self.process = subprocess.Popen(
            [*(prefix or []), *DEPLOY, *self.argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=self.env,
            cwd=self.directory,
        )
        log.close()

    def log(self) -> str:
        path = self.directory / "daemon.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Signal, wait, then kill; returns the exit code the daemon chose (None if killed)."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(sig)
            try:
                return self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
                return None
        return self.process.returncode


@dataclass
class Push:
    """A ``deploy push`` still running: its JSON events are collected as they are printed."""

    process: subprocess.Popen
    tag: str
    events: list[dict] = field(default_factory=list)
    lines: queue.Queue = field(default_factory=queue.Queue)
    stderr: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ended = False  # stdout closed: every event is in self.events
        self.readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=lambda: self.stderr.append(self.process.stderr.read()), daemon=True),
        ]
        for reader in self.readers:
            reader.start()

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            if line.startswith(b'{"event"'):
                event = json.loads(line)
                self.events.append(event)
                self.lines.put(event)
        self.ended = True
        self.lines.put(None)

    def wait_for_output(self, text: str, timeout: float = 30.0) -> str:
        """The first complete line of stdout (of any process) containing ``text``, waiting for it.

        Output events are chunks of bytes, not lines: a process's chunks are joined first.
        """
        deadline = time.monotonic() + timeout
        partial: dict[str, str] = {}
        seen = 0
        while True:
            while seen < len(self.events):
                event = self.events[seen]
                seen += 1
                if event["event"] != "output" or event["fd"] != 1:
                    continue
                buffered = partial.get(event["pid"], "") + event["text"]
                *lines, partial[event["pid"]] = buffered.split("\n")
                for line in lines:
                    if text in line:
                        return line
            if self.ended and seen >= len(self.events):
                raise AssertionError(f"the push ended without printing {text!r}; stderr: {self.stderr_text()}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no output {text!r} within {timeout}s; events: {self.events[-10:]}")
            with contextlib.suppress(queue.Empty):
                self.lines.get(timeout=min(remaining, 0.2))  # wakes up on the next event

    def stderr_text(self) -> str:
        return b"".join(self.stderr).decode(errors="replace")

    def finish(self, timeout: float = 60.0) -> Run:
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
            raise AssertionError(f"deploy push did not finish in {timeout}s; events: {self.events[-10:]}") from None
        for reader in self.readers:
            reader.join(10)
        return Run(self.process.returncode, list(self.events), self.stderr_text(), b"", self.tag)


@dataclass
class Cluster:
    root: Path
    secret: str
    tag: str
    master: Daemon
    workers: list[Daemon]
    bridge: str
    push_tags: list[str] = field(default_factory=list)
    pushes: list[Push] = field(default_factory=list)
    prefix: list[str] | None = None  # e.g. ["ip", "netns", "exec", NS] for pushes

    @property
    def daemons(self) -> list[Daemon]:
        return [self.master, *self.workers]

    def env(self, secret: str | None = None, **extra: str) -> dict[str, str]:
        environment = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
        for name in ("DEPLOY_LOG", "DEPLOY_FORMAT", "DEPLOY_SECRET"):
            environment.pop(name, None)
        if secret is None:
            secret = self.secret
        if secret:
            environment["DEPLOY_SECRET"] = secret
        return environment

    def command(self, *argv: str, secret: str | None = None, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """Run ``deploy ARGV`` as a user would, to completion."""
        return subprocess.run(
            [*(self.prefix or []), *DEPLOY, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env(secret),
            stdin=subprocess.DEVNULL,
        )

    def status(self) -> dict:
        result = self.command("status", "--format", "json", self.bridge)
        assert result.returncode == 0, f"deploy status failed: {result.stderr}"
        return json.loads(result.stdout)

    def start_push(
        self, script: Path, *args: str, fmt: str = "json", secret: str | None = None, env: dict | None = None
    ) -> Push:
        tag = uuid.uuid4().hex
        self.push_tags.append(tag)
        process = subprocess.Popen(
            [*(self.prefix or []), *DEPLOY, "push", "--format", fmt, self.bridge, script.name, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=script.parent,
            env=self.env(secret, **{TAG: tag}, **(env or {})),
        )
        push = Push(process, tag)
        self.pushes.append(push)
        return push

    def end_pushes(self) -> None:
        """Stop every push a test left running (it failed half-way): Ctrl-C, then kill; and
        wait until their runs are gone, so that the next test finds the cluster idle."""
        left = [push for push in self.pushes if push.process.poll() is None]
        self.pushes.clear()
        for push in left:
            push.process.send_signal(signal.SIGINT)
        for push in left:
            try:
                push.process.wait(10)
            except subprocess.TimeoutExpired:
                push.process.kill()
                push.process.wait(10)
        if left:
            wait_until(lambda: self.status()["runs"] == [], 15, "the runs of interrupted pushes to end")

    def push(self, script: Path, *args: str, timeout: float = 60.0, **options) -> Run:
        """Push ``script`` to completion; its processes must all be gone afterwards."""
        result = self.start_push(script, *args, **options).finish(timeout)
        assert_gone(lambda: survivors(result.tag), f"processes of the push of {script.name}")
        return result

    def wait_ready(self, nodes: int | None = None, timeout: float = BOOT_TIMEOUT) -> dict:
        expected = len(self.daemons) if nodes is None else nodes

        def ready() -> dict | None:
            for daemon in self.daemons:
                if daemon.process is not None and daemon.process.poll() is not None:
                    raise AssertionError(f"{daemon.name} exited with {daemon.process.returncode}:\n{daemon.log()}")
            result = self.command("status", "--format", "json", self.bridge, timeout=15)
            if result.returncode != 0:
                return None
            status = json.loads(result.stdout)
            return status if len(status.get("nodes", [])) == expected else None

        try:
            return wait_until(ready, timeout, f"{expected} nodes in deploy status", interval=0.2)
        except AssertionError as error:
            logs = "\n".join(f"--- {d.name}:\n{d.log()[-2000:]}" for d in self.daemons)
            raise AssertionError(f"{error}\n{logs}") from None

    def processes(self) -> list[psutil.Process]:
        """Every live process that belongs to this cluster (daemons included)."""
        root = str(self.root.resolve())
        found = []
        for process in psutil.process_iter(["pid"]):
            try:
                environ = process.environ()
                if (
                    environ.get(CLUSTER_TAG) == self.tag
                    or environ.get(TAG) in self.push_tags
                    or process.cwd().startswith(root)
                ) and process.status() != psutil.STATUS_ZOMBIE:
                    found.append(process)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return [p for p in found if p.pid != os.getpid()]

    def shutdown(self) -> dict[str, int | None]:
        """Terminate every daemon, wait, kill the stubborn; then nothing of the cluster may live."""
        for push in self.pushes:
            if push.process.poll() is None:
                push.process.kill()
                push.process.wait(10)
        codes = {}
        for daemon in self.daemons:
            if daemon.alive():
                daemon.process.send_signal(signal.SIGTERM)
        for daemon in self.daemons:
            codes[daemon.name] = daemon.stop()
        assert_gone(self.processes, "processes of the cluster after its daemons stopped")
        return codes


def assert_gone(find: Callable[[], list[psutil.Process]], what: str, wait: float = 10.0) -> None:
    deadline = time.monotonic() + wait
    while True:
        left = find()
        if not left:
            return
        if time.monotonic() > deadline:
            described = []
            for process in left:
                with contextlib.suppress(psutil.Error):
                    described.append(f"{process.pid} {process.cmdline()} in {process.cwd()}")
                with contextlib.suppress(psutil.Error):
                    process.kill()
            raise AssertionError(f"{what} left behind: {described}")
        time.sleep(0.05)


def boot(root: Path, **options) -> Cluster:
    """Start a master with its bridge and ``workers`` in its static list (``joiners`` --join it).

    A daemon that finds its port taken after all (something else bound it first) makes the
    whole cluster start again on other ports, up to three times.
    """
    for attempt in range(3):
        try:
            return _boot_once(root / f"try{attempt}" if attempt else root, **options)
        except AssertionError as error:
            if "Address already in use" not in str(error) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _boot_once(
    root: Path,
    *,
    master: tuple[str, str] = MASTER_SIZE,
    workers: list[tuple[str, str]] | None = None,
    joiners: list[tuple[str, str]] | None = None,
    host: str = "127.0.0.1",
    wait: bool = True,
    start_workers: bool = True,
) -> Cluster:
    workers = WORKER_SIZES if workers is None else workers
    joiners = joiners or []
    tag = uuid.uuid4().hex
    secret = secrets.token_hex(16)

    def env(name: str) -> dict[str, str]:
        environment = {**os.environ, CLUSTER_TAG: tag, "DEPLOY_SECRET": secret, "PYTHONUNBUFFERED": "1"}
        environment["DEPLOY_CACHE"] = str(root / name / "cache")
        for name_ in ("DEPLOY_LOG", "DEPLOY_FORMAT"):
            environment.pop(name_, None)
        return environment

    master_addr = f"{host}:{free_port(host)}"
    bridge = f"{host}:{free_port(host)}"
    static = [
        Daemon(f"worker{i}", f"{host}:{free_port(host)}", [], root / f"worker{i}", env(f"worker{i}"))
        for i in range(len(workers))
    ]
    for daemon, (mem, cpu) in zip(static, workers, strict=True):
        daemon.argv = ["fabric", daemon.addr, "--mem", mem, "--cpu", cpu]
    joining = [
        Daemon(f"joiner{i}", f"{host}:{free_port(host)}", [], root / f"joiner{i}", env(f"joiner{i}"))
        for i in range(len(joiners))
    ]
    for daemon, (mem, cpu) in zip(joining, joiners, strict=True):
        daemon.argv = ["fabric", daemon.addr, "--mem", mem, "--cpu", cpu, "--join", master_addr]
    listed = [word for daemon, (mem, cpu) in zip(static, workers, strict=True) for word in (daemon.addr, mem, cpu)]
    head = Daemon(
        "master",
        master_addr,
        ["fabric", "master", master_addr, *master, "bridge", bridge, *listed],
        root / "master",
        env("master"),
    )
    cluster = Cluster(root, secret, tag, head, [*static, *joining], bridge)
    try:
        for daemon in static if start_workers else []:
            daemon.start()
        head.start()
        for daemon in joining:
            daemon.start()
        if wait:
            cluster.wait_ready(None if start_workers else 1 + len(joining))
    except BaseException:
        cluster.shutdown()
        raise
    return cluster


@contextlib.contextmanager
def running(root: Path, **options) -> Iterator[Cluster]:
    cluster = boot(root, **options)
    try:
        yield cluster
    finally:
        cluster.shutdown()


# The producer streams numbers to the consumer; neither fits on a node beside the other.
# The consumer reports how its producer ended, and when.
STREAM = f"""
import os, sys, time, deploy

def producer(parent, consumer):
    deploy.Sender[int](parent).send(os.getpid())
    tx = deploy.Sender[int](consumer)
    index = 0
    while True:
        tx.send(index)
        index += 1
        if index % 100 == 0:
            time.sleep(0.01)

def consumer(parent, _):
    rx = deploy.Receiver[int](deploy.Receiver[deploy.Pid](parent).recv())
    try:
        while True:
            rx.recv()
    except deploy.PeerLost as error:
        print(f"PeerLost at {{time.time():.3f}}: {{error}}", flush=True)
        sys.exit(3)
    except Exception as error:
        print(f"{{type(error).__name__}} instead of PeerLost: {{error}}", flush=True)
        sys.exit(4)

if __name__ == "__main__":
    deploy.init()
    big = deploy.Resources(mem="{HOLDER_MEM}", cpu=0.1)
    c = deploy.spawn(consumer, None, big)
    p = deploy.spawn(producer, c, big)
    deploy.Sender[deploy.Pid](c).send(p)
    print("producer", deploy.Receiver[int](p).recv(), flush=True)
"""


def node_of(cluster: Cluster, os_pid: int) -> Daemon:
    """The daemon whose process tree holds the process ``os_pid``."""
    ancestors = {parent.pid for parent in psutil.Process(os_pid).parents()}
    owners = [daemon for daemon in cluster.daemons if daemon.process.pid in ancestors]
    assert len(owners) == 1, f"process {os_pid} is under {[d.name for d in owners]}"
    return owners[0]
