"""Issue 13: the bridge's control port decodes nothing but plain values, checks every claim
against the connection's authenticated identity, and survives a malformed message.

Each script is a process of the run that opens its own control connection (with the
run's secret: a holder of the secret that is buggy or hostile), sends one bad message,
waits for the bridge to close that connection, then spawns a child the normal way.
"""

import pytest
from conftest import run

pytestmark = pytest.mark.timeout(90)

PRELUDE = """
import logging, os, pickle, socket, sys
import deploy
from deploy_channels.framing import encode_frame
from deploy_core import Pid, Resources, SpawnRequest
from deploy_fabric import _process as _runtime, _wire as wire
from deploy_fabric._wire import Kind

MARKER = sys.argv[1]


class Payload:
    # Unpickling this creates the marker file: what a plain pickle.loads would run.
    def __reduce__(self):
        return (os.mkdir, (MARKER,))


def control(hello_pid=None):
    me = _runtime._me
    hello = (Kind.HELLO_PROCESS, (hello_pid or me.pid).format())
    return wire.connect(me.fabric, me.secret, me.pid.hex, hello)


def closed_by_the_bridge(sock, payload):
    sock.sendall(encode_frame(payload))
    sock.settimeout(20)
    try:
        while sock.recv(1 << 16):
            pass  # (the bridge's echo of an accepted hello comes first)
        return True
    except ConnectionResetError:
        return True
    finally:
        sock.close()


def child(parent, value):
    deploy.Sender[int](parent).send(value + 1)


if __name__ == "__main__":
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(name)s: %(message)s")
    deploy.init()
"""


def check_the_run_went_on(result, marker) -> str:
    result.check_tree()
    assert result.code == 0, result.stderr
    assert result.output(result.top) == b"closed 42\n", result.all_output(2)
    assert not marker.exists(), "the bridge unpickled a global from a control message"
    dropped = [line for line in result.stderr.splitlines() if "dropped the control connection" in line]
    assert len(dropped) == 1, result.stderr
    return dropped[0]


MALFORMED = {
    "global": "pickle.dumps((Kind.SPAWN.value, Payload()))",
    "global-in-hello": "pickle.dumps(Payload())",
    "not-a-pickle": "bytes(range(40))",
    "truncated-pickle": "pickle.dumps((Kind.SPAWN.value, b'x' * 100))[:30]",
    "not-a-tuple": "pickle.dumps({'spawn': 1})",
    "wrong-shape": "pickle.dumps((Kind.SPAWN.value, b'', b'', 3))",
    "unknown-kind": "pickle.dumps(('launch-missiles', 1))",
    "empty-frame": "b''",
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_control_message_closes_only_that_connection(script, tmp_path, case):
    marker = tmp_path / "marker"
    job = script(
        PRELUDE
        + f"""
    sock = control()
    closed = closed_by_the_bridge(sock, {MALFORMED[case]})
    pid = deploy.spawn(child, 41)
    print("closed" if closed else "still open", deploy.Receiver[int](pid).recv())
"""
    )
    result = run(job, str(marker))
    check_the_run_went_on(result, marker)


def test_a_malformed_hello_closes_the_connection(script, tmp_path):
    marker = tmp_path / "marker"
    job = script(
        PRELUDE
        + """
    me = _runtime._me
    sock = socket.create_connection(me.fabric)
    from deploy_core import authenticate
    authenticate(sock, me.secret, initiator=True, identity=me.pid.hex, wanted=wire.BRIDGE)
    closed = closed_by_the_bridge(sock, pickle.dumps((Kind.HELLO_PROCESS.value, Payload())))
    pid = deploy.spawn(child, 41)
    print("closed" if closed else "still open", deploy.Receiver[int](pid).recv())
"""
    )
    result = run(job, str(marker))
    check_the_run_went_on(result, marker)


FORGED = {
    "no-parent": "None",
    "invented-parent": "Pid.new('127.0.0.1', 9)",
    "another-process": "other",
}


@pytest.mark.parametrize("case", sorted(FORGED))
def test_a_forged_parent_is_refused(script, tmp_path, case):
    marker = tmp_path / "marker"
    job = script(
        PRELUDE
        + f"""
    other = deploy.spawn(child, 0)
    assert deploy.Receiver[int](other).recv() == 1
    request = SpawnRequest.build(child, 99, Resources.default(), {FORGED[case]})
    sock = control()
    closed = closed_by_the_bridge(sock, pickle.dumps((Kind.SPAWN.value, request.encode()), protocol=5))
    pid = deploy.spawn(child, 41)
    print("closed" if closed else "still open", deploy.Receiver[int](pid).recv())
"""
    )
    result = run(job, str(marker))
    line = check_the_run_went_on(result, marker)
    assert "parent" in line
    # Only the two honest spawns happened, both the top process's.
    assert [event["parent"] for event in result.spawns()] == [None, result.top, result.top]


def test_a_hello_naming_another_pid_is_refused(script, tmp_path):
    marker = tmp_path / "marker"
    job = script(
        PRELUDE
        + """
    other = deploy.spawn(child, 0)
    assert deploy.Receiver[int](other).recv() == 1
    sock = control(hello_pid=other)  # authenticates as us, claims to be the child
    closed = closed_by_the_bridge(sock, pickle.dumps((Kind.SPAWN.value, b"")))
    pid = deploy.spawn(child, 41)
    print("closed" if closed else "still open", deploy.Receiver[int](pid).recv())
"""
    )
    result = run(job, str(marker))
    line = check_the_run_went_on(result, marker)
    assert "authenticated as" in line
    assert [event["parent"] for event in result.spawns()] == [None, result.top, result.top]
