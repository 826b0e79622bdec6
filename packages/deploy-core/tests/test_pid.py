"""Pid: short and full forms, parsing, validation, hashing, ordering and pickling."""

from __future__ import annotations

import copy
import pickle
import re

import cloudpickle
import pytest
from deploy_core import Pid

HEX = "0123456789abcdef0123456789abcdef"


def test_new_pid_has_short_and_full_lowercase_hex_forms() -> None:
    pid = Pid.new("127.0.0.1", 4242)
    assert re.fullmatch(r"[0-9a-f]{32}", pid.hex)
    assert re.fullmatch(r"[0-9a-f]{7}", str(pid))
    assert str(pid) == pid.hex[:7] == pid.short
    assert pid.addr == ("127.0.0.1", 4242)
    assert isinstance(pid.addr, tuple)


def test_new_pids_are_distinct() -> None:
    pids = {Pid.new("127.0.0.1", 1).hex for _ in range(200)}
    assert len(pids) == 200


def test_short_form_is_stable() -> None:
    pid = Pid(HEX, "host", 80)
    assert str(pid) == "0123456"
    assert str(Pid.parse(pid.format())) == "0123456"


@pytest.mark.parametrize(
    ("host", "port", "text"),
    [
        ("127.0.0.1", 8080, f"{HEX}@127.0.0.1:8080"),
        ("node-1.example.org", 1, f"{HEX}@node-1.example.org:1"),
        ("::1", 65535, f"{HEX}@[::1]:65535"),
        ("fe80::1%eth0", 9000, f"{HEX}@[fe80::1%eth0]:9000"),
    ],
)
def test_format_and_parse_round_trip(host: str, port: int, text: str) -> None:
    pid = Pid(HEX, host, port)
    assert pid.format() == text
    parsed = Pid.parse(text)
    assert parsed == pid
    assert parsed.addr == (host, port)
    assert Pid.parse(pid.hex + "@" + (f"[{host}]" if ":" in host else host) + ":" + str(port)) == pid


def test_parse_accepts_uppercase_hex_and_lowercases_it() -> None:
    pid = Pid.parse(f"{HEX.upper()}@127.0.0.1:80")
    assert pid.hex == HEX
    assert str(pid) == HEX[:7]
    assert pid == Pid(HEX, "127.0.0.1", 80)


def test_parse_ignores_surrounding_whitespace() -> None:
    assert Pid.parse(f"  {HEX}@h:80\n") == Pid(HEX, "h", 80)


@pytest.mark.parametrize(
    "text",
    [
        f"{'zz' * 16}@127.0.0.1:80",  # bad hex
        f"{HEX[:-1]}@127.0.0.1:80",  # 31 hex digits
        f"{HEX}0@127.0.0.1:80",  # 33 hex digits
        f"{HEX}@127.0.0.1",  # missing port
        f"{HEX}@127.0.0.1:",  # empty port
        f"{HEX}@127.0.0.1:0",  # port 0
        f"{HEX}@127.0.0.1:70000",  # port too large
        f"{HEX}@127.0.0.1:-1",
        f"{HEX}@:80",  # empty host
        f"{HEX}@[]:80",  # empty bracketed host
        f"{HEX}@::1:80",  # IPv6 without brackets
        f"{HEX}@[::1]",  # IPv6 without port
        f"{HEX}127.0.0.1:80",  # no @
        f"{HEX}@ho st:80",
        "",
        "0123456",  # the short form is not a full pid
    ],
)
def test_parse_rejects_invalid_text(text: str) -> None:
    with pytest.raises(ValueError, match="invalid pid"):
        Pid.parse(text)


@pytest.mark.parametrize("value", [None, 123, b"0123456789abcdef0123456789abcdef@h:1"])
def test_parse_rejects_non_strings(value: object) -> None:
    with pytest.raises(ValueError):
        Pid.parse(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("hex_", "host", "port", "what"),
    [
        (HEX.upper(), "h", 80, "id"),  # the constructor takes the canonical lowercase form only
        ("xyz", "h", 80, "id"),
        (HEX, "", 80, "host"),
        (HEX, None, 80, "host"),
        (HEX, "h", 0, "port"),
        (HEX, "h", 65536, "port"),
        (HEX, "h", 70000, "port"),
        (HEX, "h", True, "port"),
        (HEX, "h", "80", "port"),
        (HEX, "h", 80.0, "port"),
    ],
)
def test_constructor_validates(hex_: object, host: object, port: object, what: str) -> None:
    with pytest.raises(ValueError, match=what):
        Pid(hex_, host, port)  # type: ignore[arg-type]


def test_pid_is_immutable() -> None:
    pid = Pid(HEX, "h", 80)
    with pytest.raises(AttributeError):
        pid.port = 81  # type: ignore[misc]


def test_equality() -> None:
    pid = Pid(HEX, "h", 80)
    assert pid == Pid(HEX, "h", 80)
    assert pid != Pid(HEX, "h", 81)
    assert pid != Pid(HEX, "other", 80)
    assert pid != Pid("f" + HEX[1:], "h", 80)
    assert pid != str(pid)
    assert pid != pid.format()


def test_hashable_in_sets_and_dicts() -> None:
    a = Pid(HEX, "h", 80)
    b = Pid.parse(a.format())
    c = Pid.new("h", 80)
    assert a is not b
    assert hash(a) == hash(b)
    assert len({a, b, c}) == 2
    table = {a: "first"}
    table[b] = "second"
    assert table == {a: "second"}


def test_orderable() -> None:
    pids = [Pid.new("127.0.0.1", 1000 + i) for i in range(20)]
    ordered = sorted(pids)
    assert [pid.hex for pid in ordered] == sorted(pid.hex for pid in pids)
    assert ordered[0] < ordered[-1]
    assert ordered[0] <= ordered[0]
    assert max(pids) == ordered[-1]


def test_repr_shows_the_full_form() -> None:
    pid = Pid(HEX, "::1", 80)
    assert repr(pid) == f"Pid('{HEX}@[::1]:80')"


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "a-rather-long-host-name.cluster.example.org", "hôte"])
def test_pickle_round_trip(host: str) -> None:
    pid = Pid.new(host, 65535)
    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        copied = pickle.loads(pickle.dumps(pid, protocol=protocol))
        assert copied == pid
        assert type(copied) is Pid
        assert copied.addr == (host, 65535)
    assert cloudpickle.loads(cloudpickle.dumps(pid)) == pid
    assert copy.copy(pid) == pid
    assert copy.deepcopy(pid) == pid


def test_pickled_pid_is_small() -> None:
    pid = Pid.new("127.0.0.1", 8080)
    size = len(pickle.dumps(pid))
    assert size < 80, size
    # Smaller than pickling the same information as its text fields.
    assert size < len(pickle.dumps((pid.hex, pid.host, pid.port))) + 16


def test_many_pickled_pids_are_smaller_than_their_text() -> None:
    pids = [Pid.new("127.0.0.1", 1024 + i) for i in range(100)]
    as_pids = len(pickle.dumps(pids))
    as_text = len(pickle.dumps([pid.format() for pid in pids]))
    assert as_pids < 0.8 * as_text, (as_pids, as_text)
    assert pickle.loads(pickle.dumps(pids)) == pids
