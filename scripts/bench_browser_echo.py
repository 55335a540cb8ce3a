#!/usr/bin/env python
"""Browser mouth-to-ear echo: Chromium's fake microphone → s2s echo → Chromium, tuned vs stock.

Chromium (Debian's, headless, driven by Playwright) plays a 1 kHz 40 ms burst a second as its
microphone, sends it to ``s2s serve --model echo`` and times, in its own AudioContext, each
burst's onset in the microphone stream to its onset in the received (decoded, jitter-buffered)
stream. That is mouth to ear less the sound card. Both servers run in the same run, pinned to
CPU 0, one after the other.

    .venv/bin/python scripts/bench_browser_echo.py --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import wave
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchlib import percentile, serve  # noqa: E402

from tests.chromium import CHROMIUM, CHROMIUM_ARGS  # noqa: E402


def _bursts(path: Path) -> Path:
    rate = 48_000
    t = np.arange(int(0.04 * rate)) / rate
    second = np.zeros(rate, np.int16)
    second[: t.size] = (0.5 * 32767 * np.sin(2 * np.pi * 1000 * t)).astype(np.int16)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(np.tile(second, 10).tobytes())
    return path


async def _measure(url: str, wav: Path, seconds: float) -> list[float]:
    from aiohttp import web
    from playwright.async_api import async_playwright

    site = web.Application()
    site.router.add_static("/", ROOT / "scripts")
    runner = web.AppRunner(site)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    page_url = f"http://127.0.0.1:{runner.addresses[0][1]}/echo_probe.html?server={url}"
    try:
        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(
                executable_path=CHROMIUM,
                args=[*CHROMIUM_ARGS, f"--use-file-for-fake-audio-capture={wav}"],
            )
            page = await browser.new_page()
            await page.goto(page_url)
            await page.wait_for_function("window.ready || window.errors.length > 0",
                                         timeout=20_000)  # fmt: skip
            errors = await page.evaluate("window.errors")
            if errors:
                raise SystemExit(f"the page failed: {errors}")
            await asyncio.sleep(seconds)
            latencies: list[float] = await page.evaluate("window.latencies")
            buffered = await page.evaluate(
                "(async () => { let ms = null; (await window.pc.getStats()).forEach(s => {"
                " if (s.type === 'inbound-rtp' && s.kind === 'audio' && s.jitterBufferEmittedCount)"
                " ms = 1000 * s.jitterBufferDelay / s.jitterBufferEmittedCount; }); return ms; })()"
            )
            print(f"  Chromium's receive jitter buffer held {buffered:.1f} ms on average")
            await browser.close()
    finally:
        await runner.cleanup()
    return latencies[2:]  # the first bursts meet a jitter buffer still settling


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="measured per server")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wav = _bursts(Path(tmp) / "bursts.wav")
        rows = []
        for transport in ("stock", "tuned"):
            with serve("--model", "echo", "--transport", transport, cpus={0}) as (url, _):
                latencies = asyncio.run(_measure(url, wav, args.seconds))
            if not latencies:
                raise SystemExit(f"{transport}: no echo was timed")
            rows.append((transport, len(latencies), statistics.median(latencies),
                         percentile(latencies, 0.95)))  # fmt: skip
    print(f"{'server':>8} {'bursts':>7} {'p50_ms':>8} {'p95_ms':>8}")
    for transport, n, p50, p95 in rows:
        print(f"{transport:>8} {n:>7} {p50:>8.1f} {p95:>8.1f}")


if __name__ == "__main__":
    main()
