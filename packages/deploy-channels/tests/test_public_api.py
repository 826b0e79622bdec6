import deploy_channels
import pytest
from deploy_channels import framing

pytestmark = pytest.mark.timeout(10)


def test_public_surface_is_pinned():
    assert sorted(deploy_channels.__all__) == sorted(
        [
            "ChannelClosed",
            "ChannelExists",
            "Endpoint",
            "PeerExited",
            "PeerLost",
            "Receiver",
            "Sender",
            "__version__",
            "aselect",
            "default_endpoint",
            "framing",
            "select",
            "set_default_endpoint",
        ]
    )
    for name in deploy_channels.__all__:
        assert hasattr(deploy_channels, name)
    assert deploy_channels.__version__ == "0.1.0"


def test_framing_surface_is_pinned():
    assert sorted(framing.__all__) == sorted(
        [
            "CLOSED",
            "Assembly",
            "DEFAULT_MAX_FRAME_SIZE",
            "HEADER_SIZE",
            "MAX_FRAME_SIZE_LIMIT",
            "NEED_DATA",
            "FrameDecoder",
            "Whole",
            "encode_frame",
            "frame_header",
        ]
    )


def test_framing_is_sans_io():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(framing))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"socket", "selectors", "select", "asyncio"}


def test_errors_are_deploy_cores():
    import deploy_core

    assert deploy_channels.PeerExited is deploy_core.PeerExited
    assert deploy_channels.ChannelExists is deploy_core.ChannelExists


def test_subscripted_channel_types():
    assert repr(deploy_channels.Sender[int]) == "Sender[int]"
    assert deploy_channels.Receiver[list[int]] == deploy_channels.Receiver[list[int]]
