"""Bundles on data: what is packed, that packing is deterministic, and how the cache stores."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from deploy_core import DeployError
from deploy_fabric import _bundle
from deploy_fabric._bundle import Bundle, BundleCache

pytestmark = pytest.mark.timeout(60)


def make_tree(root: Path, files: dict[str, bytes | str]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return root


def names(bundle: Bundle) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(bundle.data))) as archive:
        return [member.name for member in archive if member.isreg()]


def test_digest_is_the_sha256_of_the_data(tmp_path):
    bundle = Bundle.pack(make_tree(tmp_path, {"job.py": "print(1)\n"}))
    assert bundle.digest == hashlib.sha256(bundle.data).hexdigest()
    assert len(bundle.digest) == 64


def test_same_content_same_digest_whatever_the_order_times_and_place(tmp_path):
    files = {"job.py": "import lib\n", "lib/__init__.py": "", "lib/util.py": "X = 1\n", "data/a.txt": "a" * 5000}
    first = make_tree(tmp_path / "one", files)
    second = make_tree(tmp_path / "two", dict(reversed(list(files.items()))))
    old = time.time() - 86400
    for path in second.rglob("*"):
        os.utime(path, (old, old))
    assert Bundle.pack(first).digest == Bundle.pack(second).digest


def test_a_changed_byte_changes_the_digest(tmp_path):
    root = make_tree(tmp_path, {"job.py": "print(1)\n"})
    before = Bundle.pack(root).digest
    (root / "job.py").write_text("print(2)\n")
    assert Bundle.pack(root).digest != before


def test_the_executable_bit_is_part_of_the_content(tmp_path):
    root = make_tree(tmp_path, {"run.sh": "echo hi\n"})
    before = Bundle.pack(root).digest
    (root / "run.sh").chmod(0o755)
    assert Bundle.pack(root).digest != before


def test_skips_vcs_caches_and_virtual_environments(tmp_path):
    root = make_tree(
        tmp_path,
        {
            "job.py": "",
            "pkg/mod.py": "",
            ".git/HEAD": "ref",
            "__pycache__/job.cpython-311.pyc": b"\0",
            "pkg/__pycache__/mod.cpython-311.pyc": b"\0",
            "stray.pyc": b"\0",
            ".tox/py311/x": "",
            ".venv/lib/x.py": "",
            "venv/lib/x.py": "",
            "env-with-odd-name/pyvenv.cfg": "home = /usr",
            "env-with-odd-name/lib/x.py": "",
            "docs/notes.md": "keep",
        },
    )
    assert names(Bundle.pack(root)) == ["docs/notes.md", "job.py", "pkg/mod.py"]


def test_a_symlinked_file_is_packed_as_its_content_a_symlinked_directory_is_not_followed(tmp_path):
    outside = make_tree(tmp_path / "outside", {"shared.py": "S = 1\n", "big/x.py": ""})
    root = make_tree(tmp_path / "code", {"job.py": ""})
    (root / "shared.py").symlink_to(outside / "shared.py")
    (root / "big").symlink_to(outside / "big")
    (root / "dangling.py").symlink_to(tmp_path / "missing.py")
    bundle = Bundle.pack(root)
    assert names(bundle) == ["job.py", "shared.py"]
    cache = BundleCache(tmp_path / "cache")
    assert (cache.store(bundle.digest, bundle.data) / "shared.py").read_text() == "S = 1\n"


def test_past_the_limit_a_clear_error_names_the_largest_files(tmp_path):
    root = make_tree(tmp_path, {"job.py": "", "data/huge.bin": b"x" * 3000, "small.txt": b"y" * 10})
    with pytest.raises(DeployError) as raised:
        Bundle.pack(root, limit=2048)
    message = str(raised.value)
    assert "more than the 2KiB a bundle may hold" in message
    assert "data/huge.bin" in message
    assert "\n" not in message
    assert Bundle.pack(root, limit=4096).digest  # at the limit or under it: packed


def test_the_default_limit_is_100_mib():
    assert _bundle.LIMIT == 100 * 2**20


def test_packing_something_that_is_not_a_directory_says_so(tmp_path):
    with pytest.raises(DeployError, match="not a directory"):
        Bundle.pack(tmp_path / "nope")


def test_a_file_that_cannot_be_read_is_named(tmp_path, monkeypatch):
    # A file that vanishes between the walk and its read (as root, permissions cannot make
    # one unreadable): the real open() fails, and the error names the file.
    root = make_tree(tmp_path, {"job.py": "", "lib/gone.py": "x"})
    real_collect = _bundle._collect

    def collect_then_remove(base):
        found = real_collect(base)
        (base / "lib" / "gone.py").unlink()
        return found

    monkeypatch.setattr(_bundle, "_collect", collect_then_remove)
    with pytest.raises(DeployError) as raised:
        Bundle.pack(root)
    assert str(raised.value) == f"cannot pack {root / 'lib' / 'gone.py'}: No such file or directory"


def test_store_unpacks_the_tree_and_the_cache_knows_it(tmp_path):
    root = make_tree(tmp_path / "code", {"job.py": "print('hi')\n", "lib/util.py": "X = 1\n"})
    (root / "job.py").chmod(0o755)
    bundle = Bundle.pack(root)
    cache = BundleCache(tmp_path / "cache")
    assert not cache.has(bundle.digest)
    unpacked = cache.store(bundle.digest, bundle.data)
    assert cache.has(bundle.digest)
    assert cache.path(bundle.digest) == unpacked
    assert (unpacked / "job.py").read_text() == "print('hi')\n"
    assert (unpacked / "lib/util.py").read_text() == "X = 1\n"
    assert os.access(unpacked / "job.py", os.X_OK)
    assert not os.access(unpacked / "lib/util.py", os.X_OK)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [bundle.digest]


def test_storing_twice_keeps_the_first_copy(tmp_path):
    bundle = Bundle.pack(make_tree(tmp_path / "code", {"job.py": ""}))
    cache = BundleCache(tmp_path / "cache")
    first = cache.store(bundle.digest, bundle.data)
    marker = first / "marker"
    marker.write_text("still here")
    assert cache.store(bundle.digest, bundle.data) == first
    assert marker.read_text() == "still here"


def test_a_damaged_bundle_is_refused_and_leaves_nothing(tmp_path):
    bundle = Bundle.pack(make_tree(tmp_path / "code", {"job.py": ""}))
    cache = BundleCache(tmp_path / "cache")
    with pytest.raises(DeployError, match="damaged"):
        cache.store(bundle.digest, bundle.data[:-1] + bytes([bundle.data[-1] ^ 1]))
    assert not cache.has(bundle.digest)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


@pytest.mark.parametrize("digest", ["../../etc", "A" * 64, "0" * 63, ""])
def test_a_name_that_is_not_a_digest_is_refused(tmp_path, digest):
    cache = BundleCache(tmp_path / "cache")
    assert not cache.has(digest)
    with pytest.raises(DeployError):
        cache.store(digest, b"")
    with pytest.raises(DeployError):
        cache.path(digest)


def crafted(members: list[tuple[tarfile.TarInfo, bytes]]) -> Bundle:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as archive:
        for member, content in members:
            member.size = len(content)
            archive.addfile(member, io.BytesIO(content))
    data = gzip.compress(raw.getvalue())
    return Bundle(hashlib.sha256(data).hexdigest(), data)


def test_names_escaping_the_bundle_are_refused(tmp_path):
    cache = BundleCache(tmp_path / "cache")
    for name in ["../escape.py", "/abs.py", "a/../../escape.py"]:
        bundle = crafted([(tarfile.TarInfo(name), b"x")])
        with pytest.raises(DeployError, match="unsafe name"):
            cache.store(bundle.digest, bundle.data)
        assert not cache.has(bundle.digest)
    assert not (tmp_path / "escape.py").exists()
    assert list((tmp_path / "cache").iterdir()) == []


def test_links_and_devices_are_refused(tmp_path):
    link = tarfile.TarInfo("link")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    bundle = crafted([(link, b"")])
    cache = BundleCache(tmp_path / "cache")
    with pytest.raises(DeployError, match="not a file or directory"):
        cache.store(bundle.digest, bundle.data)
    assert list((tmp_path / "cache").iterdir()) == []


def test_data_that_is_not_an_archive_is_refused(tmp_path):
    data = b"not gzip at all"
    cache = BundleCache(tmp_path / "cache")
    with pytest.raises(DeployError, match="not a valid archive"):
        cache.store(hashlib.sha256(data).hexdigest(), data)


def test_losing_a_race_to_another_store_keeps_the_winner(tmp_path, monkeypatch):
    bundle = Bundle.pack(make_tree(tmp_path / "code", {"job.py": "v = 1\n"}))
    cache = BundleCache(tmp_path / "cache")
    real_unpack = _bundle._unpack

    def unpack_while_another_store_wins(data, target, digest):
        real_unpack(data, target, digest)
        other = BundleCache(cache.directory)
        monkeypatch.setattr(_bundle, "_unpack", real_unpack)
        other.store(digest, data)

    monkeypatch.setattr(_bundle, "_unpack", unpack_while_another_store_wins)
    assert cache.store(bundle.digest, bundle.data) == cache.path(bundle.digest)
    assert [p.name for p in cache.directory.iterdir()] == [bundle.digest]


def test_a_full_disk_is_one_clear_error_and_nothing_half_unpacked(tmp_path, monkeypatch):
    files = {f"f{index}.bin": os.urandom(4096) for index in range(10)}
    bundle = Bundle.pack(make_tree(tmp_path / "code", files))
    cache = BundleCache(tmp_path / "cache")
    written = []
    real_copy = _bundle.shutil.copyfileobj

    def copy_until_full(source, sink, *args):
        if len(written) == 5:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written.append(sink.name)
        real_copy(source, sink, *args)

    monkeypatch.setattr(_bundle.shutil, "copyfileobj", copy_until_full)
    with pytest.raises(DeployError) as raised:
        cache.store(bundle.digest, bundle.data)
    assert "no space left" in str(raised.value)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__
    assert len(written) == 5
    assert not cache.has(bundle.digest)
    assert list(cache.directory.iterdir()) == []


@pytest.fixture
def small_filesystem(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
            check=True,
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError) as error:
        pytest.skip(f"cannot mount a small tmpfs here to fill it: {error}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False, capture_output=True, timeout=10)


def test_a_really_full_disk_is_one_clear_error_and_nothing_half_unpacked(tmp_path, small_filesystem):
    files = {f"f{index}.bin": os.urandom(64 * 1024) for index in range(8)}  # 512 KiB into 256 KiB
    bundle = Bundle.pack(make_tree(tmp_path / "code", files))
    cache = BundleCache(small_filesystem / "cache")
    with pytest.raises(DeployError, match="no space left"):
        cache.store(bundle.digest, bundle.data)
    assert not cache.has(bundle.digest)
    assert list(cache.directory.iterdir()) == []
    small = Bundle.pack(make_tree(tmp_path / "small", {"job.py": "ok"}))
    assert (cache.store(small.digest, small.data) / "job.py").read_text() == "ok"
