"""What a spawned process starts with: its function, argv and environment, its resources."""

import json

import pytest
from conftest import run

pytestmark = pytest.mark.timeout(90)


def test_lambdas_and_closures_run_in_the_child(script):
    job = script(
        """
        import deploy

        def make_adder(amount):
            def add(parent, value):
                deploy.Sender[int](parent).send(value + amount)
            return add

        if __name__ == "__main__":
            deploy.init()
            a = deploy.spawn(lambda parent, value: deploy.Sender[int](parent).send(value * 2), 21)
            b = deploy.spawn(make_adder(100), 1)
            print(deploy.Receiver[int](a).recv(), deploy.Receiver[int](b).recv())
        """
    )
    result = run(job)
    result.check_tree()
    assert result.output(result.top) == b"42 101\n"


def test_a_function_sees_the_globals_as_they_are_at_spawn_not_at_init(script):
    job = script(
        """
        import deploy

        SETTINGS = None
        SEEN = []

        def report(parent, _):
            deploy.Sender[str](parent).send(f"{SETTINGS} {SEEN}")

        def main():
            global SETTINGS
            deploy.init()
            SETTINGS = "configured after init"
            SEEN.append("appended after init")
            print(deploy.Receiver[str](deploy.spawn(report, None)).recv())

        if __name__ == "__main__":
            main()
        """
    )
    result = run(job)
    result.check_tree()
    assert result.output(result.top) == b"configured after init ['appended after init']\n"


def test_argv_and_environment_are_those_at_spawn_time(script):
    job = script(
        """
        import os, sys, deploy

        def report(parent, _):
            seen = {"argv": sys.argv[1:], "late": os.environ.get("LATE"), "gone": os.environ.get("GONE"),
                "changed": os.environ.get("CHANGED"),
                "deploy": sorted(key for key in os.environ if key.startswith("DEPLOY_"))}
            deploy.Sender[dict](parent).send(seen)

        if __name__ == "__main__":
            deploy.init()
            sys.argv.append("added-before-spawn")
            os.environ["LATE"] = "set after init"
            del os.environ["GONE"]
            os.environ["CHANGED"] = "changed after init"
            print(deploy.Receiver[dict](deploy.spawn(report, None)).recv())
        """
    )
    result = run(job, "first", "--second", env={"GONE": "removed after init", "CHANGED": "as started"})
    seen = eval(result.output(result.top).decode())  # a dict's repr, printed by the top process
    assert seen == {
        "argv": ["first", "--second", "added-before-spawn"],
        "late": "set after init",
        "gone": None,
        "changed": "changed after init",
        "deploy": [],
    }


def test_pid_and_resources_of_each_process(script):
    job = script(
        """
        import deploy

        def child(parent, _):
            deploy.Sender[tuple](parent).send((deploy.pid(), parent, deploy.resources()))

        if __name__ == "__main__":
            deploy.init(deploy.Resources(mem="200MiB", cpu=0.5))
            assert deploy.resources() == deploy.Resources(mem="200MiB", cpu=0.5)
            child_pid = deploy.spawn(child, None, deploy.Resources(mem="64MiB", cpu=0.25))
            pid, parent, resources = deploy.Receiver[tuple](child_pid).recv()
            print(pid == child_pid, parent == deploy.pid(), resources)
        """
    )
    result = run(job)
    result.check_tree()
    assert result.output(result.top) == b"True True 64MiB memory, 0.25 cpu\n"
    spawns = result.spawns()
    assert spawns[0]["resources"] == {"mem": 200 * 2**20, "cpu": 0.5}
    assert spawns[1]["resources"] == {"mem": 64 * 2**20, "cpu": 0.25}
    assert spawns[1]["addr"].startswith("127.0.0.1:")


def test_recce_reports_the_requested_resources_and_runs_nothing(script):
    job = script(
        """
        import deploy

        if __name__ == "__main__":
            deploy.init(deploy.Resources(mem="2GiB", cpu=1.5))
            print("the program ran")
        """
    )
    result = run(job, env={"DEPLOY_RECCE": "1"}, fmt="human")
    assert result.code == 0
    assert json.loads(result.stdout) == {"resources": {"mem": 2 * 2**30, "cpu": 1.5}}
    assert result.stderr == ""


def test_big_spawn_arguments_while_another_process_floods_its_output(script):
    """The zygote forwards every process's output to the bridge, and the bridge sends the
    zygote every spawn request: neither may wait on the other."""
    job = script(
        """
        import os, deploy

        def flood(parent, _):
            line = b"x" * 1023 + b"\\n"
            for _ in range(30 * 1024):
                os.write(1, line)

        def size(parent, blob):
            deploy.Sender[int](parent).send(len(blob))

        if __name__ == "__main__":
            deploy.init()
            deploy.spawn(flood, None)
            blob = b"b" * (16 * 2**20)
            sizes = []
            for _ in range(4):
                child = deploy.spawn(size, blob)
                sizes.append(deploy.Receiver[int](child).recv())
            print(sizes)
        """
    )
    result = run(job, timeout=60)
    result.check_tree()
    assert result.code == 0
    assert result.output(result.top) == f"{[16 * 2**20] * 4}\n".encode()
    flooder = next(event["pid"] for event in result.spawns() if result.output(event["pid"]).startswith(b"x"))
    assert len(result.output(flooder)) == 30 * 1024 * 1024


def test_try_spawn_says_why_while_a_blocking_spawn_waits(script):
    job = script(
        """
        import os, threading, deploy

        def holder(parent, _):
            deploy.Receiver[str](parent).recv()  # holds its cores until told

        def noop(parent, _):
            pass

        if __name__ == "__main__":
            deploy.init(deploy.Resources(cpu=0.05))
            cores = len(os.sched_getaffinity(0))
            held = deploy.spawn(holder, None, deploy.Resources(cpu=cores - 0.5))  # 0.45 cores left
            waiter = threading.Thread(target=deploy.spawn, args=(noop, None, deploy.Resources(cpu=1)))
            waiter.start()  # blocks: 1 core is not free
            while True:  # until the blocking spawn is queued, a small try_spawn fits
                try:
                    deploy.try_spawn(noop, None, deploy.Resources(cpu=0.1))
                except deploy.NoCapacity as error:
                    print(error)
                    break
            deploy.Sender[str](held).send("done")
            waiter.join()
        """
    )
    result = run(job)
    result.check_tree()
    message = result.output(result.top).decode()
    assert "no capacity for" in message and "0.1" in message
    assert "1 blocking spawn is waiting ahead of it" in message, message
    assert result.code == 0


def test_working_directory_and_sys_path_are_those_at_spawn_time(script, tmp_path):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "greeter.py").write_text("def greet(parent, name):\n    print('hello', name)\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "input.txt").write_text("from the data folder\n")
    job = script(
        """
        import os, sys, deploy

        def reads(parent, _):
            print(open("input.txt").read().strip(), os.getcwd().endswith("data"))

        if __name__ == "__main__":
            deploy.init()
            sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "plugins"))
            import greeter

            deploy.spawn(greeter.greet, "plugin")
            os.chdir("data")
            deploy.spawn(reads, None)
        """
    )
    result = run(job)
    result.check_tree()
    greeted, read = result.children(result.top)
    assert result.output(greeted) == b"hello plugin\n", result.output(greeted, 2).decode()
    assert result.output(read) == b"from the data folder True\n", result.output(read, 2).decode()
    assert result.code == 0


# An argument of N bytes costs about N once on each side (pickled once, sent scatter-gather,
# received into one buffer that is freed once unpickled), so with the default 100 MiB the
# top process can send 20 MiB and a process can receive 40 MiB.
def test_a_spawn_argument_costs_about_its_size_once_on_each_side(script):
    job = script(
        """
        import deploy

        def size(parent, blob):
            deploy.Sender[int](parent).send(len(blob))

        if __name__ == "__main__":
            deploy.init()  # 100 MiB
            for mib in (20, 40):
                blob = b"b" * (mib * 2**20)
                child = deploy.spawn(size, blob)  # 100 MiB too
                del blob
                print(mib, deploy.Receiver[int](child).recv() // 2**20)
        """
    )
    result = run(job, timeout=60)
    result.check_tree()
    exits = result.exits()
    assert all(exit["code"] == 0 for exit in exits.values()), exits
    assert result.output(result.top) == b"20 20\n40 40\n"


def test_spawn_out_of_descriptors_raises_a_deploy_error_and_works_after(script):
    job = script(
        """
        import os, deploy

        def hello(parent, _):
            print("hello")

        if __name__ == "__main__":
            deploy.init()
            held = []
            try:
                while True:
                    held.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                pass
            try:
                deploy.spawn(hello, None)
            except deploy.DeployError as error:
                print(type(error).__name__, error)
            for fd in held:
                os.close(fd)
            deploy.spawn(hello, None)
        """
    )
    result = run(job)
    result.check_tree()
    assert result.output(result.top) == b"DeployError cannot connect to the fabric to spawn: Too many open files\n"
    assert [result.output(pid) for pid in result.children(result.top)] == [b"hello\n"]
    assert result.code == 0


# The zygote out of descriptors fails the spawns it cannot make, and serves on.
def test_a_zygote_out_of_descriptors_fails_those_spawns_and_serves_on(script):
    job = script(
        """
        import os, psutil, deploy

        def hello(parent, n):
            deploy.Receiver[str](parent).recv()  # keeps the zygote's fds for it until then
            print("hello", n)

        if __name__ == "__main__":
            deploy.init()
            zygote = psutil.Process(os.getppid())
            limits = zygote.rlimit(psutil.RLIMIT_NOFILE)
            # A limit of the number of fds it has open leaves free only the numbers below it
            # that are not in use (about as many as it has open above it); each process
            # started then keeps some, until none is left.
            zygote.rlimit(psutil.RLIMIT_NOFILE, (len(os.listdir(f"/proc/{zygote.pid}/fd")), limits[1]))
            failures, started = [], []
            for n in range(12):  # more than the spares it keeps forked ahead
                try:
                    started.append(deploy.spawn(hello, n))
                except deploy.DeployError as error:
                    failures.append(str(error))
            zygote.rlimit(psutil.RLIMIT_NOFILE, limits)
            for pid in started:
                deploy.Sender[str](pid).send("go")
            print(len(failures), "failed:", failures[0] if failures else None)
            deploy.Sender[str](deploy.spawn(hello, "after")).send("go")
        """
    )
    result = run(job)
    result.check_tree()
    out = result.output(result.top).decode()
    assert not out.startswith("0 failed"), out
    assert "Too many open files" in out
    assert all(exit["reason"] != "its monitor died" for exit in result.exits().values())
    assert b"hello after\n" in [result.output(pid) for pid in result.children(result.top)]
    assert result.code == 0
