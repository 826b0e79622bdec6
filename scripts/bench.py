"""deploy's benchmarks, each against its peers in the same run, reported as ratios.

    python scripts/bench.py             # everything
    python scripts/bench.py channels    # messaging only (scripts/bench_channels.py)
    python scripts/bench.py runtime     # spawning only (scripts/bench_runtime.py)
    python scripts/bench.py cluster     # local mode against a 3-node loopback fabric (scripts/bench_cluster.py)

Peers: multiprocessing (Pipe and connection over TCP, fork and spawn start methods), a
raw TCP socket with length-prefixed pickle, and pyzmq when installed
(``pip install -e .[bench]``). Machines are shared and noisy: compare the ratios, which
are measured side by side, not the absolute times.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_channels  # noqa: E402
import bench_cluster  # noqa: E402
import bench_runtime  # noqa: E402

SUITES = {
    "channels": lambda: bench_channels.main([]),
    "runtime": bench_runtime.main,
    "cluster": lambda: bench_cluster.main([]),
}


def main(argv: list[str]) -> int:
    chosen = argv or list(SUITES)
    unknown = [name for name in chosen if name not in SUITES]
    if unknown:
        print(f"unknown suite {', '.join(unknown)}: choose from {', '.join(SUITES)}", file=sys.stderr)
        return 2
    for name in chosen:
        print(f"## {name}\n", flush=True)
        SUITES[name]()
        print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
