"""Spawn messages: building, encoding, decoding and the user-value serialization errors."""

from __future__ import annotations

import gc
import linecache
import os
import pickle
import socket
import sys
import textwrap
import threading
import traceback
import types
import weakref
from collections.abc import Iterator

import pytest
from deploy_core import (
    DeployError,
    Pid,
    Resources,
    SerializationError,
    SpawnReply,
    SpawnRequest,
    dumps_message,
    dumps_user,
    loads_user,
    snapshot_main,
)
from deploy_core._protocol import VERSION

PARENT = Pid("0123456789abcdef0123456789abcdef", "::1", 7000)
CHILD = Pid("fedcba9876543210fedcba9876543210", "127.0.0.1", 7001)


def round_trip(request: SpawnRequest) -> SpawnRequest:
    data = request.encode()
    assert isinstance(data, bytes)
    decoded = SpawnRequest.decode(data)
    assert decoded == request
    return decoded


def test_lambda_round_trips_and_still_works() -> None:
    request = round_trip(SpawnRequest.build(lambda parent, arg: (str(parent), arg * 2), 21, Resources(), PARENT))
    function, argument = request.function_and_argument()
    assert argument == 21
    assert function(PARENT, argument) == (str(PARENT), 42)


def test_closure_round_trips_and_still_works() -> None:
    seen: list[int] = []
    factor = 3

    def worker(parent: Pid, arg: int) -> int:
        seen.append(arg)  # the copy has its own list
        return arg * factor + len(seen)

    request = round_trip(SpawnRequest.build(worker, 5, Resources(), PARENT))
    function = loads_user(request.function)
    assert function is not worker
    assert function(PARENT, loads_user(request.argument)) == 16
    assert seen == []


def test_argument_objects_round_trip() -> None:
    argument = {"pids": [PARENT, CHILD], "resources": Resources("1GiB", 2), "data": b"\0" * 1000}
    request = round_trip(SpawnRequest.build(print, argument, Resources(), None))
    assert loads_user(request.argument) == argument


def test_argv_and_environment_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["job.py", "--size", "3"])
    monkeypatch.setenv("MY_SETTING", "kept")
    monkeypatch.setenv("DEPLOYMENT_NAME", "kept too")  # not the DEPLOY_ prefix
    monkeypatch.setenv("DEPLOY_SECRET", "never forwarded")
    monkeypatch.setenv("DEPLOY_FABRIC", "127.0.0.1:1")
    request = SpawnRequest.build(print, None, Resources(), PARENT)
    monkeypatch.setattr(sys, "argv", ["changed"])
    monkeypatch.setenv("MY_SETTING", "changed later")
    assert request.argv == ("job.py", "--size", "3")
    assert request.env["MY_SETTING"] == "kept"
    assert request.env["DEPLOYMENT_NAME"] == "kept too"
    assert not [key for key in request.env if key.startswith("DEPLOY_")]
    assert {key: value for key, value in os.environ.items() if not key.startswith("DEPLOY_")} != request.env
    decoded = round_trip(request)
    assert decoded.argv == ("job.py", "--size", "3")
    assert decoded.env == request.env


def test_working_directory_and_sys_path_snapshot(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    plugins = str(tmp_path / "plugins")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [*sys.path, plugins])
    request = SpawnRequest.build(print, None, Resources(), PARENT)
    monkeypatch.chdir("/")
    sys.path.remove(plugins)
    assert request.cwd == str(tmp_path)
    assert request.path[-1] == plugins and plugins not in sys.path
    decoded = round_trip(request)
    assert (decoded.cwd, decoded.path) == (str(tmp_path), request.path)


def test_a_removed_working_directory_is_sent_as_empty(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    assert round_trip(SpawnRequest.build(print, None, Resources(), PARENT)).cwd == ""


@pytest.mark.parametrize("resources", [Resources(), Resources("1.5GiB", 0.25), Resources(0, 0), Resources(1, 64)])
@pytest.mark.parametrize("parent", [PARENT, CHILD, None])
def test_resources_and_parent_round_trip(resources: Resources, parent: Pid | None) -> None:
    decoded = round_trip(SpawnRequest.build(print, None, resources, parent))
    assert decoded.resources == resources
    assert decoded.parent == parent
    assert decoded.parent is None or decoded.parent.addr == parent.addr  # type: ignore[union-attr]


@pytest.mark.parametrize("block", [True, False])
def test_block_flag_round_trips(block: bool) -> None:
    request = SpawnRequest.build(print, None, Resources(), None, block=block)
    assert request.block is block
    assert round_trip(request).block is block
    assert SpawnRequest.build(print, None, Resources(), None).block is True


def test_decode_accepts_bytearray_and_memoryview() -> None:
    request = SpawnRequest.build(print, 1, Resources(), PARENT)
    assert SpawnRequest.decode(bytearray(request.encode())) == request
    assert SpawnRequest.decode(memoryview(request.encode())) == request


MiB = 1 << 20


def peak(work) -> tuple[object, int]:
    """What ``work()`` returns, and the most memory it held at once beyond what it returns."""
    import tracemalloc

    tracemalloc.start()
    try:
        result = work()
        _, most = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, most


# An argument of N bytes costs about N once on each side: one pickle of it to send, sent in
# pieces (no copy into a bigger message); one received buffer, decoded into views of itself.
def test_a_big_argument_is_pickled_once_and_never_copied_again() -> None:
    big = b"x" * (20 * MiB)
    request, building = peak(lambda: SpawnRequest.build(lambda parent, arg: len(arg), big, Resources(), PARENT))
    assert building < 24 * MiB  # its one pickle (io.BytesIO grows by an eighth)
    parts, encoding = peak(request.encode_parts)
    assert encoding < MiB
    assert parts[2] is request.argument
    received = bytearray(b"".join(parts))  # what the other side reads, once
    decoded, decoding = peak(lambda: SpawnRequest.decode(received))
    assert decoding < MiB
    assert decoded == request
    assert isinstance(decoded.argument, memoryview) and decoded.argument.obj is received
    (function, argument), loading = peak(decoded.function_and_argument)
    assert argument == big and function(PARENT, argument) == len(big)
    assert loading < 21 * MiB  # the argument itself


def test_a_received_request_lets_go_of_its_buffer_once_loaded() -> None:
    import dataclasses
    import weakref

    class Received(bytearray):  # (a bytearray cannot be weakly referenced; a subclass can)
        pass

    received = Received(SpawnRequest.build(len, b"z" * MiB, Resources(), PARENT).encode())
    alive = weakref.ref(received)
    original = SpawnRequest.decode(received)
    request = dataclasses.replace(original, cwd="/elsewhere")  # (as a node's localising makes)
    del received
    function, argument = request.function_and_argument(release=True)
    assert function(argument) == MiB
    assert alive() is None, "the request still holds the buffer it was received in"
    assert request.function == request.argument == b""
    assert SpawnRequest.recognise(SpawnRequest.build(len, 1, Resources(), PARENT).encode())
    assert not SpawnRequest.recognise(pickle.dumps(("spawn", b"")))


class Blob:
    """A value with a pickle-5 buffer of its own, as numpy arrays have."""

    def __init__(self, data: bytearray | memoryview):
        self.data = data

    def __reduce_ex__(self, protocol: int):
        return Blob, (pickle.PickleBuffer(self.data),)


def test_out_of_band_buffers_travel_without_a_copy_on_either_side() -> None:
    data = bytearray(b"y" * (8 * MiB))
    request, building = peak(lambda: SpawnRequest.build(print, Blob(data), Resources(), PARENT))
    assert building < MiB and len(request.buffers) == 1
    assert request.buffers[0].obj is data  # a view of the user's own bytes
    received = bytearray(b"".join(request.encode_parts()))
    decoded = SpawnRequest.decode(received)
    (_, blob), loading = peak(decoded.function_and_argument)
    assert loading < MiB
    assert bytes(blob.data) == bytes(data) and blob.data.obj is received


def valid_request() -> bytes:
    return SpawnRequest.build(print, 1, Resources(), PARENT).encode()


@pytest.mark.parametrize(
    "data",
    [b"", b"D", b"DSQ", b"garbage that is not a message", b"XXX\x01" + valid_request()[4:], SpawnReply(CHILD).encode()],
    ids=["empty", "one-byte", "magic-only", "garbage", "wrong-magic", "a-reply"],
)
def test_decode_rejects_non_requests(data: bytes) -> None:
    with pytest.raises(DeployError, match="not a spawn request message"):
        SpawnRequest.decode(data)


def test_decode_rejects_other_versions() -> None:
    data = bytearray(valid_request())
    data[3] = 99
    with pytest.raises(DeployError, match="version 99 is not supported"):
        SpawnRequest.decode(bytes(data))


def raw_request(header: object, body: bytes = b"fa", *, pickled: bytes | None = None) -> bytes:
    """A request message with this header (pickled unless given already) and body."""
    data = pickle.dumps(header) if pickled is None else pickled
    return b"DSQ" + bytes([VERSION]) + len(data).to_bytes(4, "big") + data + body


def plain(sizes: object = (1, 1), resources: object = (1, 1), parent: object = None, **changes: object) -> tuple:
    fields = {"argv": (), "env": {}, "block": True, "cwd": "", "path": ()} | changes
    return (sizes, resources, parent, *fields.values())


@pytest.mark.parametrize(
    "data",
    [
        raw_request(None, pickled=b"\x80\x05not a pickle"),
        valid_request()[:-10],  # truncated
        valid_request() + b"more",  # more than the header announces
        raw_request(["a", "list"]),
        raw_request(("too", "few")),
        raw_request(plain(resources=(-1, 0.05))),
        raw_request(plain(parent="not a pid")),
        raw_request(plain(resources=5)),
        raw_request(plain(sizes=(1,)), b"f"),  # no argument
        raw_request(plain(sizes=(1, -1))),
        raw_request(plain(sizes=(b"f", b"a"))),  # lengths, not the parts
        raw_request(plain(sizes=(1, 5))),  # the argument would run past the end
        raw_request(plain(argv=5)),
        raw_request(plain(cwd=5)),
        raw_request(plain(path=(5,))),
        b"DSQ" + bytes([VERSION]) + (1 << 31).to_bytes(4, "big") + b"\x80\x05N.",  # header past the end
    ],
    ids=[
        "not-a-pickle",
        "truncated",
        "trailing",
        "list",
        "too-few",
        "negative-mem",
        "bad-parent",
        "resources-not-pair",
        "no-argument",
        "negative-size",
        "sizes-not-ints",
        "sizes-past-the-end",
        "argv-int",
        "cwd-int",
        "path-int",
        "header-past-the-end",
    ],
)
def test_decode_rejects_malformed_payloads(data: bytes) -> None:
    with pytest.raises(DeployError, match="malformed spawn request"):
        SpawnRequest.decode(data)


CALLS: list[str] = []


def _record(text: str) -> str:
    CALLS.append(text)
    return text


class _Sneaky:
    def __reduce__(self):
        return (_record, ("decoding ran a function",))


def test_decode_never_calls_anything() -> None:
    CALLS.clear()
    with pytest.raises(DeployError, match="malformed spawn request"):
        SpawnRequest.decode(raw_request(plain(sizes=(_Sneaky(), 1))))
    with pytest.raises(DeployError, match="malformed spawn reply"):
        SpawnReply.decode(b"DSR" + bytes([VERSION]) + pickle.dumps((None, _Sneaky(), False)))
    assert CALLS == []


def test_unpicklable_lock_argument_names_it_and_why() -> None:
    lock = threading.Lock()
    with pytest.raises(SerializationError) as info:
        SpawnRequest.build(print, lock, Resources(), PARENT)
    message = str(info.value)
    assert repr(lock) in message
    assert "argument" in message
    assert "_thread.lock" in message and "pickle" in message
    assert isinstance(info.value, TypeError)


class Holder:
    def __init__(self, sock: socket.socket):
        self.sock = sock

    def __repr__(self) -> str:
        return "Holder(with a socket)"


def test_object_holding_a_socket_names_it_and_why() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        with pytest.raises(SerializationError) as info:
            SpawnRequest.build(print, Holder(sock), Resources(), PARENT)
    message = str(info.value)
    assert "Holder(with a socket)" in message
    assert "socket" in message.split("Holder(with a socket)", 1)[1]  # the reason, after the name


def test_unpicklable_function_names_it() -> None:
    lock = threading.Lock()

    def uses_lock(parent: Pid, arg: object) -> None:
        with lock:
            pass

    with pytest.raises(SerializationError, match="function .*uses_lock") as info:
        SpawnRequest.build(uses_lock, None, Resources(), PARENT)
    assert "lock" in str(info.value)


class _BadRepr:
    def __init__(self) -> None:
        self.lock = threading.Lock()

    def __repr__(self) -> str:
        raise RuntimeError("repr is broken too")


def test_unpicklable_value_with_broken_repr_still_reports_cleanly() -> None:
    with pytest.raises(SerializationError, match="_BadRepr") as info:
        dumps_user(_BadRepr(), "argument")
    assert "_thread.lock" in str(info.value)


def test_long_repr_is_shortened() -> None:
    value = [threading.Lock()] + list(range(1000))
    with pytest.raises(SerializationError) as info:
        dumps_user(value, "argument")
    assert "..." in str(info.value)
    assert len(str(info.value)) < 300


@pytest.mark.parametrize("function", [None, 42, "print", b"bytes"])
def test_non_callable_function_is_a_type_error(function: object) -> None:
    with pytest.raises(TypeError, match="callable") as info:
        SpawnRequest.build(function, None, Resources(), PARENT)  # type: ignore[arg-type]
    assert not isinstance(info.value, SerializationError)


def test_resources_must_be_resources() -> None:
    with pytest.raises(TypeError, match="Resources"):
        SpawnRequest.build(print, None, "100MiB", PARENT)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "reply",
    [
        SpawnReply(CHILD),
        SpawnReply(PARENT),
        SpawnReply(error="spawn failed: node lost"),
        SpawnReply(no_capacity=True, error="no node has 8GiB free"),
        SpawnReply(),
    ],
)
def test_spawn_reply_round_trips(reply: SpawnReply) -> None:
    decoded = SpawnReply.decode(reply.encode())
    assert decoded == reply
    assert decoded.pid == reply.pid
    assert decoded.error == reply.error
    assert decoded.no_capacity is reply.no_capacity


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "not a spawn reply"),
        (b"\x00\x01\x02\x03garbage", "not a spawn reply"),
        (valid_request(), "not a spawn reply"),
        (b"DSR\x07" + SpawnReply(CHILD).encode()[4:], "version 7"),
        (b"DSR" + bytes([VERSION]) + pickle.dumps(("not a pid", None, False)), "malformed spawn reply"),
        (b"DSR" + bytes([VERSION]) + pickle.dumps((None, None)), "malformed spawn reply"),
        (b"DSR" + bytes([VERSION]) + b"\x80\x05junk", "malformed spawn reply"),
    ],
)
def test_spawn_reply_decode_rejects_bad_input(data: bytes, message: str) -> None:
    with pytest.raises(DeployError, match=message):
        SpawnReply.decode(data)


def test_dumps_and_loads_user_round_trip() -> None:
    data = dumps_user(lambda x: x + 1, "function")
    assert isinstance(data, bytes)
    assert loads_user(data)(1) == 2


@pytest.fixture
def fake_main(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    main = types.ModuleType("__main__")
    monkeypatch.setitem(sys.modules, "__main__", main)
    yield main
    monkeypatch.undo()
    snapshot_main()  # back to pytest's own __main__


def _define(main: types.ModuleType, source: str) -> None:
    exec(compile(textwrap.dedent(source), "/home/user/job.py", "exec"), main.__dict__)


def test_main_functions_and_classes_seen_at_init_travel_by_reference(fake_main: types.ModuleType) -> None:
    _define(
        fake_main,
        """
        class Job:
            def run(self): ...

        def early(parent, job):
            return job
        """,
    )
    snapshot_main()
    data = dumps_user(fake_main.early, "function")
    assert b"early" in data and b"return job" not in data and len(data) < 40
    assert loads_user(data) is fake_main.early
    assert loads_user(dumps_user(fake_main.Job, "argument")) is fake_main.Job
    assert loads_user(dumps_user(fake_main.Job.run, "function")) is fake_main.Job.run
    job = loads_user(dumps_user(fake_main.Job(), "argument"))
    assert type(job) is fake_main.Job


def test_what_main_did_not_have_at_init_travels_by_value_keeping_its_file_and_lines(
    fake_main: types.ModuleType,
) -> None:
    snapshot_main()
    _define(
        fake_main,
        """
        def late(parent, arg):
            def inner():
                raise ValueError(arg)
            return inner
        """,
    )
    function = loads_user(dumps_user(fake_main.late, "function"))
    assert function is not fake_main.late
    closure = loads_user(dumps_user(fake_main.late(None, 3), "function"))
    for code in (function.__code__, closure.__code__):
        assert code.co_filename == "/home/user/job.py"
    assert (function.__code__.co_firstlineno, closure.__code__.co_firstlineno) == (2, 3)
    with pytest.raises(ValueError) as raised:
        closure()
    frame = traceback.extract_tb(raised.value.__traceback__)[-1]
    assert (frame.filename, frame.lineno, frame.name) == ("/home/user/job.py", 4, "inner")


def test_a_lambda_keeps_its_file_name() -> None:
    function = loads_user(dumps_user(lambda parent, arg: arg, "function"))
    assert function.__code__.co_filename == __file__
    assert function(None, 5) == 5


def test_the_source_lines_travel_where_the_file_is_not(fake_main: types.ModuleType) -> None:
    # The sender has the script (linecache holds it as it would the file's lines); the
    # receiving machine has no file at that path.
    filename = "/nonexistent/bundle/job.py"
    source = "import os\n\n\ndef late(parent, arg):\n    raise ValueError(arg)  # the line\n"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    exec(compile(source, filename, "exec"), fake_main.__dict__)
    data = dumps_user(fake_main.late, "function")
    del linecache.cache[filename]
    try:
        function = loads_user(data)
        with pytest.raises(ValueError) as raised:
            function(None, 7)
        text = "".join(traceback.format_exception(raised.value))
        assert f'File "{filename}", line 5, in late\n    raise ValueError(arg)  # the line\n' in text
        assert linecache.getline(filename, 1) == ""  # only the function's own lines travelled
    finally:
        linecache.cache.pop(filename, None)


# ---------------------------------------------------------------------------- loads_plain


def test_loads_plain_reads_plain_values() -> None:
    from deploy_core import loads_plain

    value = ("spawn", b"bytes", "text", 1, 2.5, None, True, [1, 2], {"a": (3,)}, {4}, frozenset({5}))
    assert loads_plain(pickle.dumps(value, protocol=5)) == value


class _Calls:
    def __reduce__(self):
        return (_called.append, ("called",))


_called: list = []


@pytest.mark.parametrize(
    "data",
    [
        pickle.dumps(_Calls()),
        pickle.dumps(("ok", _Calls())),
        pickle.dumps(Resources.default()),
        b"",
        b"\x80\x05junk",
        pickle.dumps(("truncated", b"x" * 50))[:20],
    ],
    ids=["global", "nested-global", "dataclass", "empty", "junk", "truncated"],
)
def test_loads_plain_refuses_globals_and_garbage(data: bytes) -> None:
    from deploy_core import loads_plain

    with pytest.raises(DeployError, match="malformed message"):
        loads_plain(data)
    assert _called == []


def test_the_snapshot_keeps_nothing_alive_but_functions_and_classes(fake_main: types.ModuleType) -> None:
    class Data:
        pass

    fake_main.data = Data()
    dropped = weakref.ref(fake_main.data)
    snapshot_main()
    del fake_main.data  # the script lets go of a big value after init()
    gc.collect()
    assert dropped() is None


def test_a_main_function_whose_globals_changed_since_init_travels_by_value(fake_main: types.ModuleType) -> None:
    _define(
        fake_main,
        """
        LIMIT = 3
        SEEN = []

        def reads_limit(parent, arg):
            return LIMIT

        def reads_seen(parent, arg):
            return list(SEEN)

        def reads_nothing_changed(parent, arg):
            return len(str(arg))
        """,
    )
    snapshot_main()
    fake_main.LIMIT = 4  # rebound after init(): the receiving side would still have 3
    fake_main.SEEN.append("mutable data may have changed in place")
    for name, expected in (("reads_limit", 4), ("reads_seen", ["mutable data may have changed in place"])):
        function = getattr(fake_main, name)
        travelled = loads_user(dumps_user(function, "function"))
        assert travelled is not function  # by value, with the globals as they are now
        assert travelled(None, None) == expected
    unchanged = fake_main.reads_nothing_changed
    assert loads_user(dumps_user(unchanged, "function")) is unchanged  # by reference


# --- channel messages: the one encoder both spawns and channels use ----------------------


def test_a_plain_message_is_a_standard_pickle() -> None:
    value = {"a": [1, 2.5, "x"], "b": (None, b"raw")}
    data = dumps_message(value)
    assert data == pickle.dumps(value, protocol=5)
    assert pickle.loads(data) == value


def test_a_lambda_message_falls_back_to_cloudpickle_and_loads_with_plain_pickle() -> None:
    offset = 3
    data = dumps_message(lambda x: x + offset)
    assert pickle.loads(data)(4) == 7


def test_message_buffers_travel_out_of_band_as_views_of_the_senders_memory() -> None:
    block = bytearray(b"x" * 100_000)
    views: list[memoryview] = []
    data = dumps_message(pickle.PickleBuffer(block), views)
    assert len(views) == 1 and views[0].obj is block  # not a copy
    assert len(data) < 100
    assert bytes(pickle.loads(data, buffers=views)) == bytes(block)


def test_message_buffers_of_a_failed_fast_pickle_are_not_kept_twice() -> None:
    block = bytearray(b"y" * 1000)
    views: list[memoryview] = []
    data = dumps_message((pickle.PickleBuffer(block), lambda: 5), views)  # the lambda needs cloudpickle
    assert len(views) == 1
    buffer, function = pickle.loads(data, buffers=views)
    assert bytes(buffer) == bytes(block) and function() == 5


def test_an_unpicklable_message_with_a_broken_repr_names_its_type_and_why() -> None:
    with pytest.raises(SerializationError, match="cannot send the message <_BadRepr object>") as info:
        dumps_message(_BadRepr())
    assert "_thread.lock" in str(info.value)
