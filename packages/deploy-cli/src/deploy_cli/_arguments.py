"""What the command line's words mean: addresses, sizes, the secret, the program to push.

Each function turns user input into a value or raises ``UsageError`` with one sentence.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from deploy_core import Cpu, Mem, Resources
from deploy_core import env as names

__all__ = [
    "Program",
    "UsageError",
    "address",
    "is_loopback",
    "machine_size",
    "program",
    "resources",
    "secret",
]


class UsageError(Exception):
    """Input that the command cannot use; the message is one sentence for the user."""


def address(text: str, *, listen: bool = False) -> str:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6), checked; returned as given."""
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    lowest = 0 if listen else 1
    if not sep or not host or not port.isdigit() or not lowest <= int(port) <= 65535:
        example = "127.0.0.1:7000 (port 0 picks a free one)" if listen else "127.0.0.1:7000"
        raise UsageError(f"invalid address {text!r}: expected HOST:PORT such as {example}")
    return text


def host_of(addr: str) -> str:
    host = addr.rpartition(":")[0]
    return host[1:-1] if host.startswith("[") else host


def is_loopback(addr: str) -> bool:
    """Whether every address that ``addr``'s host names is a loopback one."""
    host = host_of(addr)
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    return bool(found) and all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in found)


def resources(mem: str, cpu: str) -> Resources:
    try:
        return Resources(Mem(mem), Cpu(cpu))
    except ValueError as error:
        raise UsageError(str(error)) from None


def machine_size() -> Resources:
    """This machine's memory and the cores this process may run on."""
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return Resources(memory, cores)


def secret(secret_file: str | None, environ: Mapping[str, str]) -> bytes:
    """The cluster secret: ``--secret-file``'s stripped contents, else ``DEPLOY_SECRET``, else ``b""``."""
    if secret_file is not None:
        try:
            value = Path(secret_file).read_bytes().strip()
        except OSError as error:
            raise UsageError(f"cannot read the secret file {secret_file}: {error.strerror or error}") from None
        if not value:
            raise UsageError(f"the secret file {secret_file} is empty")
        return value
    return environ.get(names.SECRET, "").strip().encode()


@dataclass(frozen=True)
class Program:
    """What ``deploy push`` ships and runs: the bundle's root and the command inside it."""

    root: Path
    command: list[str]  # ["job.py"] or ["-m", "package.module"]
    args: list[str]
    cwd: str  # the caller's directory relative to root; "" when outside it


def program(words: list[str], cwd: Path) -> Program:
    """``SCRIPT [ARGS...]`` or ``-m MODULE [ARGS...]``, checked to exist and compile."""
    if not words:
        raise UsageError("missing SCRIPT: expected SCRIPT [ARGS...] or -m MODULE [ARGS...]")
    if words[0] == "-m":
        if len(words) < 2 or not words[1] or words[1].startswith("-"):
            raise UsageError("-m needs a MODULE name")
        module, args = words[1], words[2:]
        root = cwd.resolve()
        source = _module_file(root, module)
        command = ["-m", module]
    else:
        script, args = Path(words[0]), words[1:]
        source = (cwd / script).resolve()
        if not source.is_file():
            raise UsageError(f"no such script: {words[0]}")
        root = source.parent
        command = [source.name]
    _compile(source, cwd)
    relative = Path(cwd).resolve()
    inside = relative == root or root in relative.parents
    return Program(root, command, args, relative.relative_to(root).as_posix() if inside else "")


def _module_file(root: Path, module: str) -> Path:
    parts = module.split(".")
    if not all(part.isidentifier() for part in parts):
        raise UsageError(f"invalid module name {module!r}")
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__main__.py"):
        if candidate.is_file():
            return candidate
    raise UsageError(
        f"no module {module} under {root}: deploy push -m ships the current directory, run it where the module is"
    )


def _compile(source: Path, cwd: Path) -> None:
    try:
        text = source.read_bytes()
    except OSError as error:
        raise UsageError(f"cannot read {source}: {error.strerror or error}") from None
    try:
        compile(text, str(source), "exec", dont_inherit=True)
    except SyntaxError as error:
        shown = os.path.relpath(source, cwd) if source.is_relative_to(cwd.resolve()) else str(source)
        where = f" line {error.lineno}" if error.lineno else ""
        raise UsageError(f"{shown}{where}: {error.msg}; fix it before pushing") from None
    except ValueError as error:  # source with NUL bytes
        raise UsageError(f"{source} is not Python source: {error}") from None
