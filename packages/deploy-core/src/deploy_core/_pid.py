"""Cluster-wide process ids."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

__all__ = ["Pid"]

_HEX = re.compile(r"[0-9a-f]{32}")
_TEXT = re.compile(r"(?P<hex>[0-9a-fA-F]{32})@(?P<host>\[[^\]]+\]|[^:@\s]+):(?P<port>\d{1,5})")


@dataclass(frozen=True, order=True, slots=True)
class Pid:
    """A cluster-unique process id: a random 128-bit id plus the address it listens on.

    ``str(pid)`` is the 7-hex short form users see; ``pid.hex`` is the full id;
    ``pid.addr`` is ``(host, port)`` and ``Pid.parse(pid.format())`` round-trips.
    """

    hex: str
    host: str
    port: int

    def __post_init__(self) -> None:
        if not isinstance(self.hex, str) or not _HEX.fullmatch(self.hex):
            raise ValueError(f"invalid pid id {self.hex!r}: expected 32 lowercase hex characters")
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"invalid pid host {self.host!r}: expected a non-empty string")
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 0 < self.port < 65536:
            raise ValueError(f"invalid pid port {self.port!r}: expected an int from 1 to 65535")

    @classmethod
    def new(cls, host: str, port: int) -> Pid:
        """A fresh pid for a process listening on ``(host, port)``."""
        return cls(os.urandom(16).hex(), host, port)

    @classmethod
    def parse(cls, text: str) -> Pid:
        """Parse ``"<32 hex>@host:port"`` (IPv6 hosts in brackets)."""
        match = _TEXT.fullmatch(text.strip()) if isinstance(text, str) else None
        if match is None:
            raise ValueError(f"invalid pid {text!r}: expected '<32 hex>@host:port'")
        host = match["host"]
        if host.startswith("["):
            host = host[1:-1]
        return cls(match["hex"].lower(), host, int(match["port"]))

    def format(self) -> str:
        """The full text form, ``"<32 hex>@host:port"``, that `parse` reads back."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.hex}@{host}:{self.port}"

    @property
    def addr(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def short(self) -> str:
        return self.hex[:7]

    def __str__(self) -> str:
        return self.hex[:7]

    def __repr__(self) -> str:
        return f"Pid({self.format()!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # One bytes value (16 raw id bytes, 2 port bytes, the host) rebuilt by a function
        # pickled under the package's short name keeps a pickled pid under 80 bytes.
        raw = bytes.fromhex(self.hex) + self.port.to_bytes(2, "big") + self.host.encode("utf-8", "surrogatepass")
        return (_from_wire, (raw,))


def _from_wire(raw: bytes) -> Pid:
    return Pid(raw[:16].hex(), raw[18:].decode("utf-8", "surrogatepass"), int.from_bytes(raw[16:18], "big"))


# Pickles name it ``deploy_core._from_wire`` (re-exported there), not ``deploy_core._pid._from_wire``.
_from_wire.__module__ = "deploy_core"
