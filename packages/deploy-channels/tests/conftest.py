from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from deploy_channels import Endpoint

SECRET = b"deploy-channels-tests"


@pytest.fixture
def make_endpoint():
    """Endpoints on 127.0.0.1:0, closed (and their loop threads checked gone) afterwards."""
    made: list[Endpoint] = []

    def make(**options) -> Endpoint:
        options.setdefault("secret", SECRET)
        endpoint = Endpoint("127.0.0.1:0", **options)
        made.append(endpoint)
        return endpoint

    yield make
    for endpoint in made:
        endpoint.close(timeout=2.0)
    for endpoint in made:
        assert not endpoint._loop.is_running()


def _in_thread(fn):
    outcome: list = []

    def run():
        try:
            outcome.append(fn())
        except BaseException as error:  # reported by the test
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


@pytest.fixture
def in_thread():
    """``in_thread(fn)`` runs ``fn`` in a daemon thread and returns (the thread, a list
    that gets its value or the exception it raised)."""
    return _in_thread


def _wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.002)


@pytest.fixture
def wait_until():
    """``wait_until(condition, timeout=10.0)`` polls ``condition()`` until it is true, and
    fails the test if it is not within ``timeout`` seconds."""
    return _wait_until


@pytest.fixture
def pair(make_endpoint):
    return make_endpoint(), make_endpoint()


_PRELUDE = """\
import os, sys, time
from deploy_core import Pid, PeerExited, PeerLost
import deploy_channels as dc
SECRET = {secret!r}
"""


class Children:
    """Run Python snippets as real child processes; none may outlive the test."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def run(self, code: str, *args: str) -> subprocess.Popen:
        source = _PRELUDE.format(secret=SECRET) + textwrap.dedent(code)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
        proc = subprocess.Popen(
            [sys.executable, "-c", source, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.procs.append(proc)
        return proc

    def cleanup(self) -> list[int]:
        leftovers = []
        for proc in self.procs:
            if proc.poll() is None:
                leftovers.append(proc.pid)
                proc.kill()
            proc.wait(timeout=10)
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    stream.close()
        return leftovers


@pytest.fixture
def children():
    kids = Children()
    yield kids
    leftovers = kids.cleanup()
    assert not leftovers, f"child processes left running: {leftovers}"


@pytest.fixture(autouse=True)
def no_stray_threads():
    before = set(threading.enumerate())
    yield
    extra = [t for t in threading.enumerate() if t not in before and t.is_alive() and t.name.startswith("deploy-")]
    for thread in extra:
        thread.join(3.0)
    assert not [t for t in extra if t.is_alive()], "loop threads left running"
