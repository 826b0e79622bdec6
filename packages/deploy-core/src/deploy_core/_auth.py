"""Mutual HMAC-SHA256 challenge-response over a shared secret (DESIGN §4).

Every message has a fixed size, so a reader never asks for more than ``bytes_needed()``
and a peer can never make us buffer more than one message. The exchange, with ``K``
the secret and fresh 32-byte random nonces::

    initiator -> acceptor   MAGIC, VERSION, nonce_i                          (37 bytes)
    acceptor  -> initiator  MAGIC, VERSION, nonce_a, HMAC(K, "acceptor"  | nonce_i | nonce_a)  (69 bytes)
    initiator -> acceptor   HMAC(K, "initiator" | nonce_a | nonce_i)         (32 bytes)

Each side proves knowledge of ``K`` over a nonce chosen by the other, so a recorded
transcript cannot be replayed, and the role labels stop a reflected proof from passing.
The initiator may send payload right after its proof; the acceptor reads no payload
until the proof has checked out.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import time

from ._errors import AuthenticationError

__all__ = ["Handshake", "authenticate"]

MAGIC = b"DPLY"
VERSION = 1
_NONCE = 32
_MAC = 32
_HELLO = len(MAGIC) + 1 + _NONCE
_CHALLENGE = _HELLO + _MAC
DEFAULT_TIMEOUT = 10.0


def _mac(secret: bytes, label: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(secret, b"deploy-auth-v1 " + label + first + second, hashlib.sha256).digest()


class Handshake:
    """The handshake as a sans-IO state machine.

    Feed what the peer sent with `receive_data` (at most `bytes_needed` bytes at a
    time), write what `data_to_send` returns; `done` turns true once the peer is
    proven. Any failure raises `AuthenticationError`.
    """

    def __init__(self, secret: bytes, *, initiator: bool):
        if not isinstance(secret, (bytes, bytearray)) or not secret:
            raise ValueError("the shared secret must be non-empty bytes")
        self._secret = bytes(secret)
        self.initiator = initiator
        self._nonce = os.urandom(_NONCE)
        self._peer_nonce = b""
        self._inbox = bytearray()
        self._outbox = bytearray()
        self.done = False
        if initiator:
            self._outbox += MAGIC + bytes([VERSION]) + self._nonce
            self._expect = _CHALLENGE
        else:
            self._expect = _HELLO

    def bytes_needed(self) -> int:
        """How many more bytes the current step needs (0 once done)."""
        return 0 if self.done else self._expect - len(self._inbox)

    def data_to_send(self) -> bytes:
        out = bytes(self._outbox)
        self._outbox.clear()
        return out

    def receive_data(self, data: bytes) -> None:
        if self.done:
            raise AuthenticationError("handshake already complete: unexpected data")
        if not data:
            raise AuthenticationError("the peer closed the connection during the handshake")
        if len(data) > self.bytes_needed():
            raise AuthenticationError("the peer sent more than the handshake allows")
        self._inbox += data
        if len(self._inbox) < self._expect:
            return
        message = bytes(self._inbox)
        self._inbox.clear()
        if self.initiator:
            self._check_challenge(message)
        elif not self._peer_nonce:
            self._check_hello(message)
        else:
            self._check_proof(message)

    def _check_header(self, message: bytes) -> bytes:
        if message[: len(MAGIC)] != MAGIC:
            raise AuthenticationError("the peer is not speaking the deploy protocol")
        if message[len(MAGIC)] != VERSION:
            raise AuthenticationError(f"the peer speaks handshake version {message[len(MAGIC)]}, not {VERSION}")
        nonce = message[len(MAGIC) + 1 : _HELLO]
        if nonce == self._nonce:
            raise AuthenticationError("the peer echoed our own nonce")
        return nonce

    def _check_hello(self, message: bytes) -> None:
        self._peer_nonce = self._check_header(message)
        proof = _mac(self._secret, b"acceptor", self._peer_nonce, self._nonce)
        self._outbox += MAGIC + bytes([VERSION]) + self._nonce + proof
        self._expect = _MAC

    def _check_challenge(self, message: bytes) -> None:
        self._peer_nonce = self._check_header(message)
        expected = _mac(self._secret, b"acceptor", self._nonce, self._peer_nonce)
        if not hmac.compare_digest(message[_HELLO:], expected):
            raise AuthenticationError("the peer does not know the shared secret")
        self._outbox += _mac(self._secret, b"initiator", self._peer_nonce, self._nonce)
        self.done = True

    def _check_proof(self, message: bytes) -> None:
        expected = _mac(self._secret, b"initiator", self._nonce, self._peer_nonce)
        if not hmac.compare_digest(message, expected):
            raise AuthenticationError("the peer does not know the shared secret")
        self.done = True


def authenticate(sock: socket.socket, secret: bytes, *, initiator: bool, timeout: float = DEFAULT_TIMEOUT) -> None:
    """Run the handshake on a connected blocking socket, within ``timeout`` seconds.

    Reads exactly the handshake's bytes, so whatever the peer sends next stays in the
    socket. Raises `AuthenticationError` on a wrong secret, garbage, EOF or timeout;
    the socket's previous timeout is restored on success.
    """
    handshake = Handshake(secret, initiator=initiator)
    deadline = time.monotonic() + timeout
    previous = sock.gettimeout()
    try:
        while True:
            out = handshake.data_to_send()
            if out:
                _set_deadline(sock, deadline)
                sock.sendall(out)
            if handshake.done:
                break
            _set_deadline(sock, deadline)
            handshake.receive_data(sock.recv(handshake.bytes_needed()))
    except TimeoutError:
        raise AuthenticationError(f"the peer did not complete the handshake within {timeout:g}s") from None
    except OSError as error:
        raise AuthenticationError(f"the connection failed during the handshake: {error}") from None
    sock.settimeout(previous)


def _set_deadline(sock: socket.socket, deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError()
    sock.settimeout(remaining)
