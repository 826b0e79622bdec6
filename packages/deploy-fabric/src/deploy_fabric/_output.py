"""How the bridge shows a run: the human format and the JSON event stream (DESIGN §5).

Both write with os.write straight to fds 1 and 2, so nothing sits in a Python buffer: a
line a process prints reaches the terminal as soon as the bridge has it.

Output arrives in chunks cut wherever a pipe read or a socket read happened to end, inside
a UTF-8 character as readily as anywhere. JSON events are therefore cut at character
boundaries: an incremental decoder per process and fd holds back the (at most three) bytes
of a character not yet complete until the rest arrives, so each event's ``text`` is its
``b64`` decoded, and together they are the exact bytes.

A write to a slow terminal (or a pipe into a slow reader) blocks the bridge, and meanwhile
the rest of a half-received line waits in a socket. So the delay after which a partial line
is shown counts only time the formatter was not blocked writing: a line is never cut, and
other processes' lines never land inside it, because the terminal was slow.
"""

from __future__ import annotations

import base64
import codecs
import json
import os
import time
from typing import Protocol

from deploy_core import Pid, Resources

__all__ = ["Formatter", "HumanFormatter", "JsonFormatter", "exit_text"]

# A partial line (a prompt, a progress dot) is shown once it has waited this long.
PARTIAL_LINE_DELAY = 0.1
_COLOURS = (31, 32, 33, 34, 35, 36, 91, 92, 93, 94, 95, 96)


def exit_text(code: int | None, signal: str | None, reason: str | None) -> str:
    """``exited: 0``, ``killed: SIGKILL`` and so on, with the reason in brackets."""
    if signal is not None:
        text = f"killed: {signal}"
    else:
        text = f"exited: {code if code is not None else '?'}"
    return f"{text} ({reason})" if reason else text


def _write(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except InterruptedError:
            continue
        except BrokenPipeError:
            return  # the reader went away (`| head`); keep running the job regardless
        view = view[written:]


class Formatter(Protocol):
    def spawn(self, pid: Pid, parent: Pid | None, resources: Resources) -> None: ...
    def output(self, pid: Pid, fd: int, data: bytes) -> None: ...
    def exit(self, pid: Pid, code: int | None, signal: str | None, reason: str | None) -> None: ...
    def tick(self) -> float | None:
        """Flush what has waited long enough; return seconds until the next flush is due."""
        ...

    def close(self) -> None: ...


class JsonFormatter:
    """One JSON object per line on stdout; nothing else."""

    def __init__(self, fd: int = 1):
        self._fd = fd
        self._decoders: dict[tuple[Pid, int], codecs.IncrementalDecoder] = {}

    def _emit(self, event: dict) -> None:
        _write(self._fd, (json.dumps(event, separators=(", ", ": ")) + "\n").encode())

    def spawn(self, pid: Pid, parent: Pid | None, resources: Resources) -> None:
        self._emit(
            {
                "event": "spawn",
                "pid": pid.hex,
                "parent": parent.hex if parent is not None else None,
                "addr": f"{pid.host}:{pid.port}",
                "resources": resources.to_dict(),
            }
        )

    def output(self, pid: Pid, fd: int, data: bytes) -> None:
        decoder = self._decoders.get((pid, fd))
        if decoder is None:
            decoder = self._decoders[pid, fd] = codecs.getincrementaldecoder("utf-8")("replace")
        held = decoder.getstate()[0]
        text = decoder.decode(data)
        whole = held + data
        self._emit_output(pid, fd, whole[: len(whole) - len(decoder.getstate()[0])], text)

    def _emit_output(self, pid: Pid, fd: int, data: bytes, text: str) -> None:
        if data:
            self._emit(
                {
                    "event": "output",
                    "pid": pid.hex,
                    "fd": fd,
                    "b64": base64.b64encode(data).decode("ascii"),
                    "text": text,
                }
            )

    def exit(self, pid: Pid, code: int | None, signal: str | None, reason: str | None) -> None:
        for fd in (1, 2):  # a character its process never finished
            decoder = self._decoders.pop((pid, fd), None)
            if decoder is not None:
                held = decoder.getstate()[0]
                self._emit_output(pid, fd, held, decoder.decode(b"", final=True))
        self._emit({"event": "exit", "pid": pid.hex, "code": code, "signal": signal, "reason": reason})

    def tick(self) -> float | None:
        return None

    def close(self) -> None:
        pass


class HumanFormatter:
    """Output grouped under ``<pid>:`` headers, whole lines only, never interleaved in a line.

    Headers and the runtime's own lines go to stderr; a process's output goes to the fd
    it was written to, indented by three spaces.
    """

    def __init__(self, *, colour: bool | None = None, out_fd: int = 1, err_fd: int = 2):
        self._fds = {1: out_fd, 2: err_fd}
        self._colour = os.isatty(err_fd) if colour is None else colour
        self._current: Pid | None = None  # whose header was written last
        self._open: tuple[Pid, int] | None = None  # a line shown in part, still without its newline
        # Held partial lines: (bytes, when held, seconds blocked in writes by then).
        self._partial: dict[tuple[Pid, int], tuple[bytes, float, float]] = {}
        self._blocked = 0.0  # seconds spent in writes so far

    def _write(self, fd: int, data: bytes) -> None:
        started = time.monotonic()
        _write(fd, data)
        self._blocked += time.monotonic() - started

    def _waited(self, since: float, blocked: float, now: float) -> float:
        """How long a partial line held since ``since`` has waited, time blocked in writes aside."""
        return now - since - (self._blocked - blocked)

    def _header(self, pid: Pid) -> None:
        self._end_open_line()
        if self._current == pid:
            return
        self._current = pid
        label = f"{pid}:"
        if self._colour:
            label = f"\x1b[{_COLOURS[int(pid.hex, 16) % len(_COLOURS)]}m{label}\x1b[0m"
        self._write(self._fds[2], (label + "\n").encode())

    def _end_open_line(self) -> None:
        if self._open is not None:
            self._write(self._fds[self._open[1]], b"\n")
            self._open = None

    def _content(self, pid: Pid, fd: int, chunk: bytes, *, complete: bool) -> None:
        end = b"\n" if complete else b""
        if self._open == (pid, fd):
            self._write(self._fds[fd], chunk + end)
        else:
            self._header(pid)
            self._write(self._fds[fd], b"   " + chunk + end)
        self._open = None if complete else (pid, fd)

    def _runtime_line(self, pid: Pid, text: str) -> None:
        self._header(pid)
        self._write(self._fds[2], f"   {text}\n".encode())

    def spawn(self, pid: Pid, parent: Pid | None, resources: Resources) -> None:
        if parent is not None:
            self._runtime_line(parent, f"spawned: {pid}")

    def output(self, pid: Pid, fd: int, data: bytes) -> None:
        key = (pid, fd)
        held, since, blocked = self._partial.pop(key, (b"", 0.0, 0.0))
        *lines, rest = (held + data).split(b"\n")
        for line in lines:
            self._content(pid, fd, line, complete=True)
        if rest:
            if not held or lines:
                since, blocked = time.monotonic(), self._blocked
            self._partial[key] = (rest, since, blocked)

    def _flush_partials(self, pid: Pid | None = None, *, older_than: float | None = None) -> None:
        now = time.monotonic()
        for key, (rest, since, blocked) in list(self._partial.items()):
            if pid is not None and key[0] != pid:
                continue
            if older_than is not None and self._waited(since, blocked, now) < older_than:
                continue
            del self._partial[key]
            self._content(key[0], key[1], rest, complete=pid is not None)

    def exit(self, pid: Pid, code: int | None, signal: str | None, reason: str | None) -> None:
        self._flush_partials(pid)
        if self._open is not None and self._open[0] == pid:
            self._end_open_line()
        self._runtime_line(pid, exit_text(code, signal, reason))

    def tick(self) -> float | None:
        self._flush_partials(older_than=PARTIAL_LINE_DELAY)
        if not self._partial:
            return None
        now = time.monotonic()
        longest = max(self._waited(since, blocked, now) for _, since, blocked in self._partial.values())
        return max(0.0, PARTIAL_LINE_DELAY - longest)

    def close(self) -> None:
        for pid in {key[0] for key in self._partial}:
            self._flush_partials(pid)
        self._end_open_line()
