"""What a monitored child does between ``fork`` and the user's code, and how it ends.

Facts this module relies on (fork(2), prctl(2), dup2(2), the io and gc modules):
- Without ``exec`` every inherited fd stays open in the child, close-on-exec or not: the
  monitor's pipe read ends and its lifeline must be closed explicitly, or the child would
  keep the lifeline alive for the bridge and hold its own output pipes.
- ``dup2(fd, 1)`` makes fd 1 an inheritable copy of ``fd``; the original can then be closed.
- ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (``PR_SET_PDEATHSIG`` is 1) makes the kernel SIGKILL us
  when the *thread* that forked us exits. If the monitor died between ``fork`` and ``prctl``
  we were already reparented, so ``getppid()`` no longer is the monitor's pid.
- On a pipe Python's ``sys.stdout`` is block-buffered (only a TTY makes it line-buffered);
  ``reconfigure(line_buffering=True)`` keeps the object, so loggers and other holders of a
  reference to it see the change. Under ``python -u`` (PYTHONUNBUFFERED) it is also
  write-through, passing each piece of a print() on at once; ``write_through=False`` makes
  the text layer hold the line until its newline.
- ``os._exit`` skips atexit handlers (the parent's, inherited by fork, must not run twice)
  and does not flush Python's buffers: we flush stdout/stderr ourselves.
- ``faulthandler`` keeps the fd it was enabled with (a test runner enables it on a dup of
  stderr): re-enabling it on the new fd 2 sends a crash dump to the captured stderr.
- A full garbage collection writes the GC header of every tracked object, copying on write
  the pages the child still shares with its parent and charging them to the child.
  ``gc.freeze()`` moves the inherited objects to a generation collections never traverse.
"""

from __future__ import annotations

import ctypes
import faulthandler
import gc
import io
import locale
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterable
from typing import Any

from ._limits import Limits

__all__ = ["flush_stdio", "load_libc", "prepare_child", "run_child"]

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_libc: ctypes.CDLL | None = None


def load_libc() -> ctypes.CDLL | None:
    """libc for ``prctl``, loaded in the monitor so the child does not ``dlopen`` after fork."""
    global _libc
    if _libc is None and sys.platform.startswith("linux"):
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _libc = None
    return _libc


def _die_with_monitor(monitor_pid: int) -> None:
    libc = load_libc()
    if libc is not None:
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != monitor_pid:
        os.kill(os.getpid(), signal.SIGKILL)


def _wire_stdio(stdout: int, stderr: int, keep_stdin: bool) -> None:
    if not keep_stdin:
        null = os.open(os.devnull, os.O_RDONLY)
        if null != 0:
            os.dup2(null, 0)
            os.close(null)
    os.dup2(stdout, 1)
    os.dup2(stderr, 2)
    for fd in {stdout, stderr} - {0, 1, 2}:
        os.close(fd)


def _line_buffered(name: str, fd: int) -> None:
    stream = getattr(sys, name)
    try:
        same_fd = isinstance(stream, io.TextIOWrapper) and not stream.closed and stream.fileno() == fd
    except (OSError, ValueError, io.UnsupportedOperation):
        same_fd = False
    if same_fd:
        stream.reconfigure(line_buffering=True, write_through=False)
        return
    # Replaced (a test runner's capture, an IDE's wrapper) or missing: write to the fd itself.
    encoding = getattr(stream, "encoding", None) or locale.getpreferredencoding(False)
    errors = "backslashreplace" if fd == 2 else getattr(stream, "errors", None) or "strict"
    setattr(sys, name, open(fd, "w", buffering=1, encoding=encoding, errors=errors, closefd=False))


def flush_stdio() -> None:
    """Flush Python's stdout and stderr (before a fork, or before ``os._exit``)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass


def exit_code(value: object) -> int:
    """The exit status that ``sys.exit(value)`` gives, as the interpreter maps it."""
    if value is None:
        return 0
    if isinstance(value, int):
        return value & 0xFF
    print(value, file=sys.stderr)
    return 1


def _run(target: Callable[[], int]) -> int:
    try:
        return exit_code(target())
    except SystemExit as exc:
        return exit_code(exc.code)
    except BaseException:
        traceback.print_exc()
        return 1


def prepare_child(
    *,
    stdout: int,
    stderr: int,
    close: Iterable[int],
    keep_stdin: bool,
    monitor_pid: int,
    limits: Limits | None,
    subreaper: bool = False,
) -> None:
    """Everything the child does before user code: die with the monitor, stdio, limits
    (``subreaper``: and keep its orphaned descendants as its own children, see `_reaper`)."""
    _die_with_monitor(monitor_pid)
    libc = load_libc()
    if subreaper and libc is not None:
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    for fd in close:
        try:
            os.close(fd)
        except OSError:
            pass
    _wire_stdio(stdout, stderr, keep_stdin)
    if limits is not None:
        limits.join()
    gc.freeze()
    _line_buffered("stdout", 1)
    _line_buffered("stderr", 2)
    if faulthandler.is_enabled():
        faulthandler.enable(file=sys.stderr)


def run_child(target: Callable[[], int] | None, **wiring: Any) -> None:
    """Wire up the child (`prepare_child`) and run ``target``, then ``os._exit`` with its code.

    With ``target=None`` it returns once the child is wired up, like ``fork`` in the child,
    and the caller runs on (the top process of a run returns into the user's ``main``). A
    failure while wiring up never returns: traceback on stderr and exit code 1.
    """
    code = 1
    try:
        prepare_child(**wiring)
        if target is None:
            return
        code = _run(target)
    except BaseException:
        try:  # straight to fd 2: sys.stderr may not be wired up yet
            os.write(2, traceback.format_exc().encode(errors="backslashreplace"))
        except BaseException:
            pass
    try:
        flush_stdio()
    finally:
        os._exit(code)
