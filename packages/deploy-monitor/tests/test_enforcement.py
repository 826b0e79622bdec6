"""Resource enforcement with real processes: cgroups where the host allows, and polling."""

from __future__ import annotations

import os
import time

import deploy_monitor._limits as limits_module
import psutil
import pytest
from conftest import MiB, Recorder, enforcement_of, hog, in_fork, own_memory_cgroup, wait_gone
from deploy_core import Resources
from deploy_monitor import Enforcement, Exit, run_monitored

pytestmark = pytest.mark.timeout(90)


@pytest.mark.parametrize("kind", ["cgroup", "poll"])
def test_memory_hog_is_killed_with_the_reason(kind):
    recorder = Recorder()
    started = time.monotonic()
    exit = run_monitored(
        hog, resources=Resources(mem="50MiB", cpu=2), on_event=recorder, enforcement=enforcement_of(kind)
    )
    assert exit == Exit(code=None, signal="SIGKILL", reason="memory limit 50MiB exceeded") == recorder.exit
    assert time.monotonic() - started < 10
    if kind == "cgroup":
        group = recorder.output(1).decode().strip()
        assert "/deploy-" in group and not os.path.exists(group), "the cgroup was not removed"


def small_child_of_a_big_parent(enforcement: Enforcement) -> tuple[Exit, bytes]:
    ballast = b"x" * (200 * MiB)  # touched: really resident in the (monitor) parent
    recorder = Recorder()

    def target() -> int:
        assert len(ballast) == 200 * MiB
        for tick in range(5):  # lives through several polls
            print(f"tick {tick}")
            time.sleep(0.1)
        print("rss", psutil.Process().memory_info().rss)
        return 0

    exit = run_monitored(target, resources=Resources(mem="50MiB", cpu=1), on_event=recorder, enforcement=enforcement)
    return exit, recorder.output(1)


@pytest.mark.parametrize("kind", ["cgroup", "poll"])
def test_small_child_forked_from_a_big_parent_is_not_killed(kind):
    enforcement = enforcement_of(kind)
    exit, output = in_fork(lambda: small_child_of_a_big_parent(enforcement))
    assert exit == Exit(code=0, signal=None, reason=None)
    lines = output.decode().splitlines()
    assert lines[:5] == [f"tick {n}" for n in range(5)]
    rss = int(lines[5].split()[1])
    assert rss > 200 * MiB, "the child should map its parent's ballast (shared, not owned)"


def test_cgroup_is_removed_and_the_child_was_in_it():
    enforcement = enforcement_of("cgroup")
    recorder = Recorder()

    def target() -> int:
        print(own_memory_cgroup())
        return 0

    assert (
        run_monitored(target, resources=Resources(mem="64MiB", cpu=1), on_event=recorder, enforcement=enforcement).code
        == 0
    )
    group = recorder.output(1).decode().strip()
    assert os.path.dirname(group) == enforcement.memory_dir and os.path.basename(group).startswith(
        f"deploy-{os.getpid()}-"
    )
    assert not os.path.exists(group)


def test_cgroup_limits_are_written():
    enforcement = enforcement_of("cgroup")
    recorder = Recorder()

    def target() -> int:
        group = own_memory_cgroup()
        name = "memory.max" if enforcement.kind == "cgroup2" else "memory.limit_in_bytes"
        print(open(os.path.join(group, name)).read().strip())
        if enforcement.cpu_dir is not None and enforcement.kind == "cgroup1":
            cpu_group = os.path.join(enforcement.cpu_dir, os.path.basename(group))
            print(open(os.path.join(cpu_group, "cpu.shares")).read().strip())
        elif enforcement.cpu_dir is not None:
            print(open(os.path.join(group, "cpu.weight")).read().strip())
        return 0

    run_monitored(target, resources=Resources(mem="64MiB", cpu=0.25), on_event=recorder, enforcement=enforcement)
    lines = recorder.output(1).decode().split()
    assert lines[0] == str(64 * MiB)
    if enforcement.cpu_dir is not None:
        # 0.25 of a core's default weight (1024 shares on v1, weight 100 on v2)
        assert lines[1] == ("256" if enforcement.kind == "cgroup1" else "25")


def test_a_small_cpu_share_is_a_weight_not_a_cap():
    """An idle core is not held back from a process that asked for 0.05 cores."""
    enforcement = enforcement_of("cgroup")
    recorder = Recorder()

    def spin() -> int:
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            pass
        print(time.process_time())
        return 0

    run_monitored(spin, resources=Resources(mem="64MiB", cpu=0.05), on_event=recorder, enforcement=enforcement)
    assert float(recorder.output(1)) > 0.2  # a 5% quota would have allowed about 0.03 s


def test_unusable_cgroup_dir_falls_back_to_polling():
    broken = Enforcement("cgroup1", memory_dir="/nonexistent/deploy-test", cpu_dir=None)
    recorder = Recorder()
    exit = run_monitored(hog, resources=Resources(mem="50MiB", cpu=1), on_event=recorder, enforcement=broken)
    assert exit == Exit(code=None, signal="SIGKILL", reason="memory limit 50MiB exceeded")


def test_polling_counts_descendants(monkeypatch):
    monkeypatch.setattr(limits_module, "POLL_INTERVAL", 0.1)
    recorder = Recorder()

    def parent_of_a_hog() -> int:
        if os.fork() == 0:
            try:
                hog()
            finally:
                os._exit(0)
        time.sleep(30)
        return 0

    started = time.monotonic()
    exit = run_monitored(
        parent_of_a_hog, resources=Resources(mem="50MiB", cpu=1), on_event=recorder, enforcement=Enforcement("poll")
    )
    assert exit == Exit(code=None, signal="SIGKILL", reason="memory limit 50MiB exceeded")
    assert time.monotonic() - started < 10


def test_no_resources_means_no_enforcement():
    recorder = Recorder()

    def target() -> int:
        hoard = b"x" * (80 * MiB)
        return len(hoard) // MiB - 80

    assert run_monitored(target, resources=None, on_event=recorder).code == 0


def test_processes_left_in_the_cgroup_are_killed_when_the_child_exits():
    enforcement = enforcement_of("cgroup")
    recorder = Recorder()

    def target() -> int:
        if os.fork() == 0:
            try:
                os.setsid()  # a daemon: escapes the process tree, not the cgroup
                time.sleep(30)
            finally:
                os._exit(0)
        print(own_memory_cgroup())
        print(open(os.path.join(own_memory_cgroup(), "cgroup.procs")).read().split()[-1])
        return 0

    assert (
        run_monitored(target, resources=Resources(mem="64MiB", cpu=1), on_event=recorder, enforcement=enforcement).code
        == 0
    )
    group, daemon = recorder.output(1).decode().split()
    assert wait_gone(int(daemon))
    assert not os.path.exists(group)


def test_stale_cgroups_of_dead_monitors_are_swept():
    enforcement = enforcement_of("cgroup")
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    assert enforcement.memory_dir is not None
    stale = [os.path.join(d, f"deploy-{dead}-0badf00d") for d in {enforcement.memory_dir, enforcement.cpu_dir} if d]
    alive = os.path.join(enforcement.memory_dir, f"deploy-{os.getpid()}-0badf00d")
    for directory in [*stale, alive]:
        os.mkdir(directory)
    try:
        assert (
            run_monitored(
                lambda: 0, resources=Resources(mem="64MiB", cpu=1), on_event=Recorder(), enforcement=enforcement
            ).code
            == 0
        )
        assert [d for d in stale if os.path.exists(d)] == []
        assert os.path.exists(alive)  # our own pid: a live monitor's group is left alone
    finally:
        for directory in [*stale, alive]:
            if os.path.exists(directory):
                os.rmdir(directory)


@pytest.mark.parametrize("kind", ["cgroup", "poll"])
def test_limits_known_only_after_the_fork_still_apply(kind):
    """A child forked ahead of need is put under the limits the monitor learns later."""
    recorder = Recorder()
    read_end, write_end = os.pipe()

    def waits_then_hogs() -> int:
        os.close(write_end)
        assert os.read(read_end, 1) == b"!"  # runs only once the monitor has its limits
        return hog()

    def limits_arrive() -> Resources:
        time.sleep(0.2)  # the child is already running meanwhile
        return Resources(mem="50MiB", cpu=1)

    def go(pid: int) -> None:
        os.close(read_end)
        os.write(write_end, b"!")
        os.close(write_end)

    exit = run_monitored(
        waits_then_hogs, resources=limits_arrive, on_event=recorder, on_start=go, enforcement=enforcement_of(kind)
    )
    assert exit == Exit(code=None, signal="SIGKILL", reason="memory limit 50MiB exceeded")


def test_a_failing_limits_call_kills_the_waiting_child():
    started = []

    def never_told() -> int:
        time.sleep(30)
        return 0

    def no_job() -> Resources:
        raise EOFError("no job for this spare")

    with pytest.raises(EOFError):
        run_monitored(never_told, resources=no_job, on_event=Recorder(), on_start=started.append)
    assert started == []
    assert psutil.Process().children() == []
