"""A spawn placed on another node starts in the same place of that node's copy of the bundle."""

from dataclasses import dataclass

from deploy_fabric._process import _localised

DIGEST = "ab" * 32


@dataclass(frozen=True)
class _Request:  # the two fields of a SpawnRequest that name places
    cwd: str
    path: tuple[str, ...]


def test_places_in_the_spawners_copy_become_the_same_places_in_ours():
    theirs, ours = f"/srv/a/cache/{DIGEST}", f"/home/b/.cache/deploy/bundles/{DIGEST}"
    request = _Request(f"{theirs}/sub", (f"{theirs}", "/usr/lib/python3.12", f"{theirs}/lib", ""))
    local = _localised(request, ours)
    assert local.cwd == f"{ours}/sub"
    assert local.path == (ours, "/usr/lib/python3.12", f"{ours}/lib", "")


def test_a_place_outside_the_bundle_stays_as_it_is():
    request = _Request("/tmp/elsewhere", ("/opt/site",))
    assert _localised(request, f"/cache/{DIGEST}") == request
