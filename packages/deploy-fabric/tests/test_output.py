import base64
import json
import os

import pytest
from deploy_core import Pid, Resources
from deploy_fabric import HumanFormatter, JsonFormatter
from deploy_fabric._output import exit_text

A = Pid("3fecd01" + "0" * 25, "127.0.0.1", 4000)
B = Pid("9a1b2c3" + "0" * 25, "127.0.0.1", 4001)


@pytest.fixture
def pipes():
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    yield out_w, err_w, lambda: (_drain(out_r, out_w), _drain(err_r, err_w))
    for fd in (out_r, err_r):
        os.close(fd)


def _drain(read_fd, write_fd):
    os.set_blocking(read_fd, False)
    chunks = []
    while True:
        try:
            chunk = os.read(read_fd, 1 << 16)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def test_human_format_matches_the_design(pipes):
    out_w, err_w, read = pipes
    human = HumanFormatter(colour=False, out_fd=out_w, err_fd=err_w)
    human.spawn(A, None, Resources())
    human.output(A, 1, b"hello worker 0!\n")
    human.spawn(B, A, Resources())
    human.exit(B, 0, None, None)
    human.close()
    out, err = read()
    assert out == b"   hello worker 0!\n"
    assert err == b"3fecd01:\n   spawned: 9a1b2c3\n9a1b2c3:\n   exited: 0\n"


def test_partial_lines_are_kept_per_process_and_never_interleave(pipes):
    out_w, err_w, read = pipes
    human = HumanFormatter(colour=False, out_fd=out_w, err_fd=err_w)
    human.output(A, 1, b"hel")
    human.output(B, 1, b"wor")
    human.output(A, 1, b"lo\n")
    human.output(B, 1, b"ld\n")
    out, err = read()
    assert out == b"   hello\n   world\n"
    assert err == b"3fecd01:\n9a1b2c3:\n"


def test_a_partial_line_shows_after_a_delay_and_continues(pipes, monkeypatch):
    out_w, err_w, read = pipes
    human = HumanFormatter(colour=False, out_fd=out_w, err_fd=err_w)
    human.output(A, 1, b"name? ")
    assert human.tick() is not None  # not due yet
    monkeypatch.setattr("deploy_fabric._output.PARTIAL_LINE_DELAY", 0.0)
    assert human.tick() is None
    human.output(A, 1, b"bob\n")
    human.output(B, 1, b"x\n")
    out, _ = read()
    assert out == b"   name? bob\n   x\n"


def test_an_open_partial_line_is_ended_before_another_process_writes(pipes, monkeypatch):
    out_w, err_w, read = pipes
    monkeypatch.setattr("deploy_fabric._output.PARTIAL_LINE_DELAY", 0.0)
    human = HumanFormatter(colour=False, out_fd=out_w, err_fd=err_w)
    human.output(A, 1, b"progress...")
    human.tick()
    human.output(B, 1, b"other\n")
    out, err = read()
    assert out == b"   progress...\n   other\n"
    assert err == b"3fecd01:\n9a1b2c3:\n"


def test_a_slow_terminal_never_splits_a_line(monkeypatch):
    """A line that arrives in two chunks, with the bridge stuck writing other processes' lines
    to a slow reader in between, is still shown whole: time spent blocked on the terminal
    does not make a partial line look abandoned."""
    import fcntl
    import threading
    import time

    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    fcntl.fcntl(out_w, fcntl.F_SETPIPE_SZ, 4096)
    received = bytearray()

    def slow_reader() -> None:
        while chunk := os.read(out_r, 4096):
            received.extend(chunk)
            time.sleep(0.01)

    reader = threading.Thread(target=slow_reader)
    reader.start()
    C = Pid("5c5c5c5" + "0" * 25, "127.0.0.1", 4002)
    line = b"a" * 5000 + b"\n"
    try:
        human = HumanFormatter(colour=False, out_fd=out_w, err_fd=err_w)
        human.output(A, 1, line[:904])
        started = time.monotonic()
        for _ in range(10):
            human.output(B, 1, b"b" * 5000 + b"\n")
            human.output(C, 1, b"c" * 5000 + b"\n")
        assert time.monotonic() - started > 0.2, "the terminal was not slow"
        human.tick()  # what the bridge does before it reads on: more of B's, then the rest of A's
        human.output(B, 1, b"b" * 5000 + b"\n")
        human.output(A, 1, line[904:])
        human.close()
    finally:
        os.close(out_w)
        reader.join(timeout=20)
        os.close(out_r)
    err = _drain(err_r, err_w)
    os.close(err_w)
    os.close(err_r)
    assert b"   " + line in bytes(received), "A's line was split"
    assert err.count(b"3fecd01:") == 1, f"A's header repeated: {err!r}"


def test_exit_flushes_what_is_left_and_says_why(pipes):
    out_w, err_w, read = pipes
    human = HumanFormatter(colour=False, out_fd=out_w, err_fd=err_w)
    human.output(A, 2, b"no newline")
    human.exit(A, None, "SIGKILL", "memory limit 20MiB exceeded")
    out, err = read()
    assert out == b""
    assert err == b"3fecd01:\n   no newline\n   killed: SIGKILL (memory limit 20MiB exceeded)\n"


def test_headers_are_coloured_only_when_asked(pipes):
    out_w, err_w, read = pipes
    HumanFormatter(colour=True, out_fd=out_w, err_fd=err_w).exit(A, 1, None, None)
    _, err = read()
    assert err.startswith(b"\x1b[") and b"3fecd01:" in err and err.endswith(b"   exited: 1\n")


def test_exit_text():
    assert exit_text(0, None, None) == "exited: 0"
    assert exit_text(None, "SIGKILL", None) == "killed: SIGKILL"
    assert exit_text(None, "SIGKILL", "memory limit 20MiB exceeded") == "killed: SIGKILL (memory limit 20MiB exceeded)"


def test_json_events_are_exact(pipes):
    out_w, err_w, read = pipes
    formatter = JsonFormatter(fd=out_w)
    formatter.spawn(A, None, Resources("100MiB", 0.05))
    formatter.output(A, 1, bytes(range(256)))
    formatter.exit(A, None, "SIGABRT", None)
    out, err = read()
    assert err == b""
    spawn, output, exit_ = (json.loads(line) for line in out.splitlines())
    assert spawn == {
        "event": "spawn",
        "pid": A.hex,
        "parent": None,
        "addr": "127.0.0.1:4000",
        "resources": {"mem": 104857600, "cpu": 0.05},
    }
    assert base64.b64decode(output["b64"]) == bytes(range(256))
    assert output["fd"] == 1 and output["pid"] == A.hex and isinstance(output["text"], str)
    assert exit_ == {"event": "exit", "pid": A.hex, "code": None, "signal": "SIGABRT", "reason": None}


def test_json_text_is_exact_when_chunks_split_characters(pipes):
    out_w, err_w, read = pipes
    formatter = JsonFormatter(fd=out_w)
    data = ("€" * 3000 + " 🐍\n").encode()
    chunks = [data[:4097], data[4097:4098], data[4098:8191], data[8191:]]  # each cut inside a character
    for chunk in chunks:
        formatter.output(A, 1, chunk)
    formatter.output(B, 2, b"ab\xe2\x82")  # a character its process never finished
    formatter.exit(B, 0, None, None)
    formatter.exit(A, 0, None, None)
    out, _ = read()
    events = [json.loads(line) for line in out.splitlines()]
    outputs = [event for event in events if event["event"] == "output" and event["pid"] == A.hex]
    assert "".join(event["text"] for event in outputs) == data.decode()
    assert b"".join(base64.b64decode(event["b64"]) for event in outputs) == data
    for event in outputs:
        assert base64.b64decode(event["b64"]).decode() == event["text"]
    of_b = [event for event in events if event["pid"] == B.hex]
    assert [(e["event"], e.get("text")) for e in of_b] == [("output", "ab"), ("output", "\ufffd"), ("exit", None)]
    assert b"".join(base64.b64decode(e["b64"]) for e in of_b[:2]) == b"ab\xe2\x82"
