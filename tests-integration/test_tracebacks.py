"""A spawned process that raises shows a traceback that points at the user's code: their
file, line and source line, for functions of the script, of an imported module, lambdas,
closures and functions defined after init(); none of the runtime's own frames."""

from __future__ import annotations

import pytest
from conftest import run, write_script

pytestmark = pytest.mark.timeout(90)

HELPER = """\
def fail_in_module(parent, arg):
    raise ValueError(f"module {arg}")
"""

JOB = """\
import deploy
import helper


def fail(parent, arg):
    raise RuntimeError(f"script {arg}")


def make_closure(n):
    def inner(parent, arg):
        raise KeyError(n + arg)
    return inner


def main():
    deploy.init()

    def after_init(parent, arg):
        raise LookupError(f"defined after init {arg}")

    for fn, arg in [
        (fail, 1),
        (helper.fail_in_module, 2),
        (lambda parent, arg: 1 / arg, 0),
        (make_closure(3), 4),
        (after_init, 5),
    ]:
        pid = deploy.spawn(fn, arg)
        print(pid.hex, flush=True)
        try:
            deploy.Receiver[int](pid).recv()
        except deploy.PeerExited:
            pass


if __name__ == "__main__":
    main()
"""


def test_tracebacks_name_the_users_file_line_and_source(tmp_path):
    write_script(tmp_path, HELPER, "helper.py")
    job = write_script(tmp_path, JOB)
    result = run(job)
    result.check_tree()
    assert result.code == 1, result.stderr
    pids = result.output(result.top).decode().split()
    assert len(pids) == 5
    script, helper = str(job), str(tmp_path / "helper.py")
    expected = [
        (f'File "{script}", line 6, in fail', 'raise RuntimeError(f"script {arg}")', "RuntimeError: script 1"),
        (f'File "{helper}", line 2, in fail_in_module', 'raise ValueError(f"module {arg}")', "ValueError: module 2"),
        (f'File "{script}", line 24, in <lambda>', "(lambda parent, arg: 1 / arg, 0),", "ZeroDivisionError"),
        (f'File "{script}", line 11, in inner', "raise KeyError(n + arg)", "KeyError: 7"),
        (f'File "{script}", line 19, in after_init', "raise LookupError(", "LookupError: defined after init 5"),
    ]
    for pid, (where, source, error) in zip(pids, expected, strict=True):
        lines = [line.strip() for line in result.output(pid, fd=2).decode().splitlines()]
        assert lines[0] == "Traceback (most recent call last):", lines
        # The user's frame comes first, then its source line: no frame of the runtime's.
        assert lines[1] == where, lines
        assert lines[2].startswith(source), lines
        assert lines[-1].startswith(error), lines
        assert result.exits()[pid]["code"] == 1


def test_human_output_shows_the_same_traceback(tmp_path):
    job = write_script(
        tmp_path,
        """\
        import deploy

        def fail(parent, arg):
            raise RuntimeError("boom")

        if __name__ == "__main__":
            deploy.init()
            deploy.spawn(fail, None)
        """,
    )
    result = run(job, fmt="human")
    assert result.code == 1
    text = result.stderr
    assert f'     File "{job}", line 4, in fail\n       raise RuntimeError("boom")\n   RuntimeError: boom\n' in text
    assert "deploy_fabric" not in text and "<dynamic-code>" not in text


def test_a_channel_error_in_the_users_code_shows_one_frame_of_deploy(tmp_path):
    job = write_script(
        tmp_path,
        """\
        import deploy

        def fail(parent, values):
            deploy.Sender[float](parent).send(sum(values) / len(values))

        if __name__ == "__main__":
            deploy.init()
            pid = deploy.spawn(fail, [])
            print(deploy.Receiver[float](pid).recv())
        """,
    )
    result = run(job)
    assert result.code == 1
    lines = [line.strip() for line in result.output(result.top, fd=2).decode().splitlines()]
    child = result.children(result.top)[0][:7]
    assert lines[:3] == [
        "Traceback (most recent call last):",
        f'File "{job}", line 9, in <module>',
        "print(deploy.Receiver[float](pid).recv())",
    ], lines
    assert lines[-1] == f"deploy_core.PeerExited: peer {child} has exited with code 1", lines
    frames = [line for line in lines if line.startswith("File ")]
    assert len(frames) == 2 and frames[1].endswith(", in recv"), lines  # not the link's internals
