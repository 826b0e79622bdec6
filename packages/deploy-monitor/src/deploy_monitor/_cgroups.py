"""Finding out what resource enforcement the host allows, and one cgroup per monitored process.

Facts this module relies on (cgroups(7), the kernel's cgroup-v1/memory.rst and cgroup-v2.rst):
- ``/proc/self/cgroup`` has one line ``ID:CONTROLLERS:PATH`` per hierarchy: v1 lines list their
  controllers (``4:memory:/a/b``, ``1:cpu,cpuacct:/``), the v2 unified hierarchy is ``0::/path``.
  Paths are relative to the root of our cgroup namespace.
- ``/proc/self/mountinfo``: field 4 is the root of the mount inside its hierarchy, field 5 the
  mount point (octal escapes like ``\\040``); after the ``-`` separator come the filesystem
  type (``cgroup`` or ``cgroup2``), the source and the super options, which for v1 name the
  mounted controllers (``rw,memory``).
- ``mkdir`` in a hierarchy makes a child cgroup and the kernel fills it with control files;
  ``rmdir`` removes it once no process is left in it (``EBUSY`` before), whatever it was
  charged goes to the parent. Writing a pid to ``cgroup.procs`` moves the whole process;
  processes it forks afterwards start in the same cgroup.
- Memory is charged to the cgroup of the process that first touches a page, and charges do
  not follow a process that moves (v1 ``memory.move_charge_at_immigrate`` defaults to 0, v2
  never moves them). A freshly forked child shares its parent's pages without being charged
  for them; the copies it makes on write are charged to it. So a child's charge is the memory
  it owns, which is what DESIGN §2 asks a limit to count.
- Pages of a tmpfs file (``/dev/shm``, shared memory) stay charged to the cgroup that first
  touched them for as long as the file exists, long after every process of the group exited.
  Reclaim (v1 ``memory.force_empty``, v2 ``memory.reclaim``) drops page cache but can only
  swap such pages out, never uncharge them; ``rmdir`` still succeeds and the charge stays with
  the removed group. Usage is v1 ``memory.usage_in_bytes``, v2 ``memory.current``.
- When a cgroup reaches its memory limit and reclaim cannot free enough, the kernel's OOM
  killer SIGKILLs a process inside that cgroup and counts it: v2 ``memory.events`` line
  ``oom_kill N``, v1 ``memory.oom_control`` line ``oom_kill N`` (Linux >= 4.13; older kernels
  only have ``memory.failcnt``).
- v2: a controller's files exist in a child cgroup only if the parent lists it in
  ``cgroup.subtree_control``; enabling it there fails with ``EBUSY`` when the parent holds
  processes and is not the root ("no internal processes"). Limits: ``memory.max`` (bytes),
  ``cpu.weight`` (1..10000, 100 by default).
- v1: ``memory.limit_in_bytes``; ``memory.memsw.limit_in_bytes`` (memory + swap, must stay
  >= the memory limit) exists when swap accounting is on. CPU: ``cpu.shares`` (at least 2,
  1024 by default).
- CPU is shared by weight, not capped by a CFS quota: a weight only matters when processes
  compete for a core, so each gets its requested share under contention while an idle core
  is never left unused. A quota would hold a process asking for the default 0.05 cores to
  5% of a core on an idle machine, twenty times slower than the same code without deploy.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import signal
import time
from dataclasses import dataclass

from deploy_core import Resources

__all__ = [
    "Cgroup",
    "Enforcement",
    "Mount",
    "cgroup_dirs",
    "detect_enforcement",
    "parse_mountinfo",
    "parse_proc_cgroup",
]

log = logging.getLogger("deploy.monitor")

KINDS = ("cgroup2", "cgroup1", "poll")
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")
_MOUNT_OPTIONS = {"rw", "ro", "xattr", "noprefix", "clone_children", "cpuset_v2_mode", "nsdelegate"}  # not controllers
_RMDIR_PATIENCE = 2.0  # seconds to wait for a cgroup's last process to leave before giving up
REUSE_CHARGE = 1 << 20  # a group still charged more than this after reclaim is not reused


@dataclass(frozen=True)
class Enforcement:
    """What this host lets a monitor use to enforce `Resources`.

    ``kind`` is ``"cgroup2"``, ``"cgroup1"`` or ``"poll"`` (memory checked with psutil, no
    CPU limit). ``memory_dir`` is the cgroup directory under which a cgroup per monitored
    process is made (``None`` when polling); ``cpu_dir`` likewise for the CPU weight, ``None``
    when CPU cannot be limited.
    """

    kind: str
    memory_dir: str | None = None
    cpu_dir: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown enforcement kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        if (self.kind == "poll") != (self.memory_dir is None):
            raise ValueError(f"enforcement {self.kind!r} with memory_dir={self.memory_dir!r} is inconsistent")

    @property
    def limits_cpu(self) -> bool:
        """Whether CPU shares are enforced (as cgroup weights)."""
        return self.cpu_dir is not None

    def __str__(self) -> str:
        if self.kind == "poll":
            return "memory by polling with psutil (USS), no CPU limit"
        cpu = f"cpu weight under {self.cpu_dir}" if self.cpu_dir else "no CPU weighting"
        return f"{self.kind}: memory under {self.memory_dir}, {cpu}"


@dataclass(frozen=True)
class Mount:
    """One cgroup mount from ``/proc/self/mountinfo``."""

    root: str
    mountpoint: str
    fstype: str
    controllers: frozenset[str]


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """``/proc/self/cgroup`` as ``{controller: path}``; the v2 hierarchy's key is ``""``."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            paths[""] = path
        for name in controllers.split(","):
            if name and not name.startswith("name="):
                paths[name] = path
    return paths


def _unescape(field: str) -> str:
    return _OCTAL_ESCAPE.sub(lambda match: chr(int(match[1], 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup and cgroup2 mounts listed in ``/proc/self/mountinfo`` text."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        if "-" not in fields[6:] or len(fields) < 10:
            continue
        sep = fields.index("-", 6)
        fstype, superopts = fields[sep + 1], fields[sep + 3] if len(fields) > sep + 3 else ""
        if fstype not in ("cgroup", "cgroup2"):
            continue
        controllers = frozenset(
            o for o in superopts.split(",") if fstype == "cgroup" and o and "=" not in o and o not in _MOUNT_OPTIONS
        )
        mounts.append(Mount(_unescape(fields[3]), _unescape(fields[4]), fstype, controllers))
    return mounts


def cgroup_dirs(proc_cgroup: dict[str, str], mounts: list[Mount]) -> dict[str, str]:
    """Where our own cgroups are in the file system: ``{controller: dir}``, ``""`` for v2.

    A path from ``/proc/self/cgroup`` is inside a mount whose root is a prefix of it; the
    directory is the mount point plus the rest of the path.
    """
    dirs: dict[str, str] = {}
    for key, path in proc_cgroup.items():
        for mount in mounts:
            if (mount.fstype == "cgroup2") != (key == "") or (key and key not in mount.controllers):
                continue
            root = mount.root.rstrip("/")
            if path != root and not path.startswith(root + "/"):
                continue
            rest = path[len(root) :].strip("/")
            dirs[key] = os.path.join(mount.mountpoint, rest) if rest else mount.mountpoint
            break
    return dirs


def _read(path: str) -> str:
    with open(path) as file:
        return file.read()


def _write(path: str, value: str) -> None:
    with open(path, "w") as file:
        file.write(value)


def _unique_name(prefix: str = "deploy") -> str:
    return f"{prefix}-{os.getpid()}-{secrets.token_hex(4)}"


def _probe(parent: str, control_files: tuple[str, ...]) -> dict[str, bool]:
    """Make and remove a child cgroup of ``parent``; which of ``control_files`` it had."""
    probe = os.path.join(parent, _unique_name("deploy-probe"))
    os.mkdir(probe)
    try:
        return {name: os.path.exists(os.path.join(probe, name)) for name in control_files}
    finally:
        os.rmdir(probe)


def _detect_v2(dirs: dict[str, str]) -> Enforcement | None:
    own = dirs.get("")
    if own is None:
        log.debug("enforcement: no cgroup v2 hierarchy mounted for this process")
        return None
    try:
        available = _read(os.path.join(own, "cgroup.controllers")).split()
        if "memory" not in available:
            log.debug(
                "enforcement: cgroup v2 at %s has no memory controller (controllers: %s)", own, available or "none"
            )
            return None
        enabled = _read(os.path.join(own, "cgroup.subtree_control")).split()
        for controller in ("memory", "cpu"):
            if controller in available and controller not in enabled:
                try:
                    _write(os.path.join(own, "cgroup.subtree_control"), f"+{controller}")
                except OSError as exc:
                    log.debug("enforcement: cannot delegate the %s controller under %s: %s", controller, own, exc)
        found = _probe(own, ("memory.max", "cpu.weight"))
    except OSError as exc:
        log.debug("enforcement: cgroup v2 at %s is not usable: %s", own, exc)
        return None
    if not found["memory.max"]:
        log.debug("enforcement: cgroup v2 at %s does not give child cgroups a memory controller", own)
        return None
    return Enforcement("cgroup2", memory_dir=own, cpu_dir=own if found["cpu.weight"] else None)


def _detect_v1(dirs: dict[str, str]) -> Enforcement | None:
    memory, cpu = dirs.get("memory"), dirs.get("cpu")
    if memory is None:
        log.debug("enforcement: no cgroup v1 memory hierarchy mounted for this process")
        return None
    try:
        if not _probe(memory, ("memory.limit_in_bytes",))["memory.limit_in_bytes"]:
            log.debug("enforcement: cgroup v1 memory cgroups under %s have no memory.limit_in_bytes", memory)
            return None
    except OSError as exc:
        log.debug("enforcement: cannot make cgroup v1 memory cgroups under %s: %s", memory, exc)
        return None
    if cpu is not None:
        try:
            if not _probe(cpu, ("cpu.shares",))["cpu.shares"]:
                log.debug("enforcement: cgroup v1 cpu cgroups under %s have no cpu.shares", cpu)
                cpu = None
        except OSError as exc:
            log.debug("enforcement: cannot make cgroup v1 cpu cgroups under %s: %s", cpu, exc)
            cpu = None
    return Enforcement("cgroup1", memory_dir=memory, cpu_dir=cpu)


_detected: Enforcement | None = None


def detect_enforcement(force: str | None = None) -> Enforcement:
    """What this host allows, detected once and cached (forked processes inherit the answer).

    Tries a writable cgroup v2 subtree with the memory controller, then cgroup v1, then falls
    back to polling; never raises because cgroups are missing or read-only. ``force`` limits
    the choice to one kind (``"cgroup2"``, ``"cgroup1"`` or ``"poll"``) and bypasses the cache;
    a forced cgroup kind the host lacks still falls back to ``"poll"``.
    """
    global _detected
    if force is not None and force not in KINDS:
        raise ValueError(f"unknown enforcement kind {force!r}: expected one of {', '.join(KINDS)}")
    if force is None and _detected is not None:
        return _detected
    found: Enforcement | None = None
    if force != "poll":
        try:
            dirs = cgroup_dirs(
                parse_proc_cgroup(_read("/proc/self/cgroup")), parse_mountinfo(_read("/proc/self/mountinfo"))
            )
        except OSError as exc:
            log.debug("enforcement: cannot read this process's cgroups: %s", exc)
            dirs = {}
        if force in (None, "cgroup2"):
            found = _detect_v2(dirs)
        if found is None and force in (None, "cgroup1"):
            found = _detect_v1(dirs)
    result = found or Enforcement("poll")
    log.debug("enforcement: %s", result)
    if not result.limits_cpu:
        log.debug("enforcement: CPU shares are not enforced on this host (no cgroup CPU weights)")
    if force is None:
        _detected = result
    return result


def sweep_stale(parent: str) -> None:
    """Remove empty ``deploy-<pid>-*`` cgroups whose monitor is gone (it was killed before cleaning up).

    A cgroup still holding processes refuses ``rmdir``; a reused pid only delays the sweep.
    """
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        parts = name.split("-")
        if len(parts) != 3 or parts[0] != "deploy" or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
            continue  # its monitor is alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            os.rmdir(os.path.join(parent, name))
            log.debug("cgroup %s: removed, its monitor died before cleaning up", os.path.join(parent, name))
        except OSError:
            pass


class Cgroup:
    """The cgroup(s) of one monitored process: made with its limits, removed after it is reaped.

    With cgroup v1 memory and CPU live in separate hierarchies, so there may be two directories.
    """

    def __init__(self, kind: str, memory_dir: str, cpu_dir: str | None, limit: int):
        self.kind = kind
        self.memory_dir = memory_dir
        self.cpu_dir = cpu_dir
        self.limit = limit
        self.oom_base = 0  # OOM kills counted before this process (a reused group)
        self.enforcement: Enforcement | None = None  # what it was made under (for reuse)

    @property
    def dirs(self) -> list[str]:
        return [d for d in dict.fromkeys((self.memory_dir, self.cpu_dir)) if d is not None]

    @classmethod
    def create(cls, enforcement: Enforcement, resources: Resources | None, pool: CgroupPool | None = None) -> Cgroup:
        """Make the cgroup(s) with ``resources``' limits (None: none yet, see `set_limits`),
        or take an empty one from ``pool``; ``OSError`` if memory cannot be limited."""
        assert enforcement.memory_dir is not None
        reused = pool.take(enforcement) if pool is not None else None
        if reused is not None:
            if resources is not None:
                try:
                    reused.set_limits(resources)
                except OSError:
                    reused.remove()
                    raise
            return reused
        for parent in dict.fromkeys((enforcement.memory_dir, enforcement.cpu_dir)):
            if parent is not None:
                sweep_stale(parent)
        name = _unique_name()
        memory_dir = os.path.join(enforcement.memory_dir, name)
        os.mkdir(memory_dir)
        group = cls(enforcement.kind, memory_dir, None, 0)
        group.enforcement = enforcement
        try:
            if enforcement.cpu_dir is not None:
                group._make_cpu_dir(os.path.join(enforcement.cpu_dir, name))
            if resources is not None:
                group.set_limits(resources)
        except BaseException:
            group.remove()
            raise
        return group

    def set_limits(self, resources: Resources) -> None:
        """Write ``resources``' limits; ``OSError`` if memory cannot be limited so (a process
        inside already uses more than the new limit)."""
        self.limit = int(resources.mem)
        self._limit_memory()
        if self.cpu_dir is not None:
            self._limit_cpu(self.cpu_dir, float(resources.cpu))
        log.debug(
            "cgroup %s: memory %s, cpu %s",
            self.memory_dir,
            resources.mem,
            resources.cpu if self.cpu_dir else "unlimited",
        )

    def _limit_memory(self) -> None:
        limit = str(self.limit)
        if self.kind == "cgroup2":
            _write(os.path.join(self.memory_dir, "memory.max"), limit)
            # Best effort: no swap beyond the limit, and an OOM kill takes the whole group.
            for name, value in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
                try:
                    _write(os.path.join(self.memory_dir, name), value)
                except OSError:
                    pass
        else:
            # The memory limit may never exceed memory+swap's (EINVAL): raising it, memsw goes first.
            memory = os.path.join(self.memory_dir, "memory.limit_in_bytes")
            memsw = os.path.join(self.memory_dir, "memory.memsw.limit_in_bytes")
            try:
                _write(memory, limit)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                _write(memsw, limit)
                _write(memory, limit)
            try:
                _write(memsw, limit)
            except OSError:
                pass  # no swap accounting: the memory limit alone applies

    def lift_limits(self) -> None:
        """No memory limit and the default CPU weight; ``OSError`` if memory stays limited."""
        if self.kind == "cgroup2":
            _write(os.path.join(self.memory_dir, "memory.max"), "max")
        else:
            try:
                _write(os.path.join(self.memory_dir, "memory.memsw.limit_in_bytes"), "-1")
            except OSError:
                pass  # no swap accounting
            _write(os.path.join(self.memory_dir, "memory.limit_in_bytes"), "-1")
        if self.cpu_dir is not None:
            self._limit_cpu(self.cpu_dir, 1.0)

    def _make_cpu_dir(self, cpu_dir: str) -> None:
        try:
            if self.kind != "cgroup2":  # (v2: one directory holds both)
                os.mkdir(cpu_dir)
            self.cpu_dir = cpu_dir
        except OSError as exc:
            log.debug("cgroup: cannot make %s, CPU left unweighted: %s", cpu_dir, exc)

    def _limit_cpu(self, cpu_dir: str, cores: float) -> None:
        try:
            if self.kind == "cgroup2":
                _write(os.path.join(cpu_dir, "cpu.weight"), str(min(10000, max(1, round(cores * 100)))))
            else:
                _write(os.path.join(cpu_dir, "cpu.shares"), str(max(2, round(cores * 1024))))
        except (OSError, ValueError) as exc:
            log.debug("cgroup: cannot set a CPU weight in %s, CPU left unweighted: %s", cpu_dir, exc)

    def add(self, pid: int) -> None:
        """Move process ``pid`` (``0``: the caller) into every directory of this group."""
        for directory in self.dirs:
            _write(os.path.join(directory, "cgroup.procs"), str(pid or os.getpid()))

    def pids(self) -> set[int]:
        found: set[int] = set()
        for directory in self.dirs:
            try:
                found.update(int(word) for word in _read(os.path.join(directory, "cgroup.procs")).split())
            except OSError:
                pass
        return found

    def charge(self) -> int:
        """Bytes of memory charged to the group now; ``OSError`` if unreadable."""
        name = "memory.current" if self.kind == "cgroup2" else "memory.usage_in_bytes"
        return int(_read(os.path.join(self.memory_dir, name)))

    def reclaim(self) -> None:
        """Ask the kernel to reclaim what it can of the group's charge (best effort)."""
        if self.kind == "cgroup2":
            path, value = os.path.join(self.memory_dir, "memory.reclaim"), str(max(self.charge(), 1))
        else:
            path, value = os.path.join(self.memory_dir, "memory.force_empty"), "0"
        try:
            _write(path, value)
        except OSError as exc:  # EAGAIN when v2 could not reclaim it all; no such file on old kernels
            log.debug("cgroup %s: reclaim left some charge: %s", self.memory_dir, exc)

    def oom_killed(self) -> bool:
        """Whether the OOM killer killed a process of this group since it was (re)used."""
        kills = self.oom_kills()
        return kills < 0 or kills > self.oom_base

    def oom_kills(self) -> int:
        """How many processes the kernel OOM killer killed in this group (-1: unknown)."""
        name = "memory.events" if self.kind == "cgroup2" else "memory.oom_control"
        try:
            for line in _read(os.path.join(self.memory_dir, name)).splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
            if self.kind == "cgroup1":  # kernels before 4.13: only know that the limit was hit
                return -1 if int(_read(os.path.join(self.memory_dir, "memory.failcnt"))) else 0
        except (OSError, ValueError):
            pass
        return 0

    def kill_all(self) -> None:
        """SIGKILL every process left in the group."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def remove(self) -> bool:
        """Kill what is left inside and rmdir the group, retrying briefly; False if it stayed."""
        deadline = time.monotonic() + _RMDIR_PATIENCE
        remaining = self.dirs
        while remaining:
            still = []
            for directory in remaining:
                try:
                    os.rmdir(directory)
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    if exc.errno != errno.EBUSY:
                        log.debug("cgroup %s: cannot remove it: %s", directory, exc)
                        continue
                    still.append(directory)
            remaining = still
            if remaining:
                if time.monotonic() > deadline:
                    log.debug("cgroup: %s still busy, left in place", ", ".join(remaining))
                    return False
                self.kill_all()
                time.sleep(0.01)
        log.debug("cgroup %s removed", self.memory_dir)
        return True


class CgroupPool:
    """Empty cgroups kept for the next processes: making and removing a cgroup costs the
    kernel more than a fork does. A group is reused only once nothing is left in it and its
    charge is (near) zero, with its memory limit lifted and its OOM count noted: a group
    still charged for what its last process left behind (a file in ``/dev/shm``) is removed,
    or the next process would start with that charge counted against its own limit."""

    def __init__(self, size: int = 16):
        self.size = size
        self._groups: dict[Enforcement, list[Cgroup]] = {}

    def take(self, enforcement: Enforcement) -> Cgroup | None:
        groups = self._groups.get(enforcement)
        return groups.pop() if groups else None

    def give(self, group: Cgroup) -> None:
        """After its process was reaped: keep ``group`` for another, or remove it."""
        groups = self._groups.setdefault(group.enforcement, []) if group.enforcement is not None else None
        if groups is None or len(groups) >= self.size or group.pids():
            group.remove()
            return
        try:
            if group.charge() > REUSE_CHARGE:
                group.reclaim()
                left = group.charge()
                if left > REUSE_CHARGE:
                    log.debug("cgroup %s: still charged %s bytes, not reusing it", group.memory_dir, left)
                    group.remove()
                    return
            group.lift_limits()
            if group.kind == "cgroup1":
                try:
                    _write(os.path.join(group.memory_dir, "memory.failcnt"), "0")
                except OSError:
                    pass
            group.oom_base = max(0, group.oom_kills())
        except OSError as exc:
            log.debug("cgroup %s: not reusable, removing it: %s", group.memory_dir, exc)
            group.remove()
            return
        groups.append(group)

    def close(self) -> None:
        """Remove every group kept."""
        for groups in self._groups.values():
            for group in groups:
                group.remove()
        self._groups.clear()
