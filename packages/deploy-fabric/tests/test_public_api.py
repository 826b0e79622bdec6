import deploy_fabric


def test_public_surface_is_pinned():
    assert set(deploy_fabric.__all__) == {
        "HumanFormatter",
        "JsonFormatter",
        "Node",
        "Scheduler",
        "__version__",
        "init",
        "pid",
        "push",
        "resources",
        "serve_master",
        "serve_worker",
        "spawn",
        "status",
        "try_spawn",
    }


def test_the_api_needs_init_first():
    import pytest
    from deploy_core import DeployError

    for call in (deploy_fabric.pid, deploy_fabric.resources, lambda: deploy_fabric.spawn(print, None)):
        with pytest.raises(DeployError, match=r"call deploy\.init\(\) first"):
            call()
