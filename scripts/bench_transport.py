#!/usr/bin/env python
"""Transport benchmark: N concurrent aiortc echo calls against ``s2s serve --model echo``.

The server runs in its own process pinned to CPU 0; the callers run in separate processes pinned
to the other CPU. Each caller sends pre-encoded Opus (so callers spend little CPU), a 40 ms 1 kHz
burst every second, and times each burst's echo.

Printed, per load level: call set-up (POST of the offer to ``connected``), data-channel open,
echo round trip (send of the packet holding a burst's start to arrival of the decoded frame
holding its echo's onset) p50/p95, server CPU%, and whether every call's audio stayed on time
(at least 97% of the expected frames in the window, echo p95 under 200 ms).

    .venv/bin/python scripts/bench_transport.py                     # ramp 1, 10, 20, 30, 40...
    .venv/bin/python scripts/bench_transport.py --levels 1,20 --client-prefetch 4
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fractions
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import percentile, serve  # noqa: E402

RATE = 48_000
FRAME = 960
PERIOD_FRAMES = 50  # one burst per second
BURST_FRAMES = 2
ON_TIME_FRAMES = 0.97
ON_TIME_P95_S = 0.200


# -- caller side ----------------------------------------------------------------------------------


def _encoded_period() -> list[bytes]:
    """One second of probe signal as Opus packets: a 40 ms 1 kHz burst, then silence."""
    import av
    import numpy as np

    ctx = av.CodecContext.create("libopus", "w")
    ctx.sample_rate, ctx.layout, ctx.format, ctx.bit_rate = RATE, "mono", "s16", 32_000
    ctx.time_base = fractions.Fraction(1, RATE)
    ctx.open()
    t = np.arange(FRAME * BURST_FRAMES) / RATE
    burst = (0.4 * 32767 * np.sin(2 * np.pi * 1000 * t)).astype(np.int16)
    signal_ = np.zeros(FRAME * PERIOD_FRAMES * 2, np.int16)
    signal_[: burst.size] = burst
    signal_[FRAME * PERIOD_FRAMES : FRAME * PERIOD_FRAMES + burst.size] = burst
    packets: list[bytes] = []
    for i in range(PERIOD_FRAMES * 2):
        frame = av.AudioFrame.from_ndarray(
            signal_[i * FRAME : (i + 1) * FRAME].reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate, frame.pts = RATE, i * FRAME
        frame.time_base = fractions.Fraction(1, RATE)
        packets += [bytes(p) for p in ctx.encode(frame)]
    # The encoder lags by its look-ahead; the second period is aligned to whole packets.
    return packets[PERIOD_FRAMES : 2 * PERIOD_FRAMES]


def _caller_process(
    url: str, n: int, warm_s: float, measure_s: float, prefetch: int, conn: Any
) -> None:
    os.sched_setaffinity(0, {os.cpu_count() - 1})  # type: ignore[operator]
    import uvloop

    conn.send(uvloop.run(_callers(url, n, warm_s, measure_s, prefetch)))


def _probe_process(url: str, n: int, prefetch: int, conn: Any) -> None:
    os.sched_setaffinity(0, {os.cpu_count() - 1})  # type: ignore[operator]
    import uvloop

    conn.send(uvloop.run(_setup_probes(url, n, prefetch)))


async def _setup_probes(url: str, n: int, prefetch: int) -> list[tuple[float, float]]:
    """Set-up and data-channel-open times of ``n`` calls made one after another."""
    from tests.peer import Peer

    timings = []
    for _ in range(n):
        peer = Peer(url, prefetch=prefetch)
        await peer.connect()
        await peer.wait_open()
        assert peer.setup_s is not None and peer.channel_open_s is not None
        timings.append((peer.setup_s, peer.channel_open_s))
        await peer.hangup()
        await peer.close()
    return timings


async def _callers(
    url: str, n: int, warm_s: float, measure_s: float, prefetch: int
) -> list[dict[str, Any]]:
    import av
    from aiortc.mediastreams import MediaStreamTrack

    from tests.peer import CallRefused, Peer

    period = _encoded_period()

    class ProbeMic(MediaStreamTrack):
        kind = "audio"

        def __init__(self) -> None:
            super().__init__()
            self.start: float | None = None
            self.count = 0
            self.burst_times: list[float] = []

        async def recv(self) -> av.Packet:
            loop = asyncio.get_running_loop()
            if self.start is None:
                self.start = loop.time()
            wait = self.start + self.count * FRAME / RATE - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            index = self.count % PERIOD_FRAMES
            packet = av.Packet(period[index])
            packet.pts, packet.time_base = self.count * FRAME, fractions.Fraction(1, RATE)
            if index == 0:
                self.burst_times.append(loop.time())
            self.count += 1
            return packet

    async def one_call(i: int) -> dict[str, Any]:
        await asyncio.sleep(i * 0.02)  # stagger set-ups like independent users
        mic = ProbeMic()
        peer = Peer(url, mic, prefetch=prefetch)  # type: ignore[arg-type]
        try:
            await peer.connect(timeout=20)
            await peer.wait_open(timeout=20)
        except (CallRefused, TimeoutError) as exc:
            await peer.close()
            return {"error": str(exc) or type(exc).__name__}
        loop = asyncio.get_running_loop()
        await asyncio.sleep(warm_s)
        window_start = loop.time()
        await asyncio.sleep(measure_s)
        window_end = loop.time()
        frames = [(t, pcm) for t, pcm in peer.frames if window_start <= t < window_end]
        latencies = _echo_latencies(mic.burst_times, frames)
        await peer.hangup()
        await peer.close()
        return {
            "setup_s": peer.setup_s,
            "open_s": peer.channel_open_s,
            "frames": len(frames),
            "expected": (window_end - window_start) * RATE / FRAME,
            "latencies": latencies,
        }

    return list(await asyncio.gather(*(one_call(i) for i in range(n))))


def _echo_latencies(burst_times: list[float], frames: list[tuple[float, Any]]) -> list[float]:
    import numpy as np

    latencies = []
    quiet = True
    for t, pcm in frames:
        loud = float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2))) / 32768 > 0.03
        if loud and quiet:
            sent = [b for b in burst_times if b <= t]
            if sent and t - sent[-1] < 0.9:
                latencies.append(t - sent[-1])
        quiet = not loud
    return latencies


# -- server side ----------------------------------------------------------------------------------


def _cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return math.nan
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _run_level(url: str, pid: int | None, n: int, args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    procs = max(1, math.ceil(n / args.calls_per_process))
    pipes, workers = [], []
    for k in range(procs):
        share = n // procs + (1 if k < n % procs else 0)
        parent, child = ctx.Pipe(duplex=False)
        worker = ctx.Process(
            target=_caller_process,
            args=(url, share, args.warm, args.measure, args.client_prefetch, child),
        )
        worker.start()
        pipes.append(parent)
        workers.append(worker)
    # Server CPU over the measuring window (callers are set up by then, barring stragglers).
    time.sleep(2.0 + args.warm + n * 0.02 / procs)
    cpu0, t0 = _cpu_seconds(pid), time.monotonic()
    callers0 = sum(_cpu_seconds(w.pid) for w in workers)
    time.sleep(args.measure * 0.8)
    elapsed = time.monotonic() - t0
    cpu = (_cpu_seconds(pid) - cpu0) / elapsed
    callers_cpu = (sum(_cpu_seconds(w.pid) for w in workers) - callers0) / elapsed
    results: list[dict[str, Any]] = []
    for parent, worker in zip(pipes, workers, strict=True):
        results += parent.recv()
        worker.join()
    return {**_summarise(n, results, cpu), "callers_cpu_pct": 100 * callers_cpu}


def _drift(latencies: list[float]) -> float:
    k = max(1, len(latencies) // 10)
    if len(latencies) < 2 * k:
        return math.nan
    return statistics.median(latencies[-k:]) - statistics.median(latencies[:k])


def _summarise(n: int, results: list[dict[str, Any]], cpu: float) -> dict[str, Any]:
    ok = [r for r in results if "error" not in r]
    latencies = [x for r in ok for x in r["latencies"]]
    on_time = sum(
        1
        for r in ok
        if r["frames"] >= ON_TIME_FRAMES * r["expected"]
        and r["latencies"]
        and percentile(r["latencies"], 0.95) < ON_TIME_P95_S
    )
    return {
        "calls": n,
        "failed": len(results) - len(ok),
        "on_time": on_time,
        "setup_p50_ms": 1000 * statistics.median([r["setup_s"] for r in ok]) if ok else math.nan,
        "open_p50_ms": 1000 * statistics.median([r["open_s"] for r in ok]) if ok else math.nan,
        "rtt_p50_ms": 1000 * percentile(latencies, 0.5),
        "rtt_p95_ms": 1000 * percentile(latencies, 0.95),
        "server_cpu_pct": 100 * cpu,
        "frames_pct": 100 * min((r["frames"] / r["expected"] for r in ok), default=0),
        # Echo latency at the end of the window minus at its start: a clock that drifts (or a
        # queue that grows) shows here over a long --measure.
        "rtt_drift_ms": 1000 * max((_drift(r["latencies"]) for r in ok), default=math.nan),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="an already running server (default: start one)")
    parser.add_argument(
        "--levels",
        default="1,10,20,30,40,50,60",
        help="comma-separated call counts to try, in order",
    )
    parser.add_argument("--warm", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--measure", type=float, default=8.0, help="seconds measured per level")
    parser.add_argument(
        "--client-prefetch",
        type=int,
        default=0,
        help="callers' jitter buffer prefetch (aiortc's default is 4)",
    )
    parser.add_argument(
        "--server-prefetch",
        type=int,
        default=0,
        help="server's --jitter-prefetch when this script starts it",
    )
    parser.add_argument("--server-pid", type=int, help="with --url: the pid for CPU figures")
    parser.add_argument("--calls-per-process", type=int, default=15)
    parser.add_argument(
        "--setup-probes",
        type=int,
        default=20,
        help="sequential single calls timed for set-up before the ramp",
    )
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        if args.url:
            url, pid = args.url.rstrip("/"), args.server_pid
        else:
            url, pid = stack.enter_context(serve(
                "--model", "echo", "--max-sessions", "500",
                "--jitter-prefetch", str(args.server_prefetch), cpus={0},
            ))  # fmt: skip
        _run(url, pid, args)


def _run(url: str, pid: int | None, args: argparse.Namespace) -> None:
    print(
        f"server pid {pid} pinned to CPU 0, callers on CPU {os.cpu_count() - 1}; "
        f"client prefetch {args.client_prefetch}, server prefetch {args.server_prefetch}"
    )
    if args.setup_probes:
        parent, child = mp.get_context("spawn").Pipe(duplex=False)
        worker = mp.get_context("spawn").Process(
            target=_probe_process, args=(url, args.setup_probes, args.client_prefetch, child)
        )
        worker.start()
        timings = parent.recv()
        worker.join()
        setups = [1000 * s for s, _ in timings]
        opens = [1000 * o for _, o in timings]
        print(
            f"set-up, {len(timings)} calls one at a time: connected p50 "
            f"{statistics.median(setups):.1f} ms p95 {percentile(setups, 0.95):.1f} ms; "
            f"data channel open p50 {statistics.median(opens):.1f} ms "
            f"p95 {percentile(opens, 0.95):.1f} ms"
        )
    header = (
        "calls",
        "failed",
        "on_time",
        "setup_p50_ms",
        "open_p50_ms",
        "rtt_p50_ms",
        "rtt_p95_ms",
        "server_cpu_pct",
        "callers_cpu_pct",
        "frames_pct",
        "rtt_drift_ms",
    )
    print(" ".join(f"{h:>15}" for h in header))
    best = 0
    for n in (int(x) for x in args.levels.split(",")):
        row = _run_level(url, pid, n, args)
        print(
            " ".join(
                f"{row[h]:>15.1f}" if isinstance(row[h], float) else f"{row[h]:>15}" for h in header
            ),
            flush=True,
        )
        if row["on_time"] == n and not row["failed"]:
            best = n
        else:
            break
    print(f"largest N with every call on time: {best}")


if __name__ == "__main__":
    main()
