"""Scale and figures for the reliability suite (test_reliability_*.py, scripts/soak.py).

``DEPLOY_RELIABILITY=full`` runs every scenario at the size issue 9 names (1,000
processes, 2,000 spawns, 30 s stalls, ...); anything else runs the bounded CI size.
``DEPLOY_RELIABILITY_MESSAGES`` sets the messages per producer of the order-and-integrity
scenario (scripts/soak.py --messages).
Each scenario records its figures with `record`; when ``DEPLOY_RELIABILITY_FIGURES``
names a file, they are appended to it as JSON lines (scripts/soak.py prints them).
"""

from __future__ import annotations

import json
import os
import time

import psutil

FULL = os.environ.get("DEPLOY_RELIABILITY", "").strip().lower() == "full"


def scaled(ci: int | float, full: int | float):
    """``full`` under DEPLOY_RELIABILITY=full, else ``ci``."""
    return full if FULL else ci


def record(scenario: str, **figures) -> None:
    """Note a scenario's figures: printed (pytest -s shows them) and kept for the soak."""
    line = json.dumps({"scenario": scenario, "full": FULL, **figures}, sort_keys=True)
    print(line)
    path = os.environ.get("DEPLOY_RELIABILITY_FIGURES")
    if path:
        with open(path, "a") as out:
            out.write(line + "\n")


def wait_for(condition, timeout: float, what: str, interval: float = 0.05):
    """Poll ``condition`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def listening_ports(pid: int) -> list[int]:
    return sorted(c.laddr.port for c in psutil.Process(pid).net_connections("tcp") if c.status == psutil.CONN_LISTEN)


class LiveRun:
    """A run read while it runs: its JSON events as they come, from a reader thread."""

    def __init__(self, process, tag: str):
        import threading

        self.process, self.tag = process, tag
        self.events: list[dict] = []
        self.stderr = b""
        self._out = threading.Thread(target=self._read_stdout, daemon=True)
        self._err = threading.Thread(target=self._read_stderr, daemon=True)
        self._out.start()
        self._err.start()

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            if line.startswith(b'{"event"'):
                self.events.append(json.loads(line))

    def _read_stderr(self) -> None:
        self.stderr = self.process.stderr.read()

    def printed(self, needle: str) -> list[str]:
        """Complete lines of output (any process, any fd) containing ``needle``."""
        import base64
        from collections import defaultdict

        streams: dict = defaultdict(bytes)
        for event in list(self.events):
            if event["event"] == "output":
                streams[event["pid"], event["fd"]] += base64.b64decode(event["b64"])
        lines = []
        for data in streams.values():
            lines += [line for line in data.decode(errors="replace").split("\n")[:-1] if needle in line]
        return lines

    def wait_printed(self, needle: str, timeout: float = 30) -> str:
        return wait_for(lambda: self.printed(needle), timeout, f"a line with {needle!r}")[0]

    def finish(self, timeout: float = 60) -> int:
        code = self.process.wait(timeout=timeout)
        self._out.join(10)
        self._err.join(10)
        return code
