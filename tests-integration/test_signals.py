"""Ctrl-C and resource enforcement: nothing of the run survives."""

import json
import signal
import time

import psutil
import pytest
from conftest import assert_no_survivors, run, start, survivors

pytestmark = pytest.mark.timeout(90)


def test_ctrl_c_kills_every_process(script):
    job = script(
        """
        import time, deploy

        def sleeper(parent, depth):
            if depth < 2:
                deploy.spawn(sleeper, depth + 1)
            print("sleeping", flush=True)
            time.sleep(60)

        if __name__ == "__main__":
            deploy.init()
            for _ in range(3):
                deploy.spawn(sleeper, 0)
            time.sleep(60)
        """
    )
    process, tag = start(job, fmt="human")
    deadline = time.monotonic() + 20
    while len(survivors(tag)) < 1 + 1 + 10 and time.monotonic() < deadline:
        time.sleep(0.1)  # the bridge, the zygote (every process's monitor) and 10 processes
    assert len(survivors(tag)) >= 12
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=15)
    assert process.returncode == 128 + signal.SIGINT
    assert_no_survivors(tag, wait=3)
    assert stderr.decode().count("killed: SIGKILL") == 10


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
    job = script(
        """
        import time, deploy

        def sleeper(parent, _):
            print("sleeping", flush=True)
            time.sleep(60)

        if __name__ == "__main__":
            deploy.init()
            for _ in range(3):
                deploy.spawn(sleeper, None)
            time.sleep(60)
        """
    )
    process, tag = start(job, fmt="json")
    bridge = psutil.Process(process.pid)
    deadline = time.monotonic() + 20
    while sum(1 for p in survivors(tag) if p.ppid() != process.pid) < 4 and time.monotonic() < deadline:
        time.sleep(0.1)  # the top process and three sleepers, under the zygote
    (zygote,) = bridge.children()
    zygote.kill()
    stdout, _ = process.communicate(timeout=15)
    events = [json.loads(line) for line in stdout.decode().splitlines()]
    exits = [event for event in events if event["event"] == "exit"]
    assert len(exits) == 4
    assert all(event["signal"] == "SIGKILL" and event["reason"] == "its monitor died" for event in exits)
    assert process.returncode == 128 + signal.SIGKILL
    assert_no_survivors(tag, wait=3)


def test_nothing_outlives_a_killed_bridge(script):
    job = script(
        """
        import time, deploy

        def sleeper(parent, depth):
            if depth < 1:
                deploy.spawn(sleeper, depth + 1)
            print("sleeping", flush=True)
            time.sleep(60)

        if __name__ == "__main__":
            deploy.init()
            for _ in range(3):
                deploy.spawn(sleeper, 0)
            time.sleep(60)
        """
    )
    process, tag = start(job, fmt="json")
    deadline = time.monotonic() + 20
    while len(survivors(tag)) < 1 + 1 + 7 and time.monotonic() < deadline:
        time.sleep(0.1)  # the bridge, the zygote, the top process and six sleepers
    assert len(survivors(tag)) >= 9
    process.kill()
    process.communicate(timeout=10)
    assert_no_survivors(tag, wait=3)
