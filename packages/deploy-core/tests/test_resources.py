"""Mem, Cpu and Resources: parsing, formatting, errors and the scheduler's arithmetic."""

from __future__ import annotations

import functools
import pickle

import pytest
from deploy_core import Cpu, Mem, Resources

MiB = 2**20


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1.5GiB", 1536 * MiB),
        ("512MB", 512_000_000),
        ("100 MiB", 100 * MiB),
        ("1KB", 1000),
        ("1KiB", 1024),
        ("2TiB", 2 * 2**40),
        ("3TB", 3 * 10**12),
        ("1GB", 10**9),
        ("7B", 7),
        ("0", 0),
        ("0B", 0),
        ("42", 42),
        (" 8 mib ", 8 * MiB),
        ("1gib", 2**30),
        (".5KiB", 512),
        ("1.KB", 1000),
        (1024, 1024),
        (0, 0),
    ],
)
def test_mem_parses(text: object, size: int) -> None:
    mem = Mem(text)  # type: ignore[arg-type]
    assert mem == size
    assert int(mem) == size
    assert type(int(mem)) is int
    assert int(Resources(mem=text, cpu=1).mem) == size  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [0, 1, 2**53 + 1, 9_007_199_254_740_993, 10**30])
def test_mem_digit_string_is_exact(size: int) -> None:
    # Strings and ints agree even past float precision.
    assert Mem(str(size)) == Mem(size) == size
    assert Mem(f"{size}B") == size


def test_mem_of_mem_is_identity() -> None:
    mem = Mem("1GiB")
    assert Mem(mem) == mem
    assert Mem() == 0


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (100 * MiB, "100MiB"),
        (512_000_000, "512MB"),
        (10**9, "1GB"),
        (0, "0B"),
        (1, "1B"),
        (999, "999B"),
        (1024, "1KiB"),
        (1000, "1KB"),
        (2**30, "1GiB"),
        (1536 * MiB, "1536MiB"),
        (2**40, "1TiB"),
        (1500, "1.5KiB"),
    ],
)
def test_mem_formats(size: int, text: str) -> None:
    assert str(Mem(size)) == text
    assert repr(Mem(size)) == f"Mem({text!r})"


@pytest.mark.parametrize("size", [0, 1, 1000, 1024, 100 * MiB, 512_000_000, 3 * 2**40, 123_000])
def test_mem_exact_format_round_trips(size: int) -> None:
    assert Mem(str(Mem(size))) == size


MEM_BAD = [
    "12 parsecs",
    "1.5XB",
    "",
    "   ",
    "MiB",
    "-1",
    "-5MB",
    "1.5.5MB",
    "1e3",
    "nan",
    "inf",
    "1 0MB",
    -1,
    None,
    True,
    False,
    1.5,
    float("nan"),
    float("inf"),
    b"1MB",
    [1],
]


@pytest.mark.parametrize("value", MEM_BAD, ids=repr)
def test_mem_rejects_bad_input_naming_value_and_forms(value: object) -> None:
    with pytest.raises(ValueError) as info:
        Mem(value)  # type: ignore[arg-type]
    message = str(info.value)
    assert repr(value) in message
    assert "MiB" in message and "512MB" in message
    with pytest.raises(ValueError, match="MiB"):
        Resources(mem=value, cpu=1)  # type: ignore[arg-type]


def test_negative_mem_says_so() -> None:
    with pytest.raises(ValueError, match="negative"):
        Mem(-1)


@pytest.mark.parametrize(
    ("value", "cores"),
    [(0.25, 0.25), ("2", 2.0), (2, 2.0), ("1.5", 1.5), (" 0.5 ", 0.5), (0, 0.0), (0.05, 0.05), (Cpu(3), 3.0)],
)
def test_cpu_parses(value: object, cores: float) -> None:
    cpu = Cpu(value)  # type: ignore[arg-type]
    assert float(cpu) == cores
    assert type(float(cpu)) is float
    assert float(Resources(cpu=value).cpu) == cores  # type: ignore[arg-type]


def test_cpu_is_kept_to_a_millionth_of_a_core() -> None:
    assert Cpu(0.1 + 0.2) == 0.3
    assert Cpu(0.05).micros == 50_000
    assert Cpu("2").micros == 2_000_000


def test_cpu_formats() -> None:
    assert str(Cpu(0.25)) == "0.25"
    assert str(Cpu(2)) == "2"
    assert repr(Cpu(0.05)) == "Cpu(0.05)"


CPU_BAD = [
    "12 parsecs",
    "1.5XB",
    "",
    "  ",
    -0.5,
    -1,
    "-1",
    float("nan"),
    "nan",
    float("inf"),
    float("-inf"),
    "inf",
    10**400,
    None,
    True,
    False,
    b"1",
    [1],
]


@pytest.mark.parametrize("value", CPU_BAD, ids=lambda value: repr(value)[:20])
def test_cpu_rejects_bad_input_naming_value_and_forms(value: object) -> None:
    with pytest.raises(ValueError) as info:
        Cpu(value)  # type: ignore[arg-type]
    message = str(info.value)
    assert repr(value)[:40] in message
    assert "cores" in message and "0.25" in message
    with pytest.raises(ValueError, match="cores"):
        Resources(cpu=value)  # type: ignore[arg-type]


def test_negative_cpu_says_so() -> None:
    with pytest.raises(ValueError, match="negative"):
        Cpu(-0.5)


def test_default_is_100_mib_and_a_twentieth_of_a_core() -> None:
    default = Resources.default()
    assert int(default.mem) == 100 * MiB
    assert float(default.cpu) == 0.05
    assert default == Resources() == Resources(mem="100MiB", cpu=0.05)
    assert isinstance(default.mem, Mem) and isinstance(default.cpu, Cpu)


def test_resources_accepts_the_documented_forms() -> None:
    resources = Resources(mem="1.5GiB", cpu=0.25)
    assert int(resources.mem) == 1536 * MiB
    assert float(resources.cpu) == 0.25
    assert Resources(mem=1024, cpu="2") == Resources(mem="1KiB", cpu=2)


def test_add_and_subtract() -> None:
    a = Resources(mem="1GiB", cpu=1)
    b = Resources(mem="256MiB", cpu=0.25)
    assert a + b == Resources(mem=1280 * MiB, cpu=1.25)
    assert a - b == Resources(mem=768 * MiB, cpu=0.75)
    assert (a + b) - b == a
    assert a - a == Resources(mem=0, cpu=0)


@pytest.mark.parametrize(
    "taken",
    [Resources(mem="2GiB", cpu=0.5), Resources(mem="1MiB", cpu=2), Resources(mem="1GiB", cpu=1.000001)],
)
def test_subtracting_more_than_available_raises(taken: Resources) -> None:
    with pytest.raises(ValueError, match="negative"):
        Resources(mem="1GiB", cpu=1) - taken


def test_arithmetic_with_other_types_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        Resources() + 1  # type: ignore[operator]
    with pytest.raises(TypeError):
        Resources() - (1, 2)  # type: ignore[operator]


def test_twenty_twentieths_make_exactly_one_core() -> None:
    # Plain floats drift when added one by one (sum() compensates since Python 3.12); Resources must not.
    assert functools.reduce(lambda acc, _: acc + 0.05, range(20), 0.0) != 1.0
    share = Resources(mem=0, cpu=0.05)
    total = functools.reduce(lambda acc, _: acc + share, range(20), Resources(mem=0, cpu=0))
    assert float(total.cpu) == 1.0
    assert total.cpu.micros == 1_000_000
    remaining = Resources(mem=0, cpu=1)
    for _ in range(20):
        remaining = remaining - share
    assert float(remaining.cpu) == 0.0
    assert share.fits_in(Resources(mem=0, cpu=0.05))


def test_fits_in() -> None:
    node = Resources(mem="8GiB", cpu=4)
    assert Resources(mem="8GiB", cpu=4).fits_in(node)
    assert Resources.default().fits_in(node)
    assert not Resources(mem="9GiB", cpu=1).fits_in(node)
    assert not Resources(mem="1GiB", cpu=4.000001).fits_in(node)
    assert not node.fits_in(Resources.default())
    assert Resources(mem=0, cpu=0).fits_in(Resources(mem=0, cpu=0))


def test_to_dict() -> None:
    data = Resources.default().to_dict()
    assert data == {"mem": 100 * MiB, "cpu": 0.05}
    assert type(data["mem"]) is int and type(data["cpu"]) is float


@pytest.mark.parametrize("resources", [Resources.default(), Resources(mem="1.5GiB", cpu=0.25), Resources(0, 0)])
def test_pickle_round_trip(resources: Resources) -> None:
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        copied = pickle.loads(pickle.dumps(resources, protocol=protocol))
        assert copied == resources
        assert isinstance(copied.mem, Mem) and isinstance(copied.cpu, Cpu)
    assert pickle.loads(pickle.dumps(Mem("1GiB"))) == Mem("1GiB")
    assert type(pickle.loads(pickle.dumps(Mem("1GiB")))) is Mem
    assert type(pickle.loads(pickle.dumps(Cpu(0.5)))) is Cpu


def test_repr_and_str() -> None:
    resources = Resources(mem="512MB", cpu=0.25)
    assert repr(resources) == "Resources(mem='512MB', cpu=0.25)"
    assert eval(repr(resources), {"Resources": Resources}) == resources
    assert str(Resources.default()) == "100MiB memory, 0.05 cpu"


def test_resources_are_hashable_and_immutable() -> None:
    assert len({Resources.default(), Resources(), Resources(mem=1, cpu=1)}) == 2
    with pytest.raises(AttributeError):
        Resources().cpu = Cpu(1)  # type: ignore[misc]


def test_mem_arithmetic_stays_mem() -> None:
    total = Mem("1GiB") + Mem("1GiB")
    assert isinstance(total, Mem) and total == 2**31
    assert isinstance(Mem("1GiB") - 1024, Mem)
    with pytest.raises(ValueError, match="negative"):
        Mem("1KiB") - Mem("1MiB")
