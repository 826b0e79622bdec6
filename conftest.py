"""Lets ``pytest`` from the repository root run every package's tests in one session.

The root pyproject imports test modules with ``--import-mode=importlib``, so the five
``tests/test_public_api.py`` (and the several conftests) do not clash by name. In that
mode no test directory is on ``sys.path``; the suites whose test modules share helpers
through ``from conftest import ...`` (tests-integration, deploy-monitor) get, just before
each of their modules is imported, the conftest of that module's own directory under the
name ``conftest``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


def pytest_collectstart(collector: pytest.Collector) -> None:
    if not isinstance(collector, pytest.Module):
        return
    conftest = collector.path.parent / "conftest.py"
    if not conftest.exists():
        return
    for module in list(sys.modules.values()):
        if getattr(module, "__file__", None) and Path(module.__file__).resolve() == conftest.resolve():
            sys.modules["conftest"] = module
            return
