#!/usr/bin/env python
"""Soak: for a bounded time, calls come and go, some misbehave, the rest must lose nothing.

Starts ``s2s serve --model echo`` and, for ``--seconds``, keeps ``--calls`` well-behaved callers
that send a tone and a ``session.update`` every second (each must be answered), while a stream
of misbehaving callers come and go: garbage events, oversized image uploads, and peers that
vanish without hanging up (a process killed mid-call). At the end it prints, for the good calls,
audio frames received vs expected and events answered vs sent, and the server's memory and task
count before and after (once every call has ended).

    .venv/bin/python scripts/soak.py --seconds 60 --calls 6
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import serve  # noqa: E402


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _health(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url + "/healthz", timeout=5) as resp:
        result: dict[str, Any] = json.load(resp)
        return result


async def _good_call(url: str, seconds: float) -> dict[str, Any]:
    from tests.peer import MicTrack, Peer
    from tests.signals import tone

    peer = Peer(url, MicTrack(tone(440, seconds + 5, amplitude=0.2)))
    await peer.connect(timeout=20)
    await peer.next_event("session.created", timeout=20)
    loop = asyncio.get_running_loop()
    start = loop.time() + 1.0
    sent = 0
    while loop.time() < start + seconds - 1.0:
        peer.send({"type": "session.update", "event_id": f"u{sent}", "session": {}})
        sent += 1
        await asyncio.sleep(1.0)
    end = loop.time()
    await asyncio.sleep(1.0)  # the last answers and frames arrive
    frames = sum(1 for t, _ in peer.frames if start <= t < end)
    answered = sum(1 for e in peer.events if e["type"] == "session.updated")
    await peer.hangup()
    await peer.close()
    return {"frames": frames, "expected": (end - start) / 0.02, "sent": sent, "answered": answered}


async def _garbage_call(url: str, rng: random.Random) -> None:
    from tests.peer import Peer

    peer = Peer(url)
    await peer.connect(timeout=20)
    await peer.wait_open(timeout=20)
    for _ in range(rng.randint(5, 40)):
        peer.send(rng.choice(["{", "[]", '{"type": "nope"}', "x" * 5000, '{"type": 7}']))
        await asyncio.sleep(0.01)
    if rng.random() < 0.5:
        big = "A" * 200_000
        for i in range(200):  # far past the per-call limit on bytes in flight
            peer.send({"type": "s2s.image.chunk", "upload_id": "big", "index": i,
                       "total": 200, "data": big})  # fmt: skip
    await asyncio.sleep(rng.uniform(0.5, 2.0))
    await peer.close()


async def _vanishing_call(url: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.vanishing_client", url, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        async with asyncio.timeout(30):
            await proc.stdout.readline()  # type: ignore[union-attr]
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()


async def _soak(url: str, pid: int, seconds: float, calls: int) -> None:
    rng = random.Random(7)
    await asyncio.sleep(1.0)
    before = _health(url)
    rss_before = _rss_mb(pid)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    good = asyncio.gather(*(_good_call(url, seconds) for _ in range(calls)))
    bad = {"garbage": 0, "vanished": 0}
    while loop.time() < deadline - 3:
        if rng.random() < 0.7:
            await _garbage_call(url, rng)
            bad["garbage"] += 1
        else:
            await _vanishing_call(url)
            bad["vanished"] += 1
    results = await good
    # Vanished peers end after the server's peer timeout (3 s here).
    async with asyncio.timeout(30):
        while _health(url)["calls"]:  # noqa: ASYNC110 - another process's state: poll it
            await asyncio.sleep(0.5)
    after = _health(url)
    rss_after = _rss_mb(pid)
    for i, r in enumerate(results):
        print(f"good call {i}: frames {r['frames']}/{r['expected']:.0f} "
              f"({100 * r['frames'] / r['expected']:.1f}%), events answered "
              f"{r['answered']}/{r['sent']}")  # fmt: skip
    print(
        f"misbehaving calls: {bad['garbage']} sent garbage / oversized uploads, "
        f"{bad['vanished']} vanished without hanging up"
    )
    print(
        f"server memory {rss_before:.0f} MB -> {rss_after:.0f} MB; "
        f"tasks {before['tasks']} -> {after['tasks']}; calls at the end {after['calls']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--calls", type=int, default=6)
    args = parser.parse_args()
    started = time.monotonic()
    with serve("--model", "echo", "--peer-timeout", "3", "--max-sessions", "100") as (url, pid):
        import uvloop

        uvloop.run(_soak(url, pid, args.seconds, args.calls))
    print(f"soak took {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
