"""`select` and `aselect`: wait until one of several channels is ready."""

from __future__ import annotations

import random

from ._channel import Receiver, Sender
from ._link import AsyncWaiter, Waiter, deadline_after, remaining

__all__ = ["aselect", "select"]

Channel = Sender | Receiver


def _pick(channels: tuple) -> Channel | None:
    # A random starting point keeps a busy channel from starving the others.
    count = len(channels)
    start = random.randrange(count)
    for i in range(count):
        channel = channels[(start + i) % count]
        if channel._ready():
            return channel
    return None


def _validate(channels: tuple) -> None:
    if not channels:
        raise ValueError("select() needs at least one channel")
    for channel in channels:
        if not isinstance(channel, (Sender, Receiver)):
            raise TypeError(f"select() takes Senders and Receivers, not {type(channel).__name__}")


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


async def aselect(*channels: Channel) -> Channel:
    """`select` for asyncio (use ``asyncio.wait_for`` for a timeout)."""
    _validate(channels)
    while True:
        ready = _pick(channels)
        if ready is not None:
            return ready
        waiter = AsyncWaiter()
        sets = [channel._watchers() for channel in channels]
        for watchers in sets:
            watchers.add(waiter)
        try:
            if _pick(channels) is None:
                await waiter.future
        finally:
            for watchers in sets:
                watchers.discard(waiter)
