"""Lets ``pytest`` from the repository root run every package's tests in one session.

The root pyproject imports test modules with ``--import-mode=importlib``, so the five
``tests/test_public_api.py`` (and the several conftests) do not clash by name. That mode
puts no test directory on ``sys.path``, while the suites import what their directory
holds: helper modules (``from cluster import ...`` in tests-integration) and their own
conftest (``from conftest import ...`` in tests-integration and deploy-monitor). So, just
before each test module is imported, its directory goes on ``sys.path`` (as the default
import mode would put it) and the conftest of that directory becomes ``conftest``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest


def pytest_collectstart(collector: pytest.Collector) -> None:
    if not isinstance(collector, pytest.Module):
        return
    directory = str(collector.path.parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    conftest = collector.path.parent / "conftest.py"
    if not conftest.exists():
        return
    for module in list(sys.modules.values()):
        if getattr(module, "__file__", None) and Path(module.__file__).resolve() == conftest.resolve():
            sys.modules["conftest"] = module
            return
