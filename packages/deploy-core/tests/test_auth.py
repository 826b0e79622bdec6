"""The HMAC handshake: sans-IO in memory, then `authenticate` over real sockets."""

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
HELLO = 37  # MAGIC, VERSION, nonce
CHALLENGE = 69  # MAGIC, VERSION, nonce, proof
PROOF = 32
TIMEOUT = 0.5
MARGIN = 1.0


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


def test_same_secret_completes_both_sides() -> None:
    initiator = Handshake(SECRET, initiator=True)
    acceptor = Handshake(SECRET, initiator=False)
    assert not initiator.done and not acceptor.done
    sent = pump(initiator, acceptor)
    assert initiator.done and acceptor.done
    assert initiator.bytes_needed() == acceptor.bytes_needed() == 0
    assert [len(message) for message in sent["initiator"]] == [HELLO, PROOF]
    assert [len(message) for message in sent["acceptor"]] == [CHALLENGE]
    assert initiator.data_to_send() == acceptor.data_to_send() == b""


def test_bytes_needed_and_first_message() -> None:
    initiator = Handshake(SECRET, initiator=True)
    acceptor = Handshake(SECRET, initiator=False)
    assert initiator.bytes_needed() == CHALLENGE
    assert acceptor.bytes_needed() == HELLO
    assert acceptor.data_to_send() == b""  # the acceptor speaks second
    hello = initiator.data_to_send()
    assert hello[:5] == b"DPLY\x01" and len(hello) == HELLO
    assert initiator.data_to_send() == b""  # drained
    acceptor.receive_data(hello[:10])
    assert acceptor.bytes_needed() == HELLO - 10


def test_bytearray_secret_works() -> None:
    initiator = Handshake(bytearray(SECRET), initiator=True)
    acceptor = Handshake(SECRET, initiator=False)
    pump(initiator, acceptor)
    assert initiator.done and acceptor.done


def test_one_byte_at_a_time() -> None:
    initiator = Handshake(SECRET, initiator=True)
    acceptor = Handshake(SECRET, initiator=False)
    pump(initiator, acceptor, chunk=1)
    assert initiator.done and acceptor.done


def test_fresh_nonces_every_time() -> None:
    hellos = {Handshake(SECRET, initiator=True).data_to_send() for _ in range(50)}
    assert len(hellos) == 50


def test_wrong_secret_is_rejected_by_the_initiator() -> None:
    initiator = Handshake(b"one secret", initiator=True)
    acceptor = Handshake(b"another secret", initiator=False)
    acceptor.receive_data(initiator.data_to_send())
    with pytest.raises(AuthenticationError, match="shared secret"):
        initiator.receive_data(acceptor.data_to_send())
    assert not initiator.done
    assert initiator.data_to_send() == b""  # no proof goes out after a failed check


def initiator_proof(secret: bytes, hello: bytes, challenge: bytes) -> bytes:
    """The initiator's proof as the module docstring specifies it."""
    nonce_i, nonce_a = hello[5:HELLO], challenge[5:HELLO]
    return hmac.new(secret, b"deploy-auth-v1 initiator" + nonce_a + nonce_i, hashlib.sha256).digest()


@pytest.mark.parametrize(("secret", "accepted"), [(SECRET, True), (b"another secret", False)])
def test_acceptor_checks_the_initiators_proof(secret: bytes, accepted: bool) -> None:
    # A well-formed proof made with the wrong secret (an initiator that skipped its own
    # check of the acceptor) is refused; the same construction with the right one passes.
    hello = Handshake(secret, initiator=True).data_to_send()
    acceptor = Handshake(SECRET, initiator=False)
    acceptor.receive_data(hello)
    proof = initiator_proof(secret, hello, acceptor.data_to_send())
    if accepted:
        acceptor.receive_data(proof)
        assert acceptor.done
    else:
        with pytest.raises(AuthenticationError, match="shared secret"):
            acceptor.receive_data(proof)
        assert not acceptor.done


def test_replayed_initiator_transcript_is_rejected() -> None:
    sent = pump(Handshake(SECRET, initiator=True), Handshake(SECRET, initiator=False))
    hello, proof = sent["initiator"]
    fresh = Handshake(SECRET, initiator=False)
    fresh.receive_data(hello)  # a hello alone proves nothing; the acceptor answers
    assert len(fresh.data_to_send()) == CHALLENGE
    with pytest.raises(AuthenticationError, match="shared secret"):
        fresh.receive_data(proof)
    assert not fresh.done


def test_replayed_acceptor_transcript_is_rejected() -> None:
    sent = pump(Handshake(SECRET, initiator=True), Handshake(SECRET, initiator=False))
    (challenge,) = sent["acceptor"]
    fresh = Handshake(SECRET, initiator=True)
    fresh.data_to_send()
    with pytest.raises(AuthenticationError, match="shared secret"):
        fresh.receive_data(challenge)


def test_reflected_nonce_is_rejected() -> None:
    initiator = Handshake(SECRET, initiator=True)
    hello = initiator.data_to_send()
    with pytest.raises(AuthenticationError, match="nonce"):
        initiator.receive_data(hello + b"\0" * PROOF)


def test_reflected_proof_from_a_second_session_is_rejected() -> None:
    # An attacker without the secret talks to acceptor A, then opens a second session
    # to B with A's nonce as its own, hoping B's proof answers A's challenge.
    a = Handshake(SECRET, initiator=False)
    b = Handshake(SECRET, initiator=False)
    a.receive_data(b"DPLY\x01" + b"\x11" * 32)
    challenge_a = a.data_to_send()
    b.receive_data(b"DPLY\x01" + challenge_a[5:HELLO])
    challenge_b = b.data_to_send()
    with pytest.raises(AuthenticationError):
        a.receive_data(challenge_b[HELLO:])
    assert not a.done


def test_more_than_bytes_needed_is_rejected() -> None:
    initiator = Handshake(SECRET, initiator=True)
    acceptor = Handshake(SECRET, initiator=False)
    with pytest.raises(AuthenticationError, match="more than"):
        acceptor.receive_data(initiator.data_to_send() + b"x")
    initiator = Handshake(SECRET, initiator=True)
    with pytest.raises(AuthenticationError, match="more than"):
        initiator.receive_data(b"\0" * (CHALLENGE + 1))


def test_data_after_completion_is_rejected() -> None:
    initiator = Handshake(SECRET, initiator=True)
    acceptor = Handshake(SECRET, initiator=False)
    pump(initiator, acceptor)
    with pytest.raises(AuthenticationError):
        acceptor.receive_data(b"x")
    with pytest.raises(AuthenticationError):
        initiator.receive_data(b"x")


def test_eof_mid_handshake_is_rejected() -> None:
    acceptor = Handshake(SECRET, initiator=False)
    acceptor.receive_data(b"DPLY")
    with pytest.raises(AuthenticationError, match="closed"):
        acceptor.receive_data(b"")


@pytest.mark.parametrize(
    "hello",
    [
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1:80\r\n\r\n",
        bytes(random.Random(1).randrange(256) for _ in range(HELLO)),
        b"\0" * HELLO,
        b"dply\x01" + b"\0" * 32,  # magic is case-sensitive
    ],
    ids=["http", "random", "zeros", "lowercase-magic"],
)
def test_garbage_hello_is_rejected(hello: bytes) -> None:
    acceptor = Handshake(SECRET, initiator=False)
    with pytest.raises(AuthenticationError, match="not speaking the deploy protocol"):
        deliver(hello[:HELLO], acceptor)
    assert acceptor.data_to_send() == b""


def test_other_version_is_rejected() -> None:
    acceptor = Handshake(SECRET, initiator=False)
    with pytest.raises(AuthenticationError, match="version 2"):
        acceptor.receive_data(b"DPLY\x02" + b"\0" * 32)


@pytest.mark.parametrize("secret", [b"", bytearray(), "text secret", None, 42])
def test_secret_must_be_non_empty_bytes(secret: object) -> None:
    with pytest.raises(ValueError, match="secret"):
        Handshake(secret, initiator=True)  # type: ignore[arg-type]
    a, b = socket.socketpair()
    with a, b, pytest.raises(ValueError, match="secret"):
        authenticate(a, secret, initiator=True, timeout=TIMEOUT)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- sockets


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def side(sock: socket.socket, secret: bytes, *, initiator: bool, timeout: float = 5.0) -> None:
    """`authenticate`, closing the socket on failure as a real server would."""
    try:
        authenticate(sock, secret, initiator=initiator, timeout=timeout)
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

    acceptor = background(accept)
    side(client, SECRET, initiator=True)
    client.sendall(b"from the initiator")
    assert recv_exactly(client, len(b"from the acceptor")) == b"from the acceptor"
    assert acceptor.result() == b"from the initiator"


@pytest.mark.timeout(10)
def test_payload_sent_with_the_proof_stays_in_the_socket(connected, background) -> None:
    # The initiator writes its proof and the first payload in one send; the acceptor
    # must read only the proof.
    client, server = connected
    acceptor = background(lambda: (side(server, SECRET, initiator=False), recv_exactly(server, 7))[1])
    handshake = Handshake(SECRET, initiator=True)
    client.sendall(handshake.data_to_send())
    handshake.receive_data(recv_exactly(client, CHALLENGE))
    assert handshake.done
    client.sendall(handshake.data_to_send() + b"payload")
    assert acceptor.result() == b"payload"


@pytest.mark.timeout(10)
@pytest.mark.parametrize("previous", [None, 7.0])
def test_socket_timeout_is_restored(pair, background, previous: float | None) -> None:
    a, b = pair
    a.settimeout(previous)
    b.settimeout(previous)
    acceptor = background(lambda: authenticate(b, SECRET, initiator=False, timeout=5))
    authenticate(a, SECRET, initiator=True, timeout=5)
    acceptor.result()
    assert a.gettimeout() == previous
    assert b.gettimeout() == previous


@pytest.mark.timeout(10)
def test_wrong_secret_rejected_on_both_sides(connected, background) -> None:
    client, server = connected
    acceptor = background(lambda: side(server, b"the acceptor's secret", initiator=False))
    with pytest.raises(AuthenticationError):
        side(client, b"the initiator's secret", initiator=True)
    with pytest.raises(AuthenticationError):
        acceptor.result()


@pytest.mark.timeout(10)
@pytest.mark.parametrize("sent", [b"", b"DPLY\x01" + b"\x22" * 10])
def test_initiator_closing_mid_handshake_is_rejected(connected, sent: bytes) -> None:
    client, server = connected
    client.sendall(sent)
    client.shutdown(socket.SHUT_WR)
    start = time.monotonic()
    with pytest.raises(AuthenticationError, match="closed"):
        authenticate(server, SECRET, initiator=False, timeout=5)
    assert time.monotonic() - start < 2


@pytest.mark.timeout(10)
def test_acceptor_closing_mid_handshake_is_rejected(connected, background) -> None:
    client, server = connected

    def truncated_acceptor() -> None:
        assert len(recv_exactly(server, HELLO)) == HELLO
        server.sendall(b"DPLY\x01" + b"\x33" * 20)
        server.shutdown(socket.SHUT_WR)

    fake = background(truncated_acceptor)
    with pytest.raises(AuthenticationError, match="closed"):
        authenticate(client, SECRET, initiator=True, timeout=5)
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
        authenticate(server, SECRET, initiator=False, timeout=5)


@pytest.mark.timeout(10)
def test_garbage_rejected_by_initiator(connected, background) -> None:
    client, server = connected

    def http_server() -> None:
        recv_exactly(server, HELLO)
        server.sendall(b"HTTP/1.1 400 Bad Request\r\nServer: nginx\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    fake = background(http_server)
    with pytest.raises(AuthenticationError, match="not speaking the deploy protocol"):
        authenticate(client, SECRET, initiator=True, timeout=5)
    fake.result()


@pytest.mark.timeout(10)
def test_replayed_transcript_rejected_over_a_socket(connected, background) -> None:
    sent = pump(Handshake(SECRET, initiator=True), Handshake(SECRET, initiator=False))
    hello, proof = sent["initiator"]
    client, server = connected
    acceptor = background(lambda: side(server, SECRET, initiator=False))
    client.sendall(hello)
    assert len(recv_exactly(client, CHALLENGE)) == CHALLENGE
    client.sendall(proof)
    with pytest.raises(AuthenticationError, match="shared secret"):
        acceptor.result()


@pytest.mark.timeout(10)
def test_reflected_nonce_rejected_over_a_socket(connected, background) -> None:
    client, server = connected

    def mirror() -> None:
        hello = recv_exactly(server, HELLO)
        server.sendall(hello + b"\0" * PROOF)

    fake = background(mirror)
    with pytest.raises(AuthenticationError, match="nonce"):
        authenticate(client, SECRET, initiator=True, timeout=5)
    fake.result()


@pytest.mark.timeout(10)
@pytest.mark.parametrize("sent", [b"", b"DPLY\x01" + b"\x44" * 10], ids=["silent", "half"])
def test_stalling_initiator_times_out(connected, sent: bytes) -> None:
    client, server = connected
    client.sendall(sent)
    start = time.monotonic()
    with pytest.raises(AuthenticationError, match="within 0.5s"):
        authenticate(server, SECRET, initiator=False, timeout=TIMEOUT)
    elapsed = time.monotonic() - start
    assert TIMEOUT * 0.9 <= elapsed < TIMEOUT + MARGIN


@pytest.mark.timeout(10)
@pytest.mark.parametrize("sent", [b"", b"DPLY\x01" + b"\x55" * 40], ids=["silent", "half"])
def test_stalling_acceptor_times_out(connected, background, sent: bytes) -> None:
    client, server = connected

    def stall() -> None:
        recv_exactly(server, HELLO)
        server.sendall(sent)

    fake = background(stall)
    start = time.monotonic()
    with pytest.raises(AuthenticationError, match="within"):
        authenticate(client, SECRET, initiator=True, timeout=TIMEOUT)
    assert time.monotonic() - start < TIMEOUT + MARGIN
    fake.result()


@pytest.mark.timeout(10)
def test_trickling_peer_cannot_extend_the_deadline(connected, background) -> None:
    # A byte every 0.1 s keeps every recv busy, but the deadline covers the whole handshake.
    client, server = connected
    hello = Handshake(SECRET, initiator=True).data_to_send()
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
            authenticate(server, SECRET, initiator=False, timeout=TIMEOUT)
        assert time.monotonic() - start < TIMEOUT + MARGIN
    finally:
        stop.set()
    trickler.result()


@pytest.mark.timeout(10)
def test_two_initiators_do_not_authenticate(pair, background) -> None:
    a, b = pair
    other = background(lambda: authenticate(b, SECRET, initiator=True, timeout=TIMEOUT))
    with pytest.raises(AuthenticationError):
        authenticate(a, SECRET, initiator=True, timeout=TIMEOUT)
    with pytest.raises(AuthenticationError):
        other.result()


@pytest.mark.timeout(10)
def test_closed_socket_is_an_authentication_error(pair) -> None:
    a, b = pair
    b.close()
    with pytest.raises(AuthenticationError):
        authenticate(a, SECRET, initiator=True, timeout=TIMEOUT)
