"""Runs real deploy scripts as subprocesses and checks what they report.

Every run is tagged with an environment variable that all its processes inherit (the
runtime passes the spawner's environment on), so a test can find any process of the run
that is still alive afterwards: none may be.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

TAG = "DEPLOYTEST_RUN"
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    code: int
    events: list[dict]
    stderr: str
    stdout: bytes = b""
    tag: str = ""
    by_pid: dict[str, list[dict]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        grouped = defaultdict(list)
        for event in self.events:
            grouped[event["pid"]].append(event)
        self.by_pid = dict(grouped)

    @property
    def top(self) -> str:
        return self.events[0]["pid"]

    def spawns(self) -> list[dict]:
        return [event for event in self.events if event["event"] == "spawn"]

    def exits(self) -> dict[str, dict]:
        return {event["pid"]: event for event in self.events if event["event"] == "exit"}

    def output(self, pid: str, fd: int = 1) -> bytes:
        return b"".join(
            base64.b64decode(event["b64"])
            for event in self.by_pid.get(pid, [])
            if event["event"] == "output" and event["fd"] == fd
        )

    def all_output(self, fd: int = 1) -> str:
        return "".join(self.output(pid, fd).decode() for pid in self.by_pid)

    def children(self, pid: str) -> list[str]:
        return [event["pid"] for event in self.spawns() if event["parent"] == pid]

    def check_tree(self) -> None:
        """DESIGN §5: one spawn and one exit each, parent's spawn first, nothing after exit."""
        assert self.events, f"no events; stderr:\n{self.stderr}"
        assert self.events[0]["event"] == "spawn" and self.events[0]["parent"] is None
        spawned: set[str] = set()
        exited: set[str] = set()
        for event in self.events:
            pid = event["pid"]
            assert pid not in exited, f"event after exit: {event}"
            if event["event"] == "spawn":
                assert pid not in spawned, f"second spawn event: {event}"
                assert event["parent"] is None or event["parent"] in spawned
                spawned.add(pid)
            else:
                assert pid in spawned, f"event before spawn: {event}"
                if event["event"] == "exit":
                    exited.add(pid)
        assert spawned == exited, f"processes without an exit event: {spawned - exited}"


def survivors(tag: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["pid"]):
        try:
            if process.environ().get(TAG) == tag and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def assert_no_survivors(tag: str, wait: float = 5.0) -> None:
    deadline = time.monotonic() + wait
    while True:
        left = survivors(tag)
        if not left:
            return
        if time.monotonic() > deadline:
            for process in left:
                process.kill()
            raise AssertionError(f"processes left behind: {[p.cmdline() for p in left]}")
        time.sleep(0.05)


def write_script(tmp_path: Path, source: str, name: str = "job.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return path


def start(
    script: Path, *args: str, fmt: str = "json", env: dict | None = None, **popen
) -> tuple[subprocess.Popen, str]:
    tag = uuid.uuid4().hex
    environment = {**os.environ, TAG: tag, "DEPLOY_FORMAT": fmt, "PYTHONUNBUFFERED": "1", **(env or {})}
    environment.pop("DEPLOY_LOG", None)
    process = subprocess.Popen(
        [sys.executable, str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=environment,
        cwd=script.parent,
        **popen,
    )
    return process, tag


def run(script: Path, *args: str, timeout: float = 60, fmt: str = "json", env: dict | None = None) -> Run:
    process, tag = start(script, *args, fmt=fmt, env=env)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        process.send_signal(signal.SIGINT)
        try:
            stdout, stderr = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            for survivor in survivors(tag):  # a hung run (the bridge included): leave nothing
                try:
                    survivor.kill()
                except psutil.NoSuchProcess:
                    pass
            stdout, stderr = process.communicate(timeout=10)
        assert_no_survivors(tag)
        raise AssertionError(f"the run did not finish in {timeout}s; stderr:\n{stderr.decode()}") from expired
    assert_no_survivors(tag)
    # Before init() a script's own prints go straight to stdout; events are the JSON lines.
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith(b'{"event"')] if fmt == "json" else []
    return Run(process.returncode, events, stderr.decode(errors="replace"), stdout, tag)


@pytest.fixture
def script(tmp_path):
    return lambda source, name="job.py": write_script(tmp_path, source, name)
