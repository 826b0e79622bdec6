"""Memory and CPU requirements: parsing, formatting and the arithmetic a scheduler needs."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

__all__ = ["Cpu", "Mem", "Resources"]

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_FORMAT_UNITS = [
    ("TiB", 2**40),
    ("GiB", 2**30),
    ("MiB", 2**20),
    ("KiB", 2**10),
    ("TB", 10**12),
    ("GB", 10**9),
    ("MB", 10**6),
    ("KB", 10**3),
]
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")
_MEM_FORMS = (
    "an int of bytes or a string like '512MB', '1.5GiB' or '100 MiB' (units B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)"
)
_CPU_FORMS = "a non-negative number of cores such as 0.25, 2 or '1.5'"
_MICRO = 1_000_000  # cpu is accounted in millionths of a core so sums never drift


class Mem(int):
    """A memory size in bytes; ``Mem("1.5GiB")``, ``Mem(1024)``. ``str()`` gives a short form."""

    def __new__(cls, value: int | str | Mem = 0) -> Mem:
        return super().__new__(cls, _parse_mem(value))

    def __str__(self) -> str:
        value = int(self)
        exact = [(value // size, name) for name, size in _FORMAT_UNITS if value and value % size == 0]
        if exact and min(exact)[0] < 10000:
            count, name = min(exact)
            return f"{count}{name}"
        for name, size in _FORMAT_UNITS[:4]:  # a size that no unit divides: one decimal of the binary unit
            if value >= size:
                return f"{value / size:.1f}{name}"
        return f"{value}B"

    def __repr__(self) -> str:
        return f"Mem({str(self)!r})"

    def __add__(self, other: object) -> Mem:
        if not isinstance(other, int) or isinstance(other, bool):
            return NotImplemented
        return Mem(int(self) + int(other))

    def __sub__(self, other: object) -> Mem:
        if not isinstance(other, int) or isinstance(other, bool):
            return NotImplemented
        return Mem(int(self) - int(other))

    def __reduce__(self) -> tuple[Any, ...]:
        return (Mem, (int(self),))


def _parse_mem(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"invalid memory size {value!r}: expected {_MEM_FORMS}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"invalid memory size {value!r}: it is negative; expected {_MEM_FORMS}")
        return int(value)
    if isinstance(value, str):
        match = _SIZE.fullmatch(value)
        unit = match and _UNITS.get(match[2].upper())
        if match and unit:
            # Fraction, not float: "9007199254740993" is exact and huge sizes cannot overflow.
            return round(Fraction(match[1]) * unit)
    raise ValueError(f"invalid memory size {value!r}: expected {_MEM_FORMS}")


class Cpu(float):
    """A share of CPU in cores; ``Cpu(0.25)``, ``Cpu("2")``."""

    def __new__(cls, value: float | int | str | Cpu = 0.0) -> Cpu:
        return super().__new__(cls, _parse_cpu(value))

    @property
    def micros(self) -> int:
        """The share in millionths of a core, the unit sums are kept in."""
        return round(float(self) * _MICRO)

    def __str__(self) -> str:
        return f"{float(self):g}"

    def __repr__(self) -> str:
        return f"Cpu({float(self)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Cpu, (float(self),))


def _parse_cpu(value: object) -> float:
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an int too large for a float
            number = None
    elif isinstance(value, str):
        try:
            number = float(value.strip()) if value.strip() else None
        except ValueError:
            number = None
    if number is None or not math.isfinite(number):
        raise ValueError(f"invalid cpu share {value!r}: expected {_CPU_FORMS}")
    if number < 0:
        raise ValueError(f"invalid cpu share {value!r}: it is negative; expected {_CPU_FORMS}")
    return round(number * _MICRO) / _MICRO


@dataclass(frozen=True, slots=True)
class Resources:
    """What a process needs: ``Resources(mem="100MiB", cpu=0.05)``.

    Supports ``+`` and ``-`` (a scheduler's bookkeeping) and ``fits_in``.
    """

    mem: Mem = Mem(100 * 2**20)
    cpu: Cpu = Cpu(0.05)

    def __init__(self, mem: int | str | Mem = 100 * 2**20, cpu: float | int | str | Cpu = 0.05):
        object.__setattr__(self, "mem", Mem(mem))
        object.__setattr__(self, "cpu", Cpu(cpu))

    @classmethod
    def default(cls) -> Resources:
        """100 MiB and 0.05 cores."""
        return cls()

    def __add__(self, other: Resources) -> Resources:
        if not isinstance(other, Resources):
            return NotImplemented
        return Resources(int(self.mem) + int(other.mem), (self.cpu.micros + other.cpu.micros) / _MICRO)

    def __sub__(self, other: Resources) -> Resources:
        if not isinstance(other, Resources):
            return NotImplemented
        mem = int(self.mem) - int(other.mem)
        cpu = self.cpu.micros - other.cpu.micros
        if mem < 0 or cpu < 0:
            raise ValueError(f"cannot subtract {other} from {self}: the result would be negative")
        return Resources(mem, cpu / _MICRO)

    def fits_in(self, available: Resources) -> bool:
        """Whether these requirements fit within ``available``."""
        return int(self.mem) <= int(available.mem) and self.cpu.micros <= available.cpu.micros

    def to_dict(self) -> dict[str, int | float]:
        return {"mem": int(self.mem), "cpu": float(self.cpu)}

    def __str__(self) -> str:
        return f"{self.mem} memory, {self.cpu} cpu"

    def __repr__(self) -> str:
        return f"Resources(mem={str(self.mem)!r}, cpu={float(self.cpu)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (Resources, (int(self.mem), float(self.cpu)))
