"""Supervisor with real forks: many children from one loop, their descriptors, lifelines,
deferred limits, cgroup reuse, close, and reaping without pidfds.

Every test leaves no process behind: conftest's autouse ``no_process_left_behind`` checks
``psutil.Process().children(recursive=True)`` after each one; grandchildren that outlive
their parent (reparented away, out of that check's sight) are checked with ``wait_gone``.
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import socket
import time
from collections.abc import Callable, Iterable
from contextlib import closing

import deploy_monitor._supervisor as supervisor_module
import psutil
import pytest
from conftest import MiB, Recorder, enforcement_of, gone, hog, in_fork, own_memory_cgroup, wait_gone
from deploy_core import Resources
from deploy_monitor import Child, Exit, Output, Supervisor, detect_enforcement

pytestmark = pytest.mark.timeout(60)

MEMORY_REASON = "memory limit 50MiB exceeded"


@pytest.fixture
def supervisor():
    with closing(Supervisor()) as supervisor:
        yield supervisor


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def wait_readable(fd: int, timeout: float = 10.0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def poll_until(supervisor: Supervisor, done: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what or done}"
        supervisor.poll(0.2)


def drive(supervisor: Supervisor, children: Iterable[Child], timeout: float = 20.0) -> None:
    """Poll until every one of ``children`` has been reaped and reported."""
    children = list(children)
    poll_until(supervisor, lambda: all(c.exit is not None for c in children), timeout, f"exits of {children}")


def close_all(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# --- 1. many children at once ------------------------------------------------------------------


def test_many_children_each_report_their_own_output_and_exit(supervisor):
    go_read, go_write = os.pipe()
    count = 20

    def target(n: int) -> Callable[[], int]:
        def run() -> int:
            # Every child waits until all are started: they all run at the same time.
            if not wait_readable(go_read):
                return 99
            print(f"child {n} says hello")
            return 100 + n

        return run

    recorders = [Recorder() for _ in range(count)]
    try:
        # The children must not keep the go pipe's write end, or EOF would never come.
        children = [supervisor.start(target(n), on_event=recorders[n], close=[go_write]) for n in range(count)]
        assert len(supervisor.children) == count
        assert not any(gone(c.pid) for c in children)
    finally:
        os.close(go_write)  # EOF: go
    try:
        drive(supervisor, children)
    finally:
        os.close(go_read)
    for n, (child, recorder) in enumerate(zip(children, recorders, strict=True)):
        # Recorder refuses events after the Exit, and .exit checks the Exit is the last one.
        assert recorder.exit == Exit(code=100 + n, signal=None, reason=None) == child.exit
        assert recorder.output(1) == f"child {n} says hello\n".encode()
        assert recorder.output(2) == b""
    assert supervisor.children == []


# --- 2. live, interleaved output ---------------------------------------------------------------


def test_output_of_two_running_children_is_forwarded_live_and_interleaved(supervisor):
    """A and B take turns: each line is only written once the other's previous line was
    forwarded, so the exchange completes only if output flows while both still run."""
    a_go_read, a_go_write = os.pipe()
    b_go_read, b_go_write = os.pipe()
    lines = 5
    log: list[tuple[str, bytes]] = []
    children: dict[str, Child] = {}
    other_running: list[bool] = []

    def a_target() -> int:
        for k in range(lines):
            print(f"a{k}")
            if not wait_readable(a_go_read):
                return 7
            os.read(a_go_read, 1)
        return 0

    def b_target() -> int:
        for k in range(lines):
            if not wait_readable(b_go_read):
                return 7
            os.read(b_go_read, 1)
            print(f"b{k}")
        return 0

    def forwarder(name: str, other: str, other_go: int) -> Recorder:
        class Forward(Recorder):
            def __call__(self, event):
                super().__call__(event)
                if isinstance(event, Output):
                    log.append((name, event.data))
                    peer = children[other]
                    other_running.append(peer.exit is None and not gone(peer.pid))
                    for _ in range(event.data.count(b"\n")):
                        os.write(other_go, b"!")

        return Forward()

    a_recorder, b_recorder = forwarder("a", "b", b_go_write), forwarder("b", "a", a_go_write)
    try:
        children["a"] = supervisor.start(a_target, on_event=a_recorder)
        children["b"] = supervisor.start(b_target, on_event=b_recorder)
        drive(supervisor, children.values())
    finally:
        close_all(a_go_read, a_go_write, b_go_read, b_go_write)
    assert a_recorder.exit == b_recorder.exit == Exit(code=0, signal=None, reason=None)
    expected = [entry for k in range(lines) for entry in (("a", f"a{k}\n".encode()), ("b", f"b{k}\n".encode()))]
    assert log == expected
    assert all(other_running), f"an output arrived while the other child had exited: {other_running}"


# --- 3. no inherited descriptors of siblings ---------------------------------------------------


def test_a_child_does_not_inherit_its_siblings_or_the_callers_watched_descriptors(supervisor):
    release_read, release_write = os.pipe()
    watched_read, watched_write = os.pipe()
    ours, theirs = socket.socketpair()
    a_recorder, b_recorder = Recorder(), Recorder()
    try:
        supervisor.watch(watched_read, lambda events: None)

        def a_target() -> int:
            return 0 if wait_readable(release_read) else 7

        a = supervisor.start(a_target, on_event=a_recorder, lifeline=ours.fileno())
        state = supervisor._children[a.pid]
        assert state is a and len(state.pipes) == 2 and state.lifeline == ours.fileno()
        fds = {f"a's pipe read end {fd}": fd for fd in state.pipes}
        if state.pidfd is not None:
            fds["a's pidfd"] = state.pidfd
        fds["a's lifeline"] = state.lifeline
        fds["the watched fd"] = watched_read
        control = theirs.fileno()  # the caller's, not the supervisor's: a child keeps it

        def b_target() -> int:
            print(json.dumps({"control": is_open(control), **{name: is_open(fd) for name, fd in fds.items()}}))
            return 0

        b = supervisor.start(b_target, on_event=b_recorder)
        drive(supervisor, [b])
        assert a.exit is None and not gone(a.pid), "a should still run while b looks"
        os.write(release_write, b"!")
        drive(supervisor, [a])
    finally:
        supervisor.unwatch(watched_read)
        close_all(release_read, release_write, watched_read, watched_write)
        ours.close()
        theirs.close()
    assert b_recorder.exit == Exit(code=0, signal=None, reason=None)
    report = json.loads(b_recorder.output(1))
    assert report.pop("control") is True
    assert report == dict.fromkeys(fds, False)
    assert a_recorder.exit == Exit(code=0, signal=None, reason=None)


# --- 4. watch callbacks ------------------------------------------------------------------------


def test_a_watch_callback_runs_from_poll_and_can_start_children(supervisor):
    requests_read, requests_write = os.pipe()
    calls: list[int] = []
    spawned: list[tuple[int, Child, Recorder]] = []

    def reply(n: int) -> Callable[[], int]:
        def run() -> int:
            print(f"spawned {n} as {os.getpid()}")
            return n

        return run

    def on_request(events: int) -> None:
        calls.append(events)
        n = int(os.read(requests_read, 10))
        recorder = Recorder()
        spawned.append((n, supervisor.start(reply(n), on_event=recorder), recorder))

    try:
        supervisor.watch(requests_read, on_request)
        os.write(requests_write, b"4")
        assert calls == [], "the callback runs from poll, not from watch or write"
        poll_until(supervisor, lambda: len(spawned) == 1 and spawned[0][1].exit is not None)
        os.write(requests_write, b"5")
        poll_until(supervisor, lambda: len(spawned) == 2 and spawned[1][1].exit is not None)
        supervisor.unwatch(requests_read)
        os.write(requests_write, b"6")
        for _ in range(3):
            supervisor.poll(0.1)
    finally:
        close_all(requests_read, requests_write)
    assert len(calls) == 2 and all(events & select.POLLIN for events in calls)
    for n, child, recorder in spawned:
        assert recorder.exit == Exit(code=n, signal=None, reason=None) == child.exit
        assert recorder.output(1) == f"spawned {n} as {child.pid}\n".encode()


# --- 5. per-child lifelines --------------------------------------------------------------------


def test_losing_one_lifeline_kills_only_its_child(supervisor):
    ours_1, theirs_1 = socket.socketpair()
    ours_2, theirs_2 = socket.socketpair()
    go_read, go_write = os.pipe()
    peers = [theirs_1.fileno(), theirs_2.fileno()]  # in the runtime they live in another process

    def sleeper() -> int:
        print("ready")
        time.sleep(30)
        return 0

    def finisher() -> int:
        print("ready")
        return 0 if wait_readable(go_read) else 7

    first, second = Recorder(), Recorder()
    try:
        one = supervisor.start(sleeper, on_event=first, lifeline=ours_1.fileno(), close=peers)
        two = supervisor.start(finisher, on_event=second, lifeline=ours_2.fileno(), close=peers)
        poll_until(supervisor, lambda: first.output(1) == second.output(1) == b"ready\n")
        hung_up = time.monotonic()
        theirs_1.close()
        drive(supervisor, [one])
        assert time.monotonic() - hung_up < 2.0
        assert one.exit == first.exit == Exit(code=None, signal="SIGKILL", reason="bridge lost")
        for _ in range(3):
            supervisor.poll(0.1)
        assert two.exit is None and not gone(two.pid), "the other child was hit too"
        os.write(go_write, b"!")
        drive(supervisor, [two])
    finally:
        close_all(go_read, go_write)
        for sock in (ours_1, theirs_1, ours_2, theirs_2):
            sock.close()
    assert two.exit == second.exit == Exit(code=0, signal=None, reason=None)


# --- 6. limits given later ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cgroup", "poll"])
def test_limits_set_after_the_start_kill_a_memory_hog(kind):
    enforcement = enforcement_of(kind)
    go_read, go_write = os.pipe()
    recorder = Recorder()

    def waits_then_hogs() -> int:
        if not wait_readable(go_read, 20):  # runs only once the supervisor has its limits
            return 7
        return hog()

    try:
        with closing(Supervisor(enforcement)) as supervisor:
            child = supervisor.start(waits_then_hogs, on_event=recorder, limits_later=True, close=[go_write])
            for _ in range(2):  # the child runs unlimited meanwhile
                supervisor.poll(0.1)
            assert child.exit is None
            child.set_limits(Resources(mem="50MiB", cpu=1))
            os.write(go_write, b"!")
            started = time.monotonic()
            drive(supervisor, [child])
            assert time.monotonic() - started < 10
    finally:
        close_all(go_read, go_write)
    assert recorder.exit == Exit(code=None, signal="SIGKILL", reason=MEMORY_REASON) == child.exit
    if kind == "cgroup":
        group = recorder.output(1).decode().strip()
        assert os.path.dirname(group) == enforcement.memory_dir and "/deploy-" in group
        assert not os.path.exists(group)


# --- 7. cgroup reuse ---------------------------------------------------------------------------


def print_cgroup(code: int = 0) -> Callable[[], int]:
    def run() -> int:
        print(own_memory_cgroup())
        if code < 0:
            os.kill(os.getpid(), -code)
        return code

    return run


def start_limited(supervisor: Supervisor, target: Callable[[], int], recorder: Recorder, how: str) -> Child:
    """Start ``target`` under 50 MiB: from the start, or given later (``target`` then waits for it)."""
    if how == "resources":
        return supervisor.start(target, on_event=recorder, resources=Resources(mem="50MiB", cpu=1))
    go_read, go_write = os.pipe()

    def waits() -> int:
        os.close(go_write)
        return target() if wait_readable(go_read) else 7

    try:
        child = supervisor.start(waits, on_event=recorder, limits_later=True)
        if how == "limits_later":
            child.set_limits(Resources(mem="50MiB", cpu=1))
        else:
            assert how == "never_limited"  # joined a cgroup of its own, never given limits
        os.write(go_write, b"!")
    finally:
        close_all(go_read, go_write)
    return child


# A group that had a limit is reusable too: on cgroup v1 with swap accounting, lifting the memory
# limit must lift memory+swap's first (the kernel refuses a memory limit above it).
@pytest.mark.parametrize("how", ["resources", "limits_later", "never_limited"])
def test_the_next_child_reuses_the_cgroup_and_close_removes_it(how):
    enforcement = enforcement_of("cgroup")
    first, second = Recorder(), Recorder()
    with closing(Supervisor(enforcement)) as supervisor:
        one = start_limited(supervisor, print_cgroup(), first, how)
        drive(supervisor, [one])
        two = start_limited(supervisor, print_cgroup(), second, how)
        drive(supervisor, [two])
        group = first.output(1).decode().strip()
        assert os.path.dirname(group) == enforcement.memory_dir and "/deploy-" in group
        assert first.exit == second.exit == Exit(code=0, signal=None, reason=None)
        assert second.output(1).decode().strip() == group, "the second child got a new cgroup"
        assert os.path.isdir(group), "the pool should keep the empty group"
    assert not os.path.exists(group), "close() left the pooled cgroup behind"


@pytest.mark.parametrize("how", ["resources", "limits_later"])
def test_a_reused_cgroup_forgets_the_oom_kill_of_its_previous_child(how):
    enforcement = enforcement_of("cgroup")
    hogged, killed_itself, normal = Recorder(), Recorder(), Recorder()
    with closing(Supervisor(enforcement)) as supervisor:
        one = start_limited(supervisor, hog, hogged, how)
        drive(supervisor, [one])
        assert hogged.exit == Exit(code=None, signal="SIGKILL", reason=MEMORY_REASON)
        group = hogged.output(1).decode().strip()
        # A SIGKILL that is not the OOM killer's: the old OOM count must not be taken for one.
        two = start_limited(supervisor, print_cgroup(-signal.SIGKILL), killed_itself, how)
        drive(supervisor, [two])
        three = start_limited(supervisor, print_cgroup(), normal, how)
        drive(supervisor, [three])
        assert killed_itself.output(1).decode().strip() == group, "the second child got a new cgroup"
        assert normal.output(1).decode().strip() == group, "the third child got a new cgroup"
    assert killed_itself.exit == Exit(code=None, signal="SIGKILL", reason=None)
    assert normal.exit == Exit(code=0, signal=None, reason=None)
    assert not os.path.exists(group)


def memory_charge() -> int:
    """Bytes charged to the calling process's memory cgroup."""
    name = "memory.usage_in_bytes" if detect_enforcement().kind == "cgroup1" else "memory.current"
    with open(os.path.join(own_memory_cgroup(), name)) as file:
        return int(file.read())


# A file in /dev/shm (tmpfs) stays charged to the group that wrote it for as long as the file
# exists, long after its writer exited: a group that still holds such a charge must not be
# handed to the next process, which would start with it counted against its own limit.
def test_a_reused_cgroup_does_not_carry_the_shared_memory_of_its_previous_child():
    enforcement = enforcement_of("cgroup")
    path = f"/dev/shm/deploy-test-{os.getpid()}-{time.monotonic_ns()}"
    writer, user = Recorder(), Recorder()

    def writes_shm() -> int:
        with open(path, "wb") as file:
            for _ in range(80):
                file.write(b"x" * MiB)
        return 0

    def uses_40_mib() -> int:
        print(memory_charge())
        hoard = b"y" * (40 * MiB)
        return len(hoard) // MiB - 40

    try:
        with closing(Supervisor(enforcement)) as supervisor:
            limits = Resources(mem="100MiB", cpu=1)
            one = supervisor.start(writes_shm, on_event=writer, resources=limits)
            drive(supervisor, [one])
            assert writer.exit == Exit(code=0, signal=None, reason=None)
            two = supervisor.start(uses_40_mib, on_event=user, resources=limits)
            drive(supervisor, [two])
    finally:
        if os.path.exists(path):
            os.unlink(path)
    assert user.exit == Exit(code=0, signal=None, reason=None)
    assert int(user.output(1)) < 10 * MiB, "the second child started with its predecessor's charge"


# The child is inside its group by then: lifting the limits must not remove the group (which
# would kill what is inside).
@pytest.mark.parametrize("kind", ["cgroup", "poll"])
def test_no_limits_given_later_lets_the_child_run_on(kind):
    enforcement = enforcement_of(kind)
    go_read, go_write = os.pipe()
    recorder = Recorder()

    def waits() -> int:
        if not wait_readable(go_read):
            return 7
        hoard = b"x" * (80 * MiB)  # no limit: fine
        print("survived", len(hoard) // MiB)
        return 0

    try:
        with closing(Supervisor(enforcement)) as supervisor:
            child = supervisor.start(waits, on_event=recorder, limits_later=True, close=[go_write])
            supervisor.poll(0.2)  # the child has joined its cgroup by now
            child.set_limits(None)
            os.write(go_write, b"!")
            drive(supervisor, [child])
    finally:
        close_all(go_read, go_write)
    assert recorder.exit == Exit(code=0, signal=None, reason=None)
    assert recorder.output(1) == b"survived 80\n"


# --- 8. close ----------------------------------------------------------------------------------


def test_close_kills_and_reaps_running_children_without_reporting():
    fds_before = set(os.listdir("/proc/self/fd"))
    supervisor = Supervisor()
    recorders = [Recorder() for _ in range(3)]

    def sleeper() -> int:
        print("ready")
        time.sleep(30)
        return 0

    def parent_of_a_sleeper() -> int:
        grandchild = os.fork()
        if grandchild == 0:
            try:
                time.sleep(30)
            finally:
                os._exit(0)
        print("ready", grandchild)
        time.sleep(30)
        return 0

    try:
        children = [supervisor.start(sleeper, on_event=recorders[n]) for n in range(2)]
        children.append(supervisor.start(parent_of_a_sleeper, on_event=recorders[2]))
        poll_until(supervisor, lambda: all(r.output(1).startswith(b"ready") for r in recorders))
        grandchild = int(recorders[2].output(1).split()[1])
        seen = [list(r.events) for r in recorders]
        started = time.monotonic()
    finally:
        supervisor.close()
    assert time.monotonic() - started < 5
    assert [r.events for r in recorders] == seen, "close() reported events"
    assert all(c.exit is None for c in children)
    assert supervisor.children == []
    for child in children:
        with pytest.raises(psutil.NoSuchProcess):  # reaped, not a zombie
            psutil.Process(child.pid)
    assert psutil.Process().children(recursive=True) == []
    assert wait_gone(grandchild), f"grandchild {grandchild} outlived close()"
    assert set(os.listdir("/proc/self/fd")) == fds_before, "close() left descriptors open"


# A monitor out of descriptors: the limits (a cgroup) are made before the pipes, and must go
# when the pipes cannot be made, as must a pipe made before the other failed.
@pytest.mark.parametrize("free", [1, 3])
def test_a_start_that_runs_out_of_descriptors_leaves_no_cgroup_and_no_descriptor(free):
    enforcement = enforcement_of("cgroup")
    parents = [d for d in dict.fromkeys((enforcement.memory_dir, enforcement.cpu_dir)) if d is not None]

    def ours() -> set[str]:
        prefix = f"deploy-{os.getpid()}-"
        return {name for parent in parents for name in os.listdir(parent) if name.startswith(prefix)}

    def out_of_descriptors() -> tuple[str, set[str], list[str], list[str]]:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        filler = []
        try:
            while True:
                filler.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass
        for fd in filler[-free:]:  # room for the cgroup's files, not for both pipes
            os.close(fd)
        del filler[-free:]
        fds_before = sorted(os.listdir("/proc/self/fd"))
        with closing(Supervisor(enforcement)) as supervisor:
            try:
                supervisor.start(lambda: 0, on_event=Recorder(), resources=Resources(mem="50MiB", cpu=1))
                error = "started"
            except OSError as exc:
                error = os.strerror(exc.errno or 0)
        fds_after = sorted(os.listdir("/proc/self/fd"))
        return error, ours(), fds_before, fds_after

    # (Its empty group may wait in the pool for the next start; close() removes the pool.)
    error, left, fds_before, fds_after = in_fork(out_of_descriptors)
    assert error == os.strerror(errno.EMFILE)
    assert left == set(), f"cgroups left behind by the failed start: {left}"
    assert fds_after == fds_before, "the failed start left descriptors open"


# --- 9. without pidfds -------------------------------------------------------------------------


def test_without_pidfds_children_are_still_reaped_and_reported(monkeypatch, supervisor):
    """Each child leaves a grandchild holding its pipes: no EOF wakes the loop, only the
    REAP_TICK waitpid can notice the exits (poll() is called without a timeout)."""
    monkeypatch.setattr(supervisor_module, "_USE_PIDFD", False)
    count = 5

    def target(n: int) -> Callable[[], int]:
        def run() -> int:
            grandchild = os.fork()
            if grandchild == 0:
                try:
                    time.sleep(20)  # holds fds 1 and 2
                finally:
                    os._exit(0)
            print(f"child {n} grandchild {grandchild}")
            time.sleep(0.05 * n)
            return 30 + n

        return run

    recorders = [Recorder() for _ in range(count)]
    grandchildren: list[int] = []
    started = time.monotonic()
    try:
        children = [supervisor.start(target(n), on_event=recorders[n]) for n in range(count)]
        assert all(c.pidfd is None for c in children)
        while any(c.exit is None for c in children):
            supervisor.poll()
        elapsed = time.monotonic() - started
    finally:
        for recorder in recorders:
            words = recorder.output(1).split()
            if len(words) == 4:
                grandchildren.append(int(words[3]))
                os.kill(int(words[3]), signal.SIGKILL)
    assert elapsed < 5, "exits were noticed only when the grandchildren let go of the pipes"
    for n, (child, recorder) in enumerate(zip(children, recorders, strict=True)):
        assert recorder.exit == Exit(code=30 + n, signal=None, reason=None) == child.exit
        assert recorder.output(1).startswith(f"child {n} grandchild ".encode())
    assert len(grandchildren) == count
    assert all(wait_gone(pid) for pid in grandchildren)


# --- 10. a child's own subprocesses --------------------------------------------------------------


def leaves_subprocesses(marker_dir: str) -> int:
    """Start a plain subprocess and a setsid daemon (double fork), wait until both have said
    they are up and written 100 KB each, print their pids and return, leaving them running."""
    import subprocess
    import sys

    say = "import os, sys, time; sys.stdout.write({name!r} + ' up ' + 'x' * 100000 + '\\n'); sys.stdout.flush(); open({path!r}, 'w').close(); time.sleep(60)"
    plain = subprocess.Popen([sys.executable, "-c", say.format(name="plain", path=os.path.join(marker_dir, "plain"))])
    read_end, write_end = os.pipe()
    if os.fork() == 0:  # the daemon's parent: setsid, fork the daemon, tell its pid, exit
        try:
            os.setsid()
            daemon = subprocess.Popen(
                [sys.executable, "-c", say.format(name="daemon", path=os.path.join(marker_dir, "daemon"))]
            )
            os.write(write_end, b"%d" % daemon.pid)
        finally:
            os._exit(0)
    os.close(write_end)
    daemon = int(os.read(read_end, 64))
    deadline = time.monotonic() + 20
    while not all(os.path.exists(os.path.join(marker_dir, name)) for name in ("plain", "daemon")):
        if time.monotonic() > deadline:
            return 3
        time.sleep(0.02)
    print("pids", plain.pid, daemon)
    return 0


def kill_leftovers(marker_dir: object) -> list[int]:
    """SIGKILL what `leaves_subprocesses` started there and is still running (a failed test)."""
    killed = []
    for process in psutil.process_iter(["cmdline"]):
        if any(str(marker_dir) in part for part in process.info["cmdline"] or ()):
            try:
                process.kill()
                killed.append(process.pid)
            except psutil.NoSuchProcess:
                pass
    return killed


# DESIGN §2: a process's subprocesses belong to it; they are killed when it exits, after their
# output is drained, whatever the enforcement (polling too, where nothing but the subreaper
# finds a setsid daemon whose parent exited).
@pytest.mark.parametrize("kind", ["cgroup", "poll"])
def test_a_childs_subprocesses_are_killed_when_it_exits_after_their_output(kind, tmp_path):
    enforcement = enforcement_of(kind)

    def monitor() -> tuple[Exit, bytes, list[int]]:
        recorder = Recorder()
        with closing(Supervisor(enforcement, subreaper=True)) as supervisor:
            child = supervisor.start(
                lambda: leaves_subprocesses(str(tmp_path)), on_event=recorder, resources=Resources(mem="200MiB", cpu=1)
            )
            drive(supervisor, [child], timeout=30)
            pids = [int(word) for word in recorder.output(1).split(b"pids ")[-1].split()]
            alive = [pid for pid in pids if not wait_gone(pid)]  # (SIGKILLed: dead a moment later)
            return recorder.exit, recorder.output(1), alive

    try:
        exit, output, alive = in_fork(monitor, timeout=60)
    finally:
        left = kill_leftovers(tmp_path)
    assert left == []
    assert exit == Exit(code=0, signal=None, reason=None)
    assert alive == [], f"subprocesses outlived their parent's exit: {alive}"
    # (Both write 100 KB at once to the same pipe: their bytes may interleave, none is lost.)
    assert b"plain up " in output and b"daemon up " in output
    assert output.count(b"x") == 200000, "the subprocesses' output was lost"


def test_subprocesses_of_a_killed_child_are_killed_and_reaped_too(tmp_path):
    enforcement = enforcement_of("poll")

    def killed() -> int:
        leaves_subprocesses(str(tmp_path))
        os.kill(os.getpid(), signal.SIGKILL)
        return 0

    def monitor() -> tuple[Exit, list[int], list[int]]:
        recorder = Recorder()
        with closing(Supervisor(enforcement, subreaper=True)) as supervisor:
            child = supervisor.start(killed, on_event=recorder, resources=Resources(mem="200MiB", cpu=1))
            drive(supervisor, [child], timeout=30)
            pids = [int(word) for word in recorder.output(1).split(b"pids ")[-1].split()]
            poll_until(supervisor, lambda: all(wait_gone(pid, timeout=0) for pid in pids), what="orphans killed")
            poll_until(supervisor, lambda: not psutil.Process().children(), what="orphans reaped")
            return recorder.exit, pids, [p.pid for p in psutil.Process().children()]

    try:
        exit, pids, zombies = in_fork(monitor, timeout=60)
    finally:
        left = kill_leftovers(tmp_path)
    assert left == []
    assert exit == Exit(code=None, signal="SIGKILL", reason=None)
    assert len(pids) == 2 and zombies == []
