"""``deploy status`` for people: the cluster's nodes, runs and processes as aligned tables."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

from deploy_core import Mem

__all__ = ["render"]


def render(status: Mapping, now: float | None = None) -> str:
    """The status dict of ``deploy_fabric.status`` as three titled tables."""
    now = time.time() if now is None else now
    nodes = status.get("nodes", [])
    runs = status.get("runs", [])
    processes = status.get("processes", [])
    sections = [
        _section(
            f"nodes ({len(nodes)})",
            ["NODE", "CAPACITY", "USED", "FREE", "UP SINCE"],
            [
                [
                    str(node.get("addr", "?")),
                    _resources(node.get("capacity")),
                    _resources(node.get("used")),
                    _resources(node.get("free")),
                    _since(node.get("up_since"), now),
                ]
                for node in nodes
            ],
        ),
        _section(
            f"runs ({len(runs)})",
            ["RUN", "PROGRAM", "STARTED", "PROCESSES"],
            [
                [
                    _short(run.get("id")),
                    _program(run.get("program")),
                    _since(run.get("started"), now),
                    str(run.get("processes", "?")),
                ]
                for run in runs
            ],
        ),
        _section(
            f"processes ({len(processes)})",
            ["PID", "RUN", "NODE", "RESOURCES", "AGE", "MEMORY"],
            [
                [
                    _short(process.get("pid")),
                    _short(process.get("run")),
                    str(process.get("node", "?")),
                    _resources(process.get("resources")),
                    _age(process.get("age")),
                    _memory(process.get("memory")),
                ]
                for process in processes
            ],
        ),
    ]
    return "\n\n".join(sections)


def _section(title: str, header: list[str], rows: list[list[str]]) -> str:
    if not rows:
        return f"{title}: none"
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join([f"{title}:", *lines])


def _resources(value: object) -> str:
    if not isinstance(value, Mapping):
        return "?"
    mem, cpu = value.get("mem"), value.get("cpu")
    shown_mem = str(Mem(int(mem))) if isinstance(mem, (int, float)) else "?"
    shown_cpu = f"{float(cpu):g}" if isinstance(cpu, (int, float)) else "?"
    return f"{shown_mem} / {shown_cpu} cpu"


def _memory(value: object) -> str:
    # Memory in use is a measurement, not a size someone chose: one decimal of the largest
    # binary unit reads better than an exact "3984KiB".
    if not isinstance(value, (int, float)) or value < 0:
        return "?"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return f"{int(value)}B"


def _short(value: object) -> str:
    # Pids and run ids are shown as deploy shows pids everywhere: their first 7 hex digits.
    return str(value)[:7] if value is not None else "?"


def _program(value: object) -> str:
    if isinstance(value, Sequence) and not isinstance(value, str):
        return " ".join(str(word) for word in value)
    return str(value) if value is not None else "?"


def _since(epoch: object, now: float) -> str:
    if not isinstance(epoch, (int, float)):
        return "?"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))
    return f"{stamp} ({_age(now - epoch)} ago)"


def _age(seconds: object) -> str:
    if not isinstance(seconds, (int, float)):
        return "?"
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"
