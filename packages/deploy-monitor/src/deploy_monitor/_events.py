"""The events a monitor reports: a child's output as it arrives, then its exit status.

Facts this module relies on (waitpid(2), signal(7)):
- A ``waitpid`` status is either "exited" (``WIFEXITED``, code 0-255 in ``WEXITSTATUS``) or
  "killed by a signal" (``WIFSIGNALED``, number in ``WTERMSIG``); we never ask for stopped
  or continued children (no ``WUNTRACED``/``WCONTINUED``), so no other kind reaches us.
- ``signal.Signals`` names the classic signals; real-time signals between ``SIGRTMIN`` and
  ``SIGRTMAX`` have no member of their own, so they are named ``SIGRTMIN+n`` as ``kill -l``
  does.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

__all__ = ["Exit", "Output", "exit_from_status", "signal_name"]


@dataclass(frozen=True)
class Output:
    """A chunk of a child's output, exactly the bytes read from its pipe.

    ``fd`` is the child's file descriptor it was written to: 1 (stdout) or 2 (stderr).
    Chunks are not aligned to lines; a consumer that wants lines keeps the partial one.
    """

    fd: int
    data: bytes

    def __post_init__(self) -> None:
        if self.fd not in (1, 2):
            raise ValueError(f"Output.fd must be 1 or 2, not {self.fd!r}")


@dataclass(frozen=True)
class Exit:
    """How a child ended: exactly one of ``code`` (it exited) and ``signal`` (it was killed) is set.

    ``signal`` is a name such as ``"SIGKILL"``; ``reason`` says why the monitor killed it
    (``"memory limit 20MiB exceeded"``, ``"bridge lost"``) and is ``None`` otherwise.
    """

    code: int | None
    signal: str | None
    reason: str | None = None

    def __post_init__(self) -> None:
        if (self.code is None) == (self.signal is None):
            raise ValueError(
                f"exactly one of Exit.code and Exit.signal must be set, got code={self.code!r} signal={self.signal!r}"
            )

    @property
    def returncode(self) -> int:
        """The status as ``subprocess`` reports it: the exit code, or ``-N`` for signal N."""
        if self.code is not None:
            return self.code
        return -_signal_number(self.signal or "")

    @property
    def success(self) -> bool:
        """Whether the child exited with code 0."""
        return self.code == 0


def signal_name(number: int) -> str:
    """``"SIGKILL"`` for 9; ``"SIGRTMIN+2"`` for real-time signals; ``"SIG<n>"`` if nameless."""
    try:
        return signal.Signals(number).name
    except ValueError:
        pass
    low, high = getattr(signal, "SIGRTMIN", None), getattr(signal, "SIGRTMAX", None)
    if low is not None and high is not None and low < number < high:
        return f"SIGRTMIN+{number - low}"
    return f"SIG{number}"


def _signal_number(name: str) -> int:
    try:
        return int(signal.Signals[name])
    except KeyError:
        pass
    if name.startswith("SIGRTMIN+") and hasattr(signal, "SIGRTMIN"):
        return int(signal.SIGRTMIN) + int(name[len("SIGRTMIN+") :])
    return int(name[3:]) if name[3:].isdigit() else 0


def exit_from_status(status: int, reason: str | None = None) -> Exit:
    """Decode a ``waitpid`` status into an `Exit`."""
    if os.WIFSIGNALED(status):
        return Exit(code=None, signal=signal_name(os.WTERMSIG(status)), reason=reason)
    if os.WIFEXITED(status):
        return Exit(code=os.WEXITSTATUS(status), signal=None, reason=reason)
    raise ValueError(f"waitpid status {status:#x} is neither an exit nor a kill")
