import dataclasses
import inspect

import deploy_monitor


def test_public_surface_is_pinned():
    assert sorted(deploy_monitor.__all__) == [
        "Child",
        "Enforcement",
        "Exit",
        "OrphanReaper",
        "Output",
        "Supervisor",
        "__version__",
        "become_subreaper",
        "child_pids",
        "detect_enforcement",
        "exit_code",
        "flush_stdio",
        "run_monitored",
    ]
    for name in deploy_monitor.__all__:
        assert hasattr(deploy_monitor, name)
    assert deploy_monitor.__version__ == "0.1.0"


def test_run_monitored_signature():
    params = inspect.signature(deploy_monitor.run_monitored).parameters
    assert list(params) == ["target", "resources", "on_event", "keep_stdin", "lifeline", "on_start", "enforcement"]
    assert params["target"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for name, p in params.items() if name != "target")
    assert params["resources"].default is inspect.Parameter.empty
    assert params["on_event"].default is inspect.Parameter.empty
    assert params["keep_stdin"].default is False
    assert params["lifeline"].default is None
    assert params["on_start"].default is None
    assert params["enforcement"].default is None


def test_event_fields():
    assert [f.name for f in dataclasses.fields(deploy_monitor.Output)] == ["fd", "data"]
    assert [f.name for f in dataclasses.fields(deploy_monitor.Exit)] == ["code", "signal", "reason"]
    assert [f.name for f in dataclasses.fields(deploy_monitor.Enforcement)] == ["kind", "memory_dir", "cpu_dir"]
    assert list(inspect.signature(deploy_monitor.detect_enforcement).parameters) == ["force"]


def test_exit_code_maps_sys_exit_arguments_as_python_does(capsys):
    assert deploy_monitor.exit_code(None) == 0
    assert deploy_monitor.exit_code(3) == 3
    assert deploy_monitor.exit_code(256 + 7) == 7
    assert deploy_monitor.exit_code("bad input") == 1
    assert capsys.readouterr().err == "bad input\n"
