"""run_monitored with real forks: exit statuses, output capture, stdin, lifeline, monitor death."""

from __future__ import annotations

import faulthandler
import hashlib
import io
import os
import random
import resource
import select
import signal
import socket
import stat
import sys
import time

import deploy_monitor._child as child_module
import deploy_monitor._supervisor as supervisor_module
import pytest
from conftest import Recorder, gone, in_fork, wait_gone
from deploy_monitor import Exit, Output, run_monitored

pytestmark = pytest.mark.timeout(60)


def run(target, recorder: Recorder, **kwargs) -> Exit:
    kwargs.setdefault("resources", None)
    exit = run_monitored(target, on_event=recorder, **kwargs)
    assert exit == recorder.exit
    return exit


def test_exit_zero(recorder):
    assert run(lambda: 0, recorder) == Exit(code=0, signal=None, reason=None)
    assert recorder.events == [Exit(code=0, signal=None, reason=None)]


@pytest.mark.parametrize("code", [1, 5, 255])
def test_exit_code(recorder, code):
    assert run(lambda: code, recorder) == Exit(code=code, signal=None, reason=None)


def test_exit_codes_wrap_like_the_os_does(recorder):
    assert run(lambda: 256 + 44, recorder).code == 44


def test_sys_exit_with_a_message_prints_it_and_exits_1(recorder):
    def target() -> int:
        sys.exit("giving up")

    assert run(target, recorder).code == 1
    assert recorder.output(2) == b"giving up\n"


def test_sys_exit_gives_its_code_without_a_traceback(recorder):
    def target() -> int:
        sys.exit(3)

    assert run(target, recorder).code == 3
    assert recorder.output(2) == b""


def test_exception_prints_traceback_and_exits_1(recorder):
    def target() -> int:
        raise RuntimeError("boom in the child")

    assert run(target, recorder) == Exit(code=1, signal=None, reason=None)
    err = recorder.output(2)
    assert b"Traceback (most recent call last)" in err and b"RuntimeError: boom in the child" in err


def test_abort_is_reported_as_sigabrt(recorder):
    def target() -> int:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file
        os.abort()

    exit = run(target, recorder)
    assert exit == Exit(code=None, signal="SIGABRT", reason=None)
    assert exit.returncode == -signal.SIGABRT
    if faulthandler.is_enabled():  # its dump goes to the child's captured stderr
        assert b"Fatal Python error: Aborted" in recorder.output(2)


def test_binary_output_is_forwarded_exactly(recorder):
    payload = bytes(range(256)) * 3

    def target() -> int:
        os.write(1, payload)
        return 0

    run(target, recorder)
    assert recorder.output(1) == payload
    assert recorder.output(2) == b""


def test_stderr_is_fd_2(recorder):
    def target() -> int:
        print("to stdout")
        print("to stderr", file=sys.stderr)
        return 0

    run(target, recorder)
    assert recorder.output(1) == b"to stdout\n"
    assert recorder.output(2) == b"to stderr\n"


def test_several_mib_on_both_fds_arrive_whole(recorder):
    size = 6 << 20
    out = random.Random(1).randbytes(size)
    err = random.Random(2).randbytes(size // 2)

    def target() -> int:
        for offset in range(0, size, 1 << 16):
            os.write(1, out[offset : offset + (1 << 16)])
            if offset < len(err):
                os.write(2, err[offset : offset + (1 << 16)])
        return 0

    assert run(target, recorder).code == 0
    assert hashlib.sha256(recorder.output(1)).digest() == hashlib.sha256(out).digest()
    assert recorder.output(2) == err
    assert all(len(e.data) <= 64 * 1024 for e in recorder.events if isinstance(e, Output))


def handshake_target(go: int):
    """A child that prints a line, then waits (10 s at most) for the monitor to have seen it."""

    def target() -> int:
        print("ready")  # no flush: line buffering must push it out
        if not select.select([go], [], [], 10)[0]:
            return 7
        print("done")
        return 0

    return target


def handshake_recorder(go_write: int) -> Recorder:
    class Handshake(Recorder):
        def __call__(self, event):
            super().__call__(event)
            if isinstance(event, Output) and b"ready" in self.output(1):
                os.write(go_write, b"!")

    return Handshake()


def test_output_is_live_while_the_child_runs():
    go_read, go_write = os.pipe()
    try:
        recorder = handshake_recorder(go_write)
        assert run(handshake_target(go_read), recorder).code == 0
    finally:
        os.close(go_read)
        os.close(go_write)
    assert recorder.output(1) == b"ready\ndone\n"


def test_output_is_live_when_sys_stdout_is_a_block_buffered_fd_1():
    """The reconfigure path: sys.stdout really wraps fd 1 (not a test runner's capture)."""

    def monitor() -> tuple[bytes, Exit, bool]:
        sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)))
        before = sys.stdout
        go_read, go_write = os.pipe()
        recorder = handshake_recorder(go_write)

        def target() -> int:
            assert sys.stdout is before and sys.stdout.line_buffering
            return handshake_target(go_read)()

        exit = run_monitored(target, resources=None, on_event=recorder)
        return recorder.output(1), exit, before.line_buffering

    output, exit, parent_line_buffering = in_fork(monitor)
    assert (output, exit.code) == (b"ready\ndone\n", 0)
    assert parent_line_buffering is False  # only the child was reconfigured


def test_a_printed_line_is_one_write_when_python_runs_unbuffered():
    """``python -u`` / PYTHONUNBUFFERED=1 make sys.stdout write-through: each piece of a
    print() would reach the pipe on its own. Line buffering must hold the line together."""

    def monitor() -> tuple[list[bytes], Exit]:
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
        recorder = Recorder()

        def target() -> int:
            for _ in range(20):
                print("holder", 12345)
                time.sleep(0.005)  # the monitor reads in between
            return 0

        exit = run_monitored(target, resources=None, on_event=recorder)
        return [e.data for e in recorder.events if isinstance(e, Output) and e.fd == 1], exit

    chunks, exit = in_fork(monitor)
    assert exit.code == 0
    assert chunks and all(chunk.endswith(b"\n") and b"holder 12345" in chunk for chunk in chunks), chunks


def test_output_events_come_before_exit_even_without_pidfd(monkeypatch, recorder):
    monkeypatch.setattr(supervisor_module, "_USE_PIDFD", False)

    def target() -> int:
        print("early")
        time.sleep(0.3)
        print("late")
        return 4

    assert run(target, recorder).code == 4
    assert recorder.output(1) == b"early\nlate\n"
    first_output = next(t for e, t in zip(recorder.events, recorder.times, strict=True) if isinstance(e, Output))
    assert recorder.times[-1] - first_output > 0.2


def test_stdin_is_dev_null_by_default(recorder):
    def target() -> int:
        info, null = os.fstat(0), os.stat(os.devnull)
        print(stat.S_ISCHR(info.st_mode), info.st_rdev == null.st_rdev, os.read(0, 10))
        return 0

    run(target, recorder)
    assert recorder.output(1) == b"True True b''\n"


def test_keep_stdin_inherits_fd_0():
    def monitor() -> bytes:
        read_end, write_end = os.pipe()
        os.dup2(read_end, 0)
        os.write(write_end, b"typed by the user\n")
        os.close(write_end)
        recorder = Recorder()

        def target() -> int:
            os.write(1, os.read(0, 100))
            return 0

        run_monitored(target, resources=None, on_event=recorder, keep_stdin=True)
        return recorder.output(1)

    assert in_fork(monitor) == b"typed by the user\n"


def test_on_start_gets_the_child_pid(recorder):
    started = []

    def target() -> int:
        print(os.getpid())
        return 0

    run(target, recorder, on_start=started.append)
    assert started == [int(recorder.output(1))]


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_child_does_not_inherit_the_lifeline_or_the_read_ends(recorder):
    ours, theirs = socket.socketpair()
    with ours, theirs:
        monitor_fds = {int(fd) for fd in os.listdir("/proc/self/fd")}

        def target() -> int:
            # The pipe read ends are the two fds the monitor opened just before forking.
            new = {int(fd) for fd in os.listdir("/proc/self/fd")} - monitor_fds
            print(is_open(ours.fileno()), is_open(theirs.fileno()), sorted(fd for fd in new if is_open(fd)))
            return 0

        run(target, recorder, lifeline=ours.fileno())
    assert recorder.output(1) == b"False True []\n"


def sleeper_that_says_ready() -> int:
    print("ready")
    time.sleep(30)
    return 0


@pytest.mark.parametrize("kind", ["socket", "pipe"])
def test_lifeline_hang_up_kills_the_child_promptly(kind):
    # The child closes its copy of the bridge's end: in the runtime it lives in another process.
    if kind == "socket":
        ours, theirs = socket.socketpair()
        lifeline, bridge_end, hang_up, cleanup = ours.fileno(), theirs.fileno(), theirs.close, ours.close
    else:
        read_end, bridge_end = os.pipe()
        lifeline, cleanup = read_end, lambda: os.close(read_end)

        def hang_up() -> None:
            os.close(bridge_end)

    def target() -> int:
        os.close(bridge_end)
        return sleeper_that_says_ready()

    hung_up_at: list[float] = []

    class HangUpWhenReady(Recorder):
        def __call__(self, event):
            super().__call__(event)
            if not hung_up_at and b"ready" in self.output(1):
                hung_up_at.append(time.monotonic())
                hang_up()

    recorder = HangUpWhenReady()
    try:
        exit = run(target, recorder, lifeline=lifeline)
    finally:
        cleanup()
    assert exit == Exit(code=None, signal="SIGKILL", reason="bridge lost")
    assert recorder.times[-1] - hung_up_at[0] < 1.0


def test_lifeline_data_is_neither_read_nor_a_loss(recorder):
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(b"not for the monitor")

        def target() -> int:
            time.sleep(0.2)
            return 0

        assert run(target, recorder, lifeline=ours.fileno()) == Exit(code=0, signal=None, reason=None)
        assert ours.recv(100) == b"not for the monitor"


def test_monitor_death_kills_the_child():
    pids_read, pids_write = os.pipe()
    monitor_pid = os.fork()
    if monitor_pid == 0:
        try:
            os.close(pids_read)
            run_monitored(
                sleeper_that_says_ready,
                resources=None,
                on_event=lambda e: None,
                on_start=lambda p: os.write(pids_write, b"%d\n" % p),
            )
        finally:
            os._exit(0)
    os.close(pids_write)
    try:
        assert select.select([pids_read], [], [], 10)[0], "the monitor never started its child"
        child = int(os.read(pids_read, 100))
    finally:
        os.close(pids_read)
    assert not gone(child)
    os.kill(monitor_pid, signal.SIGKILL)
    os.waitpid(monitor_pid, 0)
    assert wait_gone(child, timeout=3.0), f"child {child} outlived its monitor"


def test_child_exit_does_not_wait_for_a_grandchild_holding_the_pipes(recorder):
    def target() -> int:
        grandchild = os.fork()
        if grandchild == 0:
            try:
                time.sleep(20)  # holds fds 1 and 2
            finally:
                os._exit(0)
        print(grandchild)
        return 0

    started = time.monotonic()
    try:
        assert run(target, recorder).code == 0
        assert time.monotonic() - started < 5
    finally:
        grandchild = int(recorder.output(1))
        os.kill(grandchild, signal.SIGKILL)
        assert wait_gone(grandchild)


def test_a_failing_on_event_kills_and_reaps_the_child():
    started = []

    def on_event(event):
        raise RuntimeError("the runtime's callback broke")

    begun = time.monotonic()
    with pytest.raises(RuntimeError, match="callback broke"):
        run_monitored(sleeper_that_says_ready, resources=None, on_event=on_event, on_start=started.append)
    assert time.monotonic() - begun < 5
    assert gone(started[0])


def test_a_chatty_grandchild_does_not_keep_the_monitor_forever(recorder):
    def target() -> int:
        grandchild = os.fork()
        if grandchild == 0:
            try:
                while True:
                    os.write(1, b"chatter\n")
            finally:
                os._exit(0)
        os.write(2, b"%d\n" % grandchild)
        time.sleep(0.2)
        return 0

    started = time.monotonic()
    try:
        assert run(target, recorder).code == 0
        assert time.monotonic() - started < 5
    finally:
        grandchild = int(recorder.output(2))
        os.kill(grandchild, signal.SIGKILL)
        assert wait_gone(grandchild)
    assert recorder.output(1).startswith(b"chatter\n")


def test_without_a_target_the_child_returns_into_the_caller():
    """target=None: like fork, the child returns None (wired up) and the caller carries on."""

    def monitor() -> tuple[Exit | None, bytes, bytes, list[int]]:
        ours, theirs = socket.socketpair()
        recorder = Recorder()
        started: list[int] = []
        result = run_monitored(None, resources=None, on_event=recorder, lifeline=ours.fileno(), on_start=started.append)
        if result is None:  # the child: the caller's code runs on, captured
            try:
                print("in the child", os.getpid(), not is_open(ours.fileno()))  # line-buffered: no flush
                os.write(2, b"raw stderr\n")
            finally:
                os._exit(6)
        ours.close()
        theirs.close()
        return result, recorder.output(1), recorder.output(2), started

    exit, out, err, started = in_fork(monitor)
    assert exit == Exit(code=6, signal=None, reason=None)
    assert out == f"in the child {started[0]} True\n".encode()
    assert err == b"raw stderr\n"


def test_without_a_target_the_child_dies_with_its_monitor():
    pids_read, pids_write = os.pipe()
    monitor_pid = os.fork()
    if monitor_pid == 0:
        try:
            os.close(pids_read)
            if (
                run_monitored(
                    None, resources=None, on_event=lambda e: None, on_start=lambda p: os.write(pids_write, b"%d\n" % p)
                )
                is None
            ):
                time.sleep(30)  # the child
        finally:
            os._exit(0)
    os.close(pids_write)
    try:
        assert select.select([pids_read], [], [], 10)[0], "the monitor never started its child"
        child = int(os.read(pids_read, 100))
    finally:
        os.close(pids_read)
    os.kill(monitor_pid, signal.SIGKILL)
    os.waitpid(monitor_pid, 0)
    assert wait_gone(child, timeout=3.0), f"child {child} outlived its monitor"


def test_a_child_that_cannot_be_wired_up_exits_1_instead_of_returning(monkeypatch, recorder):
    def broken(name: str, fd: int) -> None:
        raise RuntimeError("wiring broke")

    monkeypatch.setattr(child_module, "_line_buffered", broken)
    if run_monitored(None, resources=None, on_event=recorder) is None:
        os._exit(99)  # the child returned into the caller despite the failure
    assert recorder.exit == Exit(code=1, signal=None, reason=None)
    assert b"RuntimeError: wiring broke" in recorder.output(2)
