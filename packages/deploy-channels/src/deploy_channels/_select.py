"""`select` and `aselect`: wait until one of several channels is ready."""

from __future__ import annotations

import random
from typing import Any, TypeVar, Union, overload

from ._channel import Receiver, Sender
from ._waiters import Waiter, deadline_after, remaining, woken_or_ready

__all__ = ["aselect", "select"]

Channel = Union[Sender[Any], Receiver[Any]]
# select() returns the very object it was given, so its static type is the union of the
# arguments' types: overloads up to four channels, one type for any number beyond.
C = TypeVar("C", bound=Channel)
C1 = TypeVar("C1", bound=Channel)
C2 = TypeVar("C2", bound=Channel)
C3 = TypeVar("C3", bound=Channel)
C4 = TypeVar("C4", bound=Channel)


def _pick(channels: tuple[Channel, ...]) -> Channel | None:
    # A random starting point keeps a busy channel from starving the others.
    count = len(channels)
    start = random.randrange(count)
    for i in range(count):
        channel = channels[(start + i) % count]
        if channel._ready():
            return channel
    return None


def _validate(channels: tuple[Channel, ...]) -> None:
    if not channels:
        raise ValueError("select() needs at least one channel")
    for channel in channels:
        if not isinstance(channel, (Sender, Receiver)):
            raise TypeError(f"select() takes Senders and Receivers, not {type(channel).__name__}")


@overload
def select(c1: C1, /, *, timeout: float | None = None) -> C1: ...
@overload
def select(c1: C1, c2: C2, /, *, timeout: float | None = None) -> C1 | C2: ...
@overload
def select(c1: C1, c2: C2, c3: C3, /, *, timeout: float | None = None) -> C1 | C2 | C3: ...
@overload
def select(c1: C1, c2: C2, c3: C3, c4: C4, /, *, timeout: float | None = None) -> C1 | C2 | C3 | C4: ...
@overload
def select(*channels: C, timeout: float | None = None) -> C: ...


def select(*channels: Channel, timeout: float | None = None) -> Channel:
    """Block until one of ``channels`` is ready and return that very object.

    A Receiver is ready when it has a message (or its peer is gone, which its `recv`
    then reports); a Sender when it can send without blocking. Fair among the ready
    ones. Raises TimeoutError after ``timeout`` seconds, `ChannelClosed` for a closed one.
    """
    _validate(channels)
    ready = _pick(channels)
    if ready is not None:
        return ready
    deadline = deadline_after(timeout)
    waiter = Waiter()
    sets = [channel._watchers() for channel in channels]
    for watchers in sets:
        watchers.add(waiter)
    try:
        while True:
            ready = _pick(channels)
            if ready is not None:
                return ready
            waiter.wait(remaining(deadline))
    finally:
        for watchers in sets:
            watchers.discard(waiter)


@overload
async def aselect(c1: C1, /) -> C1: ...
@overload
async def aselect(c1: C1, c2: C2, /) -> C1 | C2: ...
@overload
async def aselect(c1: C1, c2: C2, c3: C3, /) -> C1 | C2 | C3: ...
@overload
async def aselect(c1: C1, c2: C2, c3: C3, c4: C4, /) -> C1 | C2 | C3 | C4: ...
@overload
async def aselect(*channels: C) -> C: ...


async def aselect(*channels: Channel) -> Channel:
    """`select` for asyncio (use ``asyncio.wait_for`` for a timeout)."""
    _validate(channels)
    while True:
        ready = _pick(channels)
        if ready is not None:
            return ready
        await woken_or_ready(lambda: _pick(channels) is not None, [channel._watchers() for channel in channels])
