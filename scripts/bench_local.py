#!/usr/bin/env python
"""A turn-based model under load (the default ``local``, or ``--model``): turn latency and CPU
per talking call.

Starts ``s2s serve`` (``local``, or ``--model``, whose worker process is counted with it) in its
own process; callers run in another process. Each caller
speaks an espeak-ng sentence, waits for the whole reply, pauses, and speaks again, for the
measured window. Printed per number of simultaneous calls: turn latency (the caller's last
speech sample sent -> first loud reply frame received; it includes the VAD's 500 ms of silence
before a turn ends) p50/p95, server CPU in cores, CPU per talking call, and whether every call
got every reply.

    .venv/bin/python scripts/bench_local.py --levels 1,2,4,8 --measure 30
    .venv/bin/python scripts/bench_local.py --model qwen3-omni:models/tiny-qwen3-omni --levels 1,4
"""

from __future__ import annotations

import argparse
import asyncio
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

SENTENCES = [
    "hello there how are you today",
    "the weather is nice today",
    "I would like a cup of coffee",
    "what am I looking at",
]


def _cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its live children (the ASR worker processes)."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if stat.parent.name == str(pid) or fields[1] == str(pid):
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def _talk(url: str, index: int, seconds: float) -> dict[str, Any]:
    from tests.peer import FRAME, MicTrack, Peer
    from tests.signals import rms
    from tests.speech import speak

    loop = asyncio.get_running_loop()
    await asyncio.sleep(index * 0.7)  # callers do not all speak at the same instant
    peer = Peer(url, MicTrack())
    await peer.connect(timeout=30)
    await peer.next_event("session.created", timeout=30)
    latencies: list[float] = []
    turns = replies = 0
    end = loop.time() + seconds
    while loop.time() < end:
        speech = speak(SENTENCES[turns % len(SENTENCES)], voice="en-us+f2")
        mark = len(peer.events)
        start = peer.mic.play(speech)
        last_sample = start + speech.size - int(0.3 * 48_000)  # speak() pads 0.3 s after
        turns += 1
        try:
            await peer.next_event("response.done", after=mark, timeout=20)
        except TimeoutError:
            continue
        replies += 1
        spoken_end = peer.mic.frame_times[min(len(peer.mic.frame_times) - 1, last_sample // FRAME)]
        loud = [t for t, pcm in peer.frames if t > spoken_end + 0.05 and rms(pcm) > 0.02]
        if loud:
            latencies.append(loud[0] - spoken_end)
        await asyncio.sleep(1.0)
    await peer.close()
    return {"turns": turns, "replies": replies, "latencies": latencies}


def _callers(url: str, n: int, seconds: float, conn: Any) -> None:
    import uvloop

    async def run() -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(_talk(url, i, seconds) for i in range(n))))

    conn.send(uvloop.run(run()))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--levels", default="1,2,4,8")
    parser.add_argument("--measure", type=float, default=30.0, help="seconds of talking")
    parser.add_argument("--model", default="local", help="as for s2s serve")
    args = parser.parse_args()
    with serve("--model", args.model) as (url, pid):
        print(f"{'calls':>6} {'turns':>6} {'replies':>8} {'turn_p50_ms':>12} {'turn_p95_ms':>12} "
              f"{'server_cores':>13} {'cores_per_call':>15}")  # fmt: skip
        for n in (int(x) for x in args.levels.split(",")):
            ctx = mp.get_context("spawn")
            parent, child = ctx.Pipe(duplex=False)
            worker = ctx.Process(target=_callers, args=(url, n, args.measure, child))
            cpu0, t0 = _cpu_seconds(pid), time.monotonic()
            worker.start()
            results = parent.recv()
            worker.join()
            cores = (_cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
            latencies = [x for r in results for x in r["latencies"]]
            turns = sum(r["turns"] for r in results)
            replies = sum(r["replies"] for r in results)
            print(f"{n:>6} {turns:>6} {replies:>8} {1000 * statistics.median(latencies):>12.0f} "
                  f"{1000 * percentile(latencies, 0.95):>12.0f} {cores:>13.2f} {cores / n:>15.3f}",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
