"""deploy's benchmarks, each against its peers in the same run, reported as ratios.

    python scripts/bench.py             # everything
    python scripts/bench.py channels    # messaging only (scripts/bench_channels.py, 5 rounds)
    python scripts/bench.py channels --quick            # a short smoke run of messaging
    python scripts/bench.py channels --protect all      # with frame protection
    python scripts/bench.py runtime     # spawning only (scripts/bench_runtime.py)
    python scripts/bench.py cluster     # local mode against a 3-node loopback fabric (scripts/bench_cluster.py)

Peers: multiprocessing (Pipe and connection over TCP, ``send_bytes`` and pickled ``send``;
fork and spawn start methods), a raw TCP socket with length-prefixed pickle, and pyzmq
when installed (``pip install -e .[bench]``, which also brings NumPy for the array
workload). Everything from the first option on goes to the channels suite (see
``python scripts/bench_channels.py --help``). Machines are shared and noisy: compare the
ratios, which are measured side by side, not the absolute times.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_channels  # noqa: E402
import bench_cluster  # noqa: E402
import bench_runtime  # noqa: E402

SUITES = {
    "channels": lambda options: bench_channels.main(options),
    "runtime": lambda options: bench_runtime.main(),
    "cluster": lambda options: bench_cluster.main([]),
}


def main(argv: list[str]) -> int:
    first = next((i for i, arg in enumerate(argv) if arg.startswith("-")), len(argv))
    chosen, options = argv[:first] or list(SUITES), argv[first:]
    unknown = [name for name in chosen if name not in SUITES]
    if unknown:
        print(f"unknown suite {', '.join(unknown)}: choose from {', '.join(SUITES)}", file=sys.stderr)
        return 2
    for name in chosen:
        print(f"## {name}\n", flush=True)
        SUITES[name](options)
        print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
