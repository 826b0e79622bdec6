"""A hypothesis state machine of the handshake under an active attacker (issue 13).

The world: the run's processes hold the secret. Initiator ``I`` wants ``"gone"``, a
process that exited and whose port the attacker now holds, so no honest acceptor has
that identity. Honest acceptors ``"bridge"`` and ``"other"``, and an honest initiator
``"j"`` that wants ``"other"``; any of them may start a fresh session at any time. The
attacker has no secret. It sees every byte anyone sends, and can deliver to any session
a party's latest message as it was, truncated, or with its identity fields rewritten to
what the receiver expects, random bytes, another session's MAC, or well-formed messages
made with its own secret and any identities.

Invariants: ``I`` never completes; no acceptor completes with a peer that did not
want it (``I`` wants nobody present, ``"j"`` wants only ``"other"``, the attacker's
own identities have no secret); ``"j"`` completes only with ``"other"``.
"""

from __future__ import annotations

import hashlib
import hmac

from deploy_core import AuthenticationError, Handshake
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

SECRET = b"the run's secret"
ATTACKER_SECRET = b"a guess"
I_ID, J_ID = "1" * 32, "j"
ACCEPTORS = ("bridge", "other")
# Who may legitimately complete a session with each acceptor.
ALLOWED = {"bridge": set(), "other": {J_ID}}

identities = st.sampled_from([I_ID, J_ID, "gone", "bridge", "other", "mallory"])


def forged_hello(nonce: bytes, identity: str, wanted: str) -> bytes:
    own, want = identity.encode(), wanted.encode()
    return b"DPLY\x02" + nonce + bytes([len(own), len(want)]) + own + want


def forged_challenge(nonce_a: bytes, nonce_i: bytes, id_a: str, id_i: str, secret: bytes) -> bytes:
    a, i = id_a.encode(), id_i.encode()
    t = b"deploy-auth-v2" + nonce_i + nonce_a + bytes([len(i)]) + i + bytes([len(a)]) + a
    proof = hmac.new(secret, b"acceptor " + t, hashlib.sha256).digest()
    return b"DPLY\x02" + nonce_a + bytes([len(a), len(i)]) + a + i + proof


def make(role: int) -> Handshake:
    if role == 0:
        return Handshake(SECRET, initiator=True, identity=I_ID, wanted="gone")
    if role == 3:
        return Handshake(SECRET, initiator=True, identity=J_ID, wanted="other")
    return Handshake(SECRET, initiator=False, identity=ACCEPTORS[role - 1])


def retarget(message: bytes, to: Handshake) -> bytes:
    """``message`` with its identity fields set to what ``to`` would accept (nonce and any
    MAC kept): the relay an attacker in the middle would try."""
    if len(message) < 39:
        return message
    tail = message[39 + message[37] + message[38] :]
    if to.initiator:
        return forged_hello(message[5:37], to._wanted.decode(), to.identity) + tail  # type: ignore[union-attr]
    return forged_hello(message[5:37], I_ID, to.identity) + tail


roles = st.integers(0, 3)  # I, "bridge", "other", "j"


class Attacked(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sessions = [make(role) for role in range(4)]
        self.failures = 0
        self.last: dict[int, bytes] = {}  # each session's latest message
        self.nonces: list[bytes] = []
        self.ever_done: list[Handshake] = []
        self._collect()

    @property
    def target(self) -> Handshake:
        return self.sessions[0]

    def _collect(self) -> None:
        for role, session in enumerate(self.sessions):
            data = session.data_to_send()
            if data:
                self.last[role] = data
                if len(data) > 37:
                    self.nonces.append(data[5:37])  # for forged answers to that hello
            if session.done and session not in self.ever_done:
                self.ever_done.append(session)

    def _deliver(self, role: int, data: bytes) -> None:
        session = self.sessions[role]
        while data and not session.done:
            size = min(session.bytes_needed(), len(data))
            try:
                session.receive_data(data[:size])
            except AuthenticationError:
                # The party drops the connection and connects again (an acceptor: takes
                # the next one); what the failed session sent stays seen.
                self.sessions[role] = make(role)
                self.failures += 1
                break
            data = data[size:]
        self._collect()

    @rule(role=roles)
    def fresh_session(self, role: int) -> None:
        """The party starts over (a reconnect); the old session's messages stay seen."""
        self.sessions[role] = make(role)
        self._collect()

    @precondition(lambda self: self.last)
    @rule(source=roles, to=roles, mode=st.sampled_from(["as is", "retarget", "truncate"]), cut=st.integers(1, 80))
    def relay(self, source: int, to: int, mode: str, cut: int) -> None:
        message = self.last.get(source) or self.last[min(self.last)]
        if mode == "retarget":
            message = retarget(message, self.sessions[to])
        elif mode == "truncate":
            message = message[:cut]
        self._deliver(to, message)

    @rule(to=roles, data=st.binary(min_size=1, max_size=120))
    def random_bytes(self, to: int, data: bytes) -> None:
        self._deliver(to, data)

    @rule(to=roles, nonce=st.binary(min_size=32, max_size=32), identity=identities, wanted=identities)
    def forge_hello(self, to: int, nonce: bytes, identity: str, wanted: str) -> None:
        self._deliver(to, forged_hello(nonce, identity, wanted))

    @precondition(lambda self: self.nonces)
    @rule(
        to=roles,
        nonce=st.binary(min_size=32, max_size=32),
        which=st.integers(1, 4),
        id_a=identities,
        id_i=identities,
        secret=st.sampled_from([ATTACKER_SECRET, b"x"]),
    )
    def forge_challenge(self, to: int, nonce: bytes, which: int, id_a: str, id_i: str, secret: bytes) -> None:
        nonce_i = self.nonces[-min(which, len(self.nonces))]
        self._deliver(to, forged_challenge(nonce, nonce_i, id_a, id_i, secret))

    @precondition(lambda self: self.last)
    @rule(source=roles, to=roles)
    def tail_as_proof(self, source: int, to: int) -> None:
        # The last 32 bytes someone sent (a MAC from another session) as this one's proof.
        self._deliver(to, (self.last.get(source) or self.last[min(self.last)])[-32:])

    @invariant()
    def the_relayed_initiator_never_completes(self) -> None:
        assert not any(session.initiator and session.identity == I_ID for session in self.ever_done)

    @invariant()
    def acceptors_complete_only_with_who_wanted_them(self) -> None:
        for session in self.ever_done:
            if not session.initiator:
                assert session.peer in ALLOWED[session.identity], (session.identity, session.peer)

    @invariant()
    def honest_initiators_complete_only_with_whom_they_wanted(self) -> None:
        for session in self.ever_done:
            if session.initiator:
                assert session.peer == "other"


TestAttacked = Attacked.TestCase
TestAttacked.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)


def test_the_model_can_complete_honest_sessions() -> None:
    # Relaying faithfully completes "j" with "other": the invariants above are not vacuous.
    machine = Attacked()
    machine.relay(3, 2, "as is", 1)
    machine.relay(2, 3, "as is", 1)
    machine.relay(3, 2, "as is", 1)
    j, other = machine.sessions[3], machine.sessions[2]
    assert j.done and other.done and other.peer == J_ID and j.key == other.key
    machine.acceptors_complete_only_with_who_wanted_them()
    machine.honest_initiators_complete_only_with_whom_they_wanted()
