"""The bridge: a run's events on their way to the user, and the run's exit code.

The master tells the bridge of every process that starts, every piece of output and every
exit; the bridge hands them to the formatter (human or JSON), keeps each process to one
spawn and one exit, and works out the run's code: 0 if every process exited 0, else the
first failure's code (128+N for a signal N). It owns no socket: in local mode it lives in
the process that ran ``python job.py``, in cluster mode in ``deploy push``.
"""

from __future__ import annotations

from deploy_core import Pid, Resources
from deploy_monitor import Exit

from ._output import Formatter

__all__ = ["Bridge"]


class Bridge:
    def __init__(self, formatter: Formatter):
        self._out = formatter
        self._live: dict[str, Pid] = {}
        self._done: set[str] = set()
        self.code: int | None = None

    @property
    def live(self) -> list[Pid]:
        """The processes that have started and not yet exited."""
        return list(self._live.values())

    def spawned(self, pid: Pid, parent: Pid | None, resources: Resources) -> None:
        if pid.hex in self._live or pid.hex in self._done:
            return
        self._live[pid.hex] = pid
        self._out.spawn(pid, parent, resources)

    def output(self, pid: Pid, fd: int, data: bytes) -> None:
        if pid.hex in self._live:
            self._out.output(pid, fd, data)

    def exited(self, pid: Pid, code: int | None, signal_name: str | None, reason: str | None) -> None:
        if self._live.pop(pid.hex, None) is None:
            return
        self._done.add(pid.hex)
        self._out.exit(pid, code, signal_name, reason)
        if code != 0 or signal_name is not None:
            # (The monitor's decoding owns signal names: SIGRTMIN+2 has no signal.Signals member.)
            self.failed(
                (1 if code is None else code)
                if signal_name is None
                else 128 - Exit(code=None, signal=signal_name).returncode
            )

    def failed(self, code: int) -> None:
        """The run fails with ``code`` unless it has failed already."""
        if self.code is None:
            self.code = code

    def tick(self) -> float | None:
        """Flush held partial lines that are due; seconds until the next one is, or None."""
        return self._out.tick()

    def close(self) -> int:
        """Flush the output; the run's exit code."""
        self._out.close()
        return self.code or 0
