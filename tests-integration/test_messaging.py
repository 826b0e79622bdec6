"""Channels between spawned processes: both directions, types, nesting, select, exits, volume."""

import pytest
from conftest import run

pytestmark = pytest.mark.timeout(120)


def test_send_and_receive_in_both_directions(script):
    job = script(
        """
        import deploy

        def echo(parent, _):
            with deploy.Receiver[str](parent) as rx, deploy.Sender[str](parent) as tx:
                for _ in range(3):
                    tx.send(rx.recv().upper())

        if __name__ == "__main__":
            deploy.init()
            child = deploy.spawn(echo, None)
            tx, rx = deploy.Sender[str](child), deploy.Receiver[str](child)
            for word in ("a", "bb", "ccc"):
                tx.send(word)
                print(rx.recv())
        """
    )
    result = run(job)
    result.check_tree()
    assert result.output(result.top) == b"A\nBB\nCCC\n"
    assert result.code == 0


def test_ten_children_with_channel_type_changes(script):
    job = script(
        """
        import deploy

        def child(parent, index):
            with deploy.Sender[int](parent) as tx:
                tx.send(index)
            with deploy.Sender[str](parent) as tx:
                tx.send(f"child {index}")
            with deploy.Sender[list](parent) as tx:
                tx.send([index] * index)

        if __name__ == "__main__":
            deploy.init()
            pids = [deploy.spawn(child, index) for index in range(10)]
            for index, pid in enumerate(pids):
                with deploy.Receiver[int](pid) as rx:
                    assert rx.recv() == index
                with deploy.Receiver[str](pid) as rx:
                    assert rx.recv() == f"child {index}"
                with deploy.Receiver[list](pid) as rx:
                    assert rx.recv() == [index] * index
            print("all ten")
        """
    )
    result = run(job)
    result.check_tree()
    assert len(result.spawns()) == 11
    assert result.output(result.top) == b"all ten\n"
    assert result.code == 0


def test_nested_spawns_three_deep(script):
    job = script(
        """
        import deploy

        def level(parent, depth):
            if depth < 3:
                child = deploy.spawn(level, depth + 1)
                below = deploy.Receiver[list](child).recv()
            else:
                below = []
            deploy.Sender[list](parent).send([depth] + below)

        if __name__ == "__main__":
            deploy.init()
            child = deploy.spawn(level, 1)
            print(deploy.Receiver[list](child).recv())
        """
    )
    result = run(job)
    result.check_tree()
    assert result.output(result.top) == b"[1, 2, 3]\n"
    one = result.children(result.top)
    two = result.children(one[0])
    three = result.children(two[0])
    assert len(one) == len(two) == len(three) == 1
    assert all(code["code"] == 0 for code in result.exits().values())


def test_concurrent_spawns_from_several_threads(script):
    job = script(
        """
        import threading, deploy

        def child(parent, index):
            deploy.Sender[int](parent).send(index)

        def spawner(base, results):
            for index in range(base, base + 5):
                pid = deploy.spawn(child, index)
                results.append(deploy.Receiver[int](pid).recv())

        if __name__ == "__main__":
            deploy.init()
            results = []
            threads = [threading.Thread(target=spawner, args=(base, results)) for base in range(0, 20, 5)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            print(sorted(results) == list(range(20)))
        """
    )
    result = run(job)
    result.check_tree()
    assert len(result.spawns()) == 21
    assert result.output(result.top) == b"True\n"


def test_all_to_all_among_siblings(script):
    job = script(
        """
        import deploy

        def worker(parent, index):
            peers = deploy.Receiver[list](parent).recv()
            others = [pid for pid in peers if pid != deploy.pid()]
            for pid in others:
                deploy.Sender[int](pid).send(index)
            got = sorted(deploy.Receiver[int](pid).recv() for pid in others)
            deploy.Sender[list](parent).send(got)

        if __name__ == "__main__":
            deploy.init()
            pids = [deploy.spawn(worker, index) for index in range(5)]
            for pid in pids:
                deploy.Sender[list](pid).send(pids)
            for index, pid in enumerate(pids):
                assert deploy.Receiver[list](pid).recv() == [i for i in range(5) if i != index]
            print("ok")
        """
    )
    result = run(job)
    result.check_tree()
    assert result.output(result.top) == b"ok\n"


def test_select_over_several_children(script):
    job = script(
        """
        import time, deploy

        def child(parent, delay):
            time.sleep(delay)
            deploy.Sender[float](parent).send(delay)

        if __name__ == "__main__":
            deploy.init()
            delays = [0.6, 0.1, 0.3]
            receivers = [deploy.Receiver[float](deploy.spawn(child, delay)) for delay in delays]
            order = []
            pending = list(receivers)
            while pending:
                ready = deploy.select(*pending)
                assert ready in pending
                order.append(ready.recv())
                pending.remove(ready)
            print(order)
            try:
                deploy.select(deploy.Receiver[int](deploy.spawn(child, 5.0)), timeout=0.2)
            except TimeoutError:
                print("timeout")
        """
    )
    result = run(job)
    result.check_tree()
    assert result.output(result.top) == b"[0.1, 0.3, 0.6]\ntimeout\n"


def test_peer_exit_while_receiving(script):
    job = script(
        """
        import time, deploy

        def quits(parent, _):
            deploy.Sender[int](parent).send(1)
            time.sleep(0.3)

        if __name__ == "__main__":
            deploy.init()
            rx = deploy.Receiver[int](deploy.spawn(quits, None))
            print(rx.recv())
            started = time.monotonic()
            try:
                rx.recv()
            except deploy.PeerExited as error:
                print(f"peer exited, code {error.code}, after {time.monotonic() - started < 2}")
        """
    )
    result = run(job)
    result.check_tree()
    assert result.output(result.top) == b"1\npeer exited, code 0, after True\n"


def test_ten_thousand_messages_sent_just_before_exit_all_arrive(script):
    job = script(
        """
        import deploy

        def flood(parent, count):
            tx = deploy.Sender[int](parent)
            for index in range(count):
                tx.send(index)

        if __name__ == "__main__":
            deploy.init()
            rx = deploy.Receiver[int](deploy.spawn(flood, 10000))
            got = [rx.recv() for _ in range(10000)]
            print(got == list(range(10000)))
        """
    )
    result = run(job)
    result.check_tree()
    assert result.output(result.top) == b"True\n"


def test_a_64_mib_message(script):
    job = script(
        """
        import hashlib, deploy

        def big(parent, _):
            data = bytes(range(256)) * (64 * 1024 * 4)
            deploy.Sender[bytes](parent).send(data)
            deploy.Sender[str](parent).send(hashlib.sha256(data).hexdigest())

        if __name__ == "__main__":
            deploy.init(deploy.Resources(mem="1GiB"))
            child = deploy.spawn(big, None, deploy.Resources(mem="1GiB"))
            data = deploy.Receiver[bytes](child).recv()
            digest = deploy.Receiver[str](child).recv()
            print(len(data), hashlib.sha256(data).hexdigest() == digest)
        """
    )
    result = run(job)
    result.check_tree()
    assert result.output(result.top) == f"{64 * 2**20} True\n".encode()
