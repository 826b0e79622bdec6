#!/usr/bin/env python3
"""Benchmark deploy-channels against multiprocessing.connection, pyzmq and a raw socket.

Two processes on loopback for every figure. Prints ratios (the machines are shared and
noisy, so each figure is the median of a few repeats); `main()` returns them too, and
the bench_* functions return raw numbers for scripts/bench.py.

    python scripts/bench_channels.py [--repeat 3] [--quick] [--protect all]
"""

from __future__ import annotations

import argparse
import os
import pickle
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time

SECRET = b"bench-secret"
# deploy_channels.Endpoint's frame protection for every endpoint of the benchmark (the
# children inherit it through the environment): off, remote or all.
PROTECT = os.environ.get("DEPLOY_BENCH_PROTECT", "off")
MIB = 1 << 20

# --- children -----------------------------------------------------------------------------
# Each child is this script run with --child KIND ROLE N SIZE; it prints its address on
# stdout, reads the parent's on stdin, then plays ROLE: "sink" receives N messages and
# answers one ack; "echo" returns N messages one by one; "flood" sends N (or forever).


def _child(kind: str, role: str, n: int, size: int) -> None:
    if kind == "channels":
        _child_channels(role, n, size)
    elif kind == "mp":
        _child_mp(role, n)
    elif kind == "zmq":
        _child_zmq(role, n)
    elif kind == "raw":
        _child_raw(role, n)
    elif kind == "idle100":
        _child_idle100()
    else:
        raise SystemExit(f"unknown child kind {kind}")


def _child_channels(role: str, n: int, size: int) -> None:
    import deploy_channels as dc
    from deploy_core import Pid

    ep = dc.Endpoint("127.0.0.1:0", secret=SECRET, protect=PROTECT)
    print(ep.pid.format(), flush=True)
    parent = Pid.parse(sys.stdin.readline())
    rx, tx = dc.Receiver(parent, endpoint=ep), dc.Sender(parent, endpoint=ep)
    if role == "sink":
        for _ in range(n):
            rx.recv()
        tx.send(b"ack")
    elif role == "echo":
        for _ in range(n):
            tx.send(rx.recv())
    elif role == "flood":
        payload = bytes(size)
        while True:
            tx.send(payload)
    ep.close()


def _child_mp(role: str, n: int) -> None:
    from multiprocessing.connection import Client

    host, port = sys.stdin.readline().split()
    print("ready", flush=True)
    conn = Client((host, int(port)), authkey=SECRET)
    if role == "sink":
        for _ in range(n):
            conn.recv()
        conn.send(b"ack")
    else:
        for _ in range(n):
            conn.send(conn.recv())
    conn.close()


def _child_zmq(role: str, n: int) -> None:
    import zmq

    address = sys.stdin.readline().strip()
    print("ready", flush=True)
    context = zmq.Context()
    sock = context.socket(zmq.PAIR)
    sock.connect(address)
    if role == "sink":
        for _ in range(n):
            sock.recv_pyobj()
        sock.send_pyobj(b"ack")
    else:
        for _ in range(n):
            sock.send_pyobj(sock.recv_pyobj())
    sock.close(linger=1000)
    context.term()


def _child_raw(role: str, n: int) -> None:
    host, port = sys.stdin.readline().split()
    print("ready", flush=True)
    sock = socket.create_connection((host, int(port)))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stream = sock.makefile("rb")
    for _ in range(n):
        (length,) = struct.unpack(">I", stream.read(4))
        data = pickle.dumps(pickle.loads(stream.read(length)), protocol=5)
        sock.sendall(struct.pack(">I", len(data)) + data)
    sock.close()


def _child_idle100() -> None:
    import deploy_channels as dc
    from deploy_core import Pid

    ep = dc.Endpoint("127.0.0.1:0", secret=SECRET, protect=PROTECT)
    print(ep.pid.format(), flush=True)
    pids = [Pid.parse(line) for line in sys.stdin.readline().split()]
    before = _rss(os.getpid())
    channels = []
    for index, pid in enumerate(pids):
        channel = dc.Sender(pid, endpoint=ep) if index % 2 else dc.Receiver(pid, endpoint=ep)
        channels.append(channel)
    for channel in channels:
        if isinstance(channel, dc.Sender):
            channel.send(0)
    time.sleep(1.0)  # every connection established and idle
    print(before, _rss(os.getpid()), len(ep._conns), flush=True)
    sys.stdin.readline()


def _spawn(kind: str, role: str, n: int, size: int = 0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--child", kind, role, str(n), str(size)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> None:
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.stdin.close()
    proc.stdout.close()


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# --- peers, parent side ---------------------------------------------------------------------


class _Channels:
    name = "deploy_channels"

    def __init__(self, role: str, n: int, size: int = 0):
        import deploy_channels as dc
        from deploy_core import Pid

        self.ep = dc.Endpoint("127.0.0.1:0", secret=SECRET, protect=PROTECT)
        self.proc = _spawn("channels", role, n, size)
        peer = Pid.parse(self.proc.stdout.readline())
        self.proc.stdin.write(self.ep.pid.format() + "\n")
        self.proc.stdin.flush()
        self.tx, self.rx = dc.Sender(peer, endpoint=self.ep), dc.Receiver(peer, endpoint=self.ep)
        self.send, self.recv = self.tx.send, self.rx.recv

    def close(self) -> None:
        _finish(self.proc)
        self.ep.close(timeout=2)


class _Mp:
    name = "multiprocessing.connection"

    def __init__(self, role: str, n: int, size: int = 0):
        from multiprocessing.connection import Listener

        self.listener = Listener(("127.0.0.1", 0), authkey=SECRET)
        self.proc = _spawn("mp", role, n, size)
        host, port = self.listener.address
        self.proc.stdin.write(f"{host} {port}\n")
        self.proc.stdin.flush()
        self.proc.stdout.readline()
        self.conn = self.listener.accept()
        self.send, self.recv = self.conn.send, self.conn.recv

    def close(self) -> None:
        _finish(self.proc)
        self.conn.close()
        self.listener.close()


class _Zmq:
    name = "pyzmq PAIR"

    def __init__(self, role: str, n: int, size: int = 0):
        import zmq

        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.PAIR)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.proc = _spawn("zmq", role, n, size)
        self.proc.stdin.write(f"tcp://127.0.0.1:{port}\n")
        self.proc.stdin.flush()
        self.proc.stdout.readline()
        self.send, self.recv = self.sock.send_pyobj, self.sock.recv_pyobj

    def close(self) -> None:
        _finish(self.proc)
        self.sock.close(linger=0)
        self.context.term()


class _Raw:
    name = "raw socket"

    def __init__(self, role: str, n: int, size: int = 0):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        self.proc = _spawn("raw", role, n, size)
        self.proc.stdin.write(f"127.0.0.1 {listener.getsockname()[1]}\n")
        self.proc.stdin.flush()
        self.proc.stdout.readline()
        self.sock, _ = listener.accept()
        listener.close()
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.stream = self.sock.makefile("rb")

    def send(self, value: object) -> None:
        data = pickle.dumps(value, protocol=5)
        self.sock.sendall(struct.pack(">I", len(data)) + data)

    def recv(self) -> object:
        (length,) = struct.unpack(">I", self.stream.read(4))
        return pickle.loads(self.stream.read(length))

    def close(self) -> None:
        _finish(self.proc)
        self.sock.close()


def _have_zmq() -> bool:
    try:
        import zmq  # noqa: F401
    except ImportError:
        return False
    return True


# --- measurements ---------------------------------------------------------------------------


def one_way(peer_cls: type, count: int, value: object) -> float:
    """Messages per second, ``count`` copies of ``value`` sent one way (until the ack)."""
    peer = peer_cls("sink", count)
    try:
        send = peer.send
        start = time.perf_counter()
        for _ in range(count):
            send(value)
        peer.recv()
        return count / (time.perf_counter() - start)
    finally:
        peer.close()


def round_trip(peer_cls: type, count: int) -> float:
    """Median round-trip time in seconds of ``count`` ping-pongs of a small int."""
    peer = peer_cls("echo", count)
    try:
        times = []
        send, recv, clock = peer.send, peer.recv, time.perf_counter
        for i in range(count):
            start = clock()
            send(i)
            recv()
            times.append(clock() - start)
        return statistics.median(times[count // 10 :])  # skip the warm-up
    finally:
        peer.close()


def bench_small(count: int = 200_000, repeat: int = 3) -> dict[str, float]:
    peers = [_Channels, _Mp] + ([_Zmq] if _have_zmq() else [])
    return {cls.name: statistics.median(one_way(cls, count, 12345) for _ in range(repeat)) for cls in peers}


def bench_large(count: int = 200, size: int = MIB, repeat: int = 3) -> dict[str, float]:
    value = bytes(size)
    peers = [_Channels, _Mp] + ([_Zmq] if _have_zmq() else [])
    return {cls.name: statistics.median(one_way(cls, count, value) for _ in range(repeat)) for cls in peers}


def bench_latency(count: int = 5000, repeat: int = 3) -> dict[str, float]:
    peers = [_Channels, _Raw] + ([_Zmq] if _have_zmq() else [])
    return {cls.name: statistics.median(round_trip(cls, count) for _ in range(repeat)) for cls in peers}


def bench_idle_memory(channels: int = 100) -> dict[str, float]:
    """RSS of a process before and after opening ``channels`` channels to as many peers."""
    import deploy_channels as dc

    peers = [dc.Endpoint("127.0.0.1:0", secret=SECRET, protect=PROTECT) for _ in range(channels)]
    proc = _spawn("idle100", "-", 0)
    try:
        proc.stdout.readline()
        proc.stdin.write(" ".join(p.pid.format() for p in peers) + "\n")
        proc.stdin.flush()
        before, after, conns = (int(x) for x in proc.stdout.readline().split())
        proc.stdin.write("done\n")
        proc.stdin.flush()
    finally:
        _finish(proc)
        for peer in peers:
            peer.close(timeout=1)
    return {"rss_before": before, "rss_with_channels": after, "connections": conns}


def bench_flood_memory(seconds: float = 10.0, size: int = 64 * 1024) -> list[int]:
    """RSS samples (one a second) of a sender that outruns its (slow) receiver."""
    import deploy_channels as dc
    from deploy_core import Pid

    ep = dc.Endpoint("127.0.0.1:0", secret=SECRET, protect=PROTECT)
    proc = _spawn("channels", "flood", 0, size)
    samples = []
    try:
        peer = Pid.parse(proc.stdout.readline())
        proc.stdin.write(ep.pid.format() + "\n")
        proc.stdin.flush()
        rx = dc.Receiver(peer, endpoint=ep)
        dc.Sender(peer, endpoint=ep)
        stop = threading.Event()

        def slow_reader():
            while not stop.is_set():
                rx.recv(timeout=5)
                time.sleep(0.002)

        reader = threading.Thread(target=slow_reader, daemon=True)
        reader.start()
        for _ in range(int(seconds)):
            time.sleep(1.0)
            samples.append(_rss(proc.pid))
        stop.set()
    finally:
        proc.kill()
        _finish(proc)
        ep.close(timeout=1)
    return samples


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="fewer messages, shorter flood")
    parser.add_argument("--protect", choices=("off", "remote", "all"), help="Endpoint(protect=...) for every endpoint")
    args = parser.parse_args(argv)
    if args.protect is not None:
        global PROTECT
        PROTECT = os.environ["DEPLOY_BENCH_PROTECT"] = args.protect
    scale = 10 if args.quick else 1
    ratios: dict[str, float] = {}
    zmq = _have_zmq()

    small = bench_small(200_000 // scale, args.repeat)
    print("small messages (pickled ints, one way), messages/s:")
    for name, rate in small.items():
        print(f"  {name:28s} {rate:12,.0f}")
    ratios["small vs multiprocessing"] = small["deploy_channels"] / small["multiprocessing.connection"]
    if zmq:
        ratios["small vs pyzmq"] = small["deploy_channels"] / small["pyzmq PAIR"]

    large = bench_large(200 // scale, MIB, args.repeat)
    print("1 MiB messages, one way, messages/s:")
    for name, rate in large.items():
        print(f"  {name:28s} {rate:12,.1f}")
    ratios["1 MiB vs multiprocessing"] = large["deploy_channels"] / large["multiprocessing.connection"]
    if zmq:
        ratios["1 MiB vs pyzmq"] = large["deploy_channels"] / large["pyzmq PAIR"]

    latency = bench_latency(5000 // scale, args.repeat)
    print("ping-pong round trip, median microseconds:")
    for name, rtt in latency.items():
        print(f"  {name:28s} {rtt * 1e6:12.1f}")
    if zmq:
        ratios["round trip: pyzmq / ours"] = latency["pyzmq PAIR"] / latency["deploy_channels"]
    ratios["round trip: raw socket / ours"] = latency["raw socket"] / latency["deploy_channels"]

    idle = bench_idle_memory()
    print(
        f"idle endpoint with 100 channels: RSS {idle['rss_before'] / MIB:.1f} MiB before, "
        f"{idle['rss_with_channels'] / MIB:.1f} MiB with them ({idle['connections']} connections)"
    )
    ratios["idle: RSS growth for 100 channels (MiB)"] = (idle["rss_with_channels"] - idle["rss_before"]) / MIB

    flood = bench_flood_memory(3.0 if args.quick else 10.0)
    print("RSS of a sender outrunning its receiver, MiB per second: " + " ".join(f"{s / MIB:.1f}" for s in flood))
    ratios["flood: RSS last/first sample"] = flood[-1] / flood[0] if flood else float("nan")

    print("\nratios (higher is better for deploy_channels; targets in brackets):")
    targets = {
        "small vs multiprocessing": ">= 2",
        "1 MiB vs multiprocessing": ">= 0.5",
        "round trip: pyzmq / ours": ">= 1",
        "flood: RSS last/first sample": "~1 (flat)",
    }
    for name, value in ratios.items():
        print(f"  {name:42s} {value:8.2f}  {('[' + targets[name] + ']') if name in targets else ''}")
    return ratios


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        main()
