import subprocess
import sys

import pytest
from deploy_cli import main


def test_version_lists_every_package(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    for name in ("deploy-cli 0.1.0", "deploy-core 0.1.0", "deploy-channels", "deploy-monitor", "deploy-fabric"):
        assert name in out


@pytest.mark.parametrize("command", ["fabric", "push", "status"])
def test_cluster_commands_say_they_are_not_available(command, capsys):
    assert main([command, "127.0.0.1:9999"]) == 2
    err = capsys.readouterr().err
    assert "cluster mode is not available" in err
    assert "Traceback" not in err


def test_console_script_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "deploy_cli._main", "--version"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert "deploy-cli" in result.stdout


def test_no_command_prints_usage_and_fails(capsys):
    assert main([]) == 2
    assert "usage: deploy" in capsys.readouterr().err
