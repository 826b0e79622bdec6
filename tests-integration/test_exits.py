"""Exit codes, signals and the errors a user hits, reported per process and in aggregate."""

import signal

import pytest
from conftest import run

pytestmark = pytest.mark.timeout(90)


def test_success_failure_and_abort_are_reported_per_process(script):
    job = script(
        """
        import os, sys, deploy

        def ok(parent, _):
            print("fine")

        def fails(parent, _):
            sys.exit(3)

        def raises(parent, _):
            raise RuntimeError("boom")

        def aborts(parent, _):
            os.abort()

        if __name__ == "__main__":
            deploy.init()
            for fn in (ok, fails, raises, aborts):
                deploy.spawn(fn, None)
        """
    )
    result = run(job)
    result.check_tree()
    children = result.children(result.top)
    assert len(children) == 4
    exits = result.exits()
    assert [exits[pid]["code"] for pid in children[:3]] == [0, 3, 1]
    assert exits[children[3]]["signal"] == "SIGABRT" and exits[children[3]]["code"] is None
    assert exits[result.top]["code"] == 0
    assert "RuntimeError: boom" in result.output(children[2], 2).decode()
    assert "Traceback" not in result.output(children[1], 2).decode()  # sys.exit: no traceback
    first_failure = next(
        event for event in result.events if event["event"] == "exit" and (event["code"] or event["signal"])
    )
    expected = first_failure["code"] if first_failure["signal"] is None else 128 + signal.SIGABRT
    assert result.code == expected  # the first failure's code, in the order the exits happened


def test_all_zero_exits_zero_and_a_signal_gives_128_plus_n(script):
    job = script(
        """
        import os, signal, deploy

        def killer(parent, _):
            os.kill(os.getpid(), signal.SIGTERM)

        if __name__ == "__main__":
            deploy.init()
            deploy.spawn(killer, None)
        """
    )
    result = run(job)
    result.check_tree()
    assert result.code == 128 + signal.SIGTERM


def test_a_real_time_signal_is_reported_by_name_and_the_run_goes_on(script):
    job = script(
        """
        import os, signal, time, deploy

        def killed(parent, _):
            os.kill(os.getpid(), signal.SIGRTMIN + 2)

        def later(parent, _):
            time.sleep(0.5)
            print("still reported")

        if __name__ == "__main__":
            deploy.init()
            deploy.spawn(later, None)
            deploy.spawn(killed, None)
        """
    )
    result = run(job)
    result.check_tree()
    slow, killed = result.children(result.top)
    exits = result.exits()
    assert exits[killed]["signal"] == "SIGRTMIN+2" and exits[killed]["code"] is None
    assert exits[slow]["code"] == 0 and result.output(slow) == b"still reported\n"
    assert result.code == 128 + signal.SIGRTMIN + 2
    assert "Traceback" not in result.stderr


def test_non_daemon_threads_finish_before_the_process_ends(script):
    job = script(
        """
        import threading, time, deploy

        def late(parent):
            time.sleep(0.5)
            print("thread printed after fn returned")
            deploy.Sender[str](parent).send("sent from the thread")

        def fails():
            time.sleep(0.2)
            raise ValueError("a thread's own error")

        def child(parent, _):
            threading.Thread(target=late, args=(parent,)).start()
            threading.Thread(target=fails).start()
            threading.Thread(target=time.sleep, args=(60,), daemon=True).start()  # not waited for

        if __name__ == "__main__":
            deploy.init()
            pid = deploy.spawn(child, None)
            print(deploy.Receiver[str](pid).recv(timeout=20))
        """
    )
    result = run(job, timeout=40)
    result.check_tree()
    child = result.children(result.top)[0]
    assert result.output(child) == b"thread printed after fn returned\n"
    assert "ValueError: a thread's own error" in result.output(child, 2).decode()
    assert result.exits()[child]["code"] == 0  # as in Python: a thread's exception is printed, not the exit code
    assert result.output(result.top) == b"sent from the thread\n"


def test_a_child_outlives_its_parent_and_the_run_waits_for_it(script):
    job = script(
        """
        import time, deploy

        def slow(parent, _):
            time.sleep(1.5)
            print("still here")

        if __name__ == "__main__":
            deploy.init()
            deploy.spawn(slow, None)
        """
    )
    result = run(job)
    result.check_tree()
    child = result.children(result.top)[0]
    assert result.output(child) == b"still here\n"
    order = [(event["event"], event["pid"]) for event in result.events if event["event"] == "exit"]
    assert order == [("exit", result.top), ("exit", child)]


def test_unpicklable_argument_names_the_object(script):
    job = script(
        """
        import threading, deploy

        def worker(parent, lock):
            pass

        if __name__ == "__main__":
            deploy.init()
            try:
                deploy.spawn(worker, threading.Lock())
            except deploy.SerializationError as error:
                print(f"error: {error}")
        """
    )
    result = run(job)
    out = result.output(result.top).decode()
    assert "error: cannot send the argument <unlocked _thread.lock" in out
    assert "lock" in out.split(":", 2)[-1]
    assert result.code == 0


def test_spawn_before_init_says_to_call_init(script):
    job = script(
        """
        import deploy
        try:
            deploy.spawn(print, None)
        except deploy.DeployError as error:
            print(error)
        try:
            deploy.pid()
        except deploy.DeployError as error:
            print(error)
        """
    )
    result = run(job, fmt="human")
    assert result.stdout.decode().splitlines() == [
        "deploy.spawn() needs the runtime: call deploy.init() first",
        "deploy.pid() needs the runtime: call deploy.init() first",
    ]


def test_impossible_resources_raise_no_capacity_with_numbers(script):
    job = script(
        """
        import deploy

        if __name__ == "__main__":
            deploy.init()
            for spawn in (deploy.spawn, deploy.try_spawn):
                try:
                    spawn(print, None, deploy.Resources(mem="64TiB"))
                except deploy.NoCapacity as error:
                    print(error)
        """
    )
    result = run(job)
    lines = result.output(result.top).decode().splitlines()
    assert len(lines) == 2
    assert all("64TiB" in line and "local" in line for line in lines)


def test_try_spawn_raises_at_once_when_full_and_spawn_waits(script):
    job = script(
        """
        import os, time, deploy

        def hold(parent, seconds):
            time.sleep(seconds)

        if __name__ == "__main__":
            deploy.init(deploy.Resources(cpu=0))
            everything = deploy.Resources(mem="50MiB", cpu=len(os.sched_getaffinity(0)))
            deploy.spawn(hold, 1.0, everything)
            try:
                deploy.try_spawn(hold, 0, everything)
                print("try_spawn: started")
            except deploy.NoCapacity:
                print("try_spawn: no capacity")
            started = time.monotonic()
            deploy.spawn(hold, 0, everything)
            print(f"spawn waited {time.monotonic() - started >= 0.5}")
        """
    )
    result = run(job)
    result.check_tree()
    assert result.output(result.top).decode().splitlines() == ["try_spawn: no capacity", "spawn waited True"]


def test_init_twice_and_after_threads_are_clear_errors(script):
    job = script(
        """
        import threading, time, deploy
        thread = threading.Thread(target=time.sleep, args=(0.5,), name="busy")
        thread.start()
        try:
            deploy.init()
        except deploy.DeployError as error:
            print(error)
        thread.join()
        deploy.init()
        try:
            deploy.init()
        except deploy.DeployError as error:
            print(error)
        """
    )
    result = run(job)
    assert result.stdout.splitlines()[0] == b"deploy.init() must run before any thread is started; running: busy"
    assert result.output(result.top) == b"deploy.init() has already been called in this process\n"
