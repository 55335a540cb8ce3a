"""A caller for the lossy-link tests, run inside the client's network namespace.

It speaks a sentence to an echo server, records what comes back and prints one JSON line: the
correlation of the echo with what was said (window by window), the share of the sentence that
came back, and the server's last ``s2s.session.stats`` (its inbound recovery counts).

The loss starts once the call is up: the caller prints ``ready`` when its data channel is open
and waits for a line on stdin, which the test sends after it has impaired the link. Set-up over
a lossy link is a different question (DTLS and SCTP back off for seconds per lost handshake
packet), and a run of unlucky drops there made this test flaky.
"""

from __future__ import annotations

import asyncio
import json
import sys

import numpy as np

from tests.peer import MicTrack, Peer
from tests.speech import speak

SENTENCE = "The quick brown fox jumps over the lazy dog, then it runs back home to sleep."


def best_correlation(sent: np.ndarray, heard: np.ndarray) -> tuple[float, float]:
    """How much of ``sent`` came back in ``heard``: the mean, over the loud 100 ms windows of
    ``sent``, of each window's best normalised correlation with ``heard`` near the whole clip's
    best alignment (±40 ms, so a frame dropped or added on the way shifts nothing after it);
    and the ratio of loud samples heard to loud samples sent."""
    a = sent.astype(np.float64)
    b = heard.astype(np.float64)
    if b.size < a.size:
        b = np.concatenate([b, np.zeros(a.size - b.size)])
    n = 1 << int(np.ceil(np.log2(a.size + b.size)))
    xcorr = np.fft.irfft(np.fft.rfft(b, n) * np.conj(np.fft.rfft(a, n)), n)[: b.size - a.size + 1]
    lag = int(np.argmax(xcorr))
    window, slack, scores = 4800, 1920, []
    for start in range(0, a.size - window, window):
        piece = a[start : start + window]
        if np.sqrt(np.mean(piece**2)) < 500:
            continue
        best = 0.0
        for shift in range(-slack, slack + 1, 48):
            at = lag + start + shift
            if at < 0 or at + window > b.size:
                continue
            other = b[at : at + window]
            denom = np.linalg.norm(piece) * np.linalg.norm(other)
            if denom:
                best = max(best, float(piece @ other / denom))
        scores.append(best)
    loud = 500
    ratio = float(np.sum(np.abs(heard) > loud) / max(1, np.sum(np.abs(sent) > loud)))
    return float(np.mean(scores)) if scores else 0.0, ratio


async def main(url: str, tuned: bool) -> None:
    speech = speak(SENTENCE)
    mic = MicTrack(encode=tuned)  # tuned: Opus with FEC, as a browser asked for useinbandfec
    peer = Peer(url, mic, prefetch=None, tuned=tuned)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(45):
        await peer.connect(timeout=10)
        await peer.wait_open(timeout=10)
        print("ready", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)  # the link is lossy from here on
        await peer.wait_audio(0.5)  # the link settles (and loses) before the sentence starts
        start = loop.time()
        mic.play(speech)
        # Record for the sentence's length and the echo's way back, whatever arrives: the stock
        # path drops lost frames, so counting received audio would wait longer for it.
        await asyncio.sleep(speech.size / 48_000 + 0.8)
    heard = peer.audio(since=start)
    score, ratio = best_correlation(speech, heard)
    stats = [e for e in peer.events if e.get("type") == "s2s.session.stats"]
    result = {"correlation": score, "loud_ratio": ratio, "stats": stats[-1] if stats else None}
    print(json.dumps(result), flush=True)
    await peer.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2] == "tuned"))
