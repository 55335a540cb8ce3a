#!/usr/bin/env python
"""What the Ray hop adds per 80 ms frame: N tiny-Moshi calls driven through the edge's scheduler
(``MoshiBackend``) to one worker actor on a Ray cluster, against the same calls on a local worker
process (``--ray-address``'s absence) and the engine's own step time.

Per tick it records the round trip the scheduler waits for and the worker's own ``step_ms``;
the difference is the hop (encoding, the transport, decoding). Prints p50/p99 of the hop for the
Ray actor and for the local worker process, the step itself, and CPU per call on each side (this
process, the edge; the worker's process from /proc). No WebRTC here: the calls' media path is the
same either way (scripts/bench_transport.py measures it).

    .venv/bin/python scripts/bench_cluster.py --calls 32 --seconds 20
    .venv/bin/python scripts/bench_cluster.py --ray-address HEAD:6379 --model moshi:PATH \\
        --device cuda

Without ``--ray-address`` it starts a one-node Ray of its own with one ``s2s_worker`` resource.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchlib import percentile  # noqa: E402

from s2s.backends.moshi import MoshiBackend  # noqa: E402
from s2s.worker.handle import WorkerHandle  # noqa: E402
from s2s.worker.messages import Hello, Tick, TickResult  # noqa: E402


class Timed:
    """A worker handle that records each tick's round trip and the worker's own step time."""

    def __init__(self, inner: WorkerHandle) -> None:
        self.inner = inner
        self.samples: list[tuple[float, float]] = []

    @property
    def hello(self) -> Hello:
        return self.inner.hello

    async def tick(self, tick: Tick) -> TickResult:
        started = time.perf_counter()
        result = await self.inner.tick(tick)
        if tick.frames:
            self.samples.append((1000 * (time.perf_counter() - started), result.step_ms))
        return result

    async def replacement(self) -> WorkerHandle:
        raise RuntimeError("the worker died during the benchmark")

    async def close(self) -> None:
        await self.inner.close()


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _drive(handle: Timed, calls: int, seconds: float, worker_pid: int) -> dict[str, float]:
    backend = MoshiBackend(handle)
    streams = [await backend.open_stream(f"bench-{i}") for i in range(calls)]
    frame = (np.sin(np.arange(backend.frame_samples) / 8) * 8000).astype(np.int16)

    async def call(stream: Any) -> None:
        while True:
            await stream.step(frame)

    tasks = [asyncio.create_task(call(s)) for s in streams]
    await asyncio.sleep(3)  # the first ticks (warm-up, joins) are not counted
    handle.samples.clear()
    edge0, worker0, wall0 = time.process_time(), _cpu_s(worker_pid), time.monotonic()
    await asyncio.sleep(seconds)
    edge1, worker1, wall1 = time.process_time(), _cpu_s(worker_pid), time.monotonic()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for stream in streams:
        await stream.close()
    await backend.close()
    hops = [rt - step for rt, step in handle.samples]
    wall = wall1 - wall0
    return {
        "ticks": len(hops),
        "hop_p50": percentile(hops, 0.5),
        "hop_p99": percentile(hops, 0.99),
        "step_p50": percentile([s for _, s in handle.samples], 0.5),
        "edge_cpu_per_call": 100 * (edge1 - edge0) / wall / calls,
        "worker_cpu_per_call": 100 * (worker1 - worker0) / wall / calls,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--model", default=f"moshi:{ROOT / 'models' / 'tiny-moshi'}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ray-address", default="")
    args = parser.parse_args()

    import ray

    from s2s.worker import cluster
    from s2s.worker.edge import ClusterWorker
    from s2s.worker.process import WorkerOptions, WorkerProcess

    if args.ray_address:
        cluster.connect(args.ray_address)
    else:
        os.environ.update(cluster.INLINE_TICKS)  # as cluster.connect() does
        ray.init(num_cpus=1, resources={cluster.WORKER_RESOURCE: 1}, include_dashboard=False,
                 namespace=cluster.NAMESPACE, log_to_driver=False)  # fmt: skip
    loop = asyncio.get_running_loop()
    name, actor, _ = await loop.run_in_executor(
        None, lambda: cluster.start_worker(WorkerOptions(args.model, args.device, args.calls))
    )
    results: dict[str, dict[str, float]] = {}
    try:
        registry = cluster.registry()
        ids = [f"bench-{i}" for i in range(args.calls)]
        placement = await registry.place.remote(args.model, ids)
        assert placement is not None and placement.name == name, placement
        pid = await actor.pid.remote()
        remote = Timed(ClusterWorker(registry, args.model, placement))
        results["ray actor"] = await _drive(remote, args.calls, args.seconds, pid)
    finally:
        await loop.run_in_executor(None, cluster.stop_worker, name, actor)
    local = await WorkerProcess.start(WorkerOptions(args.model, args.device, args.calls))
    timed = Timed(local)
    results["local process"] = await _drive(timed, args.calls, args.seconds, local.process.pid)

    print(f"{args.calls} calls, {args.model}, {args.device}, {args.seconds:g} s each")
    print(f"{'worker':>14} {'ticks':>6} {'hop p50':>9} {'hop p99':>9} {'step p50':>9} "
          f"{'edge CPU/call':>14} {'worker CPU/call':>16}")  # fmt: skip
    for label, r in results.items():
        print(f"{label:>14} {r['ticks']:>6.0f} {r['hop_p50']:>7.2f}ms {r['hop_p99']:>7.2f}ms "
              f"{r['step_p50']:>7.1f}ms {r['edge_cpu_per_call']:>13.2f}% "
              f"{r['worker_cpu_per_call']:>15.2f}%")  # fmt: skip
    ray.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
