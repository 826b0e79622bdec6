"""Fixtures for real-process tests: an event recorder, a forked monitor, and the leftover check."""

from __future__ import annotations

import os
import pickle
import select
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any

import psutil
import pytest
from deploy_monitor import Enforcement, Exit, Output, detect_enforcement


class Recorder:
    """An ``on_event`` that keeps every event and when it arrived."""

    def __init__(self) -> None:
        self.events: list[Output | Exit] = []
        self.times: list[float] = []

    def __call__(self, event: Output | Exit) -> None:
        assert not any(isinstance(e, Exit) for e in self.events), f"event after the Exit: {event}"
        self.events.append(event)
        self.times.append(time.monotonic())

    def output(self, fd: int = 1) -> bytes:
        return b"".join(e.data for e in self.events if isinstance(e, Output) and e.fd == fd)

    @property
    def exit(self) -> Exit:
        exits = [e for e in self.events if isinstance(e, Exit)]
        assert len(exits) == 1 and self.events[-1] is exits[0], f"expected one Exit, last: {self.events[-1:]}"
        return exits[0]


def in_fork(fn: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Run ``fn`` in a forked process, as the runtime runs a monitor, and return its result.

    On timeout the forked process is SIGKILLed (its child follows through PDEATHSIG).
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_end)
            try:
                payload = pickle.dumps(("ok", fn()))
            except BaseException:
                payload = pickle.dumps(("error", traceback.format_exc()))
            view = memoryview(payload)
            while view:
                view = view[os.write(write_end, view) :]
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([read_end], [], [], remaining)[0]:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"the forked monitor did not finish within {timeout}s")
            chunk = os.read(read_end, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    status, value = pickle.loads(b"".join(chunks))
    if status == "error":
        raise AssertionError(f"the forked monitor failed:\n{value}")
    return value


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie nobody reaped yet counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pid: int, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture(autouse=True)
def no_process_left_behind():
    yield
    me = psutil.Process()
    deadline = time.monotonic() + 3.0
    while children := me.children(recursive=True):
        if time.monotonic() > deadline:
            for child in children:
                child.kill()
            pytest.fail(f"processes left behind: {children}")
        time.sleep(0.02)


def enforcement_of(kind: str) -> Enforcement:
    """``"cgroup"``: what this host gives (skipped where it gives no cgroups); ``"poll"``: polling."""
    found = detect_enforcement() if kind == "cgroup" else detect_enforcement(force="poll")
    if kind == "cgroup" and found.kind == "poll":
        pytest.skip("this host does not let us make cgroups")
    return found


def own_memory_cgroup() -> str:
    """The calling process's memory cgroup directory (v1 memory hierarchy, or the v2 one)."""
    found = detect_enforcement()
    lines = dict(line.split(":", 2)[1:] for line in open("/proc/self/cgroup").read().splitlines())
    path = lines.get("memory", lines.get(""))
    assert found.memory_dir is not None
    return os.path.join(found.memory_dir, os.path.basename(path))


MiB = 1 << 20


def hog() -> int:
    """Print our memory cgroup ("-" when polling), then take 300 MiB and hold on to it."""
    print(own_memory_cgroup() if detect_enforcement().kind != "poll" else "-")
    hoard = []
    for _ in range(30):  # 300 MiB in 10 MiB steps, each page touched
        hoard.append(b"x" * (10 * MiB))
    time.sleep(30)  # a real hog holds on; polling must catch it
    return 0
