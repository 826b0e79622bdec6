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


def _package_imports() -> dict[str, set[str]]:
    """Each module of the package and the package modules it imports: at the top, in
    functions and under TYPE_CHECKING alike (a cycle there still ties the modules)."""
    import ast
    from pathlib import Path

    root = Path(deploy_channels.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in root.glob("*.py"):
        name = path.stem
        edges = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    edges.add(node.module.split(".")[0])
                else:
                    edges.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("deploy_channels."):
                edges.add(node.module.split(".")[1])
    for edges in graph.values():
        edges &= graph.keys()
    return graph


def test_the_package_has_no_import_cycles():
    graph = _package_imports()
    assert {"_connection", "_link", "_peers", "_endpoint"} <= graph.keys()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(module) :], module]))
        if module in done:
            return
        for imported in sorted(graph[module]):
            visit(imported, [*path, module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])


def test_a_connection_knows_only_its_own_module_and_the_ones_below():
    # The connection calls its owner through ConnectionOwner and reads its link through
    # Carried (both declared in _connection), as asyncio's transports call their protocol.
    graph = _package_imports()
    assert graph["_connection"] <= {"_wire", "_loop", "framing", "_waiters", "_memory"}, graph["_connection"]
    assert "_endpoint" not in graph["_link"] and "_peers" not in graph["_link"], graph["_link"]
