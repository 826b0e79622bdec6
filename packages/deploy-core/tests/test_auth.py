"""The identity-bound HMAC handshake: sans-IO in memory, then `authenticate` over real sockets."""

from __future__ import annotations

import hashlib
import hmac
import random
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from deploy_core import AuthenticationError, Handshake, authenticate

SECRET = b"correct horse battery staple"
ME = "3fe0c1a2b3c4d5e6f708192a3b4c5d6e"  # the initiator's identity (a pid's hex)
YOU = "bridge"  # the acceptor it wants
HELLO = 5 + 34 + len(ME) + len(YOU)  # MAGIC, VERSION, nonce, two lengths, both identities
CHALLENGE = HELLO + 32  # the same shape from the acceptor, plus its proof
PROOF = 32
TIMEOUT = 0.5
MARGIN = 1.0


def initiator(secret: bytes = SECRET, identity: str = ME, wanted: str = YOU) -> Handshake:
    return Handshake(secret, initiator=True, identity=identity, wanted=wanted)


def acceptor(secret: bytes = SECRET, identity: str = YOU) -> Handshake:
    return Handshake(secret, initiator=False, identity=identity)


def hello_of(nonce: bytes, identity: bytes, wanted: bytes, version: int = 2) -> bytes:
    return b"DPLY" + bytes([version]) + nonce + bytes([len(identity), len(wanted)]) + identity + wanted


def transcript(nonce_i: bytes, nonce_a: bytes, id_i: bytes, id_a: bytes) -> bytes:
    return b"deploy-auth-v2" + nonce_i + nonce_a + bytes([len(id_i)]) + id_i + bytes([len(id_a)]) + id_a


def mac(secret: bytes, label: bytes, t: bytes) -> bytes:
    return hmac.new(secret, label + t, hashlib.sha256).digest()


# ---------------------------------------------------------------------------- in memory


def deliver(data: bytes, to: Handshake, chunk: int | None = None) -> None:
    """Feed ``data`` to ``to`` in pieces of at most its ``bytes_needed``."""
    while data:
        size = to.bytes_needed()
        assert size > 0, f"{len(data)} bytes left over for a handshake that needs none"
        if chunk is not None:
            size = min(size, chunk)
        to.receive_data(data[:size])
        data = data[size:]


def pump(initiator: Handshake, acceptor: Handshake, chunk: int | None = None) -> dict[str, list[bytes]]:
    """Run a handshake to completion in memory; returns what each side sent."""
    sent: dict[str, list[bytes]] = {"initiator": [], "acceptor": []}
    for _ in range(10):
        moved = False
        for name, source, target in (("initiator", initiator, acceptor), ("acceptor", acceptor, initiator)):
            data = source.data_to_send()
            if data:
                sent[name].append(data)
                deliver(data, target, chunk)
                moved = True
        if not moved:
            break
    return sent


def test_same_secret_completes_both_sides_with_identities_and_one_key() -> None:
    i, a = initiator(), acceptor()
    assert not i.done and not a.done
    sent = pump(i, a)
    assert i.done and a.done
    assert i.bytes_needed() == a.bytes_needed() == 0
    assert [len(message) for message in sent["initiator"]] == [HELLO, PROOF]
    assert [len(message) for message in sent["acceptor"]] == [CHALLENGE]
    assert i.data_to_send() == a.data_to_send() == b""
    assert i.peer == YOU and a.peer == ME
    assert len(i.key) == 32 and i.key == a.key


def test_every_connection_gets_its_own_key() -> None:
    keys = set()
    for _ in range(20):
        i, a = initiator(), acceptor()
        pump(i, a)
        keys.add(i.key)
    assert len(keys) == 20


def test_peer_and_key_need_a_finished_handshake() -> None:
    i = initiator()
    with pytest.raises(AuthenticationError, match="not complete"):
        i.peer  # noqa: B018
    with pytest.raises(AuthenticationError, match="not complete"):
        i.key  # noqa: B018


def test_bytes_needed_and_first_message() -> None:
    i, a = initiator(), acceptor()
    assert i.bytes_needed() == 5  # the version is read and checked first
    assert a.bytes_needed() == 5
    assert a.data_to_send() == b""  # the acceptor speaks second
    hello = i.data_to_send()
    assert hello[:5] == b"DPLY\x02" and len(hello) == HELLO
    assert hello.endswith(ME.encode() + YOU.encode())
    assert i.data_to_send() == b""  # drained
    a.receive_data(hello[:3])
    assert a.bytes_needed() == 2
    a.receive_data(hello[3:5])
    assert a.bytes_needed() == 34
    a.receive_data(hello[5:39])
    assert a.bytes_needed() == len(ME) + len(YOU)


def test_bytearray_secret_works() -> None:
    i, a = initiator(bytearray(SECRET)), acceptor()
    pump(i, a)
    assert i.done and a.done


def test_one_byte_at_a_time() -> None:
    i, a = initiator(), acceptor()
    pump(i, a, chunk=1)
    assert i.done and a.done and i.key == a.key


def test_fresh_nonces_every_time() -> None:
    hellos = {initiator().data_to_send() for _ in range(50)}
    assert len(hellos) == 50


def test_wrong_secret_is_rejected_by_the_initiator() -> None:
    i, a = initiator(b"one secret"), acceptor(b"another secret")
    deliver(i.data_to_send(), a)
    with pytest.raises(AuthenticationError, match="shared secret"):
        deliver(a.data_to_send(), i)
    assert not i.done
    assert i.data_to_send() == b""  # no proof goes out after a failed check
    with pytest.raises(AuthenticationError, match="already failed"):
        i.receive_data(b"x")


@pytest.mark.parametrize(("secret", "accepted"), [(SECRET, True), (b"another secret", False)])
def test_acceptor_checks_the_initiators_proof(secret: bytes, accepted: bool) -> None:
    # A well-formed proof made with the wrong secret (an initiator that skipped its own
    # check of the acceptor) is refused; the same construction with the right one passes.
    hello = initiator(secret).data_to_send()
    a = acceptor()
    deliver(hello, a)
    challenge = a.data_to_send()
    t = transcript(hello[5:37], challenge[5:37], ME.encode(), YOU.encode())
    proof = mac(secret, b"initiator ", t)
    if accepted:
        a.receive_data(proof)
        assert a.done and a.key == mac(SECRET, b"key ", t)
    else:
        with pytest.raises(AuthenticationError, match="shared secret"):
            a.receive_data(proof)
        assert not a.done


# --- relays: the attack of issue 13 -------------------------------------------------------


def test_hello_relayed_to_a_different_acceptor_is_refused() -> None:
    # The initiator wants the process whose port the attacker now holds; the attacker
    # relays the hello to the bridge.
    i = initiator(wanted="a" * 32)
    bridge = acceptor(identity="bridge")
    with pytest.raises(AuthenticationError, match="wants 'aaaa"):
        deliver(i.data_to_send(), bridge)
    assert bridge.data_to_send() == b""


def test_relay_with_a_rewritten_wanted_identity_fails_at_the_initiator() -> None:
    # The attacker rewrites `wanted` (the hello carries no MAC) so the bridge answers;
    # the answer names the bridge and is refused by the initiator.
    wanted = "a" * 32
    i = initiator(wanted=wanted)
    hello = i.data_to_send()
    bridge = acceptor(identity="bridge")
    deliver(hello_of(hello[5:37], ME.encode(), b"bridge"), bridge)
    challenge = bridge.data_to_send()
    with pytest.raises(AuthenticationError, match="not 'aaaa"):
        deliver(challenge, i)
    # Renaming the bridge in its answer breaks its MAC instead.
    i = initiator(wanted=wanted)
    hello = i.data_to_send()
    bridge = acceptor(identity="bridge")
    deliver(hello_of(hello[5:37], ME.encode(), b"bridge"), bridge)
    challenge = bridge.data_to_send()
    forged = challenge[:37] + bytes([len(wanted), len(ME)]) + wanted.encode() + ME.encode() + challenge[-32:]
    with pytest.raises(AuthenticationError, match="shared secret"):
        deliver(forged, i)
    assert i.data_to_send() == b""


def test_relay_with_a_rewritten_initiator_identity_fails() -> None:
    # The attacker renames the initiator in the hello (to be accepted as someone else):
    # the acceptor's answer names that identity and the initiator refuses it; repairing
    # the name breaks the acceptor's MAC.
    i, a = initiator(), acceptor()
    hello = i.data_to_send()
    deliver(hello_of(hello[5:37], b"f" * 32, YOU.encode()), a)
    challenge = a.data_to_send()
    with pytest.raises(AuthenticationError, match="answered"):
        deliver(challenge, i)
    i, a = initiator(), acceptor()
    hello = i.data_to_send()
    deliver(hello_of(hello[5:37], b"f" * 32, YOU.encode()), a)
    challenge = a.data_to_send()
    repaired = challenge[:37] + bytes([len(YOU), len(ME)]) + YOU.encode() + ME.encode() + challenge[-32:]
    with pytest.raises(AuthenticationError, match="shared secret"):
        deliver(repaired, i)


def test_replayed_initiator_transcript_is_rejected() -> None:
    sent = pump(initiator(), acceptor())
    hello, proof = sent["initiator"]
    fresh = acceptor()
    deliver(hello, fresh)  # a hello alone proves nothing; the acceptor answers
    assert len(fresh.data_to_send()) == CHALLENGE
    with pytest.raises(AuthenticationError, match="shared secret"):
        fresh.receive_data(proof)
    assert not fresh.done


def test_replayed_acceptor_transcript_is_rejected() -> None:
    sent = pump(initiator(), acceptor())
    (challenge,) = sent["acceptor"]
    fresh = initiator()
    fresh.data_to_send()
    with pytest.raises(AuthenticationError):
        deliver(challenge, fresh)


def test_reflected_hello_is_rejected() -> None:
    i = initiator()
    hello = i.data_to_send()
    with pytest.raises(AuthenticationError, match="nonce"):
        deliver(hello, i)


def test_reflected_proof_is_rejected() -> None:
    # The attacker, without the secret, gets acceptor A's proof over a transcript and
    # offers it back to A as the initiator's proof: the role labels differ.
    a = acceptor()
    deliver(hello_of(b"\x11" * 32, ME.encode(), YOU.encode()), a)
    challenge = a.data_to_send()
    with pytest.raises(AuthenticationError, match="shared secret"):
        a.receive_data(challenge[-32:])
    assert not a.done


def test_reflected_proof_from_a_second_session_is_rejected() -> None:
    # An attacker without the secret talks to acceptor A, then opens a second session
    # to B with A's nonce as its own, hoping B's proof answers A's challenge.
    a, b = acceptor(), acceptor()
    deliver(hello_of(b"\x11" * 32, ME.encode(), YOU.encode()), a)
    challenge_a = a.data_to_send()
    deliver(hello_of(challenge_a[5:37], ME.encode(), YOU.encode()), b)
    challenge_b = b.data_to_send()
    with pytest.raises(AuthenticationError):
        a.receive_data(challenge_b[-32:])
    assert not a.done


# --- malformed input ----------------------------------------------------------------------


def test_more_than_bytes_needed_is_rejected() -> None:
    i, a = initiator(), acceptor()
    with pytest.raises(AuthenticationError, match="more than"):
        a.receive_data(i.data_to_send())  # the whole hello at once, when 5 bytes are wanted
    with pytest.raises(AuthenticationError, match="more than"):
        initiator().receive_data(b"\0" * (CHALLENGE + 1))


def test_oversized_input_is_never_buffered() -> None:
    # The largest lengths the hello can announce bound what is read: 255 each.
    a = acceptor()
    deliver(b"DPLY\x02" + b"\x07" * 32 + b"\xff\xff", a)
    assert a.bytes_needed() == 510
    with pytest.raises(AuthenticationError, match="more than"):
        a.receive_data(b"x" * 511)


def test_data_after_completion_is_rejected() -> None:
    i, a = initiator(), acceptor()
    pump(i, a)
    with pytest.raises(AuthenticationError):
        a.receive_data(b"x")
    with pytest.raises(AuthenticationError):
        i.receive_data(b"x")


def test_eof_mid_handshake_is_rejected() -> None:
    a = acceptor()
    a.receive_data(b"DPLY")
    with pytest.raises(AuthenticationError, match="closed"):
        a.receive_data(b"")


@pytest.mark.parametrize("cut", [1, 5, 20, 39, HELLO - 1])
def test_truncated_hello_never_completes(cut: int) -> None:
    a = acceptor()
    deliver(initiator().data_to_send()[:cut], a)
    assert not a.done and a.bytes_needed() > 0 and a.data_to_send() == b""


@pytest.mark.parametrize("cut", [1, 5, 39, CHALLENGE - 1])
def test_truncated_challenge_never_completes(cut: int) -> None:
    i, a = initiator(), acceptor()
    deliver(i.data_to_send(), a)
    deliver(a.data_to_send()[:cut], i)
    assert not i.done and i.bytes_needed() > 0 and i.data_to_send() == b""


def test_empty_identity_in_a_hello_is_rejected() -> None:
    a = acceptor()
    with pytest.raises(AuthenticationError, match="empty identity"):
        deliver(b"DPLY\x02" + b"\x07" * 32 + b"\x00\x06", a)


def test_non_ascii_identity_in_a_hello_is_rejected() -> None:
    a = acceptor()
    with pytest.raises(AuthenticationError, match="ASCII"):
        deliver(hello_of(b"\x07" * 32, "é".encode(), YOU.encode()), a)


@pytest.mark.parametrize(
    "hello",
    [
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1:80\r\n\r\n",
        bytes(random.Random(1).randrange(256) for _ in range(HELLO)),
        b"\0" * HELLO,
        b"dply\x02" + b"\0" * 32,  # magic is case-sensitive
    ],
    ids=["http", "random", "zeros", "lowercase-magic"],
)
def test_garbage_hello_is_rejected(hello: bytes) -> None:
    a = acceptor()
    with pytest.raises(AuthenticationError, match="not speaking the deploy protocol"):
        deliver(hello[:5], a)
    assert a.data_to_send() == b""


def test_version_1_peer_is_told_both_versions() -> None:
    a = acceptor()
    with pytest.raises(AuthenticationError, match="version 1, this side version 2"):
        a.receive_data(b"DPLY\x01")  # checked before the rest of a v1 hello is read


@pytest.mark.parametrize("secret", [b"", bytearray(), "text secret", None, 42])
def test_secret_must_be_non_empty_bytes(secret: object) -> None:
    with pytest.raises(ValueError, match="secret"):
        initiator(secret)  # type: ignore[arg-type]
    a, b = socket.socketpair()
    with a, b, pytest.raises(ValueError, match="secret"):
        authenticate(a, secret, initiator=True, identity=ME, wanted=YOU, timeout=TIMEOUT)  # type: ignore[arg-type]


@pytest.mark.parametrize("identity", ["", "x" * 256, "pid-é", None, b"bytes"])
def test_identities_must_be_short_ascii(identity: object) -> None:
    with pytest.raises(ValueError, match="identity"):
        Handshake(SECRET, initiator=False, identity=identity)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="identity"):
        Handshake(SECRET, initiator=True, identity=ME, wanted=identity)  # type: ignore[arg-type]


def test_initiator_must_name_whom_it_wants_and_acceptor_must_not() -> None:
    with pytest.raises(ValueError, match="wanted"):
        Handshake(SECRET, initiator=True, identity=ME)
    with pytest.raises(ValueError, match="only the initiator"):
        Handshake(SECRET, initiator=False, identity=YOU, wanted=ME)


# ---------------------------------------------------------------------------- sockets


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def side(sock: socket.socket, secret: bytes, *, initiator: bool, timeout: float = 5.0) -> Handshake:
    """`authenticate` as ME (initiator) or YOU, closing the socket on failure as a real server would."""
    try:
        if initiator:
            return authenticate(sock, secret, initiator=True, identity=ME, wanted=YOU, timeout=timeout)
        return authenticate(sock, secret, initiator=False, identity=YOU, timeout=timeout)
    except BaseException:
        sock.close()
        raise


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    with a, b:
        yield a, b


@pytest.fixture
def loopback() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected (client, server-side) TCP pair on 127.0.0.1."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=5)
        server, _ = listener.accept()
    client.settimeout(None)
    with client, server:
        yield client, server


@pytest.fixture(params=["socketpair", "loopback"])
def connected(request: pytest.FixtureRequest) -> tuple[socket.socket, socket.socket]:
    return request.getfixturevalue("pair" if request.param == "socketpair" else "loopback")


@pytest.mark.timeout(10)
def test_right_secret_passes_both_ways_and_leaves_payload(connected, background) -> None:
    client, server = connected

    def accept() -> bytes:
        side(server, SECRET, initiator=False)
        server.sendall(b"from the acceptor")
        return recv_exactly(server, len(b"from the initiator"))

    server_side = background(accept)
    mine = side(client, SECRET, initiator=True)
    client.sendall(b"from the initiator")
    assert mine.peer == YOU and len(mine.key) == 32
    assert recv_exactly(client, len(b"from the acceptor")) == b"from the acceptor"
    assert server_side.result() == b"from the initiator"


@pytest.mark.timeout(10)
def test_payload_sent_with_the_proof_stays_in_the_socket(connected, background) -> None:
    # The initiator writes its proof and the first payload in one send; the acceptor
    # must read only the proof.
    client, server = connected
    server_side = background(lambda: (side(server, SECRET, initiator=False), recv_exactly(server, 7))[1])
    handshake = initiator()
    client.sendall(handshake.data_to_send())
    deliver(recv_exactly(client, CHALLENGE), handshake)
    assert handshake.done
    client.sendall(handshake.data_to_send() + b"payload")
    assert server_side.result() == b"payload"


@pytest.mark.timeout(10)
@pytest.mark.parametrize("previous", [None, 7.0])
def test_socket_timeout_is_restored(pair, background, previous: float | None) -> None:
    a, b = pair
    a.settimeout(previous)
    b.settimeout(previous)
    server_side = background(lambda: authenticate(b, SECRET, initiator=False, identity=YOU, timeout=5))
    authenticate(a, SECRET, initiator=True, identity=ME, wanted=YOU, timeout=5)
    server_side.result()
    assert a.gettimeout() == previous
    assert b.gettimeout() == previous


@pytest.mark.timeout(10)
def test_wrong_secret_rejected_on_both_sides(connected, background) -> None:
    client, server = connected
    server_side = background(lambda: side(server, b"the acceptor's secret", initiator=False))
    with pytest.raises(AuthenticationError):
        side(client, b"the initiator's secret", initiator=True)
    with pytest.raises(AuthenticationError):
        server_side.result()


@pytest.mark.timeout(10)
@pytest.mark.parametrize("sent", [b"", b"DPLY\x02" + b"\x22" * 10])
def test_initiator_closing_mid_handshake_is_rejected(connected, sent: bytes) -> None:
    client, server = connected
    client.sendall(sent)
    client.shutdown(socket.SHUT_WR)
    start = time.monotonic()
    with pytest.raises(AuthenticationError, match="closed"):
        authenticate(server, SECRET, initiator=False, identity=YOU, timeout=5)
    assert time.monotonic() - start < 2


@pytest.mark.timeout(10)
def test_acceptor_closing_mid_handshake_is_rejected(connected, background) -> None:
    client, server = connected

    def truncated_acceptor() -> None:
        assert len(recv_exactly(server, HELLO)) == HELLO
        server.sendall(b"DPLY\x02" + b"\x33" * 20)
        server.shutdown(socket.SHUT_WR)

    fake = background(truncated_acceptor)
    with pytest.raises(AuthenticationError, match="closed"):
        authenticate(client, SECRET, initiator=True, identity=ME, wanted=YOU, timeout=5)
    fake.result()


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "garbage",
    [
        bytes(random.Random(7).randrange(256) for _ in range(200)),
        b"GET /index.html HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: curl/8.0\r\nAccept: */*\r\n\r\n",
    ],
    ids=["random", "http"],
)
def test_garbage_rejected_by_acceptor(connected, garbage: bytes) -> None:
    client, server = connected
    client.sendall(garbage)
    with pytest.raises(AuthenticationError, match="not speaking the deploy protocol"):
        authenticate(server, SECRET, initiator=False, identity=YOU, timeout=5)


@pytest.mark.timeout(10)
def test_garbage_rejected_by_initiator(connected, background) -> None:
    client, server = connected

    def http_server() -> None:
        recv_exactly(server, HELLO)
        server.sendall(b"HTTP/1.1 400 Bad Request\r\nServer: nginx\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    fake = background(http_server)
    with pytest.raises(AuthenticationError, match="not speaking the deploy protocol"):
        authenticate(client, SECRET, initiator=True, identity=ME, wanted=YOU, timeout=5)
    fake.result()


@pytest.mark.timeout(10)
def test_replayed_transcript_rejected_over_a_socket(connected, background) -> None:
    sent = pump(initiator(), acceptor())
    hello, proof = sent["initiator"]
    client, server = connected
    server_side = background(lambda: side(server, SECRET, initiator=False))
    client.sendall(hello)
    assert len(recv_exactly(client, CHALLENGE)) == CHALLENGE
    client.sendall(proof)
    with pytest.raises(AuthenticationError, match="shared secret"):
        server_side.result()


@pytest.mark.timeout(10)
def test_reflected_nonce_rejected_over_a_socket(connected, background) -> None:
    client, server = connected

    def mirror() -> None:
        hello = recv_exactly(server, HELLO)
        server.sendall(hello + b"\0" * PROOF)

    fake = background(mirror)
    with pytest.raises(AuthenticationError, match="nonce"):
        authenticate(client, SECRET, initiator=True, identity=ME, wanted=YOU, timeout=5)
    fake.result()


@pytest.mark.timeout(10)
@pytest.mark.parametrize("sent", [b"", b"DPLY\x02" + b"\x44" * 10], ids=["silent", "half"])
def test_stalling_initiator_times_out(connected, sent: bytes) -> None:
    client, server = connected
    client.sendall(sent)
    start = time.monotonic()
    with pytest.raises(AuthenticationError, match="within 0.5s"):
        authenticate(server, SECRET, initiator=False, identity=YOU, timeout=TIMEOUT)
    elapsed = time.monotonic() - start
    assert TIMEOUT * 0.9 <= elapsed < TIMEOUT + MARGIN


@pytest.mark.timeout(10)
@pytest.mark.parametrize("sent", [b"", b"DPLY\x02" + b"\x55" * 40], ids=["silent", "half"])
def test_stalling_acceptor_times_out(connected, background, sent: bytes) -> None:
    client, server = connected

    def stall() -> None:
        recv_exactly(server, HELLO)
        server.sendall(sent)

    fake = background(stall)
    start = time.monotonic()
    with pytest.raises(AuthenticationError, match="within"):
        authenticate(client, SECRET, initiator=True, identity=ME, wanted=YOU, timeout=TIMEOUT)
    assert time.monotonic() - start < TIMEOUT + MARGIN
    fake.result()


@pytest.mark.timeout(10)
def test_trickling_peer_cannot_extend_the_deadline(connected, background) -> None:
    # A byte every 0.1 s keeps every recv busy, but the deadline covers the whole handshake.
    client, server = connected
    hello = initiator().data_to_send()
    stop = threading.Event()

    def trickle() -> None:
        for byte in hello[:20]:
            if stop.wait(0.1):
                return
            client.sendall(bytes([byte]))

    trickler = background(trickle)
    start = time.monotonic()
    try:
        with pytest.raises(AuthenticationError, match="within"):
            authenticate(server, SECRET, initiator=False, identity=YOU, timeout=TIMEOUT)
        assert time.monotonic() - start < TIMEOUT + MARGIN
    finally:
        stop.set()
    trickler.result()


@pytest.mark.timeout(10)
def test_two_initiators_do_not_authenticate(pair, background) -> None:
    a, b = pair
    other = background(lambda: authenticate(b, SECRET, initiator=True, identity=ME, wanted=YOU, timeout=TIMEOUT))
    with pytest.raises(AuthenticationError):
        authenticate(a, SECRET, initiator=True, identity=ME, wanted=YOU, timeout=TIMEOUT)
    with pytest.raises(AuthenticationError):
        other.result()


@pytest.mark.timeout(10)
def test_closed_socket_is_an_authentication_error(pair) -> None:
    a, b = pair
    b.close()
    with pytest.raises(AuthenticationError):
        authenticate(a, SECRET, initiator=True, identity=ME, wanted=YOU, timeout=TIMEOUT)
