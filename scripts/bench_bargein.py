#!/usr/bin/env python
"""Barge-in benchmark: how fast a reply goes silent at the caller when interrupted.

Starts ``s2s serve`` (default ``local`` model) in its own process and calls it from this one
with a real aiortc peer. Each trial asks for a long reply, lets it play for a second, then
either talks over it (espeak-ng speech into the microphone; server VAD barges in) or sends
``response.cancel`` + ``output_audio_buffer.clear``. Printed: p50/p95 of the time from the
caller's speech onset (or the cancel) to the last loud reply frame received.

    .venv/bin/python scripts/bench_bargein.py --trials 10
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import percentile, serve  # noqa: E402

LONG = (
    "please say this is a long answer that goes on for quite a while. it has many sentences. "
    "each one is spoken slowly and clearly. the caller will talk over it at some point. "
    "then it should stop at once. nobody should hear the rest of it."
)


async def _trials(
    url: str, n: int, prefetch: int, phrase: str
) -> tuple[list[float], list[float], list[float]]:
    from tests.peer import FRAME, MicTrack, Peer
    from tests.signals import rms
    from tests.speech import speak

    speech = speak(phrase, voice="en-us+f2")
    onset_offset = int(0.3 * 48_000)  # speak() pads 0.3 s of quiet before the words
    by_voice: list[float] = []
    by_cancel: list[float] = []
    detected: list[float] = []
    loop = asyncio.get_running_loop()
    for i in range(2 * n):
        peer = Peer(url, MicTrack(), prefetch=prefetch)
        await peer.connect()
        await peer.next_event("session.created")
        mark = len(peer.events)
        peer.send({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user",
            "content": [{"type": "input_text", "text": LONG}]}})  # fmt: skip
        peer.send({"type": "response.create"})
        await peer.next_event("output_audio_buffer.started", after=mark, timeout=20)
        await asyncio.sleep(1.0)
        if i % 2 == 0:
            start = peer.mic.play(speech) + onset_offset
            await peer.next_event("input_audio_buffer.speech_started", after=mark, timeout=20)
            detected_at = loop.time()
            await peer.next_event("response.done", after=mark, timeout=20)
            interrupted_at = peer.mic.frame_times[start // FRAME]
            detected.append(detected_at - interrupted_at)
        else:
            interrupted_at = loop.time()
            peer.send({"type": "response.cancel"})
            peer.send({"type": "output_audio_buffer.clear"})
            await peer.next_event("response.done", after=mark, timeout=20)
        await asyncio.sleep(0.5)  # long enough for anything still in flight to arrive
        loud = [t for t, pcm in peer.frames if t > interrupted_at and rms(pcm) > 0.02]
        latency = (loud[-1] - interrupted_at) if loud else 0.0
        (by_voice if i % 2 == 0 else by_cancel).append(latency)
        await peer.close()
    return by_voice, by_cancel, detected


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=10, help="trials of each kind")
    parser.add_argument("--model", default="local")
    parser.add_argument(
        "--phrase",
        default="wait, hold on",
        help="what the caller says over the reply (VAD onset time depends on it)",
    )
    parser.add_argument(
        "--client-prefetch",
        type=int,
        default=0,
        help="the caller's jitter buffer prefetch (aiortc's default is 4)",
    )
    args = parser.parse_args()
    with serve("--model", args.model) as (url, _):
        import uvloop

        voice, cancel, detected = uvloop.run(_trials(url, args.trials,
                                           args.client_prefetch, args.phrase))  # fmt: skip
        print(
            f"caller speech onset -> speech_started at the caller: "
            f"p50 {1000 * statistics.median(detected):.0f} ms, "
            f"p95 {1000 * percentile(detected, 0.95):.0f} ms"
        )
        for name, values in (("caller speech onset", voice), ("response.cancel sent", cancel)):
            print(
                f"{name} -> last loud reply frame at the caller, {len(values)} trials: "
                f"p50 {1000 * statistics.median(values):.0f} ms, "
                f"p95 {1000 * percentile(values, 0.95):.0f} ms, max {1000 * max(values):.0f} ms"
            )


if __name__ == "__main__":
    main()
