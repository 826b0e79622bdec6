"""Shared fixtures: a bounded way to run one side of a connection in a thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest


class Background:
    """A callable running in a daemon thread; `result()` joins it (bounded) and re-raises."""

    def __init__(self, function: Callable[[], Any]):
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(function,), daemon=True)
        self._thread.start()

    def _run(self, function: Callable[[], Any]) -> None:
        try:
            self._value = function()
        except BaseException as error:  # handed to the test thread by result()
            self._error = error

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "background side did not finish in time"

    def result(self, timeout: float = 5.0) -> Any:
        self.join(timeout)
        if self._error is not None:
            raise self._error
        return self._value

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


@pytest.fixture
def background() -> Iterator[Callable[[Callable[[], Any]], Background]]:
    """Start callables in threads; fails the test if any is still running at teardown."""
    started: list[Background] = []

    def start(function: Callable[[], Any]) -> Background:
        started.append(Background(function))
        return started[-1]

    yield start
    for side in started:
        side.join(5.0)


@pytest.fixture(autouse=True)
def no_leftover_threads() -> Iterator[None]:
    """Every test leaves the thread count as it found it."""
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + 5.0
    while (extra := set(threading.enumerate()) - before) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not extra, f"threads left running: {extra}"
