"""`Sender` and `Receiver`: typed, one-way views of the link to a peer."""

from __future__ import annotations

import pickle
import struct
from collections.abc import AsyncIterator, Iterator
from itertools import repeat
from operator import is_
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from deploy_core import ChannelClosed, PeerExited, PeerLost, Pid, SerializationError

from ._default import default_endpoint
from ._endpoint import Endpoint
from ._interrupts import DeferredInterrupt, Interrupted
from ._link import Link
from ._typecheck import type_checker, type_name
from ._waiters import FdWaiter, deadline_after, woken_or_ready
from ._wire import Payload, batch_size, decode_message, encode_message

__all__ = ["Receiver", "Sender"]

_PLAIN_TYPES = frozenset({int, float, bool, str, bytes, type(None)})
_plain_dumps = pickle.dumps
_plain_loads = pickle.loads
_pack_header = struct.Struct(">I").pack
_join = b"".join

T = TypeVar("T")
_Self = TypeVar("_Self", bound="_Channel[Any]")


class _TypedAlias:
    """What ``Sender[int]`` evaluates to: callable like the class, with ``T`` bound."""

    __slots__ = ("__origin__", "__args__")

    def __init__(self, origin: type, item: Any):
        self.__origin__ = origin
        self.__args__ = (item,)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__origin__(*args, _type=self.__args__[0], **kwargs)

    def __repr__(self) -> str:
        return f"{self.__origin__.__name__}[{type_name(self.__args__[0])}]"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _TypedAlias) and (self.__origin__, self.__args__) == (other.__origin__, other.__args__)

    def __hash__(self) -> int:
        return hash((self.__origin__, self.__args__))

    def __instancecheck__(self, obj: object) -> bool:
        return isinstance(obj, self.__origin__)


class _Channel(Generic[T]):
    _kind = ""

    if not TYPE_CHECKING:
        # A type checker reads ``Sender[int]`` as the generic class itself; at run time
        # it is a `_TypedAlias` that hands ``int`` to the channel to check messages by.

        def __class_getitem__(cls, item: Any) -> Any:
            if isinstance(item, TypeVar):
                return super().__class_getitem__(item)  # a generic annotation, e.g. Sender[T]
            return _TypedAlias(cls, item)

    def __init__(self, pid: Pid, endpoint: Endpoint | None = None, *, _type: Any = None):
        if endpoint is None:
            endpoint = default_endpoint()
        self._type = _type
        self._check = type_checker(_type) if _type is not None else None
        self.pid = pid
        self.endpoint = endpoint
        self._link: Link | None = None
        link, self._ref = endpoint._open_channel(self._kind, pid, self)
        self._link = link

    def __repr__(self) -> str:
        name = type(self).__name__
        if self._type is not None:
            name += f"[{type_name(self._type)}]"
        state = " closed" if self._link is None else ""
        return f"<{name} {'to' if self._kind == 'sender' else 'from'} {self.pid}{state}>"

    @property
    def closed(self) -> bool:
        return self._link is None

    def close(self) -> None:
        """Release the channel (idempotent). Messages already sent are still delivered;
        messages not yet received stay queued for the next Receiver from that pid."""
        link = self._link
        if link is not None:
            self._link = None
            self.endpoint._close_channel(self._kind, self.pid, self._ref)
            # Threads and tasks blocked on this channel look again and find it closed.
            link.wake_all()

    def __enter__(self: _Self) -> _Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _live_link(self) -> Link:
        link = self._link
        if link is None:
            raise self._closed_error()
        if link.shut and link.loop.forked:
            raise link.closed_error()  # inherited through fork: unusable in this process
        return link

    def _closed_error(self) -> ChannelClosed:
        return ChannelClosed(
            f"this {type(self).__name__} {'to' if self._kind == 'sender' else 'from'} {self.pid} is closed"
        )

    def _ready(self) -> bool:
        raise NotImplementedError

    def _watchers(self) -> set[Any]:
        raise NotImplementedError


class Sender(_Channel[T]):
    """Send values of type ``T`` to the process ``pid``: ``Sender[int](pid).send(3)``.

    Messages to one process arrive in the order sent. `send` blocks while the peer is
    not reading and this process's buffer to it is over the high-water mark.
    """

    _kind = "sender"

    def send(self, value: T, timeout: float | None = None) -> None:
        """Send ``value``; raises `PeerExited`/`PeerLost` if the peer is gone, TypeError on
        a value that is not a ``T``, `SerializationError` on one that cannot be pickled or
        whose pickle exceeds the endpoint's ``max_frame_size`` (nothing is sent then),
        TimeoutError if still blocked by back-pressure after ``timeout`` seconds.

        Once it returns, ``value`` may change: the message is what it was. A large
        buffer of the caller's that may change (a bytearray, a NumPy array) is sent from
        its own memory, uncopied, so the call returns once the kernel has taken it (at most
        ``timeout`` seconds; what is left then is copied)."""
        link = self._link
        if link is None:
            raise ChannelClosed(f"this Sender to {self.pid} is closed")
        size = batch_size(value)
        try:
            if size is not None:
                # (A small int, float, str...: it may travel with others in one frame.)
                check = self._check
                if check is not None and not check(value):
                    raise self._type_error(value)
                link.push_value(value, size, None if timeout is None else deadline_after(timeout), self)
            else:
                frame, nbytes = self._encode(value)
                link.push(frame, nbytes, None if timeout is None else deadline_after(timeout), self)
        except (PeerExited, PeerLost, TimeoutError) as error:
            # A user's traceback ends here: the frames below are the link's.
            raise error.with_traceback(None) from None

    def _encode(self, value: T) -> tuple[bytes | list[Any], int]:
        check = self._check
        if check is not None and not check(value):
            raise self._type_error(value)
        if type(value) in _PLAIN_TYPES and (type(value) is not bytes or len(value) < 32768):  # type: ignore[arg-type]
            # Fast path: these never carry out-of-band buffers and fit one small frame.
            data = _plain_dumps(value, 5)
            frame = _join((_pack_header(len(data) + 1), data, b"D"))
            return frame, len(frame)
        return encode_message(value)

    def _type_error(self, value: object) -> TypeError:
        return TypeError(
            f"Sender[{type_name(self._type)}] to {self.pid} cannot send a {type(value).__name__}: {value!r:.80}"
        )

    async def asend(self, value: T) -> None:
        """`send` for asyncio: waits for buffer space, and for the kernel to take a large
        buffer of the caller's (see `send`), without blocking the event loop."""
        link = self._live_link()
        while not link.tx_ready():
            await woken_or_ready(link.tx_ready, (link.tx_watchers,))
            link = self._live_link()
        size = batch_size(value)
        if size is not None:
            check = self._check
            if check is not None and not check(value):
                raise self._type_error(value)
            try:
                link.push_value(value, size, None, self)  # (never holds: nothing of the caller's to wait for)
            except (PeerExited, PeerLost) as error:
                raise error.with_traceback(None) from None
            return
        frame, nbytes = self._encode(value)
        try:
            end = link.push(frame, nbytes, None, self, hold=False)
        except (PeerExited, PeerLost) as error:
            raise error.with_traceback(None) from None
        if end is None:
            return
        try:
            while not link.taken(end):
                await woken_or_ready(lambda: link.taken(end), (link.tx_watchers,))
        finally:
            link.release_hold(end)  # (cancelled: what is left is copied)

    def _ready(self) -> bool:
        return self._live_link().tx_ready()

    def _watchers(self) -> set[Any]:
        return self._live_link().tx_watchers


class Receiver(_Channel[T]):
    """Receive values of type ``T`` from the process ``pid``: ``Receiver[int](pid).recv()``.

    Once the peer is gone, `recv` returns what it had sent, then raises `PeerExited`
    (it exited cleanly; ``.code`` is its exit code when known) or `PeerLost`.
    Iterating (``for v in rx`` / ``async for v in rx``) stops when the peer has exited.
    """

    _kind = "receiver"

    def recv(self, timeout: float | None = None) -> T:
        """The next message; TimeoutError after ``timeout`` seconds without one;
        `SerializationError` for a message that cannot be unpickled here (it is consumed).

        A KeyboardInterrupt (Ctrl-C) that ends a `recv` takes no message: the next `recv`
        returns the message this one would have.
        """
        link = self._link
        if link is None:
            raise ChannelClosed(f"this Receiver from {self.pid} is closed")
        inbox = link.inbox
        while inbox:
            # Decode the first message, then take it, so that a KeyboardInterrupt raised
            # between two steps leaves it queued: `remove` (of the very object, found at
            # once) is the commit, undone if a handler raises before the return.
            try:
                payload = inbox[0]
            except IndexError:
                break
            try:
                value = self._decode(payload)
            except Exception:
                link.discard(payload)  # a message that cannot be received is consumed
                raise
            try:
                inbox.remove(payload)
                if link.paused:
                    link.resume_if_due()
                return value
            except ValueError:
                continue  # another thread received it first
            except KeyboardInterrupt:
                # Raised anywhere from just before the removal to the return (Python 3.10
                # runs handlers between almost any two instructions): not delivered, so
                # it goes back unless it is still there. Another Ctrl-C may land while
                # putting it back, and the loop thread may append meanwhile (iterating
                # then raises RuntimeError): look again, which the check by identity
                # makes harmless. The check is all C calls, so no Python frame of ours
                # runs in it for a handler to raise in.
                while True:
                    try:
                        if not any(map(is_, inbox, repeat(payload))):
                            inbox.appendleft(payload)
                        break
                    except (KeyboardInterrupt, RuntimeError):
                        continue
                raise
        deadline = None if timeout is None else deadline_after(timeout)
        waiter = FdWaiter.for_this_thread()
        deferred = DeferredInterrupt.install(waiter)
        try:
            while deferred is not None:
                taken = self._recv_deferring(link, deadline, deferred, waiter)
                if taken is not None:
                    value, payload, direct = taken
                    # Give SIGINT back and return in one try: a handler that raises
                    # anywhere before the return (Python 3.10 runs them between almost
                    # any two instructions) leaves the message queued for the next recv.
                    try:
                        pending = deferred.uninstall()
                        if pending is None:
                            return value
                    except BaseException:
                        link.put_back(payload, direct=direct)
                        raise
                    link.put_back(payload, direct=direct)
                    deferred.deliver(pending)
                # The user's handler returned instead of raising: wait again.
                deferred = DeferredInterrupt.install(waiter)
            # No signal handler can raise in this thread.
            return self._decode_taken(link, link.take(deadline, self, None, waiter))
        except (PeerExited, PeerLost, TimeoutError) as error:
            # A user's traceback ends here: the frames below are the link's.
            raise error.with_traceback(None) from None

    def _recv_deferring(
        self, link: Link, deadline: float | None, deferred: DeferredInterrupt, waiter: FdWaiter
    ) -> tuple[T, Payload, bool] | None:
        # The main thread waits with SIGINT deferred (see _interrupts): a signal ends the
        # wait at a safe point, and a message already in hand goes back to the inbox.
        # Returns the value, its payload and whether it was read off the socket, with
        # SIGINT still deferred (the caller gives it back); or None once a signal came
        # and the user's handler, run, returned instead of raising.
        payload = None
        try:
            payload = link.take(deadline, self, deferred, waiter)
            try:
                value = self._decode(payload)
            finally:
                link.done_with(payload)
        except Interrupted:
            pass
        except BaseException:
            pending = deferred.uninstall()
            if pending is not None:
                deferred.deliver(pending)
            raise
        if payload is not None and deferred.pending is None:
            return value, payload, deferred.direct
        if payload is not None:
            # Put back while the signal is still deferred: once the user's handler is
            # back, any Python call may raise.
            link.put_back(payload, direct=deferred.direct)
        pending = deferred.uninstall()
        if pending is not None:
            deferred.deliver(pending)
        return None

    def recv_nowait(self) -> T:
        """The next message if one is waiting, else raise TimeoutError at once."""
        payload = self._live_link().take_nowait()
        if payload is None:
            raise TimeoutError(f"no message from {self.pid} is waiting")
        return self._decode(payload)

    async def arecv(self) -> T:
        """`recv` for asyncio: waits without blocking the event loop."""
        while True:
            link = self._live_link()
            payload = link.take_nowait()
            if payload is not None:
                return self._decode(payload)
            await woken_or_ready(link.rx_ready, (link.rx_watchers,))

    def _decode_taken(self, link: Link, payload: Payload) -> T:
        # A payload `take` removed from the inbox: reading may resume once it is decoded.
        try:
            return self._decode(payload)
        finally:
            link.done_with(payload)

    def _decode(self, payload: Payload) -> T:
        try:
            # (A small message's payload is bytes: a pickle with its kind byte behind it;
            # one of a values frame's is a pair of the value, decoded already, and a number.)
            value: T
            if type(payload) is bytes:
                value = _plain_loads(payload)
            elif type(payload) is tuple:
                value = payload[0]
            else:
                value = decode_message(payload)  # type: ignore[arg-type]  # (bytearray or Buffers)
        except Exception as error:
            # A class or module the sender has and this process lacks, typically. The
            # message is consumed; the ones after it still arrive.
            raise SerializationError(
                f"cannot unpickle a message from {self.pid}: {type(error).__name__}: {error}"
            ) from error
        check = self._check
        if check is not None and not check(value):
            raise TypeError(
                f"Receiver[{type_name(self._type)}] from {self.pid} received a {type(value).__name__}: {value!r:.80}"
            )
        return value

    def __iter__(self) -> Iterator[T]:
        while True:
            try:
                yield self.recv()
            except PeerExited:
                return

    def __aiter__(self) -> AsyncIterator[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return await self.arecv()
        except PeerExited:
            raise StopAsyncIteration from None

    def _ready(self) -> bool:
        return self._live_link().rx_ready()

    def _watchers(self) -> set[Any]:
        return self._live_link().rx_watchers
