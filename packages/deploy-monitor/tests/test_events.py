import pickle
import signal

import pytest
from deploy_monitor import Exit, Output
from deploy_monitor._events import exit_from_status, signal_name


def test_exit_needs_exactly_one_of_code_and_signal():
    with pytest.raises(ValueError, match="exactly one"):
        Exit(code=None, signal=None, reason=None)
    with pytest.raises(ValueError, match="exactly one"):
        Exit(code=0, signal="SIGKILL", reason=None)


def test_exit_returncode_is_negative_for_signals():
    assert Exit(code=3, signal=None, reason=None).returncode == 3
    assert Exit(code=None, signal="SIGKILL", reason=None).returncode == -9
    assert Exit(code=0, signal=None).success and not Exit(code=1, signal=None).success


def test_output_fd_is_1_or_2():
    assert Output(2, b"x").fd == 2
    with pytest.raises(ValueError):
        Output(0, b"x")


def test_events_are_frozen_and_pickle():
    event = Exit(code=None, signal="SIGKILL", reason="memory limit 20MiB exceeded")
    with pytest.raises(AttributeError):
        event.code = 1  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(event)) == event
    assert pickle.loads(pickle.dumps(Output(1, bytes(range(256))))) == Output(1, bytes(range(256)))


@pytest.mark.parametrize(
    "status, expected",
    [
        (0, Exit(code=0, signal=None)),
        (7 << 8, Exit(code=7, signal=None)),
        (255 << 8, Exit(code=255, signal=None)),
        (signal.SIGKILL, Exit(code=None, signal="SIGKILL")),
        (signal.SIGABRT | 0x80, Exit(code=None, signal="SIGABRT")),  # 0x80: a core was dumped
    ],
)
def test_waitpid_status_decoding(status, expected):
    assert exit_from_status(status) == expected


def test_signal_names():
    assert signal_name(signal.SIGTERM) == "SIGTERM"
    assert signal_name(signal.SIGRTMIN + 2) == "SIGRTMIN+2"
    assert Exit(code=None, signal=signal_name(signal.SIGRTMIN + 2)).returncode == -(signal.SIGRTMIN + 2)
