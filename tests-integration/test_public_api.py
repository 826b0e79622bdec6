import deploy


def test_the_user_api_is_re_exported():
    assert set(deploy.__all__) == {
        "AuthenticationError",
        "ChannelClosed",
        "ChannelExists",
        "Cpu",
        "DeployError",
        "Mem",
        "NoCapacity",
        "PeerExited",
        "PeerLost",
        "Pid",
        "Receiver",
        "Resources",
        "Sender",
        "SerializationError",
        "__version__",
        "aselect",
        "init",
        "pid",
        "resources",
        "select",
        "spawn",
        "try_spawn",
    }
    for name in deploy.__all__:
        assert getattr(deploy, name) is not None


def test_errors_share_one_base():
    for error in (deploy.PeerExited, deploy.PeerLost, deploy.ChannelExists, deploy.ChannelClosed, deploy.NoCapacity):
        assert issubclass(error, deploy.DeployError)
