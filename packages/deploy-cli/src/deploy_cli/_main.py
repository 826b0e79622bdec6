"""The ``deploy`` command (DESIGN §6).

Cluster mode (``deploy fabric``, ``deploy push``, ``deploy status``) is not built yet;
those commands say so plainly and exit 2 rather than pretend.
"""

from __future__ import annotations

import argparse
import sys

from ._version import __version__

__all__ = ["main"]

_CLUSTER = {
    "fabric": "run a fabric daemon (worker or master)",
    "push": "run a script on a cluster through its bridge",
    "status": "show a cluster's nodes, capacity and processes",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deploy",
        description="Run distributed Python programs. Locally, just run your script: python job.py",
    )
    parser.add_argument("--version", action="store_true", help="print the versions of deploy's packages")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in _CLUSTER.items():
        command = commands.add_parser(name, help=f"{help_text} (cluster mode: not available yet)")
        command.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _versions() -> str:
    lines = [f"deploy-cli {__version__}"]
    for module in ("deploy_core", "deploy_channels", "deploy_monitor", "deploy_fabric"):
        try:
            version = __import__(module).__version__
        except ImportError:
            version = "not installed"
        lines.append(f"{module.replace('_', '-')} {version}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    options = _parser().parse_args(argv)
    if options.version:
        print(_versions())
        return 0
    if options.command in _CLUSTER:
        print(
            f"deploy {options.command}: cluster mode is not available in this version; "
            "run your script locally with: python SCRIPT",
            file=sys.stderr,
        )
        return 2
    _parser().print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
