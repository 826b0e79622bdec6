"""Runtime benchmarks: spawn-and-reply latency, 100 spawns, RSS of the bridge and of the monitor.

Each figure is compared, in the same run, with multiprocessing's fork and spawn start
methods (Process + Pipe). Run through scripts/bench.py, or alone:
``python scripts/bench_runtime.py``.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

LATENCY_RUNS = 50
MANY = 100

_DEPLOY_JOB = textwrap.dedent(
    """
    import json, os, statistics, sys, time
    import psutil
    import deploy

    def reply(parent, value):
        deploy.Sender[int](parent).send(value)

    def main(out_path, runs, many):
        deploy.init()
        small = deploy.Resources(mem="50MiB", cpu=float(os.environ.get("BENCH_CPU", "0.05")))
        latencies = []
        for index in range(runs):
            started = time.perf_counter()
            pid = deploy.spawn(reply, index, small)
            deploy.Receiver[int](pid).recv()
            latencies.append(time.perf_counter() - started)
        started = time.perf_counter()
        pids = [deploy.spawn(reply, index, small) for index in range(many)]
        total = sum(deploy.Receiver[int](pid).recv() for pid in pids)
        many_seconds = time.perf_counter() - started
        assert total == sum(range(many))
        monitor = psutil.Process(os.getppid())  # the zygote: every process's parent and monitor
        bridge = monitor.parent()
        result = {
            "latency": statistics.median(latencies),
            "many": many_seconds,
            "bridge_rss": bridge.memory_info().rss,
            "monitor_rss": monitor.memory_info().rss,
            "monitor_uss": monitor.memory_full_info().uss,
        }
        with open(out_path, "w") as out:
            json.dump(result, out)

    if __name__ == "__main__":
        main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    """
)


def _send_back(connection, value) -> None:
    connection.send(value)
    connection.close()


def multiprocessing_figures(method: str, runs: int = LATENCY_RUNS, many: int = MANY) -> dict[str, float]:
    context = multiprocessing.get_context(method)
    latencies = []
    for index in range(runs):
        started = time.perf_counter()
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(target=_send_back, args=(sender, index))
        process.start()
        receiver.recv()
        latencies.append(time.perf_counter() - started)
        process.join()
        sender.close()
        receiver.close()
    started = time.perf_counter()
    pipes, processes = [], []
    for index in range(many):
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(target=_send_back, args=(sender, index))
        process.start()
        pipes.append(receiver)
        processes.append(process)
    total = sum(receiver.recv() for receiver in pipes)
    many_seconds = time.perf_counter() - started
    assert total == sum(range(many))
    for process in processes:
        process.join()
    return {"latency": statistics.median(latencies), "many": many_seconds}


def deploy_figures(runs: int = LATENCY_RUNS, many: int = MANY) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as folder:
        job = os.path.join(folder, "job.py")
        out = os.path.join(folder, "result.json")
        with open(job, "w") as file:
            file.write(_DEPLOY_JOB)
        env = {**os.environ, "DEPLOY_FORMAT": "json"}
        done = subprocess.run(
            [sys.executable, job, out, str(runs), str(many)], env=env, capture_output=True, timeout=600
        )
        if not os.path.exists(out):
            raise RuntimeError(f"the deploy job failed (exit {done.returncode}):\n{done.stdout[-2000:]!r}")
        with open(out) as file:
            return json.load(file)


def run(repeats: int = 3) -> dict[str, float]:
    """Median over ``repeats`` of each figure, and the ratios the issues ask for."""
    samples: dict[str, list[float]] = {}
    for _ in range(repeats):
        figures = {f"deploy_{k}": v for k, v in deploy_figures().items()}
        for method in ("fork", "spawn"):
            figures.update({f"mp_{method}_{k}": v for k, v in multiprocessing_figures(method).items()})
        for key, value in figures.items():
            samples.setdefault(key, []).append(value)
    median = {key: statistics.median(values) for key, values in samples.items()}
    median["ratio_latency_vs_fork"] = median["deploy_latency"] / median["mp_fork_latency"]
    median["ratio_latency_vs_spawn"] = median["deploy_latency"] / median["mp_spawn_latency"]
    median["ratio_many_vs_fork"] = median["deploy_many"] / median["mp_fork_many"]
    median["ratio_many_vs_spawn"] = median["deploy_many"] / median["mp_spawn_many"]
    return median


def report(figures: dict[str, float]) -> str:
    mib = 2**20
    return "\n".join(
        [
            "| runtime workload | deploy | mp fork | mp spawn | deploy / fork | deploy / spawn |",
            "|---|---|---|---|---|---|",
            f"| spawn-and-reply latency (median of {LATENCY_RUNS}) | {figures['deploy_latency'] * 1e3:.2f} ms "
            f"| {figures['mp_fork_latency'] * 1e3:.2f} ms | {figures['mp_spawn_latency'] * 1e3:.2f} ms "
            f"| {figures['ratio_latency_vs_fork']:.2f}x | {figures['ratio_latency_vs_spawn']:.3f}x |",
            f"| {MANY} processes spawned, all replies in | {figures['deploy_many'] * 1e3:.0f} ms "
            f"| {figures['mp_fork_many'] * 1e3:.0f} ms | {figures['mp_spawn_many'] * 1e3:.0f} ms "
            f"| {figures['ratio_many_vs_fork']:.2f}x | {figures['ratio_many_vs_spawn']:.3f}x |",
            "",
            f"RSS of the bridge: {figures['deploy_bridge_rss'] / mib:.1f} MiB; of the monitor (the zygote): "
            f"{figures['deploy_monitor_rss'] / mib:.1f} MiB (of which its own, USS: "
            f"{figures['deploy_monitor_uss'] / mib:.1f} MiB).",
            "Ratios are times: below 1 means deploy is faster.",
        ]
    )


def main() -> None:
    print(report(run()))


if __name__ == "__main__":
    main()
