"""Issue 13 / DESIGN §4: the cluster daemons' own connections (node<->master,
push<->bridge) protect every record once they leave a machine: a network attacker on the
path cannot change or replay one.

All of it runs on loopback, which the daemons leave unprotected, so every daemon, push and
status here runs with the internal ``DEPLOY_PROTECT_ALL=1`` (protect every daemon
connection; both ends must have it). The attacker is a relay that one connection is
routed through (a worker joins the master through it, or a push reaches the bridge
through it), forwarding both ways and, when told, flipping a byte in a record or sending
a record it forwarded earlier once more.
"""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import struct
import threading

import pytest
from cluster import Daemon, free_port, project, running, wait_until

pytestmark = pytest.mark.timeout(150)

UP, DOWN = "up", "down"  # connector -> acceptor, and back
DROPPED = "dropped the protected connection with"
TAG = 16  # deploy_core's record: 4-byte length, data, 16-byte tag
TICKS = """
import time, deploy
deploy.init()
index = 0
while True:
    print("tick", index, flush=True)
    index += 1
    time.sleep(0.1)
"""


def whole_records(chunk: bytes) -> bool:
    """Whether ``chunk`` is one or more complete protected records (so it started, and
    ends, on a record boundary)."""
    pos = 0
    while pos < len(chunk):
        if len(chunk) - pos < 4:
            return False
        (size,) = struct.unpack_from(">I", chunk, pos)
        if not 0 < size <= 256 * 1024:
            return False
        pos += 4 + size + TAG
    return pos == len(chunk)


class Relay:
    """Relays the first connection it gets to ``target`` and closes its listener; can flip
    a byte in the next whole record going one way, or send the last whole record that went
    one way again."""

    def __init__(self, target: str):
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.addr = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.sinks: dict[str, socket.socket] = {}
        self.locks = {UP: threading.Lock(), DOWN: threading.Lock()}
        self.last_whole: dict[str, bytes] = {}
        self.at_boundary = {UP: False, DOWN: False}
        self.tamper = {UP: threading.Event(), DOWN: threading.Event()}
        self.changed = {UP: threading.Event(), DOWN: threading.Event()}
        self.ended = {UP: threading.Event(), DOWN: threading.Event()}  # its source closed
        self.sockets = [self.listener]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        self.listener.close()
        server = socket.create_connection(self.target)
        self.sockets += [client, server]
        self.sinks = {UP: server, DOWN: client}
        threading.Thread(target=self._pipe, args=(client, UP), daemon=True).start()
        threading.Thread(target=self._pipe, args=(server, DOWN), daemon=True).start()

    def _pipe(self, source: socket.socket, direction: str) -> None:
        sink = self.sinks[direction]
        while True:
            try:
                data = source.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                self.ended[direction].set()
                with contextlib.suppress(OSError):
                    sink.shutdown(socket.SHUT_WR)
                return
            with self.locks[direction]:
                whole = whole_records(data)
                if whole and self.tamper[direction].is_set():
                    self.tamper[direction].clear()
                    middle = len(data) // 2
                    data = data[:middle] + bytes([data[middle] ^ 0x20]) + data[middle + 1 :]
                    self.changed[direction].set()
                elif whole:
                    self.last_whole[direction] = data
                self.at_boundary[direction] = whole
                try:
                    sink.sendall(data)
                except OSError:
                    return

    def replay(self, direction: str) -> bytes:
        """Send the last whole record(s) that went ``direction`` again, on a record boundary."""
        wait_until(lambda: self.at_boundary[direction], 10, f"the {direction} stream at a record boundary")
        with self.locks[direction]:
            again = self.last_whole[direction]
            self.sinks[direction].sendall(again)
        return again

    def close(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.close()


@pytest.fixture
def protect_all(monkeypatch):
    """Every daemon, push and status this test starts protects its daemon connections."""
    monkeypatch.setenv("DEPLOY_PROTECT_ALL", "1")


def dropped_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if DROPPED in line]


def join_through_relay(cluster, tmp_path) -> tuple[Daemon, Relay]:
    """A worker that joins the cluster's master through a relay; waits until it is a node."""
    relay = Relay(cluster.master.addr)
    addr = f"127.0.0.1:{free_port()}"
    env = {**cluster.master.env, "DEPLOY_CACHE": str(cluster.root / "joiner" / "cache")}
    worker = Daemon(
        "joiner",
        addr,
        ["fabric", addr, "--mem", "1GiB", "--cpu", "1", "--join", relay.addr],
        cluster.root / "joiner",
        env,
    )
    cluster.workers.append(worker)
    worker.start()
    cluster.wait_ready(2)
    return worker, relay


def node_count(cluster) -> int:
    return len(cluster.status()["nodes"])


def test_a_tampered_record_from_a_node_is_refused_by_the_master(tmp_path, protect_all):
    with running(tmp_path / "cluster", workers=[]) as cluster:
        worker, relay = join_through_relay(cluster, tmp_path)
        try:
            relay.tamper[UP].set()  # the node's next heartbeat answer, changed on the way
            wait_until(relay.changed[UP].is_set, 10, "a record from the node to change")
            wait_until(relay.ended[DOWN].is_set, 10, "the master to close the node's connection")
            wait_until(lambda: node_count(cluster) == 1, 10, "the node to leave deploy status")
            lines = dropped_lines(cluster.master.log())
            assert len(lines) == 1, cluster.master.log()
            assert "node:" in lines[0] and "failed its check" in lines[0], lines
            assert dropped_lines(worker.log()) == [], worker.log()
        finally:
            relay.close()


def test_a_replayed_record_from_the_master_is_refused_by_the_node(tmp_path, protect_all):
    with running(tmp_path / "cluster", workers=[]) as cluster:
        worker, relay = join_through_relay(cluster, tmp_path)
        try:
            wait_until(lambda: DOWN in relay.last_whole, 10, "a whole record from the master")
            relay.replay(DOWN)  # a heartbeat the node already had, once more
            wait_until(relay.ended[UP].is_set, 10, "the node to close the master's connection")
            wait_until(lambda: node_count(cluster) == 1, 10, "the node to leave deploy status")
            lines = dropped_lines(worker.log())
            assert len(lines) == 1, worker.log()
            assert "master" in lines[0] and "failed its check" in lines[0], lines
            assert dropped_lines(cluster.master.log()) == [], cluster.master.log()
        finally:
            relay.close()


def through_relay(cluster) -> tuple[object, Relay]:
    relay = Relay(cluster.bridge)
    return dataclasses.replace(cluster, bridge=relay.addr), relay


def test_a_tampered_record_from_the_bridge_is_refused_by_the_push(tmp_path, protect_all):
    with running(tmp_path / "cluster", workers=[]) as cluster:
        relayed, relay = through_relay(cluster)
        try:
            push = relayed.start_push(project(tmp_path / "job", TICKS))
            push.wait_for_output("tick 3")
            relay.tamper[DOWN].set()  # an output event on its way to the push, changed
            wait_until(relay.changed[DOWN].is_set, 10, "a record from the bridge to change")
            result = push.finish(30)
            assert result.code != 0
            lines = dropped_lines(result.stderr)
            assert len(lines) == 1 and "bridge" in lines[0] and "failed its check" in lines[0], result.stderr
            wait_until(relay.ended[UP].is_set, 10, "the push to close its connection")
            wait_until(lambda: cluster.status()["runs"] == [], 15, "the run of the vanished push to end")
            assert dropped_lines(cluster.master.log()) == [], cluster.master.log()
        finally:
            relay.close()


def test_a_replayed_record_from_a_push_is_refused_by_the_bridge(tmp_path, protect_all):
    with running(tmp_path / "cluster", workers=[]) as cluster:
        relayed, relay = through_relay(cluster)
        try:
            push = relayed.start_push(project(tmp_path / "job", TICKS))
            push.wait_for_output("tick 3")
            relay.replay(UP)  # the push's last message (its end of stdin), once more
            result = push.finish(30)
            assert result.code != 0 and "lost the connection to the fabric" in result.stderr, result.stderr
            assert relay.ended[DOWN].is_set()  # the master closed it
            lines = dropped_lines(cluster.master.log())
            assert len(lines) == 1 and "push" in lines[0] and "failed its check" in lines[0], cluster.master.log()
            wait_until(lambda: cluster.status()["runs"] == [], 15, "the run of the dropped push to end")
            assert dropped_lines(result.stderr) == [], result.stderr
        finally:
            relay.close()
