"""Bundles: a script's directory packed for shipping to nodes, and the nodes' cache of them.

Facts relied on:
- A tar archive written with fixed metadata (mtime 0, uid/gid 0, no user names, modes
  reduced to 0o644/0o755) and its members in sorted order is the same bytes for the same
  tree on any machine; gzip with ``mtime=0`` and no file name keeps it so. The bundle is
  named by the SHA-256 of those bytes, so equal code has equal names everywhere.
- ``rename(2)`` of a directory onto a name that does not exist is atomic on one file
  system: a reader sees either no bundle or a complete one. A bundle is therefore unpacked
  into a temporary directory beside its final place and renamed into it; when two stores
  race, the loser's rename fails with ``EEXIST``/``ENOTEMPTY`` and it keeps the winner's.
- A full disk shows as ``OSError`` with ``errno`` ``ENOSPC`` (or ``EDQUOT`` past a quota)
  from any write, ``mkdir`` or ``close``; it is turned into one ``DeployError`` after the
  partial unpack is removed.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import os
import re
import shutil
import stat
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from deploy_core import DeployError, Mem

__all__ = ["Bundle", "BundleCache"]

LIMIT = 100 * 2**20
_SKIPPED_DIRS = frozenset({".git", "__pycache__", ".tox", ".venv", "venv", ".hg", ".svn"})
_SKIPPED_SUFFIXES = (".pyc", ".pyo")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_FULL_DISK = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class Bundle:
    """A deterministic, compressed archive of a directory, named by its content hash."""

    digest: str
    data: bytes

    @classmethod
    def pack(cls, root: str | os.PathLike[str], *, limit: int = LIMIT) -> Bundle:
        """Pack ``root``, skipping ``.git``, ``__pycache__``, ``.tox``, virtual environments
        (``.venv``, ``venv`` or any directory holding a ``pyvenv.cfg``) and ``*.pyc`` files.

        Symbolic links to files are packed as the files they point to; symbolic links to
        directories are not followed. Raises ``DeployError`` when the files to pack add up to
        more than ``limit`` bytes, or one of them cannot be read.
        """
        base = Path(root)
        if not base.is_dir():
            raise DeployError(f"cannot pack {base}: it is not a directory")
        files = _collect(base)
        total = sum(size for _, _, size in files)
        if total > limit:
            largest = sorted(files, key=lambda entry: -entry[2])[:3]
            named = ", ".join(f"{name} ({Mem(size)})" for name, _, size in largest)
            raise DeployError(
                f"the directory {base} holds {Mem(total)} to ship, more than the {Mem(limit)} a bundle "
                f"may hold (largest: {named}); put the script in a directory with only its code"
            )
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
            for directory in _directories(files):
                archive.addfile(_member(directory, tarfile.DIRTYPE, 0o755, 0))
            for name, path, _ in files:
                try:
                    with open(path, "rb") as source:
                        content = source.read(limit + 1)  # a file that grew since the walk is cut short
                    executable = os.stat(path).st_mode & stat.S_IXUSR
                except OSError as error:
                    raise DeployError(f"cannot pack {path}: {error.strerror or error}") from None
                archive.addfile(
                    _member(name, tarfile.REGTYPE, 0o755 if executable else 0o644, len(content)),
                    io.BytesIO(content),
                )
        data = gzip.compress(raw.getvalue(), compresslevel=6, mtime=0)
        return cls(hashlib.sha256(data).hexdigest(), data)

    def __repr__(self) -> str:
        return f"Bundle({self.digest[:12]}, {Mem(len(self.data))})"


def _collect(base: Path) -> list[tuple[str, Path, int]]:
    """The files to pack as (archive name, path, size), sorted by name."""
    found: list[tuple[str, Path, int]] = []
    for directory, subdirs, names in os.walk(base):
        here = Path(directory)
        subdirs[:] = sorted(
            name
            for name in subdirs
            if name not in _SKIPPED_DIRS
            and not (here / name).is_symlink()
            and not (here / name / "pyvenv.cfg").exists()
        )
        for name in names:
            path = here / name
            if name.endswith(_SKIPPED_SUFFIXES):
                continue
            try:
                info = path.stat()  # follows a symlink: its target is packed
            except OSError:
                continue  # a dangling symlink, or a file removed while we walk
            if stat.S_ISREG(info.st_mode):
                found.append((path.relative_to(base).as_posix(), path, info.st_size))
    found.sort(key=lambda entry: entry[0])
    return found


def _directories(files: list[tuple[str, Path, int]]) -> list[str]:
    names = {str(parent) for name, _, _ in files for parent in PurePosixPath(name).parents if str(parent) != "."}
    return sorted(names)


def _member(name: str, kind: bytes, mode: int, size: int) -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type = kind
    member.mode = mode
    member.size = size
    member.mtime = 0
    member.uid = member.gid = 0
    member.uname = member.gname = ""
    return member


class BundleCache:
    """Unpacked bundles on a node, one directory per digest under ``directory``."""

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory)

    def has(self, digest: str) -> bool:
        """Whether the bundle named ``digest`` is stored (completely: stores are atomic)."""
        return _DIGEST.fullmatch(digest) is not None and (self.directory / digest).is_dir()

    def path(self, digest: str) -> Path:
        """The unpacked root of a stored bundle; ``DeployError`` if it is not stored."""
        if not self.has(digest):
            raise DeployError(f"bundle {digest[:12]} is not in the cache at {self.directory}")
        return self.directory / digest

    def store(self, digest: str, data: bytes) -> Path:
        """Verify that ``data`` hashes to ``digest``, unpack it atomically, return its root.

        Storing a bundle that is already there does nothing. A full disk raises one
        ``DeployError`` and leaves nothing of the bundle behind.
        """
        if _DIGEST.fullmatch(digest) is None:
            raise DeployError(f"{digest!r} is not a bundle name (64 lowercase hex digits)")
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise DeployError(f"bundle {digest[:12]} arrived damaged: its content hashes to {actual[:12]}")
        final = self.directory / digest
        if final.is_dir():
            return final
        staging = self.directory / f".unpacking-{digest[:12]}-{uuid.uuid4().hex[:8]}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            staging.mkdir()
            _unpack(data, staging, digest)
            try:
                staging.rename(final)
            except OSError as error:
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not final.is_dir():
                    raise
                shutil.rmtree(staging, ignore_errors=True)  # another store won the race
        except OSError as error:
            shutil.rmtree(staging, ignore_errors=True)
            if error.errno in _FULL_DISK:
                raise DeployError(
                    f"no space left on the device of {self.directory} to unpack bundle {digest[:12]} "
                    f"({Mem(len(data))} compressed); free some space on this node"
                ) from None
            raise DeployError(f"cannot unpack bundle {digest[:12]} into {self.directory}: {error}") from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return final


def _unpack(data: bytes, target: Path, digest: str) -> None:
    try:
        raw = gzip.decompress(data)
    except (OSError, EOFError) as error:
        raise DeployError(f"bundle {digest[:12]} is not a valid archive: {error}") from None
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as archive:
        for member in archive:
            parts = PurePosixPath(member.name).parts
            if not parts or member.name.startswith("/") or ".." in parts:
                raise DeployError(f"bundle {digest[:12]} holds an unsafe name {member.name!r}")
            path = target.joinpath(*parts)
            if member.isdir():
                path.mkdir(parents=True, exist_ok=True)
            elif member.isreg():
                path.parent.mkdir(parents=True, exist_ok=True)
                source = archive.extractfile(member)
                assert source is not None  # a regular member always has content
                with open(path, "xb") as sink:
                    shutil.copyfileobj(source, sink)
                os.chmod(path, 0o755 if member.mode & stat.S_IXUSR else 0o644)
            else:
                raise DeployError(f"bundle {digest[:12]} holds {member.name!r}, which is not a file or directory")
