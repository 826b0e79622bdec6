"""Runaway scripts (issue 9): one that exhausts its memory, one that forks as fast as it can,
one that never reads its stdin. Each is contained by its resources and ended by Ctrl-C
(SIGINT to the bridge), leaving no process behind."""

import signal
import threading

import psutil
import pytest
from conftest import Run, assert_no_survivors, start
from reliability import LiveRun, record, wait_for

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(180)]


def _interrupt(live: LiveRun) -> Run:
    live.process.send_signal(signal.SIGINT)
    try:
        code = live.finish(timeout=30)
    finally:
        if live.process.poll() is None:
            live.process.kill()
    assert_no_survivors(live.tag, wait=10)
    result = Run(code, live.events, live.stderr.decode(errors="replace"))
    result.check_tree()
    return result


def test_a_memory_hog_is_ended_by_its_limit_and_the_run_by_ctrl_c(script):
    job = script(
        """
        import time, deploy

        def hog(parent, _):
            chunks = []
            while True:
                chunks.append(bytearray(4 << 20))

        if __name__ == "__main__":
            deploy.init()
            deploy.spawn(hog, None, resources=deploy.Resources(mem="200MiB"))
            print("hogging", flush=True)
            while True:
                time.sleep(1)
        """
    )
    process, tag = start(job)
    live = LiveRun(process, tag)
    live.wait_printed("hogging")
    wait_for(lambda: any(e["event"] == "exit" for e in live.events), 60, "the hog's exit")
    result = _interrupt(live)
    exits = result.exits()
    hog = result.children(result.top)[0]
    assert exits[hog]["signal"] == "SIGKILL" and "memory limit 200MiB exceeded" in exits[hog]["reason"], exits[hog]
    assert exits[result.top]["signal"] == "SIGKILL", exits[result.top]
    record("runaway: memory hog", hog=exits[hog]["reason"], top=exits[result.top]["reason"])


def test_a_script_that_forks_without_end_is_contained_by_its_memory_and_ended(script):
    job = script(
        """
        import os, time, deploy

        def breeder(parent, _):
            for n in range(20_000):  # a safety net on a shared machine; the limit comes first
                if os.fork() == 0:
                    while True:
                        time.sleep(1)
                if n % 25 == 0:
                    print("forked", n, flush=True)
            print("never contained", flush=True)

        if __name__ == "__main__":
            deploy.init()
            deploy.spawn(breeder, None, resources=deploy.Resources(mem="100MiB"))
            while True:
                time.sleep(1)
        """
    )
    process, tag = start(job)
    live = LiveRun(process, tag)
    live.wait_printed("forked 25", timeout=60)
    wait_for(lambda: any(e["event"] == "exit" for e in live.events), 120, "the breeder's end")
    forked = max(int(line.split()[1]) for line in live.printed("forked "))
    result = _interrupt(live)
    exits = result.exits()
    breeder = result.children(result.top)[0]
    assert "never contained" not in result.all_output()
    assert exits[breeder]["signal"] == "SIGKILL" and "memory limit 100MiB exceeded" in exits[breeder]["reason"]
    assert exits[result.top]["signal"] == "SIGKILL", exits[result.top]
    record("runaway: forks", forks_before_the_limit=forked, breeder=exits[breeder]["reason"])


def test_a_script_that_never_reads_its_stdin_blocks_the_writer_and_ends_by_ctrl_c(script):
    job = script(
        """
        import time, deploy

        if __name__ == "__main__":
            deploy.init()
            print("not reading", flush=True)
            while True:
                time.sleep(1)
        """
    )
    import subprocess

    process, tag = start(job, stdin=subprocess.PIPE)
    live = LiveRun(process, tag)
    live.wait_printed("not reading")
    written = [0]

    def flood():
        chunk = b"y" * 65536
        try:
            while True:
                process.stdin.write(chunk)
                process.stdin.flush()
                written[0] += len(chunk)
        except (BrokenPipeError, ValueError, OSError):
            pass

    writer = threading.Thread(target=flood, daemon=True)
    writer.start()
    bridge = psutil.Process(process.pid)
    rss = []
    for _ in range(10):  # two seconds of samples while the writer pushes
        rss.append(bridge.memory_info().rss)
        writer.join(0.2)
    assert writer.is_alive(), "the writer stopped: something failed"
    assert written[0] < 64 << 20, f"{written[0]} bytes went into a stdin nobody reads"
    result = _interrupt(live)
    writer.join(10)
    assert result.exits()[result.top]["signal"] == "SIGKILL"
    assert max(rss) - min(rss) < 4 << 20, rss
    record("runaway: unread stdin", bytes_accepted=written[0], bridge_rss_mib=round(max(rss) / 2**20, 1))
