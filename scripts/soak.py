#!/usr/bin/env python
"""Soak: for a bounded time, calls come and go, some misbehave, the rest must lose nothing.

Starts ``s2s serve --model echo`` and, for ``--seconds``, keeps ``--calls`` well-behaved echo
calls going that churn: each lasts a few seconds (``--call-seconds``), then hangs up and a new
one takes its place. Each sends a tone and a ``session.update`` every second (each must be
answered) and reads the server's RTP off the wire: every packet of its call must be there
(sequence numbers without a gap, one packet per 20 ms). Meanwhile a stream of misbehaving
callers come and go: garbage events, oversized image uploads, and peers that vanish without
hanging up (a process killed mid-call).

Every 10 s it samples the server's memory (RSS), asyncio tasks, threads and open file
descriptors; at the end it prints those over time, how much RSS grew over the second half, and
the good calls' packets and answers.

    .venv/bin/python scripts/soak.py --seconds 600 --calls 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
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
    import numpy as np

    from tests.peer import CallRefused, MicTrack, Peer
    from tests.signals import tone

    # Speech-like: a 200 ms tone every second, silence between (a continuous tone would keep
    # every Opus encoder busy, a load test rather than a soak).
    second = np.concatenate([tone(440, 0.2, amplitude=0.2), np.zeros(38_400, np.int16)])
    speech = np.tile(second, int(seconds) + 5)
    peer = Peer(url, MicTrack(speech, encode=True), decode=False)
    try:
        await peer.connect(timeout=20)
        await peer.next_event("session.created", timeout=20)
    except (TimeoutError, CallRefused) as exc:
        ice = peer.pc.iceConnectionState
        await peer.close()
        return {"dropped": f"set-up failed ({exc!r}; connection {peer.states}, ICE {ice})"}
    loop = asyncio.get_running_loop()
    start = loop.time() + 1.0
    sent = 0
    while loop.time() < start + seconds - 1.0:
        if peer.channel.readyState != "open":
            errors = [e for e in peer.events if e["type"] == "error"]
            await peer.close()
            return {"dropped": f"channel {peer.channel.readyState}, connection {peer.states}, "
                               f"errors {errors[-1:]}"}  # fmt: skip
        peer.send({"type": "session.update", "event_id": f"u{sent}", "session": {}})
        sent += 1
        await asyncio.sleep(1.0)
    end = loop.time()
    await asyncio.sleep(1.0)  # the last answers and packets arrive
    rtp = [r for r in peer.rtp if start <= r[0] < end]
    answered = sum(1 for e in peer.events if e["type"] == "session.updated")
    await peer.hangup()
    await peer.close()
    sequence = rtp[-1][2] - rtp[0][2] + 1 if rtp else 0
    return {"packets": len(rtp), "sequence": sequence % 65536,
            "expected": (end - start) / 0.02, "sent": sent, "answered": answered}  # fmt: skip


async def _churning_slot(url: str, deadline: float, call_s: float, rng: random.Random,
                         results: list[dict[str, Any]]) -> None:  # fmt: skip
    """One of ``--calls`` places: calls of about ``call_s`` seconds, one after another."""
    loop = asyncio.get_running_loop()
    while (left := deadline - loop.time()) > 4:
        results.append(await _good_call(url, min(left - 1, rng.uniform(0.5, 1.5) * call_s)))


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


def _sample(url: str, pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    fields = {k: v.split()[0] for k, _, v in (line.partition(":") for line in status) if v.strip()}
    return {
        "rss_mb": int(fields["VmRSS"]) / 1024,
        "threads": int(fields["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "tasks": _health(url)["tasks"],
        "calls": _health(url)["calls"],
    }


def _misbehaving_process(url: str, seconds: float, conn: Any) -> None:
    import uvloop

    conn.send(uvloop.run(_misbehave(url, seconds)))


async def _misbehave(url: str, seconds: float) -> dict[str, int]:
    rng = random.Random(7)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    bad = {"garbage": 0, "vanished": 0}
    while loop.time() < deadline:
        if rng.random() < 0.7:
            await _garbage_call(url, rng)
            bad["garbage"] += 1
        else:
            await _vanishing_call(url)
            bad["vanished"] += 1
    return bad


async def _soak(
    url: str, pid: int, seconds: float, calls: int, call_s: float, misbehave: bool
) -> None:
    await asyncio.sleep(1.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + seconds
    samples = [(0.0, _sample(url, pid))]

    async def sampler() -> None:
        while loop.time() < deadline:
            await asyncio.sleep(10.0)
            samples.append((loop.time() - started, await asyncio.to_thread(_sample, url, pid)))

    results: list[dict[str, Any]] = []
    # The misbehaving callers run in a process of their own: pushing 40 MB of oversized uploads
    # through aiortc's Python SCTP would otherwise stall the good callers' microphones.
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe(duplex=False)
    misbehaving = context.Process(
        target=_misbehaving_process, args=(url, seconds - 3 if misbehave else 0, child)
    )
    misbehaving.start()
    await asyncio.gather(
        sampler(),
        *(_churning_slot(url, deadline, call_s, random.Random(i), results) for i in range(calls)),
    )
    bad = await asyncio.to_thread(parent.recv)
    misbehaving.join()
    # Vanished peers end after the server's peer timeout (3 s here).
    async with asyncio.timeout(30):
        while _health(url)["calls"]:  # noqa: ASYNC110 - another process's state: poll it
            await asyncio.sleep(0.5)
    after = _sample(url, pid)
    print("   t_s  calls  rss_mb  tasks  threads  fds")
    for t, m in [*samples, (loop.time() - started, after)]:
        print(f"{t:6.0f} {m['calls']:6.0f} {m['rss_mb']:7.1f} {m['tasks']:6.0f} "
              f"{m['threads']:8.0f} {m['fds']:4.0f}")  # fmt: skip
    half = [m for t, m in samples if t >= seconds / 2]
    if half:
        growth = 100 * (samples[-1][1]["rss_mb"] / half[0]["rss_mb"] - 1)
        print(f"RSS over the second half: {half[0]['rss_mb']:.1f} -> "
              f"{samples[-1][1]['rss_mb']:.1f} MB ({growth:+.1f}%)")  # fmt: skip
    dropped = [r["dropped"] for r in results if "dropped" in r]
    results = [r for r in results if "dropped" not in r]
    whole = sum(1 for r in results if r["packets"] == r["sequence"])
    rate = [r["packets"] / r["expected"] for r in results if r["expected"]]
    print(f"good calls that failed: {len(dropped)} {dropped[:3]}")
    print(f"good calls: {len(results)}; every packet there (no sequence gap) in {whole}; "
          f"packets per 20 ms {100 * min(rate):.1f}-{100 * max(rate):.1f}%; events answered "
          f"{sum(r['answered'] for r in results)}/{sum(r['sent'] for r in results)}")  # fmt: skip
    print(
        f"misbehaving calls: {bad['garbage']} sent garbage / oversized uploads, "
        f"{bad['vanished']} vanished without hanging up"
    )
    print(f"after every call ended: {after}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--calls", type=int, default=6, help="good calls at any time")
    parser.add_argument(
        "--no-misbehaving", action="store_true", help="good calls only (to compare)"
    )
    parser.add_argument("--call-seconds", type=float, default=15.0, help="a good call's length")
    args = parser.parse_args()
    started = time.monotonic()
    with serve("--model", "echo", "--peer-timeout", "3", "--max-sessions", "100") as (url, pid):
        import uvloop

        uvloop.run(
            _soak(url, pid, args.seconds, args.calls, args.call_seconds, not args.no_misbehaving)
        )
    print(f"soak took {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
