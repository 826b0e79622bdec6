"""Faults in local mode (issue 9): kill -9 of a process mid-stream, of the zygote and of the
bridge; a message whose class the receiver lacks; a receiver that stops reading; order and
integrity over many messages of random sizes with channels re-created mid-stream."""

import os
import signal
import time

import pytest
from conftest import Run, assert_no_survivors, run, start, survivors
from reliability import LiveRun, record, scaled, wait_for

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(240)]

SIGKILL_CODE = 128 + signal.SIGKILL


def test_kill_9_mid_stream_reaches_peers_and_returns_capacity(script):
    job = script(
        """
        import os, signal, time, deploy
        from deploy import NoCapacity, PeerExited, PeerLost, Resources

        BIG = Resources(mem=int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.6), cpu=0.05)

        def victim(parent, peer):
            with deploy.Sender[int](parent) as to_parent, deploy.Sender[int](peer) as to_peer:
                to_parent.send(os.getpid())
                n = 0
                while True:
                    n += 1
                    to_peer.send(n)
                    if n % 64 == 0:
                        to_parent.send(n)

        def peer(parent, _):
            with deploy.Sender[str](parent) as report:
                victim_pid = deploy.Receiver[deploy.Pid](parent).recv()
                rx = deploy.Receiver[int](victim_pid)
                expected = 1
                try:
                    while True:
                        value = rx.recv(timeout=30)
                        assert value == expected, (value, expected)
                        expected += 1
                        if expected == 2000:
                            report.send("flowing")
                except (PeerLost, PeerExited) as error:
                    report.send(f"{type(error).__name__} after {expected - 1}")

        if __name__ == "__main__":
            deploy.init()
            peer_pid = deploy.spawn(peer, None)
            victim_pid = deploy.spawn(victim, peer_pid, resources=BIG)
            deploy.Sender[deploy.Pid](peer_pid).send(victim_pid)
            reports = deploy.Receiver[str](peer_pid)
            from_victim = deploy.Receiver[int](victim_pid)
            os_pid = from_victim.recv()
            assert reports.recv(timeout=30) == "flowing"
            try:
                deploy.try_spawn(print, "must not start", resources=BIG)
                print("capacity not enforced")
            except NoCapacity:
                print("no capacity while the victim lives")
            os.kill(os_pid, signal.SIGKILL)
            print("peer:", reports.recv(timeout=30))
            try:
                while True:
                    from_victim.recv(timeout=30)
            except (PeerLost, PeerExited) as error:
                print("top:", type(error).__name__)
            deadline = time.monotonic() + 15
            while True:  # the victim's exit event frees its memory in the scheduler
                try:
                    deploy.try_spawn(print, "capacity returned", resources=BIG)
                    break
                except NoCapacity:
                    assert time.monotonic() < deadline, "capacity never returned"
                    time.sleep(0.05)
        """
    )
    result = run(job, timeout=120)
    result.check_tree()
    out = result.all_output()
    assert "no capacity while the victim lives" in out
    assert "capacity returned" in out
    assert "peer: PeerLost" in out or "peer: PeerExited" in out, out
    assert "top: PeerLost" in out or "top: PeerExited" in out, out
    victim = result.children(result.top)[1]
    assert result.exits()[victim]["signal"] == "SIGKILL"
    assert result.code == SIGKILL_CODE
    record("kill -9 mid-stream", peer=[line for line in out.splitlines() if line.startswith("peer:")][0])


CHATTER = """
import os, sys, time, deploy

def ping(parent, peer):
    with deploy.Sender[int](peer) as tx:
        n = 0
        while True:
            n += 1
            tx.send(n)
            time.sleep(0.001)

def pong(parent, _):
    source = deploy.Receiver[deploy.Pid](parent).recv()
    with deploy.Receiver[int](source) as rx:
        while True:
            rx.recv()

if __name__ == "__main__":
    deploy.init()
    sink = deploy.spawn(pong, None)
    source = deploy.spawn(ping, sink)
    deploy.Sender[deploy.Pid](sink).send(source)
    print("zygote", os.getppid(), flush=True)
    time.sleep(120)
"""


def _live(job):
    process, tag = start(job)
    return LiveRun(process, tag)


def test_kill_9_of_the_zygote_ends_every_process_with_its_reason(script):
    live = _live(script(CHATTER))
    try:
        zygote = int(live.wait_printed("zygote ").split()[1])
        wait_for(lambda: len([e for e in live.events if e["event"] == "spawn"]) == 3, 30, "three spawn events")
        os.kill(zygote, signal.SIGKILL)
        code = live.finish(timeout=30)
    finally:
        if live.process.poll() is None:
            live.process.kill()
    assert_no_survivors(live.tag)
    result = Run(code, live.events, live.stderr.decode(errors="replace"))
    result.check_tree()
    exits = result.exits()
    assert len(exits) == 3
    for event in exits.values():
        assert event["signal"] == "SIGKILL", event
        assert "monitor died" in (event["reason"] or ""), event
    assert code == SIGKILL_CODE


def test_kill_9_of_the_bridge_leaves_no_process(script):
    live = _live(script(CHATTER))
    try:
        live.wait_printed("zygote ")
        wait_for(lambda: len([e for e in live.events if e["event"] == "spawn"]) == 3, 30, "three spawn events")
        assert len(survivors(live.tag)) >= 4  # bridge, zygote, three processes (bridge counted)
        live.process.kill()
        live.finish(timeout=30)
        assert_no_survivors(live.tag, wait=10)
    finally:
        for process in survivors(live.tag):
            process.kill()


def test_a_message_of_a_class_missing_on_the_receiver_raises_serialization_error(script):
    job = script(
        """
        import sys, types, deploy

        def sender(parent, _):
            ghost = types.ModuleType("ghost_module")
            exec("class Ghost:\\n    pass\\n", ghost.__dict__)
            ghost.Ghost.__module__ = "ghost_module"
            sys.modules["ghost_module"] = ghost
            with deploy.Sender(parent) as tx:
                tx.send(1)
                tx.send(ghost.Ghost())
                tx.send(2)
                tx.send(3)

        if __name__ == "__main__":
            deploy.init()
            child = deploy.spawn(sender, None)
            with deploy.Receiver(child) as rx:
                print("first", rx.recv(timeout=30))
                try:
                    rx.recv(timeout=30)
                    print("no error")
                except deploy.SerializationError as error:
                    print("error:", error)
                except Exception as error:
                    print("wrong error:", type(error).__name__, error)
                print("then", rx.recv(timeout=30), rx.recv(timeout=30))
                print("child", child)
        """
    )
    result = run(job)
    result.check_tree()
    out = result.output(result.top).decode()
    assert "first 1" in out and "then 2 3" in out, out
    error = next(line for line in out.splitlines() if "error" in line)
    child = out.split("child ")[1].strip()
    assert error.startswith("error:"), error
    assert child in error and "ghost_module" in error, error


def test_a_receiver_that_stops_reading_blocks_its_sender_with_flat_memory(script):
    pause = scaled(10, 30)
    job = script(
        """
        import sys, threading, time, psutil, deploy

        SIZE = 4096

        def sender(parent, count):
            sent = [0]
            me = psutil.Process()

            def progress():
                while True:
                    print("progress", time.monotonic(), sent[0], me.memory_info().rss, flush=True)
                    time.sleep(0.25)

            threading.Thread(target=progress, daemon=True).start()
            with deploy.Sender[bytes](parent) as tx:
                for n in range(count):
                    tx.send(n.to_bytes(8, "big") * (SIZE // 8))
                    sent[0] = n + 1
            print("progress", time.monotonic(), sent[0], me.memory_info().rss, flush=True)

        if __name__ == "__main__":
            pause, count = float(sys.argv[1]), int(sys.argv[2])
            deploy.init()
            me = psutil.Process()
            with deploy.Receiver[bytes](deploy.spawn(sender, count)) as rx:
                print("top rss before", me.memory_info().rss, flush=True)
                time.sleep(pause)  # the scenario: a receiver that does not read
                print("top rss stalled", me.memory_info().rss, flush=True)
                print("resumed", time.monotonic(), flush=True)
                for n in range(count):
                    message = rx.recv(timeout=60)
                    assert message == n.to_bytes(8, "big") * (SIZE // 8), f"message {n} out of order or corrupt"
                print("all in order", count, flush=True)
        """
    )
    count = 40_000  # 160 MiB, many times the 8 MiB high-water mark
    result = run(job, str(pause), str(count), timeout=pause + 120)
    result.check_tree()
    assert result.code == 0, result.stderr
    assert f"all in order {count}" in result.all_output()
    child = result.children(result.top)[0]
    samples = [line.split()[1:] for line in result.output(child).decode().splitlines() if line.startswith("progress")]
    samples = [(float(t), int(n), int(rss)) for t, n, rss in samples]
    resumed = float(next(line for line in result.all_output().splitlines() if line.startswith("resumed")).split()[1])
    stalled = [s for s in samples if samples[0][0] + 2 <= s[0] <= resumed - 0.3]
    assert len(stalled) >= 4, samples
    sent_during = {n for _, n, _ in stalled}
    assert max(sent_during) < count, "the sender never blocked"
    assert max(sent_during) - min(sent_during) <= 16, f"the sender kept sending while nobody read: {sent_during}"
    rss = [r for _, _, r in stalled]
    assert max(rss) - min(rss) < 8 << 20, rss
    top_lines = {
        line.rsplit(" ", 1)[0]: int(line.rsplit(" ", 1)[1])
        for line in result.output(result.top).decode().splitlines()
        if line.startswith("top rss")
    }
    record(
        "receiver stalled",
        pause_s=pause,
        messages=count,
        blocked_after=max(sent_during),
        sender_rss_mib=round(max(rss) / 2**20, 1),
        sender_rss_spread_kib=(max(rss) - min(rss)) // 1024,
        receiver_rss_growth_mib=round((top_lines["top rss stalled"] - top_lines["top rss before"]) / 2**20, 1),
    )


def test_no_message_duplicated_reordered_or_corrupted_across_channel_re_creation(script):
    count = int(os.environ.get("DEPLOY_RELIABILITY_MESSAGES") or scaled(3_000, 100_000))  # per producer
    job = script(
        """
        import os, random, sys, zlib, deploy

        BLOCK = os.urandom(9 << 20)

        def size(rng):
            roll = rng.random()
            if roll < 0.02:
                return rng.randrange(1 << 20, (8 << 20) + 1)  # up to 8 MiB
            if roll < 0.2:
                return rng.randrange(4096, 1 << 20)
            if roll < 0.25:
                return 0
            return rng.randrange(0, 4096)

        def producer(parent, arg):
            index, count, seed = arg
            rng = random.Random(seed)
            tx, n = None, 0
            while n < count:
                tx = deploy.Sender[tuple](parent)
                for _ in range(rng.randrange(1, 200)):  # closed and re-created mid-stream
                    if n == count:
                        break
                    length = size(rng)
                    offset = rng.randrange(0, len(BLOCK) - length + 1)
                    payload = BLOCK[offset : offset + length]
                    tx.send((index, n, zlib.crc32(payload), payload))
                    n += 1
                tx.close()

        if __name__ == "__main__":
            count = int(sys.argv[1])
            deploy.init()
            producers = [deploy.spawn(producer, (index, count, index * 7919)) for index in range(2)]
            rng = random.Random(1)
            expected = [0, 0]
            total_bytes = 0
            while expected != [count, count]:
                index = rng.randrange(2)
                if expected[index] == count:
                    continue
                with deploy.Receiver[tuple](producers[index]) as rx:
                    for _ in range(rng.randrange(1, 300)):
                        if expected[index] == count:
                            break
                        source, n, crc, payload = rx.recv(timeout=60)
                        assert source == index, (source, index)
                        assert n == expected[index], f"producer {index}: got message {n}, expected {expected[index]}"
                        assert zlib.crc32(payload) == crc, f"producer {index}: message {n} corrupted"
                        expected[index] += 1
                        total_bytes += len(payload)
            print("verified", sum(expected), total_bytes)
        """
    )
    started = time.monotonic()
    result = run(job, str(count), timeout=scaled(180, 1800))
    elapsed = time.monotonic() - started
    result.check_tree()
    assert result.code == 0, result.all_output(2)
    line = next(line for line in result.all_output().splitlines() if line.startswith("verified"))
    _, messages, total = line.split()
    assert int(messages) == 2 * count
    record("order and integrity", messages=int(messages), mib=int(total) >> 20, seconds=round(elapsed, 1))


def test_ctrl_c_reports_every_process_interrupted(script):
    live = _live(script(CHATTER))
    try:
        live.wait_printed("zygote ")
        wait_for(lambda: len([e for e in live.events if e["event"] == "spawn"]) == 3, 30, "three spawn events")
        live.process.send_signal(signal.SIGINT)
        code = live.finish(timeout=30)
    finally:
        if live.process.poll() is None:
            live.process.kill()
    assert_no_survivors(live.tag)
    result = Run(code, live.events, live.stderr.decode(errors="replace"))
    result.check_tree()
    assert code == 128 + signal.SIGINT
    assert [event["reason"] for event in result.exits().values()] == ["interrupted"] * 3, result.exits()
