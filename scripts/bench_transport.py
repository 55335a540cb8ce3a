#!/usr/bin/env python
"""Transport benchmark: N concurrent aiortc echo calls against ``s2s serve --model echo``.

The server runs in its own process pinned to CPU 0; the callers run in separate processes pinned
to the other CPU. Each caller sends pre-encoded Opus (so callers spend little CPU), a 40 ms 1 kHz
burst every second, and times each burst's echo.

Printed, per load level: call set-up (POST of the offer to ``connected``), data-channel open,
echo round trip (send of the packet holding a burst's start to arrival of the packet holding
its echo's onset) p50/p95, server CPU%, whether every call's audio stayed on time (at least 97%
of the expected packets in the window, echo p95 under 200 ms), and how each caller's inbound RTP
kept time: packets per 20 ms of wall time and RTP time per second (the calls furthest from 100%),
and how late packets arrived against their RTP timestamps (the worst call's p99; a stream that
runs fast or slow drifts here).

    .venv/bin/python scripts/bench_transport.py                     # tuned, ramp 1, 10, 20...
    .venv/bin/python scripts/bench_transport.py --compare-untuned   # untuned vs tuned, one run
    .venv/bin/python scripts/bench_transport.py --setup untuned --levels 1 --client 0
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
from dataclasses import dataclass
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
    url: str, n: int, warm_s: float, measure_s: float, client: str, cpus: set[int], conn: Any
) -> None:
    os.sched_setaffinity(0, cpus)
    import uvloop

    conn.send(uvloop.run(_callers(url, n, warm_s, measure_s, client)))


def _probe_process(url: str, n: int, client: str, cpus: set[int], conn: Any) -> None:
    os.sched_setaffinity(0, cpus)
    import uvloop

    conn.send(uvloop.run(_setup_probes(url, n, client)))


def _peer(url: str, client: str, mic: Any = None) -> Any:
    """A caller: "tuned" receives through s2s's inbound path, "stock" through aiortc's (its
    80 ms jitter buffer), a number through aiortc's with that jitter buffer prefetch."""
    from tests.peer import Peer

    if client == "rtp":
        return Peer(url, mic, prefetch=None, decode=False)
    if client == "tuned":
        return Peer(url, mic, prefetch=None, tuned=True)
    if client == "stock":
        return Peer(url, mic, prefetch=None)
    return Peer(url, mic, prefetch=int(client))


async def _setup_probes(url: str, n: int, client: str) -> list[tuple[float, float]]:
    """Set-up and data-channel-open times of ``n`` calls made one after another."""
    timings = []
    for _ in range(n):
        peer = _peer(url, client)
        await peer.connect()
        await peer.wait_open()
        assert peer.setup_s is not None and peer.channel_open_s is not None
        timings.append((peer.setup_s, peer.channel_open_s))
        await peer.hangup()
        await peer.close()
    return timings


async def _callers(
    url: str, n: int, warm_s: float, measure_s: float, client: str
) -> list[dict[str, Any]]:
    import av
    from aiortc.mediastreams import MediaStreamTrack

    from tests.peer import CallRefused, RtpTiming

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
        peer = _peer(url, client, mic)
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
        rtp = [r for r in peer.rtp if window_start <= r[0] < window_end]
        timing = RtpTiming.of(rtp)
        if client == "rtp":
            latencies = _echo_latencies_rtp(mic.burst_times, rtp)
            received = len(rtp)
        else:
            latencies = _echo_latencies(mic.burst_times, frames)
            received = len(frames)
        await peer.hangup()
        await peer.close()
        return {
            "setup_s": peer.setup_s,
            "open_s": peer.channel_open_s,
            "frames": received,
            "expected": (window_end - window_start) * RATE / FRAME,
            "latencies": latencies,
            "packet_rate": timing.packet_rate,
            "clock_rate": timing.clock_rate,
            "rtp_lag_p99_s": timing.lag_p99_s,
        }

    return list(await asyncio.gather(*(one_call(i) for i in range(n))))


def _echo_latencies(burst_times: list[float], frames: list[tuple[float, Any]]) -> list[float]:
    """Echo onsets in decoded frames: a frame louder than -30 dBFS RMS after a quiet one."""
    import numpy as np

    loudness = [
        (t, float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2))) / 32768 > 0.03)
        for t, pcm in frames
    ]
    return _onset_latencies(burst_times, loudness)


def _echo_latencies_rtp(
    burst_times: list[float], rtp: list[tuple[float, int, int, int]]
) -> list[float]:
    """Echo onsets read off the packets without decoding them: the server sends a 3-byte
    packet for silence and tens of bytes for the 1 kHz burst."""
    return _onset_latencies(burst_times, [(t, size > _LOUD_PACKET_BYTES) for t, _, _, size in rtp])


def _onset_latencies(burst_times: list[float], loudness: list[tuple[float, bool]]) -> list[float]:
    """For each loud arrival after a quiet one, the time since the burst sent just before it."""
    latencies = []
    quiet = True
    for t, loud in loudness:
        if loud and quiet:
            sent = [b for b in burst_times if b <= t]
            if sent and t - sent[-1] < 0.9:
                latencies.append(t - sent[-1])
        quiet = not loud
    return latencies


_LOUD_PACKET_BYTES = 20


# -- server side ----------------------------------------------------------------------------------


def _cpu_seconds(pid: int | None) -> float:
    """CPU time of ``pid`` and every process below it (a server's workers)."""
    if pid is None:
        return math.nan
    stats = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stats[int(entry.name)] = (entry / "stat").read_text().rsplit(")", 1)[1].split()
    tree, total = {pid}, 0.0
    for p in sorted(stats):  # children have larger pids than their parents here
        fields = stats[p]
        if p in tree or int(fields[1]) in tree:
            tree.add(p)
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _run_level(
    url: str, pid: int | None, n: int, args: argparse.Namespace, setup: Setup
) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    procs = max(1, math.ceil(n / args.calls_per_process))
    pipes, workers = [], []
    for k in range(procs):
        share = n // procs + (1 if k < n % procs else 0)
        parent, child = ctx.Pipe(duplex=False)
        worker = ctx.Process(
            target=_caller_process,
            args=(url, share, args.warm, args.measure, setup.client, setup.caller_cpus, child),
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
    summary = _summarise(n, results, cpu, echo=args.model == "echo")
    return {**summary, "callers_cpu_pct": 100 * callers_cpu}


def _drift(latencies: list[float]) -> float:
    k = max(1, len(latencies) // 10)
    if len(latencies) < 2 * k:
        return math.nan
    return statistics.median(latencies[-k:]) - statistics.median(latencies[:k])


def _summarise(
    n: int, results: list[dict[str, Any]], cpu: float, *, echo: bool = True
) -> dict[str, Any]:
    """``echo``: the server echoes, so a call is also on time only with echo p95 under 200 ms;
    a model's own speech has no echo to time, and its packets' lag against their RTP time
    counts instead (p99 under 200 ms)."""
    ok = [r for r in results if "error" not in r]
    latencies = [x for r in ok for x in r["latencies"]]
    on_time = sum(
        1
        for r in ok
        if r["frames"] >= ON_TIME_FRAMES * r["expected"]
        and (
            (r["latencies"] and percentile(r["latencies"], 0.95) < ON_TIME_P95_S)
            if echo
            else r["rtp_lag_p99_s"] < ON_TIME_P95_S
        )
    )
    short = sum(1 for r in ok if r["frames"] < ON_TIME_FRAMES * r["expected"])
    unheard = sum(1 for r in ok if not r["latencies"])
    slow = sum(
        1 for r in ok if r["latencies"] and percentile(r["latencies"], 0.95) >= ON_TIME_P95_S
    )
    return {
        "calls": n,
        "failed": len(results) - len(ok),
        "on_time": on_time,
        # Why calls missed (one call may count in several).
        "missed": f"{short} short of frames, {slow} with echo p95 >= {1000 * ON_TIME_P95_S:.0f} "
        f"ms, {unheard} with no echo heard",
        "setup_p50_ms": 1000 * statistics.median([r["setup_s"] for r in ok]) if ok else math.nan,
        "open_p50_ms": 1000 * statistics.median([r["open_s"] for r in ok]) if ok else math.nan,
        "rtt_p50_ms": 1000 * percentile(latencies, 0.5),
        "rtt_p95_ms": 1000 * percentile(latencies, 0.95),
        "server_cpu_pct": 100 * cpu,
        "frames_pct": 100 * min((r["frames"] / r["expected"] for r in ok), default=0),
        # Echo latency at the end of the window minus at its start: a clock that drifts (or a
        # queue that grows) shows here over a long --measure.
        "rtt_drift_ms": 1000 * max((_drift(r["latencies"]) for r in ok), default=math.nan),
        # Each caller's inbound RTP against its own clock: packets per 20 ms of wall time
        # (the calls furthest from 100%), and how late packets came against their timestamps
        # (the worst call's p99).
        "pkt_rate_pct": _extremes([100 * r["packet_rate"] for r in ok]),
        "rtp_clock_pct": _extremes([100 * r["clock_rate"] for r in ok]),
        "rtp_lag_p99_ms": 1000 * max((r["rtp_lag_p99_s"] for r in ok), default=math.nan),
    }


def _extremes(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}" if values else "-"


@dataclass(frozen=True)
class Setup:
    """One way of running server and callers."""

    name: str
    server_args: tuple[str, ...]
    server_cpus: set[int] | None
    caller_cpus: set[int]
    client: str


CPUS = set(range(os.cpu_count() or 1))
LAST = {max(CPUS)}


def _setups(args: argparse.Namespace) -> list[Setup]:
    # The callers are the measuring instrument, so every setup gets the same ones: "rtp" reads
    # the packets as they come off the wire and decodes nothing (cheap, no buffering of its
    # own); --client tuned decodes through s2s's inbound path, --client stock puts aiortc's 80 ms
    # jitter buffer back on the caller's side too.
    stock = Setup("untuned", ("--transport", "stock", "--workers", "1"), {0}, LAST, "rtp")
    tuned_1 = Setup("tuned-1", ("--transport", "tuned", "--workers", "1"), {0}, LAST, "rtp")
    tuned = Setup("tuned", ("--transport", "tuned", "--workers", "0"), None, CPUS, "rtp")
    if args.compare_untuned:
        return [stock, tuned_1, tuned]
    chosen = {"untuned": stock, "tuned-1": tuned_1, "tuned": tuned}[args.setup]
    if args.client:
        chosen = Setup(chosen.name, chosen.server_args, chosen.server_cpus,
                       chosen.caller_cpus, args.client)  # fmt: skip
    return [chosen]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="an already running server (default: start one)")
    parser.add_argument(
        "--levels",
        default="1,10,20,30,40,50,60,70",
        help="comma-separated call counts to try, in order (stops at the first miss)",
    )
    parser.add_argument("--warm", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--measure", type=float, default=8.0, help="seconds measured per level")
    parser.add_argument(
        "--setup",
        choices=("untuned", "tuned-1", "tuned"),
        default="tuned",
        help="untuned: aiortc's stock media path, one process on CPU 0; "
        "tuned-1: s2s's path, one process on CPU 0; tuned: s2s's path, one worker per core "
        "(callers share the cores)",
    )
    parser.add_argument(
        "--compare-untuned",
        action="store_true",
        help="run untuned, tuned-1 and tuned one after another and compare them",
    )
    parser.add_argument(
        "--client",
        help="callers' receive path: rtp (packets only, no decoding), tuned, stock (aiortc's "
        "80 ms jitter buffer) or an aiortc jitter buffer prefetch in frames (default: rtp)",
    )
    parser.add_argument(
        "--model",
        default="echo",
        help="the server's model; with another than echo (moshi:models/tiny-moshi, say) calls "
        "are on time by their packets (count and lag against RTP time), not by echo",
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
    summaries = []
    for setup in _setups(args):
        with contextlib.ExitStack() as stack:
            if args.url:
                url, pid = args.url.rstrip("/"), args.server_pid
            else:
                url, pid = stack.enter_context(serve(
                    "--model", args.model, "--max-sessions",
                    "500" if args.model == "echo" else "64", *setup.server_args,
                    cpus=setup.server_cpus,
                ))  # fmt: skip
            summaries.append(_run(url, pid, args, setup))
    if len(summaries) > 1:
        print("\nside by side (same machine, same run):")
        keys = ("setup", "calls_held", "cpu_pct_per_call", "rtt_p50_ms_1", "rtt_p95_ms_1",
                "setup_p50_ms", "open_p50_ms")  # fmt: skip
        print(" ".join(f"{k:>16}" for k in keys))
        for row in summaries:
            print(" ".join(
                f"{row[k]:>16.1f}" if isinstance(row[k], float) else f"{row[k]:>16}" for k in keys
            ))  # fmt: skip


def _run(url: str, pid: int | None, args: argparse.Namespace, setup: Setup) -> dict[str, Any]:
    print(
        f"\n== {setup.name}: server {' '.join(setup.server_args)} (pid {pid}) on CPUs "
        f"{sorted(setup.server_cpus or CPUS)}, callers ({setup.client}) on CPUs "
        f"{sorted(setup.caller_cpus)}",
        flush=True,
    )
    summary: dict[str, Any] = {"setup": setup.name, "setup_p50_ms": math.nan,
                               "open_p50_ms": math.nan}  # fmt: skip
    if args.setup_probes:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe(duplex=False)
        worker = ctx.Process(
            target=_probe_process,
            args=(url, args.setup_probes, setup.client, setup.caller_cpus, child),
        )
        worker.start()
        timings = parent.recv()
        worker.join()
        setups = [1000 * s for s, _ in timings]
        opens = [1000 * o for _, o in timings]
        summary["setup_p50_ms"] = statistics.median(setups)
        summary["open_p50_ms"] = statistics.median(opens)
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
        "pkt_rate_pct",
        "rtp_clock_pct",
        "rtp_lag_p99_ms",
    )
    print(" ".join(f"{h:>15}" for h in header))
    best, best_cpu = 0, math.nan
    for n in (int(x) for x in args.levels.split(",")):
        row = _run_level(url, pid, n, args, setup)
        print(
            " ".join(
                f"{row[h]:>15.1f}" if isinstance(row[h], float) else f"{row[h]:>15}" for h in header
            ),
            flush=True,
        )
        if row["on_time"] < n - row["failed"]:
            print(f"{'':>15} missed: {row['missed']}", flush=True)
        if n == 1:
            summary["rtt_p50_ms_1"], summary["rtt_p95_ms_1"] = row["rtt_p50_ms"], row["rtt_p95_ms"]
        if row["on_time"] == n and not row["failed"]:
            best, best_cpu = n, row["server_cpu_pct"] / n
        else:
            break
    print(f"largest N with every call on time: {best}")
    summary.setdefault("rtt_p50_ms_1", math.nan)
    summary.setdefault("rtt_p95_ms_1", math.nan)
    return {**summary, "calls_held": best, "cpu_pct_per_call": best_cpu}


if __name__ == "__main__":
    main()
