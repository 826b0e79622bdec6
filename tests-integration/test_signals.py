"""Ctrl-C and resource enforcement: nothing of the run survives."""

import json
import signal
import subprocess
import time

import psutil
import pytest
from conftest import assert_no_survivors, run, start

pytestmark = pytest.mark.timeout(90)


# The top process and three trees of sleepers, DEPTH levels below each of its children;
# each process leaves a file in up/ once it runs.
SLEEPERS = """
import os, sys, time, deploy

def up():
    os.makedirs("up", exist_ok=True)
    open(os.path.join("up", str(os.getpid())), "w").close()

def sleeper(parent, depth):
    if depth < int(sys.argv[1]):
        deploy.spawn(sleeper, depth + 1)
    up()
    print("sleeping", flush=True)
    time.sleep(60)

if __name__ == "__main__":
    deploy.init()
    for _ in range(3):
        deploy.spawn(sleeper, 0)
    up()
    time.sleep(60)
"""


def start_sleepers(script, depth: int, fmt: str) -> tuple[subprocess.Popen, str, int]:
    """Start the run and wait until all its processes run; returns it, its tag and how many."""
    job = script(SLEEPERS)
    processes = 1 + 3 * (depth + 1)
    process, tag = start(job, str(depth), fmt=fmt)
    up = job.parent / "up"
    deadline = time.monotonic() + 20
    while not (up.is_dir() and len(list(up.iterdir())) >= processes):
        assert time.monotonic() < deadline, f"not all {processes} processes started"
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    return process, tag, processes


def test_ctrl_c_kills_every_process(script):
    process, tag, processes = start_sleepers(script, 2, "human")
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=15)
    assert process.returncode == 128 + signal.SIGINT
    assert_no_survivors(tag, wait=3)
    assert stderr.decode().count("killed: SIGKILL") == processes == 10


def test_a_memory_hog_is_killed_and_says_why(script):
    job = script(
        """
        import time, deploy

        def hog(parent, _):
            blocks = []
            while True:
                blocks.append(bytearray(8 * 2**20))
                time.sleep(0.01)

        def modest(parent, _):
            print("small and fine")

        if __name__ == "__main__":
            deploy.init()
            deploy.spawn(hog, None, deploy.Resources(mem="50MiB"))
            deploy.spawn(modest, None, deploy.Resources(mem="20MiB"))
        """
    )
    result = run(job)
    result.check_tree()
    hog, modest = result.children(result.top)
    exits = result.exits()
    assert exits[hog]["signal"] == "SIGKILL"
    assert exits[hog]["reason"] == "memory limit 50MiB exceeded"
    assert exits[modest]["code"] == 0
    assert result.code == 128 + signal.SIGKILL


def test_when_the_monitor_dies_every_process_dies_and_says_so(script):
    process, tag, processes = start_sleepers(script, 0, "json")
    bridge = psutil.Process(process.pid)
    (zygote,) = bridge.children()
    zygote.kill()
    stdout, _ = process.communicate(timeout=15)
    events = [json.loads(line) for line in stdout.decode().splitlines()]
    exits = [event for event in events if event["event"] == "exit"]
    assert len(exits) == processes == 4
    assert all(event["signal"] == "SIGKILL" and event["reason"] == "its monitor died" for event in exits)
    assert process.returncode == 128 + signal.SIGKILL
    assert_no_survivors(tag, wait=3)


def test_nothing_outlives_a_killed_bridge(script):
    process, tag, _ = start_sleepers(script, 1, "json")
    process.kill()
    process.communicate(timeout=10)
    assert_no_survivors(tag, wait=3)


# A process's subprocesses belong to it (DESIGN §2): killed when it exits, after their output,
# and never outliving the run, with either enforcement, setsid daemons included.
SUBPROCESSES = """
import os, subprocess, sys, time, deploy

if sys.argv[1] == "poll":  # this host's cgroups aside: the polling enforcement
    import deploy_monitor._cgroups as cgroups
    cgroups._detected = cgroups.Enforcement("poll")

SAY = "import os, sys, time; os.write(1, sys.argv[1].encode() + b' up' + bytes([10])); open(sys.argv[1], 'w').close(); time.sleep(60)"

def leaves_subprocesses(parent, then):
    os.makedirs("up", exist_ok=True)
    plain = subprocess.Popen([sys.executable, "-c", SAY, os.path.join("up", "plain")])
    if os.fork() == 0:  # the daemon's parent: setsid, start it, exit
        os.setsid()
        subprocess.Popen([sys.executable, "-c", SAY, os.path.join("up", "daemon")])
        os._exit(0)
    deadline = time.monotonic() + 20
    while not all(os.path.exists(os.path.join("up", name)) for name in ("plain", "daemon")):
        assert time.monotonic() < deadline, "the subprocesses did not start"
        time.sleep(0.02)
    if then == "sleep":
        time.sleep(60)

if __name__ == "__main__":
    deploy.init()
    deploy.spawn(leaves_subprocesses, sys.argv[2])
"""


@pytest.mark.parametrize("kind", ["cgroup", "poll"])
def test_a_process_subprocesses_end_with_it_after_their_output(script, kind):
    result = run(script(SUBPROCESSES), kind, "return")  # (run() fails if anything of the run is left)
    result.check_tree()
    child = result.children(result.top)[0]
    assert sorted(result.output(child).decode().splitlines()) == ["up/daemon up", "up/plain up"]
    assert result.exits()[child]["code"] == 0 and result.code == 0


@pytest.mark.parametrize("kind", ["cgroup", "poll"])
def test_subprocesses_do_not_outlive_a_killed_monitor(script, kind):
    job = script(SUBPROCESSES)
    process, tag = start(job, kind, "sleep")
    up = job.parent / "up"
    deadline = time.monotonic() + 20
    while not ((up / "plain").exists() and (up / "daemon").exists()):
        assert time.monotonic() < deadline, "the subprocesses did not start"
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    (zygote,) = psutil.Process(process.pid).children()
    zygote.kill()
    process.communicate(timeout=15)
    assert process.returncode == 128 + signal.SIGKILL
    assert_no_survivors(tag, wait=3)
