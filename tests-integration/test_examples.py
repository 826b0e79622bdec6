"""The examples run as a new user would run them: python examples/NAME.py."""

from pathlib import Path

import pytest
from conftest import run

pytestmark = pytest.mark.timeout(90)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize(
    "name, expected",
    [
        ("hello.py", "total 4500!"),
        ("pool_select.py", "sum of squares of 0..39: 20540"),
        ("all_to_all.py", "totals [15, 14, 13, 12, 11, 10], correct"),
        ("asyncio_pipeline.py", "sum of squares below 1000: 332833500 (correct)"),
    ],
)
def test_example(name, expected):
    result = run(EXAMPLES / name)
    result.check_tree()
    assert result.code == 0, result.stderr
    assert expected in result.output(result.top).decode()
