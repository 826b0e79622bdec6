"""Paths a spawn request carries, taken from the spawner's machine to this one (DESIGN §2)."""

from deploy_fabric._process import relocation


def test_same_script_path_changes_nothing():
    here = relocation("/runs/job.py", "/runs/job.py")
    assert here("/runs/data") == "/runs/data" and here("/usr/lib/python3") == "/usr/lib/python3"


def test_a_relative_script_changes_nothing():
    assert relocation("job.py", "job.py")("/somewhere") == "/somewhere"


def test_a_bundle_unpacked_elsewhere_moves_the_paths_inside_it():
    theirs = "/home/a/.cache/deploy/bundles/0123abcd/tools/job.py"
    ours = "/var/cache/deploy/bundles/0123abcd/tools/job.py"
    here = relocation(theirs, ours)
    assert here("/home/a/.cache/deploy/bundles/0123abcd/data") == "/var/cache/deploy/bundles/0123abcd/data"
    assert here("/home/a/.cache/deploy/bundles/0123abcd/tools") == "/var/cache/deploy/bundles/0123abcd/tools"
    assert here("/usr/lib/python3.11") == "/usr/lib/python3.11"  # outside: the same path here
    assert here("") == "" and here("relative/dir") == "relative/dir"
