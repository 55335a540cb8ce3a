#!/usr/bin/env python
"""Image upload benchmark: chunked JPEGs over the data channel while audio flows.

Starts ``s2s serve --model echo`` and calls it with a real aiortc peer whose microphone plays a
tone (echoed back, so audio flows both ways). For each size it uploads a noisy JPEG in
``s2s.image.chunk`` messages and prints the time from the first chunk sent to
``s2s.image.received``, and the received audio's inter-arrival jitter (p95 and max gap of 20 ms
packets) during the transfer next to the same figures with no transfer.

    .venv/bin/python scripts/bench_image.py --repeat 5
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import math
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import percentile, serve  # noqa: E402

CHUNK = 150_000
SIZES = {"100 KB": (380, 280), "500 KB": (850, 630), "2 MB": (1800, 1400)}


def _photo(size: tuple[int, int]) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = np.clip(120 + rng.integers(-60, 60, (size[1], size[0], 3)), 0, 255)
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, "JPEG", quality=95)
    return out.getvalue()


def _gaps(times: list[float]) -> tuple[float, float]:
    gaps = np.diff(times) * 1000
    return percentile(list(gaps), 0.95), float(gaps.max())


async def _run(url: str, repeat: int) -> None:
    from tests.peer import MicTrack, Peer
    from tests.signals import tone

    peer = Peer(url, MicTrack(tone(440, 600)))
    await peer.connect()
    await peer.next_event("session.created")
    loop = asyncio.get_running_loop()
    start = loop.time()
    await asyncio.sleep(3.0)
    quiet = [t for t, _ in peer.frames if t >= start + 1.0]
    p95, worst = _gaps(quiet)
    print(f"no transfer: packet gap p95 {p95:.1f} ms, max {worst:.1f} ms")
    for name, size in SIZES.items():
        data = _photo(size)
        acks, p95s, worsts = [], [], []
        for n in range(repeat):
            upload_id = f"{name}-{n}"
            total = math.ceil(len(data) / CHUNK)
            mark = len(peer.events)
            began = loop.time()
            for index in range(total):
                piece = base64.b64encode(data[index * CHUNK : (index + 1) * CHUNK]).decode()
                peer.send({"type": "s2s.image.chunk", "upload_id": upload_id, "index": index,
                           "total": total, "data": piece})  # fmt: skip
            peer.send({"type": "s2s.image.commit", "upload_id": upload_id})
            await peer.next_event("s2s.image.received", after=mark, timeout=30)
            done = loop.time()
            acks.append(1000 * (done - began))
            during = [t for t, _ in peer.frames if began <= t <= done + 0.1]
            if len(during) > 2:
                p95, worst = _gaps(during)
                p95s.append(p95)
                worsts.append(worst)
            await asyncio.sleep(0.5)
        print(f"{name} ({len(data) / 1e6:.2f} MB, {math.ceil(len(data) / CHUNK)} chunks): "
              f"first chunk -> received p50 {statistics.median(acks):.0f} ms, "
              f"max {max(acks):.0f} ms; packet gap while sending p95 "
              f"{statistics.median(p95s):.1f} ms, max {max(worsts):.1f} ms")  # fmt: skip
    await peer.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with serve("--model", "echo") as (url, _):
        import uvloop

        uvloop.run(_run(url, args.repeat))


if __name__ == "__main__":
    main()
