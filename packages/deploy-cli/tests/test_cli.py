"""The ``deploy`` command's parsing and error lines.

The cluster functions of deploy_fabric are replaced by recorders only where the test is
about what the CLI itself does with the words it was given; tests-integration runs the
command against real daemons.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import deploy_fabric
import pytest
from deploy_cli import _arguments, main
from deploy_core import AuthenticationError, DeployError, Resources
from deploy_fabric._bundle import Bundle

pytestmark = pytest.mark.timeout(60)


class Recorder:
    def __init__(self, result=0, error: BaseException | None = None):
        self.calls: list[tuple[tuple, dict]] = []
        self.result = result
        self.error = error

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.error is not None:
            raise self.error
        return self.result


@pytest.fixture
def fabric(monkeypatch):
    """Recorders in place of deploy_fabric's cluster functions."""
    recorders = {
        "serve_worker": Recorder(),
        "serve_master": Recorder(),
        "push": Recorder(),
        "status": Recorder({"nodes": [], "runs": [], "processes": []}),
    }
    for name, recorder in recorders.items():
        monkeypatch.setattr(deploy_fabric, name, recorder, raising=False)
    monkeypatch.delenv("DEPLOY_SECRET", raising=False)
    monkeypatch.delenv("DEPLOY_FORMAT", raising=False)
    monkeypatch.delenv("DEPLOY_LOG", raising=False)
    return recorders


def one_error_line(capsys, command: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"deploy {command}: "), lines[0]
    assert "Traceback" not in captured.err
    return lines[0]


# --version and usage


def test_version_lists_every_package(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    for name in ("deploy-cli 0.1.0", "deploy-core 0.1.0", "deploy-channels", "deploy-monitor", "deploy-fabric"):
        assert name in out


def test_console_script_entry_point_runs():
    result = subprocess.run(
        [sys.executable, "-m", "deploy_cli", "--version"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert "deploy-cli" in result.stdout


def test_no_command_prints_usage_and_fails(capsys):
    assert main([]) == 2
    assert "usage: deploy" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["fabric"], ["push"], ["status"], ["push", "--format", "xml", "h:1", "a.py"]])
def test_argparse_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2
    assert "usage: deploy" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["fabric", "push", "status"])
def test_every_command_takes_a_secret_file(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert "--secret-file PATH" in capsys.readouterr().out


# deploy fabric (worker)


def test_a_worker_defaults_to_this_machines_size(fabric):
    assert main(["fabric", "127.0.0.1:7000"]) == 0
    (args, kwargs) = fabric["serve_worker"].calls[0]
    assert args == ("127.0.0.1:7000", _arguments.machine_size(), b"")
    assert kwargs == {"join": None}
    assert int(args[1].mem) > 0 and float(args[1].cpu) >= 1


def test_a_worker_takes_its_size_and_master(fabric):
    argv = ["fabric", "127.0.0.1:7001", "--mem", "2GiB", "--cpu", "1.5", "--join", "127.0.0.1:7000"]
    assert main(argv) == 0
    (args, kwargs) = fabric["serve_worker"].calls[0]
    assert args[:2] == ("127.0.0.1:7001", Resources("2GiB", 1.5))
    assert kwargs == {"join": "127.0.0.1:7000"}


def test_the_daemons_exit_code_is_the_commands(fabric):
    fabric["serve_worker"].result = 3
    assert main(["fabric", "127.0.0.1:7000"]) == 3


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["fabric", "127.0.0.1:7000", "--mem", "lots"], "invalid memory size 'lots'"),
        (["fabric", "127.0.0.1:7000", "--cpu", "-1"], "invalid cpu share '-1'"),
        (["fabric", "127.0.0.1"], "invalid address '127.0.0.1': expected HOST:PORT"),
        (["fabric", "127.0.0.1:99999"], "invalid address '127.0.0.1:99999'"),
        (["fabric", "127.0.0.1:7000", "--join", "nowhere"], "invalid address 'nowhere'"),
        (["fabric", "127.0.0.1:7000", "extra"], "unexpected 'extra' after BIND"),
    ],
)
def test_bad_worker_input_is_one_line_and_exit_2(fabric, capsys, argv, expected):
    assert main(argv) == 2
    assert expected in one_error_line(capsys, "fabric")
    assert not fabric["serve_worker"].calls


@pytest.mark.parametrize("bind", ["0.0.0.0:7000", "[::]:7000", "192.0.2.1:7000"])
def test_a_daemon_refuses_a_non_loopback_address_without_a_secret(fabric, capsys, bind):
    assert main(["fabric", bind]) == 2
    line = one_error_line(capsys, "fabric")
    assert f"refusing to listen on {bind}" in line and "DEPLOY_SECRET" in line and "--secret-file" in line
    assert not fabric["serve_worker"].calls


def test_loopback_names_need_no_secret(fabric):
    assert main(["fabric", "localhost:7000"]) == 0
    assert main(["fabric", "[::1]:7000"]) == 0
    assert len(fabric["serve_worker"].calls) == 2


def test_a_secret_from_the_environment_allows_any_address(fabric, monkeypatch):
    monkeypatch.setenv("DEPLOY_SECRET", "  s3cret\n")
    assert main(["fabric", "0.0.0.0:7000"]) == 0
    assert fabric["serve_worker"].calls[0][0][2] == b"s3cret"


def test_a_secret_file_wins_over_the_environment(fabric, monkeypatch, tmp_path):
    monkeypatch.setenv("DEPLOY_SECRET", "from-env")
    (tmp_path / "secret").write_bytes(b"from-file\n")
    assert main(["fabric", "0.0.0.0:7000", "--secret-file", str(tmp_path / "secret")]) == 0
    assert fabric["serve_worker"].calls[0][0][2] == b"from-file"


def test_a_missing_or_empty_secret_file_is_one_line(fabric, capsys, tmp_path):
    assert main(["fabric", "127.0.0.1:7000", "--secret-file", str(tmp_path / "nope")]) == 2
    assert "cannot read the secret file" in one_error_line(capsys, "fabric")
    (tmp_path / "empty").write_text("\n")
    assert main(["status", "--secret-file", str(tmp_path / "empty"), "127.0.0.1:7000"]) == 2
    assert "is empty" in one_error_line(capsys, "status")


def test_a_deploy_error_of_the_daemon_is_one_line_and_exit_1(fabric, capsys):
    fabric["serve_worker"].error = DeployError("cannot listen on 127.0.0.1:7000: address already in use")
    assert main(["fabric", "127.0.0.1:7000"]) == 1
    assert one_error_line(capsys, "fabric") == "deploy fabric: cannot listen on 127.0.0.1:7000: address already in use"


def test_an_os_error_that_escapes_is_one_line(fabric, capsys):
    fabric["serve_worker"].error = OSError(98, "Address already in use")
    assert main(["fabric", "127.0.0.1:7000"]) == 1
    assert one_error_line(capsys, "fabric") == "deploy fabric: Address already in use"


def test_ctrl_c_that_escapes_is_exit_130_without_a_traceback(fabric, capsys):
    fabric["serve_worker"].error = KeyboardInterrupt()
    assert main(["fabric", "127.0.0.1:7000"]) == 130
    assert capsys.readouterr().err == ""


def test_a_bug_is_still_one_line(fabric, capsys):
    fabric["serve_worker"].error = ZeroDivisionError("division by zero")
    assert main(["fabric", "127.0.0.1:7000"]) == 1
    line = one_error_line(capsys, "fabric")
    assert "internal error: ZeroDivisionError: division by zero" in line and "DEPLOY_LOG" in line


def test_without_cluster_mode_in_deploy_fabric_the_command_says_so(monkeypatch, capsys):
    monkeypatch.delattr(deploy_fabric, "serve_worker", raising=False)
    assert main(["fabric", "127.0.0.1:7000"]) == 2
    assert "cluster mode is not available" in one_error_line(capsys, "fabric")


# deploy fabric master


def test_the_master_form_in_full(fabric):
    argv = "fabric master 127.0.0.1:7000 1GiB 2 bridge 127.0.0.1:7100 127.0.0.1:7001 4GiB 4 h2:7002 512MiB 0.5"
    assert main(argv.split()) == 0
    (args, kwargs) = fabric["serve_master"].calls[0]
    assert args == ("127.0.0.1:7000", Resources("1GiB", 2), b"")
    assert kwargs == {
        "bridge_bind": "127.0.0.1:7100",
        "workers": [("127.0.0.1:7001", Resources("4GiB", 4)), ("h2:7002", Resources("512MiB", 0.5))],
    }


def test_the_master_without_bridge_or_workers(fabric):
    assert main(["fabric", "master", "127.0.0.1:7000", "100MiB", "1"]) == 0
    assert fabric["serve_master"].calls[0][1] == {"bridge_bind": None, "workers": []}


def test_the_master_with_workers_and_no_bridge(fabric):
    assert main(["fabric", "master", "127.0.0.1:7000", "100MiB", "1", "127.0.0.1:7001", "1GiB", "1"]) == 0
    assert fabric["serve_master"].calls[0][1] == {
        "bridge_bind": None,
        "workers": [("127.0.0.1:7001", Resources("1GiB", 1))],
    }


@pytest.mark.parametrize(
    "words, expected",
    [
        ("127.0.0.1:7000 1GiB", "the master needs BIND MEM CPU"),
        ("127.0.0.1:7000 lots 1", "invalid memory size 'lots'"),
        ("127.0.0.1:7000 1GiB x", "invalid cpu share 'x'"),
        ("127.0.0.1:7000 1GiB 1 bridge", "'bridge' needs a BRIDGE_BIND"),
        ("127.0.0.1:7000 1GiB 1 127.0.0.1:7001 1GiB", "ADDR MEM CPU triples"),
        ("127.0.0.1:7000 1GiB 1 127.0.0.1 1GiB 1", "invalid address '127.0.0.1'"),
        ("127.0.0.1:7000 1GiB 1 127.0.0.1:7001 1XB 1", "invalid memory size '1XB'"),
        ("127.0.0.1:7000 1GiB 1 bridge nowhere", "invalid address 'nowhere'"),
        ("127.0.0.1:7000 1GiB 1 bridge 0.0.0.0:7100", "refusing to listen on 0.0.0.0:7100"),
        ("0.0.0.0:7000 1GiB 1", "refusing to listen on 0.0.0.0:7000"),
        ("127.0.0.1:7000 1GiB 1 --mem 1GiB", "--mem, --cpu and --join are for workers"),
    ],
)
def test_bad_master_input_is_one_line_and_exit_2(fabric, capsys, words, expected):
    assert main(["fabric", "master", *words.split()]) == 2
    assert expected in one_error_line(capsys, "fabric")
    assert not fabric["serve_master"].calls


# deploy push


@pytest.fixture
def project(tmp_path, monkeypatch):
    root = tmp_path / "project"
    (root / "lib").mkdir(parents=True)
    (root / "job.py").write_text("import sys\nprint(sys.argv)\n")
    (root / "lib" / "__init__.py").write_text("")
    (root / "lib" / "tool.py").write_text("print('tool')\n")
    (root / "sub").mkdir()
    monkeypatch.chdir(root)
    return root


def test_push_ships_the_scripts_directory_and_passes_everything_on(fabric, project, monkeypatch):
    monkeypatch.setenv("SOMETHING", "for the top process")
    fabric["push"].result = 7
    assert main(["push", "--format", "json", "127.0.0.1:7100", "job.py", "a", "--b", "-m"]) == 7
    (bridge, secret, bundle, program, args, env, cwd, fmt), kwargs = fabric["push"].calls[0]
    assert (bridge, secret, program, args, cwd, fmt) == (
        "127.0.0.1:7100",
        b"",
        ["job.py"],
        ["a", "--b", "-m"],
        ".",
        "json",
    )
    assert kwargs == {}
    assert env["SOMETHING"] == "for the top process"
    assert bundle.digest == Bundle.pack(project).digest


def test_push_from_a_subdirectory_gives_the_cwd_relative_to_the_bundle(fabric, project, monkeypatch):
    monkeypatch.chdir(project / "sub")
    assert main(["push", "127.0.0.1:7100", "../job.py"]) == 0
    (_, _, bundle, program, _, _, cwd, fmt), _ = fabric["push"].calls[0]
    assert (program, cwd, fmt) == (["job.py"], "sub", "human")
    assert bundle.digest == Bundle.pack(project).digest


def test_push_from_outside_the_bundle_gives_an_empty_cwd(fabric, project, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert main(["push", "127.0.0.1:7100", "project/lib/tool.py"]) == 0
    (_, _, bundle, program, _, _, cwd, _), _ = fabric["push"].calls[0]
    assert (program, cwd) == (["tool.py"], "")
    assert bundle.digest == Bundle.pack(project / "lib").digest


def test_push_of_a_module_ships_the_current_directory(fabric, project):
    assert main(["push", "127.0.0.1:7100", "-m", "lib.tool", "x"]) == 0
    (_, _, bundle, program, args, _, cwd, _), _ = fabric["push"].calls[0]
    assert (program, args, cwd) == (["-m", "lib.tool"], ["x"], ".")
    assert bundle.digest == Bundle.pack(project).digest


def test_the_format_comes_from_deploy_format_when_not_given(fabric, project, monkeypatch, capsys):
    monkeypatch.setenv("DEPLOY_FORMAT", "json")
    assert main(["push", "127.0.0.1:7100", "job.py"]) == 0
    assert fabric["push"].calls[0][0][7] == "json"
    monkeypatch.setenv("DEPLOY_FORMAT", "yaml")
    assert main(["push", "127.0.0.1:7100", "job.py"]) == 2
    assert "DEPLOY_FORMAT='yaml' is not a format" in one_error_line(capsys, "push")


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["127.0.0.1:7100", "missing.py"], "no such script: missing.py"),
        (["127.0.0.1:7100", "lib"], "no such script: lib"),
        (["127.0.0.1:7100"], "missing SCRIPT"),
        (["127.0.0.1:7100", "-m"], "-m needs a MODULE name"),
        (["127.0.0.1:7100", "-m", "nosuch"], "no module nosuch under"),
        (["127.0.0.1:7100", "-m", "bad-name"], "invalid module name 'bad-name'"),
        (["127.0.0.1:7100", "--secret-file", "f", "job.py"], "--secret-file after BRIDGE_ADDR: options go before it"),
        (["localhost", "job.py"], "invalid address 'localhost'"),
        (["127.0.0.1:0", "job.py"], "invalid address '127.0.0.1:0'"),
    ],
)
def test_bad_push_input_is_one_line_and_exit_2(fabric, project, capsys, argv, expected):
    assert main(["push", *argv]) == 2
    assert expected in one_error_line(capsys, "push")
    assert not fabric["push"].calls


def test_a_script_with_a_syntax_error_is_refused_before_shipping(fabric, project, capsys):
    (project / "broken.py").write_text("x = 1\ndef f(:\n    pass\n")
    assert main(["push", "127.0.0.1:7100", "broken.py"]) == 2
    line = one_error_line(capsys, "push")
    assert line.startswith("deploy push: broken.py line 2: ") and "fix it before pushing" in line
    assert not fabric["push"].calls


def test_a_module_with_a_syntax_error_is_refused(fabric, project, capsys):
    (project / "lib" / "bad.py").write_text("print('unclosed'\n")
    assert main(["push", "127.0.0.1:7100", "-m", "lib.bad"]) == 2
    assert "lib/bad.py line 1" in one_error_line(capsys, "push")


def test_a_directory_past_100_mib_is_one_line(fabric, project, capsys):
    with open(project / "data.bin", "wb") as sparse:  # no disk used: only its size counts
        sparse.truncate(101 * 2**20)
    assert main(["push", "127.0.0.1:7100", "job.py"]) == 1
    line = one_error_line(capsys, "push")
    assert "more than the 100MiB a bundle may hold" in line and "data.bin (101MiB)" in line
    assert not fabric["push"].calls


@pytest.mark.parametrize(
    "error, expected",
    [
        (AuthenticationError("the bridge at 127.0.0.1:7100 refused our secret"), "refused our secret"),
        (DeployError("cannot reach the bridge at 127.0.0.1:7100: connection refused"), "cannot reach the bridge"),
        (DeployError("deploy-fabric 0.1.0 cannot talk to the fabric's 0.2.0"), "cannot talk to"),
        (ConnectionRefusedError(111, "Connection refused"), "Connection refused"),
    ],
)
def test_failures_of_the_push_are_one_line_and_exit_1(fabric, project, capsys, error, expected):
    fabric["push"].error = error
    assert main(["push", "127.0.0.1:7100", "job.py"]) == 1
    assert expected in one_error_line(capsys, "push")


def test_push_with_a_secret_file(fabric, project, tmp_path):
    (tmp_path / "s").write_text("abc\n")
    assert main(["push", "--secret-file", str(tmp_path / "s"), "127.0.0.1:7100", "job.py"]) == 0
    assert fabric["push"].calls[0][0][1] == b"abc"


# deploy status

STATUS = {
    "nodes": [
        {
            "addr": "127.0.0.1:7000",
            "capacity": {"mem": 2**30, "cpu": 2.0},
            "used": {"mem": 100 * 2**20, "cpu": 0.05},
            "free": {"mem": 2**30 - 100 * 2**20, "cpu": 1.95},
            "up_since": 1_700_000_000.0,
        },
        {
            "addr": "127.0.0.1:7001",
            "capacity": {"mem": 512 * 2**20, "cpu": 1.0},
            "used": {"mem": 0, "cpu": 0.0},
            "free": {"mem": 512 * 2**20, "cpu": 1.0},
            "up_since": 1_700_000_100.0,
        },
    ],
    "runs": [{"id": "ab" * 16, "program": ["job.py", "x"], "started": 1_700_000_200.0, "processes": 1}],
    "processes": [
        {
            "pid": "3fecd01" + "0" * 25,
            "run": "ab" * 16,
            "node": "127.0.0.1:7000",
            "resources": {"mem": 100 * 2**20, "cpu": 0.05},
            "age": 75.4,
            "memory": 12 * 2**20,
        }
    ],
}


def test_status_as_json_is_one_object(fabric, capsys):
    fabric["status"].result = STATUS
    assert main(["status", "--format", "json", "127.0.0.1:7100"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1
    assert json.loads(out) == STATUS
    assert fabric["status"].calls[0][0] == ("127.0.0.1:7100", b"")


def test_status_for_people_is_a_table(fabric, capsys):
    fabric["status"].result = STATUS
    assert main(["status", "127.0.0.1:7100", "--format", "human"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "nodes (2):"
    assert lines[1].split() == ["NODE", "CAPACITY", "USED", "FREE", "UP", "SINCE"]
    assert lines[2].split()[:13] == "127.0.0.1:7000 1GiB / 2 cpu 100MiB / 0.05 cpu 924MiB / 1.95 cpu".split()
    assert lines[3].split()[:13] == "127.0.0.1:7001 512MiB / 1 cpu 0B / 0 cpu 512MiB / 1 cpu".split()
    assert lines[1].index("USED") == lines[2].index("100MiB") == lines[3].index("0B")  # aligned columns
    assert "runs (1):" in lines
    assert any(line.startswith("ababab") and "job.py x" in line for line in lines)
    assert "processes (1):" in lines
    process = next(line for line in lines if line.startswith("3fecd01"))
    assert process.split() == ["3fecd01", "abababa", "127.0.0.1:7000", "100MiB", "/", "0.05", "cpu", "1m15s", "12.0MiB"]


def test_memory_in_use_reads_as_one_decimal(fabric, capsys):
    fabric["status"].result = {
        "nodes": [],
        "runs": [],
        "processes": [
            {**STATUS["processes"][0], "memory": memory, "pid": f"{index:032x}"}
            for index, memory in enumerate([3984 * 1024, 512, 3 * 2**30 // 2, None])
        ],
    }
    assert main(["status", "127.0.0.1:7100"]) == 0
    lines = capsys.readouterr().out.splitlines()
    shown = [line.split()[-1] for line in lines[lines.index("processes (4):") + 2 :]]
    assert shown == ["3.9MiB", "512B", "1.5GiB", "?"]


def test_status_of_an_empty_cluster(fabric, capsys):
    assert main(["status", "127.0.0.1:7100"]) == 0
    assert capsys.readouterr().out.splitlines() == ["nodes (0): none", "", "runs (0): none", "", "processes (0): none"]


def test_status_errors_are_one_line(fabric, capsys):
    fabric["status"].error = AuthenticationError("the bridge at 127.0.0.1:7100 refused our secret")
    assert main(["status", "127.0.0.1:7100"]) == 1
    assert one_error_line(capsys, "status") == "deploy status: the bridge at 127.0.0.1:7100 refused our secret"
    assert main(["status", "127.0.0.1"]) == 2
    assert "invalid address" in one_error_line(capsys, "status")


def test_errors_through_the_real_console_script_have_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "deploy_cli", "push", "127.0.0.1:9", str(tmp_path / "missing.py")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr == f"deploy push: no such script: {Path(tmp_path / 'missing.py')}\n"
