"""Cluster mode, as local mode: a spawned process's traceback names the user's file (in
the node's copy of the bundle), line and source line, for functions of the script, of an
imported module, lambdas and closures; its peers get PeerExited with its exit code."""

from __future__ import annotations

import re

import pytest
from cluster import project, running

pytestmark = pytest.mark.timeout(120)

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


if __name__ == "__main__":
    deploy.init()
    for fn, arg in [(fail, 1), (helper.fail_in_module, 2), (lambda parent, arg: 1 / arg, 0), (make_closure(3), 4)]:
        pid = deploy.spawn(fn, arg, deploy.Resources(mem="300MiB"))
        try:
            deploy.Receiver[int](pid).recv()
        except deploy.PeerExited as error:
            print(error, flush=True)
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with running(tmp_path_factory.mktemp("cluster")) as cluster:
        yield cluster


def test_tracebacks_and_exit_codes_on_a_cluster(cluster, tmp_path):
    script = project(tmp_path / "job", JOB, **{"helper.py": HELPER})
    result = cluster.push(script)
    result.check_tree()
    assert result.code == 1, result.stderr
    children = result.children(result.top)
    assert result.output(result.top).decode().splitlines() == [
        f"peer {pid[:7]} has exited with code 1" for pid in children
    ]
    expected = [
        (r"job\.py", 6, "fail", 'raise RuntimeError(f"script {arg}")', "RuntimeError: script 1"),
        (r"helper\.py", 2, "fail_in_module", 'raise ValueError(f"module {arg}")', "ValueError: module 2"),
        (r"job\.py", 17, "<lambda>", "for fn, arg in [(fail, 1),", "ZeroDivisionError"),
        (r"job\.py", 11, "inner", "raise KeyError(n + arg)", "KeyError: 7"),
    ]
    for pid, (file, line, function, source, error) in zip(children, expected, strict=True):
        lines = [text.strip() for text in result.output(pid, fd=2).decode().splitlines()]
        assert lines[0] == "Traceback (most recent call last):", lines
        assert re.fullmatch(rf'File "/.+/{file}", line {line}, in {re.escape(function)}', lines[1]), lines
        assert lines[2].startswith(source), lines
        assert lines[-1].startswith(error), lines
