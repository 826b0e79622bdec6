"""Mutual HMAC-SHA256 challenge-response over a shared secret, bound to both identities.

Every connection names who is calling and whom it wants (DESIGN §4). An identity is an
ASCII string of 1 to 255 bytes: a pid's 32-hex id, or a role such as ``"bridge"``. The
exchange, version 2, with ``K`` the secret, fresh 32-byte random nonces, and
``len`` one byte::

    initiator -> acceptor   MAGIC, VERSION, nonce_i, len, len, id_i, wanted
    acceptor  -> initiator  MAGIC, VERSION, nonce_a, len, len, id_a, id_i, MAC_a
    initiator -> acceptor   MAC_i

    T     = "deploy-auth-v2" | nonce_i | nonce_a | len | id_i | len | id_a
    MAC_a = HMAC(K, "acceptor " | T)       MAC_i = HMAC(K, "initiator " | T)
    key   = HMAC(K, "key " | T)            (32 bytes, the same on both sides)

The acceptor answers only a hello whose ``wanted`` is its own identity; the initiator
accepts only an answer from the identity it wanted, whose MAC covers its own identity
and nonce. So a handshake relayed to any other acceptor fails at one end or the
other, a recorded transcript fails against fresh nonces, and the role labels stop a
reflected proof. ``key`` is for protecting the frames that follow (each connection
gets its own).

Each message is read in two steps (a fixed header, then the part its lengths give), so
a reader never asks for more than ``bytes_needed()`` and a peer can never make us
buffer more than one message of at most 581 bytes. The version byte is checked first:
a version-1 peer is told both versions. The initiator may send payload right after its
proof; the acceptor reads no payload until the proof has checked out.
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
VERSION = 2
_NONCE = 32
_MAC = 32
_PREFIX = len(MAGIC) + 1  # MAGIC, VERSION: checked before anything else
_FIXED = _NONCE + 2  # nonce, two lengths
MAX_IDENTITY = 255
DEFAULT_TIMEOUT = 10.0


def _check_identity(value: object, what: str) -> bytes:
    if not isinstance(value, str) or not value or not value.isascii() or len(value) > MAX_IDENTITY:
        raise ValueError(f"the handshake's {what} must be a non-empty ASCII string of at most 255 bytes")
    return value.encode("ascii")


class Handshake:
    """The handshake as a sans-IO state machine.

    ``identity`` names this side; an initiator also names the acceptor it means to reach
    (``wanted``). Feed what the peer sent with `receive_data` (at most `bytes_needed`
    bytes at a time), write what `data_to_send` returns; `done` turns true once the peer
    is proven, and then `peer` is its authenticated identity and `key` the 32-byte
    per-connection key. Any failure raises `AuthenticationError`.
    """

    def __init__(self, secret: bytes, *, initiator: bool, identity: str, wanted: str | None = None):
        if not isinstance(secret, (bytes, bytearray)) or not secret:
            raise ValueError("the shared secret must be non-empty bytes")
        self._secret = bytes(secret)
        self.initiator = initiator
        self.identity = identity
        self._own = _check_identity(identity, "identity")
        if initiator:
            self._wanted: bytes | None = _check_identity(wanted, "wanted identity")
        elif wanted is not None:
            raise ValueError("only the initiator of a handshake names the identity it wants")
        else:
            self._wanted = None
        self._nonce = os.urandom(_NONCE)
        self._peer_nonce = b""
        self._peer = b""
        self._key = b""
        self._inbox = bytearray()
        self._outbox = bytearray()
        self._step = "prefix"  # prefix, fixed, rest (of the hello or challenge), proof, done
        self._lengths = (0, 0)
        self.done = False
        if initiator:
            assert self._wanted is not None
            self._outbox += MAGIC + bytes([VERSION]) + self._nonce
            self._outbox += bytes([len(self._own), len(self._wanted)]) + self._own + self._wanted
        self._expect = _PREFIX

    @property
    def peer(self) -> str:
        """The other side's authenticated identity (once done)."""
        if not self.done:
            raise AuthenticationError("the handshake is not complete: the peer is not proven yet")
        return self._peer.decode("ascii")

    @property
    def key(self) -> bytes:
        """The 32-byte per-connection key both sides derived (once done)."""
        if not self.done:
            raise AuthenticationError("the handshake is not complete: no key yet")
        return self._key

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
        if self._step == "failed":
            raise AuthenticationError("the handshake already failed")
        if not data:
            raise AuthenticationError("the peer closed the connection during the handshake")
        if len(data) > self.bytes_needed():
            raise AuthenticationError("the peer sent more than the handshake allows")
        self._inbox += data
        if len(self._inbox) < self._expect:
            return
        message = bytes(self._inbox)
        self._inbox.clear()
        try:
            self._advance(message)
        except AuthenticationError:
            self._step = "failed"
            self._outbox.clear()
            raise

    def _advance(self, message: bytes) -> None:
        if self._step == "prefix":
            if message[: len(MAGIC)] != MAGIC:
                raise AuthenticationError("the peer is not speaking the deploy protocol")
            if message[len(MAGIC)] != VERSION:
                raise AuthenticationError(
                    f"the peer speaks handshake version {message[len(MAGIC)]}, this side version {VERSION}"
                )
            self._step, self._expect = "fixed", _FIXED
        elif self._step == "fixed":
            nonce, first, second = message[:_NONCE], message[_NONCE], message[_NONCE + 1]
            if nonce == self._nonce:
                raise AuthenticationError("the peer echoed our own nonce")
            if not first or not second:
                raise AuthenticationError("the peer sent an empty identity")
            self._peer_nonce, self._lengths = nonce, (first, second)
            self._step, self._expect = "rest", first + second + (_MAC if self.initiator else 0)
        elif self._step == "rest":
            first, second = self._lengths
            peer, named = message[:first], message[first : first + second]
            if not peer.isascii():
                raise AuthenticationError("the peer sent an identity that is not ASCII")
            self._peer = peer
            if self.initiator:
                self._check_challenge(named, message[first + second :])
            else:
                self._check_hello(named)
        elif self._step == "proof":
            if not hmac.compare_digest(message, self._mac(b"initiator ")):
                raise AuthenticationError("the peer does not know the shared secret")
            self._finish()

    def _transcript(self) -> bytes:
        if self.initiator:
            nonce_i, nonce_a, id_i, id_a = self._nonce, self._peer_nonce, self._own, self._peer
        else:
            nonce_i, nonce_a, id_i, id_a = self._peer_nonce, self._nonce, self._peer, self._own
        return b"deploy-auth-v2" + nonce_i + nonce_a + bytes([len(id_i)]) + id_i + bytes([len(id_a)]) + id_a

    def _mac(self, label: bytes) -> bytes:
        return hmac.new(self._secret, label + self._transcript(), hashlib.sha256).digest()

    def _check_hello(self, wanted: bytes) -> None:
        if wanted != self._own:
            raise AuthenticationError(
                f"the peer {_show(self._peer)} wants {_show(wanted)}, but this is {_show(self._own)}"
            )
        self._outbox += MAGIC + bytes([VERSION]) + self._nonce
        self._outbox += bytes([len(self._own), len(self._peer)]) + self._own + self._peer
        self._outbox += self._mac(b"acceptor ")
        self._step, self._expect = "proof", _MAC

    def _check_challenge(self, named: bytes, proof: bytes) -> None:
        if self._peer != self._wanted:
            raise AuthenticationError(
                f"the peer is {_show(self._peer)}, not {_show(self._wanted or b'')} that this side wanted"
            )
        if named != self._own:
            raise AuthenticationError(f"the peer answered {_show(named)}, not this side ({_show(self._own)})")
        if not hmac.compare_digest(proof, self._mac(b"acceptor ")):
            raise AuthenticationError("the peer does not know the shared secret")
        self._outbox += self._mac(b"initiator ")
        self._finish()

    def _finish(self) -> None:
        self._key = self._mac(b"key ")
        self._step, self._expect = "done", 0
        self.done = True


def _show(identity: bytes) -> str:
    return repr(identity.decode("ascii", "replace")[:40])


def authenticate(
    sock: socket.socket,
    secret: bytes,
    *,
    initiator: bool,
    identity: str,
    wanted: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Handshake:
    """Run the handshake on a connected blocking socket, within ``timeout`` seconds.

    Returns the finished `Handshake` (its `peer` and `key`). Reads exactly the
    handshake's bytes, so whatever the peer sends next stays in the socket. Raises
    `AuthenticationError` on a wrong secret, a wrong identity, garbage, EOF or timeout;
    the socket's previous timeout is restored on success.
    """
    handshake = Handshake(secret, initiator=initiator, identity=identity, wanted=wanted)
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
    return handshake


def _set_deadline(sock: socket.socket, deadline: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError()
    sock.settimeout(remaining)
