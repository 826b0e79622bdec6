"""A user's type checker sees deploy: mypy, run as a user runs it on their script, reports
the mistakes deploy's annotations exist to catch and accepts the README's and examples'
programs (all of them under --strict)."""

from __future__ import annotations

import importlib.resources
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parent.parent

# Each line that mypy must flag ends in "# error: CODE"; no other line may be flagged.
MISTAKES = textwrap.dedent(
    """\
    from dataclasses import dataclass

    import deploy


    @dataclass
    class Job:
        index: int


    def worker(parent: deploy.Pid, job: Job) -> None:
        deploy.Sender[int](parent).send("text")  # error: arg-type
        deploy.Sender[int](parent).send(job.index)


    def main() -> None:
        deploy.init()
        pid = deploy.spawn(worker, Job(1))
        deploy.spawn(worker, "not a Job")  # error: arg-type
        deploy.try_spawn(worker, 3, deploy.Resources(mem="1GiB", cpu=1))  # error: arg-type
        deploy.spawn(lambda parent, arg: print(parent, arg), [1, 2])
        x: str = deploy.Receiver[int](pid).recv()  # error: assignment
        y: int = deploy.Receiver[int](pid).recv()
        rx, tx = deploy.Receiver[int](pid), deploy.Sender[str](pid)
        ready = deploy.select(rx, tx, timeout=1.0)
        ready.recv()  # error: union-attr
        if ready is rx:
            y = ready.recv()
        else:
            tx.send(x)
        with deploy.Receiver[bytes](pid) as data:
            y = data.recv()  # error: assignment
        print(x, y, deploy.pid().hex, deploy.resources().mem)
    """
)


def _readme_programs() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def _mypy(tmp_path: Path, files: list[Path]) -> str:
    # A config of its own: the repository's [tool.mypy] is for deploy's sources.
    config = tmp_path / "mypy.ini"
    config.write_text("[mypy]\nstrict = True\n")
    command = [sys.executable, "-m", "mypy", "--config-file", str(config), "--cache-dir", str(tmp_path / "cache")]
    result = subprocess.run(
        [*command, "--no-error-summary", *map(str, files)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode in (0, 1), result.stdout + result.stderr
    return result.stdout


def test_mypy_catches_mistakes_and_accepts_the_documented_programs(tmp_path: Path) -> None:
    mistakes = tmp_path / "mistakes.py"
    mistakes.write_text(MISTAKES)
    programs = sorted((REPO / "examples").glob("*.py"))
    readme = _readme_programs()
    assert readme, "the README has no python example"
    for index, source in enumerate(readme):
        path = tmp_path / f"readme_{index}.py"
        path.write_text(source)
        programs.append(path)
    output = _mypy(tmp_path, [mistakes, *programs])

    flagged = {}
    for line in output.splitlines():
        match = re.match(r"(?P<file>[^:]+):(?P<line>\d+): error: .*\[(?P<code>[\w-]+)\]$", line)
        if match:
            flagged.setdefault(Path(match["file"]).name, set()).add((int(match["line"]), match["code"]))
    expected = {
        (number, comment.split("# error: ")[1])
        for number, comment in enumerate(MISTAKES.splitlines(), start=1)
        if "# error: " in comment
    }
    assert flagged.pop("mistakes.py", set()) == expected, output
    assert flagged == {}, f"mypy rejected a documented program:\n{output}"
    # The messages say what a user needs to fix, in the user's terms.
    assert 'Argument 1 to "send" of "Sender" has incompatible type "str"; expected "int"' in output
    assert 'expression has type "int", variable has type "str"' in output
    assert 'Argument 1 to "spawn" has incompatible type "Callable[[Pid, Job], None]"' in output


@pytest.mark.parametrize(
    "package", ["deploy", "deploy_core", "deploy_channels", "deploy_monitor", "deploy_fabric", "deploy_cli"]
)
def test_every_distribution_is_marked_typed(package: str) -> None:
    # PEP 561: without the marker a type checker skips the package ("missing library stubs").
    assert importlib.resources.files(package).joinpath("py.typed").is_file()
