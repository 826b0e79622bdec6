"""Finding our cgroups from /proc text, and detecting what the host allows."""

from __future__ import annotations

import os

import deploy_monitor._cgroups as cgroups
import pytest
from deploy_monitor import Enforcement, detect_enforcement
from deploy_monitor._cgroups import Mount, cgroup_dirs, parse_mountinfo, parse_proc_cgroup

V1_HOST_CGROUP = """\
9:name=systemd:/
4:memory:/sandbox/job-1
2:cpuacct:/
1:cpu,cpuacct:/jobs/7
0::/
"""

V1_HOST_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
22 1 8:1 / / rw - ext4 /dev/root rw
"""

# A container whose mounts are rooted at its own cgroup (no cgroup namespace).
V2_CONTAINER_CGROUP = "0::/system.slice/docker-abc.scope/app\n"
V2_CONTAINER_MOUNTINFO = (
    "700 690 0:30 /system.slice/docker-abc.scope /sys/fs/cgroup ro,nosuid - cgroup2 cgroup rw,nsdelegate\n"
    "701 690 0:31 / /mnt/with\\040space rw - cgroup cgroup rw,memory\n"
)


def test_parse_proc_cgroup():
    assert parse_proc_cgroup(V1_HOST_CGROUP) == {
        "memory": "/sandbox/job-1",
        "cpuacct": "/jobs/7",
        "cpu": "/jobs/7",
        "": "/",
    }


def test_parse_mountinfo_keeps_cgroup_mounts_with_their_controllers():
    mounts = parse_mountinfo(V1_HOST_MOUNTINFO)
    assert [m.mountpoint for m in mounts] == [
        "/sys/fs/cgroup/cpu,cpuacct",
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/systemd",
        "/sys/fs/cgroup/unified",
    ]
    assert mounts[0].controllers == {"cpu", "cpuacct"}
    assert mounts[2].controllers == set()  # name=systemd is not a controller
    assert mounts[3] == Mount("/", "/sys/fs/cgroup/unified", "cgroup2", frozenset())


def test_parse_mountinfo_unescapes_paths():
    assert parse_mountinfo(V2_CONTAINER_MOUNTINFO)[1].mountpoint == "/mnt/with space"


def test_cgroup_dirs_on_a_v1_host():
    dirs = cgroup_dirs(parse_proc_cgroup(V1_HOST_CGROUP), parse_mountinfo(V1_HOST_MOUNTINFO))
    assert dirs == {
        "memory": "/sys/fs/cgroup/memory/sandbox/job-1",
        "cpu": "/sys/fs/cgroup/cpu,cpuacct/jobs/7",
        "cpuacct": "/sys/fs/cgroup/cpu,cpuacct/jobs/7",
        "": "/sys/fs/cgroup/unified",
    }


def test_cgroup_dirs_strip_the_mount_root():
    dirs = cgroup_dirs(parse_proc_cgroup(V2_CONTAINER_CGROUP), parse_mountinfo(V2_CONTAINER_MOUNTINFO))
    assert dirs == {"": "/sys/fs/cgroup/app"}


def test_cgroup_dirs_skip_paths_outside_the_mount():
    mounts = parse_mountinfo("1 0 0:1 /other /sys/fs/cgroup rw - cgroup2 cgroup rw\n")
    assert cgroup_dirs({"": "/mine"}, mounts) == {}


def test_enforcement_validates_its_fields():
    with pytest.raises(ValueError, match="unknown enforcement kind"):
        Enforcement("docker")
    with pytest.raises(ValueError, match="inconsistent"):
        Enforcement("cgroup1")
    assert not Enforcement("poll").limits_cpu
    assert "polling" in str(Enforcement("poll"))


def test_detect_is_cached_and_force_bypasses_the_cache():
    first = detect_enforcement()
    assert detect_enforcement() is first
    assert detect_enforcement(force="poll") == Enforcement("poll")
    assert detect_enforcement() is first
    with pytest.raises(ValueError, match="unknown enforcement kind"):
        detect_enforcement(force="cgroup3")


def test_detect_falls_back_to_polling_when_proc_is_unreadable(monkeypatch):
    def unreadable(path: str) -> str:
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(cgroups, "_read", unreadable)
    assert detect_enforcement(force="cgroup1") == Enforcement("poll")
    assert detect_enforcement(force="cgroup2") == Enforcement("poll")


def test_detect_falls_back_when_cgroups_are_read_only(monkeypatch):
    def read_only(path, mode=0o777):
        raise OSError(30, "Read-only file system", path)

    monkeypatch.setattr(cgroups.os, "mkdir", read_only)
    assert detect_enforcement(force="cgroup1").kind == "poll"
    assert detect_enforcement(force="cgroup2").kind == "poll"


def test_detected_dirs_exist():
    found = detect_enforcement()
    for directory in (found.memory_dir, found.cpu_dir):
        assert directory is None or os.path.isdir(directory)
    leftovers = (
        [name for name in os.listdir(found.memory_dir) if name.startswith("deploy-probe")] if found.memory_dir else []
    )
    assert leftovers == []
