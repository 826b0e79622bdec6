"""Frame protection: records with a keyed MAC and an implicit sequence number."""

from __future__ import annotations

import os
import socket
import threading

import pytest
from deploy_core import FrameError, Opener, ProtectedSocket, Sealer
from deploy_core._protect import MAX_RECORD, TamperedError

KEY = bytes(range(32))


def wire(*chunks: bytes, key: bytes = KEY, initiator: bool = True) -> bytes:
    return b"".join(bytes(part) for part in Sealer(key, initiator=initiator).seal(list(chunks)))


def test_round_trip_in_pieces_of_any_size() -> None:
    sealer, opener = Sealer(KEY, initiator=True), Opener(KEY, initiator=False)
    plain = [os.urandom(n) for n in (1, 100, MAX_RECORD, MAX_RECORD + 1, 3 * MAX_RECORD + 7)]
    stream = b"".join(bytes(part) for chunk in plain for part in sealer.seal([chunk]))
    got = bytearray()
    for start in range(0, len(stream), 9973):
        got += opener.open(stream[start : start + 9973])
    assert bytes(got) == b"".join(plain)
    assert opener.buffered() == 0


def test_one_byte_at_a_time() -> None:
    stream = wire(b"hello", b" world")
    opener = Opener(KEY, initiator=False)
    assert b"".join(opener.open(stream[i : i + 1]) for i in range(len(stream))) == b"hello world"


@pytest.mark.parametrize("where", [0, 3, 4, 10, -1, -16])
def test_a_changed_byte_is_refused(where: int) -> None:
    stream = bytearray(wire(b"0123456789abcdef"))
    stream[where] ^= 0x01
    with pytest.raises(FrameError):  # (a longer length waits for what follows: more comes)
        Opener(KEY, initiator=False).open(bytes(stream) + b"\0" * 64)


def test_a_replayed_record_is_refused() -> None:
    sealer, opener = Sealer(KEY, initiator=True), Opener(KEY, initiator=False)
    first = b"".join(bytes(p) for p in sealer.seal([b"pay 100"]))
    assert opener.open(first) == b"pay 100"
    with pytest.raises(FrameError, match="failed its check"):
        opener.open(first)


def test_dropped_or_reordered_records_are_refused() -> None:
    sealer = Sealer(KEY, initiator=True)
    one, two = (b"".join(bytes(p) for p in sealer.seal([text])) for text in (b"one", b"two"))
    with pytest.raises(FrameError):
        Opener(KEY, initiator=False).open(two)  # "one" dropped
    with pytest.raises(FrameError):
        Opener(KEY, initiator=False).open(two + one)


def test_a_record_reflected_to_its_sender_is_refused() -> None:
    with pytest.raises(FrameError):
        Opener(KEY, initiator=True).open(wire(b"mine", initiator=True))


def test_a_record_from_another_connection_is_refused() -> None:
    with pytest.raises(FrameError):
        Opener(bytes(32), initiator=False).open(wire(b"elsewhere"))


def test_an_injected_record_without_the_key_is_refused() -> None:
    forged = b"\x00\x00\x00\x05hello" + b"\x00" * 16
    with pytest.raises(FrameError):
        Opener(KEY, initiator=False).open(forged)


@pytest.mark.parametrize("length", [0, MAX_RECORD + 1, 2**32 - 1])
def test_a_bad_length_is_refused_before_buffering(length: int) -> None:
    with pytest.raises(FrameError, match="announces"):
        Opener(KEY, initiator=False).open(length.to_bytes(4, "big"))


def test_a_short_key_is_refused() -> None:
    with pytest.raises(ValueError, match="key"):
        Sealer(b"short", initiator=True)


@pytest.mark.timeout(20)
def test_protected_sockets_carry_a_stream_and_refuse_a_tampered_one(caplog) -> None:
    a, b = socket.socketpair()
    with a, b:
        left = ProtectedSocket(a, KEY, initiator=True, unsent=b"plain prefix")
        right = ProtectedSocket(b, KEY, initiator=False)
        data = os.urandom(3 * MAX_RECORD + 5)
        sender = threading.Thread(target=left.sendall, args=(data,))
        sender.start()
        assert b.recv(12, socket.MSG_WAITALL) == b"plain prefix"  # before any record
        got = bytearray()
        while len(got) < len(data):
            got += right.recv(1 << 16)
        sender.join(10)
        assert bytes(got) == data
        a.sendall(b"\x00\x00\x00\x03abc" + b"\x00" * 16)  # injected below the protection
        with pytest.raises(TamperedError):
            right.recv(1 << 16)
    assert len([r for r in caplog.records if "failed its check" in r.getMessage()]) == 1
