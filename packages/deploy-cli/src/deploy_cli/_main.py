"""The ``deploy`` command (DESIGN §6): fabric daemons, push and status.

Every failure the user can cause or meet is one line ``deploy COMMAND: SENTENCE`` on stderr
and a non-zero exit: 2 for input the command cannot use (argparse's usage errors too), 1
for a failure of the cluster or the connection, 130 after Ctrl-C. The work itself is
``deploy_fabric``'s; this module only turns words into its arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from deploy_core import DeployError, Resources
from deploy_core import env as names

from . import _arguments as arguments
from ._arguments import UsageError
from ._table import render
from ._version import __version__

__all__ = ["main"]

_FORMATS = ("human", "json")
_NO_SECRET = "set DEPLOY_SECRET or pass --secret-file PATH"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deploy",
        description="Run distributed Python programs. Locally, just run your script: python job.py",
    )
    parser.add_argument("--version", action="store_true", help="print the versions of deploy's packages")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    fabric = commands.add_parser(
        "fabric",
        help="run a fabric daemon: a worker, or the master with its own node and the bridge",
        usage=(
            "deploy fabric BIND [--mem SIZE] [--cpu N] [--join MASTER_ADDR]\n"
            "       deploy fabric master BIND MEM CPU [bridge BRIDGE_BIND] [ADDR MEM CPU ...]"
        ),
        description="A worker daemon sized to this machine unless --mem/--cpu say otherwise, or the master.",
    )
    fabric.add_argument("words", nargs="+", metavar="BIND | master BIND MEM CPU ...")
    fabric.add_argument("--mem", help="memory this worker offers (default: this machine's), e.g. 8GiB")
    fabric.add_argument("--cpu", help="cores this worker offers (default: this machine's), e.g. 4")
    fabric.add_argument("--join", metavar="MASTER_ADDR", help="register with the master at MASTER_ADDR")
    _secret_option(fabric)
    fabric.set_defaults(run=_fabric)

    push = commands.add_parser(
        "push",
        help="run a script on a cluster through its bridge",
        usage="deploy push [--format human|json] BRIDGE_ADDR (SCRIPT | -m MODULE) [ARGS...]",
        description="Ship SCRIPT's directory (or, with -m, the current one) and run it on the cluster.",
    )
    _format_option(push)
    _secret_option(push)
    push.add_argument("bridge", metavar="BRIDGE_ADDR")
    push.add_argument("program", nargs=argparse.REMAINDER, metavar="SCRIPT [ARGS...] | -m MODULE [ARGS...]")
    push.set_defaults(run=_push)

    status = commands.add_parser("status", help="show a cluster's nodes, capacity, runs and processes")
    _format_option(status)
    _secret_option(status)
    status.add_argument("bridge", metavar="BRIDGE_ADDR")
    status.set_defaults(run=_status)
    return parser


def _secret_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--secret-file", metavar="PATH", help=f"read the cluster secret from PATH (default: ${names.SECRET})"
    )


def _format_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=_FORMATS, help=f"output format (default: ${names.FORMAT} or human)")


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
    """Run ``deploy`` with ``argv`` (default: ``sys.argv[1:]``); return its exit code."""
    parser = _parser()
    options = parser.parse_args(argv)
    if options.version:
        print(_versions())
        return 0
    if options.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return options.run(options)
    except UsageError as error:
        return _fail(options.command, str(error), 2)
    except DeployError as error:
        return _fail(options.command, str(error) or type(error).__name__, 1)
    except KeyboardInterrupt:
        return 130
    except OSError as error:
        return _fail(options.command, error.strerror or str(error), 1)
    except Exception as error:  # a bug of ours: still one line, the traceback on request
        if os.environ.get(names.LOG):
            traceback.print_exc()
        hint = "" if os.environ.get(names.LOG) else f" (set {names.LOG}=debug for the traceback)"
        return _fail(options.command, f"internal error: {type(error).__name__}: {error}{hint}", 1)


def _fail(command: str, sentence: str, code: int) -> int:
    print(f"deploy {command}: {sentence}", file=sys.stderr)
    return code


def _cluster(name: str) -> Callable:
    import deploy_fabric

    function = getattr(deploy_fabric, name, None)
    if function is None:
        raise UsageError(f"cluster mode is not available in deploy-fabric {deploy_fabric.__version__}")
    return function


def _secret(options: argparse.Namespace) -> bytes:
    return arguments.secret(options.secret_file, os.environ)


def _listen(addr: str, secret: bytes) -> str:
    arguments.address(addr, listen=True)
    if not secret and not arguments.is_loopback(addr):
        raise UsageError(
            f"refusing to listen on {addr}, which is not a loopback address, without a secret: {_NO_SECRET}"
        )
    return addr


def _fabric(options: argparse.Namespace) -> int:
    words: list[str] = options.words
    secret = _secret(options)
    if words[0] == "master":
        if options.mem or options.cpu or options.join:
            raise UsageError("--mem, --cpu and --join are for workers: the master's size is its MEM CPU")
        bind, capacity, bridge, workers = _master_words(words[1:])
        _listen(bind, secret)
        if bridge is not None:
            _listen(bridge, secret)
        serve_master = _cluster("serve_master")
        return serve_master(bind, capacity, secret, bridge_bind=bridge, workers=workers)
    if len(words) != 1:
        raise UsageError(
            f"unexpected {' '.join(words[1:])!r} after BIND: a worker takes BIND [--mem SIZE] [--cpu N] "
            "[--join MASTER_ADDR]; the master form is: deploy fabric master BIND MEM CPU ..."
        )
    bind = _listen(words[0], secret)
    size = arguments.machine_size()
    capacity = arguments.resources(options.mem or str(int(size.mem)), options.cpu or str(float(size.cpu)))
    join = arguments.address(options.join) if options.join else None
    serve_worker = _cluster("serve_worker")
    return serve_worker(bind, capacity, secret, join=join)


def _master_words(words: list[str]) -> tuple[str, Resources, str | None, list[tuple[str, Resources]]]:
    form = "deploy fabric master BIND MEM CPU [bridge BRIDGE_BIND] [ADDR MEM CPU ...]"
    if len(words) < 3:
        raise UsageError(f"the master needs BIND MEM CPU: {form}")
    bind, capacity, rest = words[0], arguments.resources(words[1], words[2]), words[3:]
    bridge = None
    if rest and rest[0] == "bridge":
        if len(rest) < 2:
            raise UsageError(f"'bridge' needs a BRIDGE_BIND address: {form}")
        bridge, rest = rest[1], rest[2:]
    if len(rest) % 3:
        raise UsageError(f"the static node list is ADDR MEM CPU triples; {' '.join(rest)!r} is not: {form}")
    workers = []
    for index in range(0, len(rest), 3):
        addr, mem, cpu = rest[index : index + 3]
        workers.append((arguments.address(addr), arguments.resources(mem, cpu)))
    return bind, capacity, bridge, workers


def _format(options: argparse.Namespace) -> str:
    fmt = options.format or os.environ.get(names.FORMAT) or "human"
    if fmt not in _FORMATS:
        raise UsageError(f"{names.FORMAT}={fmt!r} is not a format: expected human or json")
    return fmt


def _push(options: argparse.Namespace) -> int:
    from deploy_fabric._bundle import Bundle

    bridge = arguments.address(options.bridge)
    fmt = _format(options)
    words: list[str] = options.program
    if words and words[0].startswith("-") and words[0] != "-m":
        raise UsageError(
            f"{words[0]} after BRIDGE_ADDR: options go before it (deploy push [--format F] BRIDGE_ADDR ...)"
        )
    secret = _secret(options)
    program = arguments.program(words, Path.cwd())
    push = _cluster("push")
    bundle = Bundle.pack(program.root)
    return push(bridge, secret, bundle, program.command, program.args, dict(os.environ), program.cwd, fmt)


def _status(options: argparse.Namespace) -> int:
    bridge = arguments.address(options.bridge)
    fmt = _format(options)
    status = _cluster("status")
    report = status(bridge, _secret(options))
    if fmt == "json":
        print(json.dumps(report, sort_keys=True))
    else:
        print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
