"""What the run says about how a process ended: the PeerExited its peers get, and the exit
reasons of DESIGN §5 (interrupted, a memory limit, a monitor that died), alike in the human
and the JSON output."""

from __future__ import annotations

import json
import signal
import subprocess
import time

import pytest
from conftest import assert_no_survivors, run, start, write_script

pytestmark = pytest.mark.timeout(90)

PEERS = """
import os, signal, sys, time
import deploy

def fails(parent, _):
    raise RuntimeError("boom")

def exits_3(parent, _):
    sys.exit(3)

def kills_itself(parent, _):
    os.kill(os.getpid(), signal.SIGKILL)

def hog(parent, _):
    blocks = []
    while True:
        blocks.append(bytearray(8 * 2**20))
        time.sleep(0.01)

if __name__ == "__main__":
    deploy.init()
    for fn, mem in [(fails, "100MiB"), (exits_3, "100MiB"), (kills_itself, "100MiB"), (hog, "50MiB")]:
        pid = deploy.spawn(fn, None, deploy.Resources(mem=mem))
        rx = deploy.Receiver[int](pid)
        try:
            rx.recv()
        except deploy.PeerExited as error:
            print(f"{error} | {error.code} {error.signal} {error.reason}", flush=True)
        try:
            deploy.Sender[int](pid).send(1)
        except deploy.PeerExited as error:
            print(f"send: {error}", flush=True)
"""


def test_peer_exited_says_the_exit_code_or_signal_and_why(tmp_path):
    job = write_script(tmp_path, PEERS)
    result = run(job)
    result.check_tree()
    fails, exits_3, kills_itself, hog = result.children(result.top)
    short = {pid: pid[:7] for pid in (fails, exits_3, kills_itself, hog)}
    assert result.output(result.top).decode().splitlines() == [
        f"peer {short[fails]} has exited with code 1 | 1 None None",
        f"send: peer {short[fails]} has exited with code 1",
        f"peer {short[exits_3]} has exited with code 3 | 3 None None",
        f"send: peer {short[exits_3]} has exited with code 3",
        f"peer {short[kills_itself]} was killed by SIGKILL | None SIGKILL None",
        f"send: peer {short[kills_itself]} was killed by SIGKILL",
        f"peer {short[hog]} was killed by SIGKILL (memory limit 50MiB exceeded) | None SIGKILL memory limit 50MiB exceeded",
        f"send: peer {short[hog]} was killed by SIGKILL (memory limit 50MiB exceeded)",
    ]
    exits = result.exits()
    assert exits[hog]["signal"] == "SIGKILL" and exits[hog]["reason"] == "memory limit 50MiB exceeded"

    human = run(job, fmt="human")
    assert human.stderr.count("   killed: SIGKILL (memory limit 50MiB exceeded)\n") == 1
    assert human.stderr.count("   exited: 1\n") == 1 and human.stderr.count("   exited: 3\n") == 1


SLEEPERS = """
import os, time, deploy

def sleeper(parent, _):
    open(os.path.join("up", str(os.getpid())), "w").close()
    time.sleep(60)

if __name__ == "__main__":
    os.makedirs("up")
    deploy.init()
    for _ in range(3):
        deploy.spawn(sleeper, None)
    open(os.path.join("up", str(os.getpid())), "w").close()
    time.sleep(60)
"""


def _interrupted_run(tmp_path, fmt: str) -> tuple[int, str, str]:
    job = write_script(tmp_path, SLEEPERS)
    process, tag = start(job, fmt=fmt)
    up = tmp_path / "up"
    deadline = time.monotonic() + 20
    while not (up.is_dir() and len(list(up.iterdir())) >= 4):
        assert time.monotonic() < deadline, "not all 4 processes started"
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    try:
        stdout, stderr = process.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    finally:
        assert_no_survivors(tag, wait=3)
    return process.returncode, stdout.decode(), stderr.decode()


@pytest.mark.parametrize("fmt", ["human", "json"])
def test_an_interrupted_run_says_interrupted(tmp_path, fmt):
    code, stdout, stderr = _interrupted_run(tmp_path, fmt)
    assert code == 128 + signal.SIGINT
    if fmt == "human":
        assert stderr.count("   killed: SIGKILL (interrupted)\n") == 4, stderr
        assert "monitor died" not in stderr
    else:
        exits = [event for event in map(json.loads, stdout.splitlines()) if event["event"] == "exit"]
        assert len(exits) == 4
        assert all((event["signal"], event["reason"]) == ("SIGKILL", "interrupted") for event in exits), exits
