"""Output reaches the terminal exactly and live, in both formats."""

import base64
import json
import os
import select
import subprocess
import time

import pytest
from conftest import assert_no_survivors, run, start

pytestmark = pytest.mark.timeout(90)


def test_binary_output_is_exact(script):
    job = script(
        """
        import os, sys, deploy

        def child(parent, _):
            sys.stdout.buffer.write(bytes(range(256)))
            sys.stdout.flush()
            os.write(2, bytes(range(255, -1, -1)))

        if __name__ == "__main__":
            deploy.init()
            deploy.spawn(child, None)
        """
    )
    result = run(job)
    result.check_tree()
    child = result.children(result.top)[0]
    assert result.output(child, 1) == bytes(range(256))
    assert result.output(child, 2) == bytes(range(255, -1, -1))
    assert result.stderr == ""  # JSON mode: nothing else from the runtime


def test_json_text_of_a_long_multibyte_line_is_exact(script):
    job = script(
        """
        import deploy

        def child(parent, _):
            print("€" * 100000)

        if __name__ == "__main__":
            deploy.init()
            deploy.spawn(child, None)
        """
    )
    result = run(job)
    child = result.children(result.top)[0]
    texts = [e["text"] for e in result.by_pid[child] if e["event"] == "output" and e["fd"] == 1]
    assert len(texts) > 1  # it did arrive in chunks
    assert "".join(texts) == "€" * 100000 + "\n"
    assert result.output(child) == ("€" * 100000 + "\n").encode()


def test_output_appears_while_the_process_still_runs(script):
    job = script(
        """
        import time, deploy

        def child(parent, _):
            print("started")
            time.sleep(4)
            print("finished")

        if __name__ == "__main__":
            deploy.init()
            deploy.spawn(child, None)
        """
    )
    process, tag = start(job)
    began = time.monotonic()
    seen, buffer = None, b""
    while seen is None and time.monotonic() - began < 10:
        ready, _, _ = select.select([process.stdout], [], [], 10)
        chunk = os.read(process.stdout.fileno(), 65536) if ready else b""
        if not chunk:
            break
        buffer += chunk
        for line in buffer.splitlines():
            event = json.loads(line) if line.endswith(b"}") else {}
            if event.get("event") == "output" and "started" in event["text"]:
                seen = time.monotonic() - began
    assert seen is not None and seen < 3.5, "output was held back"
    assert process.poll() is None  # the child is still sleeping
    process.communicate(timeout=30)
    assert process.returncode == 0
    assert_no_survivors(tag)


def test_human_format_of_the_readme_example(tmp_path):
    from pathlib import Path

    hello = Path(__file__).resolve().parent.parent / "examples" / "hello.py"
    result = run(hello, fmt="human")
    assert result.code == 0
    out = result.stdout.decode()
    assert "   total 4500!\n" in out
    for index in range(10):
        assert f"   hello worker {index}!\n" in out
    headers = [line for line in result.stderr.splitlines() if not line.startswith("   ")]
    assert all(len(line) == 8 and line.endswith(":") for line in headers), headers
    assert result.stderr.count("   exited: 0") == 11
    assert result.stderr.count("   spawned: ") == 10


def test_long_output_is_not_lost(script):
    job = script(
        """
        import deploy

        def child(parent, _):
            for index in range(50000):
                print(f"line {index:05d} " + "x" * 40)

        if __name__ == "__main__":
            deploy.init()
            deploy.spawn(child, None)
        """
    )
    result = run(job)
    child = result.children(result.top)[0]
    lines = result.output(child).decode().splitlines()
    assert len(lines) == 50000 and lines[-1].startswith("line 49999")


def test_the_top_process_keeps_stdin_and_children_read_nothing(script):
    job = script(
        """
        import sys, deploy

        def child(parent, _):
            deploy.Sender[str](parent).send(sys.stdin.read())

        if __name__ == "__main__":
            deploy.init()
            pid = deploy.spawn(child, None)
            print(repr(deploy.Receiver[str](pid).recv()), repr(sys.stdin.read()))
        """
    )
    process, tag = start(job, fmt="json", stdin=subprocess.PIPE)
    stdout, _ = process.communicate(input=b"typed at the terminal\n", timeout=30)
    assert process.returncode == 0
    events = [json.loads(line) for line in stdout.splitlines()]
    top = events[0]["pid"]
    output = b"".join(base64.b64decode(e["b64"]) for e in events if e["event"] == "output" and e["pid"] == top)
    assert output == b"'' 'typed at the terminal\\n'\n"
    assert_no_survivors(tag)
