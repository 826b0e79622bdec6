"""The public surface of deploy_core, pinned, and the layering rule."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import deploy_core
import pytest
from deploy_core import env

EXPECTED = {
    "AuthenticationError",
    "ChannelClosed",
    "ChannelExists",
    "Cpu",
    "DeployError",
    "FrameError",
    "Handshake",
    "Mem",
    "NoCapacity",
    "Opener",
    "PeerExited",
    "PeerLost",
    "Pid",
    "ProtectedSocket",
    "Resources",
    "Sealer",
    "SerializationError",
    "SpawnReply",
    "SpawnRequest",
    "__version__",
    "authenticate",
    "dumps_message",
    "dumps_user",
    "env",
    "loads_plain",
    "loads_user",
    "snapshot_main",
}


def test_all_is_pinned() -> None:
    assert set(deploy_core.__all__) == EXPECTED
    assert len(deploy_core.__all__) == len(EXPECTED)  # no duplicates


def test_every_public_name_exists() -> None:
    for name in deploy_core.__all__:
        assert getattr(deploy_core, name) is not None, name


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from deploy_core import *", namespace)
    assert set(namespace) - {"__builtins__"} == EXPECTED


def test_version_matches_the_package() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)*", deploy_core.__version__)
    source = Path(deploy_core.__file__).with_name("_version.py").read_text()
    assert deploy_core.__version__ in source


def test_env_names() -> None:
    names = {env.FORMAT, env.SECRET, env.RECCE, env.LOG, env.FABRIC}
    assert {"DEPLOY_FORMAT", "DEPLOY_SECRET", "DEPLOY_RECCE", "DEPLOY_LOG"} <= names
    assert all(name.startswith(env.PREFIX) for name in names)
    original = {"DEPLOY_SECRET": "s", "PATH": "/bin", "DEPLOYED": "1"}
    assert env.strip_deploy_vars(original) == {"PATH": "/bin", "DEPLOYED": "1"}
    assert original == {"DEPLOY_SECRET": "s", "PATH": "/bin", "DEPLOYED": "1"}  # not modified


@pytest.mark.timeout(60)
def test_imports_no_higher_layer() -> None:
    code = "import sys, deploy_core; print(sorted(m for m in sys.modules if m.startswith('deploy')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50, check=True)
    loaded = eval(result.stdout)
    assert loaded and all(name == "deploy_core" or name.startswith("deploy_core.") for name in loaded), loaded
