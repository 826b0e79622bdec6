"""Runs on one real cluster (a master and two workers of different sizes on loopback),
shared by the tests of this module; each test checks that its run left nothing behind,
and the cluster's teardown that nothing of the cluster survives it.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from cluster import DEPLOY, HOLDER_MEM, assert_gone, free_port, project, running, wait_until
from conftest import TAG, run, survivors

pytestmark = pytest.mark.timeout(120)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory):
    with running(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


@pytest.fixture
def cluster(shared_cluster):
    """The module's cluster; a push that a failed test left running is ended, not inherited."""
    yield shared_cluster
    shared_cluster.end_pushes()


@pytest.fixture
def job(tmp_path):
    return lambda source, **files: project(tmp_path / "job", source, **files)


def normalised(result) -> list:
    """The run's tree with pids replaced by their order of appearance: comparable across runs."""
    names: dict[str, str] = {}

    def name(pid):
        return None if pid is None else names.setdefault(pid, f"p{len(names)}")

    shape = []
    for event in result.events:
        if event["event"] == "spawn":
            shape.append(
                ("spawn", name(event["pid"]), name(event["parent"]), tuple(sorted(event["resources"].items())))
            )
        elif event["event"] == "exit":
            shape.append(("exit", name(event["pid"]), event["code"], event["signal"], event["reason"]))
    outputs = sorted((name(pid), result.output(pid).decode(), result.output(pid, 2).decode()) for pid in result.by_pid)
    return [sorted(shape, key=repr), outputs]


def test_the_ten_worker_hello_is_the_same_as_local_mode(cluster):
    local = run(EXAMPLES / "hello.py")
    pushed = cluster.push(EXAMPLES / "hello.py")
    pushed.check_tree()
    assert pushed.code == local.code == 0, pushed.stderr
    assert pushed.output(pushed.top).decode() == local.output(local.top).decode() == "total 4500!\n"
    assert normalised(pushed) == normalised(local)
    assert pushed.stderr == ""


def test_the_ten_worker_hello_for_people(cluster):
    result = cluster.command("push", cluster.bridge, str(EXAMPLES / "hello.py"), timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("hello worker") == 10 and "total 4500!" in result.stdout
    assert result.stderr.count("exited: 0") == 11


HOLDERS = """
import os, sys, time, deploy

def hold(parent, index):
    deploy.Sender[int](parent).send(index)
    release = sys.argv[1]
    deadline = time.monotonic() + 60
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.02)

if __name__ == "__main__":
    deploy.init()
    count, mem = int(sys.argv[2]), sys.argv[3]
    pids = [deploy.spawn(hold, index, deploy.Resources(mem=mem, cpu=0.1)) for index in range(count)]
    assert sorted(deploy.Receiver[int](pid).recv() for pid in pids) == list(range(count))
    print("all up", flush=True)
    deadline = time.monotonic() + 60  # the top stays up with its holders
    while not os.path.exists(sys.argv[1]) and time.monotonic() < deadline:
        time.sleep(0.02)
"""


def test_spawns_land_on_every_node_and_status_shows_the_busy_run(cluster, job, tmp_path):
    # 9 processes of 400MiB cannot fit on the two workers alone (3 + 5 slots): every node runs some.
    release = tmp_path / "release"
    push = cluster.start_push(job(HOLDERS), str(release), "9", "400MiB")
    push.wait_for_output("all up")
    status = cluster.status()
    try:
        ours = [p for p in status["processes"] if p["run"] == status["runs"][0]["id"]]
        assert len(status["runs"]) == 1 and status["runs"][0]["processes"] == 10
        assert len(ours) == 10
        nodes = {node["addr"] for node in status["nodes"]}
        assert nodes == {daemon.addr for daemon in cluster.daemons}
        holders = [p for p in ours if p["resources"]["mem"] == 400 * 2**20]
        assert len(holders) == 9
        assert {p["node"] for p in holders} == nodes, (
            f"not every node got a process: {Counter(p['node'] for p in holders)}"
        )
        for node in status["nodes"]:
            used = sum(p["resources"]["mem"] for p in ours if p["node"] == node["addr"])
            assert node["used"]["mem"] == used
            assert node["free"]["mem"] == node["capacity"]["mem"] - used
        assert all(p["memory"] > 0 and p["age"] >= 0 for p in ours), ours
        human = cluster.command("status", cluster.bridge)
        assert human.returncode == 0, human.stderr
        for daemon in cluster.daemons:
            assert daemon.addr in human.stdout
        assert "processes (10):" in human.stdout
    finally:
        release.touch()
    result = push.finish()
    assert result.code == 0, result.stderr
    assert_gone(lambda: survivors(result.tag), "processes of the run")
    after = wait_until(lambda: (s := cluster.status()) and not s["runs"] and s, 10, "the run to leave deploy status")
    assert after["processes"] == []
    assert all(node["used"]["mem"] == 0 for node in after["nodes"])


CHANNEL = f"""
import deploy

N = 10_000

def producer(parent, consumer):
    tx = deploy.Sender[int](consumer)
    for index in range(N):
        tx.send(index)

def consumer(parent, _):
    rx = deploy.Receiver[int](deploy.Receiver[deploy.Pid](parent).recv())
    received = [rx.recv() for _ in range(N)]
    deploy.Sender[str](parent).send("in order" if received == list(range(N)) else f"out of order: {{received[:20]}}")

if __name__ == "__main__":
    deploy.init()
    big = deploy.Resources(mem="{HOLDER_MEM}", cpu=0.1)  # no node holds two: they run on different nodes
    c = deploy.spawn(consumer, None, big)
    p = deploy.spawn(producer, c, big)
    deploy.Sender[deploy.Pid](c).send(p)
    print(deploy.Receiver[str](c).recv())
"""


def test_a_cross_node_channel_keeps_10k_messages_in_order(cluster, job):
    result = cluster.push(job(CHANNEL))
    result.check_tree()
    assert result.code == 0, result.stderr
    assert result.output(result.top).decode() == "in order\n"
    assert len(result.children(result.top)) == 2


CAPACITY = f"""
import os, sys, threading, time, deploy

def hold(parent, release):
    deploy.Sender[str](parent).send("up")
    while not os.path.exists(release):
        time.sleep(0.02)

def late(parent, _):
    deploy.Sender[str](parent).send("late one ran")

if __name__ == "__main__":
    deploy.init()
    release = sys.argv[1]
    try:
        deploy.try_spawn(late, None, deploy.Resources(mem="3GiB"))
    except deploy.NoCapacity as error:
        print("too big:", error)
    big = deploy.Resources(mem="{HOLDER_MEM}", cpu=0.1)
    holders = [deploy.spawn(hold, release + str(index), big) for index in range(2)]
    for pid in holders:
        deploy.Receiver[str](pid).recv()
    try:
        deploy.try_spawn(late, None, big)
    except deploy.NoCapacity as error:
        print("full now:", error)
    started = time.monotonic()
    spawned = []
    blocked = threading.Thread(target=lambda: spawned.append(deploy.spawn(late, None, big)))
    blocked.start()
    blocked.join(1.0)
    print("blocked:", blocked.is_alive(), flush=True)
    open(release + "0", "w").close()
    blocked.join(30)
    print(deploy.Receiver[str](spawned[0]).recv(), f"after {{time.monotonic() - started:.1f}}s")
    open(release + "1", "w").close()
"""


def test_try_spawn_says_no_capacity_and_spawn_waits_for_it(cluster, job, tmp_path):
    result = cluster.push(job(CAPACITY), str(tmp_path / "release"))
    result.check_tree()
    assert result.code == 0, result.stderr
    lines = result.output(result.top).decode().splitlines()
    assert lines[0].startswith("too big: ") and "3GiB" in lines[0] and "2GiB" in lines[0], lines
    assert lines[1].startswith("full now: ") and "1200MiB" in lines[1], lines
    assert lines[2] == "blocked: True"
    assert re.fullmatch(r"late one ran after \d+\.\ds", lines[3]), lines
    assert len(result.spawns()) == 4  # the top, two holders and the late one; no NoCapacity spawn


def test_a_wrong_secret_is_refused_with_one_clear_line(cluster, job):
    script = job("import deploy\ndeploy.init()\nprint('should not run')\n")
    for secret in ("not-the-secret", ""):
        result = cluster.start_push(script, secret=secret).finish(30)
        assert result.code != 0
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("deploy push: "), result.stderr
        assert re.search(r"secret|authenticat", lines[0], re.I), lines[0]
        assert result.events == []
        status = cluster.command("status", cluster.bridge, secret=secret)
        assert status.returncode != 0 and status.stdout == ""
        assert len(status.stderr.splitlines()) == 1 and status.stderr.startswith("deploy status: ")
    assert cluster.status()["runs"] == []


def test_an_unreachable_bridge_is_one_clear_line(cluster, job):
    script = job("import deploy\ndeploy.init()\n")
    closed = f"127.0.0.1:{free_port()}"
    for argv in (["push", closed, str(script)], ["status", closed]):
        result = cluster.command(*argv)
        assert result.returncode == 1, result.stderr
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert result.stderr.startswith(f"deploy {argv[0]}: ") and closed in result.stderr


def test_a_script_with_a_syntax_error_is_not_pushed(cluster, job):
    result = cluster.command("push", cluster.bridge, str(job("import deploy\ndef broken(:\n")))
    assert result.returncode == 2
    assert result.stderr.startswith("deploy push: ") and "line 2" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_a_second_push_of_the_same_code_ships_nothing(cluster, job):
    script = job(
        "import deploy\n\ndef f(parent, _):\n    print('ran')\n\nif __name__ == '__main__':\n    deploy.init()\n    deploy.spawn(f, None)\n"
    )

    def received() -> dict[str, int]:
        return {node["addr"]: node["bundles_received"] for node in cluster.status()["nodes"]}

    before = received()
    first = cluster.push(script)
    assert first.code == 0 and "ran" in first.all_output(), first.stderr
    after_first = received()
    assert sum(after_first.values()) > sum(before.values()), "the first push shipped nothing"
    second = cluster.push(script)
    assert second.code == 0 and "ran" in second.all_output(), second.stderr
    assert received() == after_first
    (script.parent / "data.txt").write_text("changed")
    third = cluster.push(script)
    assert third.code == 0
    assert sum(received().values()) > sum(after_first.values()), "changed code was not shipped"


def test_ctrl_c_of_deploy_push_ends_every_process_of_the_run(cluster, job, tmp_path):
    release = tmp_path / "never"
    push = cluster.start_push(job(HOLDERS), str(release), "6", "300MiB")
    push.wait_for_output("all up")
    running_pids = {p["pid"] for p in cluster.status()["processes"]}
    assert len(running_pids) == 7
    sent = time.monotonic()
    push.process.send_signal(signal.SIGINT)
    result = push.finish(20)
    assert time.monotonic() - sent < 10
    assert result.code == 128 + signal.SIGINT, result.stderr
    exits = result.exits()
    assert set(exits) == running_pids == {e["pid"] for e in result.spawns()}
    assert all(e["signal"] == "SIGKILL" and e["reason"] == "interrupted" for e in exits.values()), exits
    assert_gone(lambda: survivors(result.tag), "processes of the interrupted run")
    wait_until(lambda: cluster.status()["processes"] == [], 10, "the run's processes to leave deploy status")


def test_a_disconnected_push_ends_the_run(cluster, job, tmp_path):
    push = cluster.start_push(job(HOLDERS), str(tmp_path / "never"), "3", "100MiB")
    push.wait_for_output("all up")
    push.process.kill()  # no Ctrl-C handling: the bridge only sees the connection close
    push.process.wait(10)
    assert_gone(lambda: survivors(push.tag), "processes of the run whose push vanished")
    wait_until(lambda: cluster.status()["runs"] == [], 10, "the run to leave deploy status")


def test_the_top_process_gets_args_environment_stdin_and_directory(cluster, tmp_path):
    script = project(
        tmp_path / "proj",
        """
        import os, sys, deploy

        def child(parent, _):
            print("child in", os.path.basename(os.getcwd()), os.path.exists("../job.py"), "argv", sys.argv[1:])

        if __name__ == "__main__":
            deploy.init()
            print("args", sys.argv[1:], "env", os.environ.get("FROM_CALLER"), "stdin", sys.stdin.readline().strip())
            print("top in", os.path.basename(os.getcwd()), os.path.exists("../job.py"))
            deploy.spawn(child, None)
        """,
    )
    (script.parent / "sub").mkdir()
    tag = uuid.uuid4().hex
    cluster.push_tags.append(tag)
    result = subprocess.run(
        [*DEPLOY, "push", "--format", "human", cluster.bridge, "../job.py", "a b", "--c"],
        input="hello from stdin\n",
        capture_output=True,
        text=True,
        timeout=60,
        cwd=script.parent / "sub",
        env=cluster.env(FROM_CALLER="yes", **{TAG: tag}),
    )
    assert result.returncode == 0, result.stderr
    assert "args ['a b', '--c'] env yes stdin hello from stdin" in result.stdout
    assert "top in sub True" in result.stdout
    assert "child in sub True argv ['a b', '--c']" in result.stdout
    assert_gone(lambda: survivors(tag), "processes of the run")


def test_a_daemon_that_cannot_listen_says_so_in_one_line(cluster):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        for argv, code in (
            (["fabric", busy, "--mem", "1GiB", "--cpu", "1"], 1),
            (["fabric", "0.0.0.0:0"], 2),
            (["fabric", "master", busy, "1GiB", "1", "bridge", f"127.0.0.1:{free_port()}"], 1),
        ):
            result = cluster.command(*argv, secret="" if argv[1] == "0.0.0.0:0" else None, timeout=30)
            assert result.returncode == code, (argv, result.stderr)
            assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("deploy fabric: "), result.stderr
            assert "Traceback" not in result.stderr


# A deploy push of another version: the same CLI with the version it announces changed.
OTHER_VERSION = """
import sys
import deploy_fabric._push
from deploy_cli import main

deploy_fabric._push.__version__ = "9.9.9"
sys.exit(main(sys.argv[1:]))
"""


def test_a_push_of_another_version_is_refused_in_one_line(cluster, job, tmp_path):
    script = job("import deploy\ndeploy.init()\nprint('should not run')\n")
    other = tmp_path / "other_deploy.py"
    other.write_text(OTHER_VERSION)
    for argv in (["push", cluster.bridge, str(script)], ["status", cluster.bridge]):
        result = subprocess.run(
            [sys.executable, str(other), *argv], capture_output=True, text=True, timeout=30, env=cluster.env()
        )
        assert result.returncode == 1, result.stderr
        assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith(f"deploy {argv[0]}: "), result.stderr
        assert "9.9.9" in result.stderr, result.stderr
        assert "should not run" not in result.stdout


def test_push_of_a_module_runs_it_as_main_from_the_current_directory(cluster, tmp_path):
    package = tmp_path / "modproj" / "tools"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "job.py").write_text(
        "import sys, deploy\n\n"
        "def child(parent, word):\n    print('child says', word)\n\n"
        "if __name__ == '__main__':\n    deploy.init()\n    deploy.spawn(child, sys.argv[1])\n"
    )
    tag = uuid.uuid4().hex
    cluster.push_tags.append(tag)
    result = subprocess.run(
        [*DEPLOY, "push", cluster.bridge, "-m", "tools.job", "hi"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path / "modproj",
        env=cluster.env(**{TAG: tag}),
    )
    assert result.returncode == 0, result.stderr
    assert "child says hi" in result.stdout
    assert_gone(lambda: survivors(tag), "processes of the run")


LISTENER = """
import os, sys, time, deploy

def listen(parent, release):
    deploy.Sender[str](parent).send(deploy.pid().format())
    rx = deploy.Receiver[int](parent)
    while not os.path.exists(release):
        time.sleep(0.02)

if __name__ == "__main__":
    deploy.init()
    pid = deploy.spawn(listen, sys.argv[1])
    print("listening", deploy.Receiver[str](pid).recv(), flush=True)
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.02)
"""

INTRUDER = """
import sys, deploy

if __name__ == "__main__":
    deploy.init()
    victim = deploy.Pid.parse(sys.argv[1])
    try:
        deploy.Sender[int](victim).send(1)
        print("delivered?", deploy.Receiver[int](victim).recv(timeout=5))
    except TimeoutError:
        print("connected: the message was sent and no refusal came")
    except (deploy.AuthenticationError, deploy.PeerLost) as error:
        print("refused:", type(error).__name__, error)
"""


def test_a_process_of_one_run_cannot_reach_a_process_of_another(cluster, tmp_path):
    release = tmp_path / "release"
    listener = cluster.start_push(project(tmp_path / "a", LISTENER), str(release))
    try:
        victim = listener.wait_for_output("listening ").split()[1]
        intruder = cluster.push(project(tmp_path / "b", INTRUDER), victim, timeout=60)
        assert intruder.output(intruder.top).decode().startswith("refused: "), intruder.all_output()
    finally:
        release.touch()
    assert listener.finish(30).code == 0
