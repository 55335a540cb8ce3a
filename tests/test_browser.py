"""Real Chromium against the real server: the stock OpenAI client, and our page with a fake mic.

Chromium is Debian's (/usr/bin/chromium, installed by scripts/setup), driven by Playwright.
Its fake microphone plays a WAV file made with espeak-ng.
"""

from __future__ import annotations

import asyncio
import wave
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from playwright.async_api import Browser, Page, async_playwright

from tests.chromium import CHROMIUM, CHROMIUM_ARGS
from tests.conftest import StartServer
from tests.speech import local_reply_fits, speak

BROWSER_DIR = Path(__file__).resolve().parent / "browser"
ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"

LaunchBrowser = Callable[[Path], Awaitable[Browser]]


def write_wav(path: Path, pcm: np.ndarray, rate: int = 48_000) -> Path:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.astype(np.int16).tobytes())
    return path


@pytest.fixture
async def launch_browser() -> AsyncIterator[LaunchBrowser]:
    async with async_playwright() as playwright:
        browsers: list[Browser] = []

        async def launch(mic_wav: Path) -> Browser:
            browser = await playwright.chromium.launch(
                executable_path=CHROMIUM,
                args=[*CHROMIUM_ARGS, f"--use-file-for-fake-audio-capture={mic_wav}"],
            )
            browsers.append(browser)
            return browser

        yield launch
        for browser in browsers:
            await browser.close()


@pytest.fixture
async def static_site() -> AsyncIterator[str]:
    """tests/browser/ on its own origin, so the page calls s2s cross-origin (CORS)."""
    app = web.Application()
    app.router.add_static("/", BROWSER_DIR)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def wait_for(page: Page, expression: str, *, timeout: float) -> Any:
    """Evaluate ``expression`` in the page until it is truthy (bounded by ``timeout``)."""
    return await page.wait_for_function(expression, timeout=timeout * 1000, polling=100)


async def inbound_audio_energy(page: Page, peer_connection: str) -> float:
    """``totalAudioEnergy`` of the audio the page's peer connection has received."""
    energy: float = await page.evaluate(f"""async () => {{
        const stats = await {peer_connection}.getStats();
        let energy = 0;
        stats.forEach(s => {{ if (s.type === 'inbound-rtp' && s.kind === 'audio')
            energy = s.totalAudioEnergy; }});
        return energy;
    }}""")
    return energy


async def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


async def test_stock_openai_agents_client_holds_a_conversation(
    start_server: StartServer, static_site: str, launch_browser: LaunchBrowser, tmp_path: Path
) -> None:
    server = await start_server(model="local")
    quiet = write_wav(tmp_path / "quiet.wav", np.zeros(48_000, np.int16))
    browser = await launch_browser(quiet)
    page = await browser.new_page()
    await page.goto(f"{static_site}/agents.html?server={server.url}")
    await wait_for(page, "window.connected || window.errors.length", timeout=20)
    assert await page.evaluate("window.errors") == []
    types = await page.evaluate("window.received.map(e => e.type)")
    assert "session.created" in types and "session.updated" in types
    await page.evaluate("window.session.sendMessage('please say hello from the browser')")
    await wait_for(page, "window.received.some(e => e.type === 'response.done')", timeout=20)
    done = await page.evaluate("window.received.find(e => e.type === 'response.done')")
    assert done["response"]["status"] == "completed"
    assert done["response"]["output"][0]["content"][0]["transcript"] == "hello from the browser"
    # The SDK kept its own history from our events, and the reply's audio reached the page.
    history = await page.evaluate(
        "window.session.history.map(i => [i.role, i.content?.map(c => c.transcript ?? c.text)])"
    )
    assert ["assistant", ["hello from the browser"]] in history
    pc = "window.session.transport.connectionState.peerConnection"
    assert await inbound_audio_energy(page, pc) > 0.01
    # Chromium's offer has RED; the answer preferred it, so its audio came in RED, every packet
    # of it, and went through s2s's own inbound path.
    (session,) = server.registry.sessions()
    assert session.voice_in is not None
    received = session.voice_in.stats
    assert received.packets > 20 and received.red_packets == received.packets
    answer = await page.evaluate(f"{pc}.remoteDescription.sdp")
    assert "useinbandfec=1" in answer and "usedtx=0" in answer
    assert await page.evaluate("window.errors") == []
    await screenshot(page, "agents-sdk")


async def test_stock_openai_agents_client_runs_a_tool_the_model_calls(
    start_server: StartServer, static_site: str, launch_browser: LaunchBrowser, tmp_path: Path
) -> None:
    server = await start_server(model="local")
    browser = await launch_browser(write_wav(tmp_path / "quiet.wav", np.zeros(48_000, np.int16)))
    page = await browser.new_page()
    await page.goto(f"{static_site}/agents.html?server={server.url}&tool=1")
    await wait_for(page, "window.connected || window.errors.length", timeout=20)
    assert await page.evaluate("window.errors") == []
    updated = await page.evaluate("window.received.find(e => e.type === 'session.updated')")
    assert [t["name"] for t in updated["session"]["tools"]] == ["get_weather"]
    # The caller types the tool's name and a city; s2s calls the tool, the SDK runs it and
    # sends its output back, and the model speaks that output.
    await page.evaluate("window.session.sendMessage('get weather Paris')")
    spoken = """window.received.some(e => e.type === 'response.done'
        && e.response.output[0]?.type === 'message')"""
    await wait_for(page, spoken, timeout=30)
    assert await page.evaluate("window.toolCalls") == ["Paris"]
    dones = await page.evaluate("window.received.filter(e => e.type === 'response.done')")
    called, answered = (d["response"]["output"][0] for d in dones)
    assert (called["type"], called["name"]) == ("function_call", "get_weather")
    assert answered["content"][0]["transcript"] == "sunny in Paris, 21 degrees"
    history = await page.evaluate("window.session.history")
    calls = [i for i in history if i["type"] == "function_call"]
    assert [(c["name"], c["output"], c["status"]) for c in calls] == [
        ("get_weather", "sunny in Paris, 21 degrees", "completed")
    ]
    replies = [i for i in history if i["type"] == "message" and i["role"] == "assistant"]
    assert replies[-1]["content"][0]["transcript"] == "sunny in Paris, 21 degrees"
    assert await page.evaluate("window.errors") == []
    await screenshot(page, "agents-sdk-tool")


LONG = (
    "please say this is a long answer. it goes on for a while. it has many sentences. "
    "the interrupt button should stop it. nobody should hear the rest of it."
)


async def test_our_page_hears_the_mic_replies_shows_stats_interrupts_and_sends_a_snapshot(
    start_server: StartServer, launch_browser: LaunchBrowser, tmp_path: Path
) -> None:
    server = await start_server(model="local")
    speech = np.concatenate([speak("hello there how are you today", voice="en-us+f2"),
                             np.zeros(48_000 * 6, np.int16)])  # fmt: skip
    browser = await launch_browser(write_wav(tmp_path / "hello.wav", speech))
    page = await browser.new_page(viewport={"width": 1200, "height": 900})
    await page.goto(server.url + "/")
    await screenshot(page, "page-idle")
    await page.click("#connect")
    events = "window.s2s.events"
    # What the fake microphone said appears as the caller's turn, and the reply plays.
    transcribed = "'conversation.item.input_audio_transcription.completed'"
    await wait_for(page, f"{events}.some(e => e.type === {transcribed})", timeout=30)
    await wait_for(page, f"{events}.some(e => e.type === 'response.done')", timeout=30)
    heard = await page.inner_text("#transcript .turn.user .text")
    assert heard and heard != "…"
    replied = await page.inner_text("#transcript .turn.assistant .text")
    assert local_reply_fits(heard, replied), (heard, replied)
    assert await inbound_audio_energy(page, "window.s2s.pc") > 0.01
    # The stats panel and the turn timeline filled in.
    unset = "\u2013"  # the en dash the panel shows before a figure is known
    await wait_for(page, f"document.getElementById('stat-in').textContent !== '{unset}'",
                   timeout=5)  # fmt: skip
    for stat in ("stat-setup", "stat-channel", "stat-rtt", "stat-jitter", "stat-out"):
        assert (await page.inner_text(f"#{stat}")) != unset, stat
    assert "turn latency" in await page.inner_text("#turn-latency")
    await screenshot(page, "page-replied")

    # Push-to-talk from here on, so the looping fake microphone does not barge in.
    await page.uncheck("#vad")
    await wait_for(page, f"{events}.filter(e => e.type === 'session.updated').length >= 2",
                   timeout=5)  # fmt: skip
    # Interrupt stops the reply's audio.
    await page.fill("#message", LONG)
    await page.press("#message", "Enter")
    await wait_for(page, f"{events}.filter(e => e.type === 'output_audio_buffer.started')"
                   ".length >= 2", timeout=20)  # fmt: skip
    await asyncio.sleep(1.0)  # let the long reply play for a second before interrupting it
    await page.click("#interrupt")
    await wait_for(page, f"{events}.some(e => e.type === 'response.done' && "
                   "e.response.status === 'cancelled')", timeout=10)  # fmt: skip
    assert "(interrupted)" in await page.inner_text("#transcript")
    # What was already in flight plays out (a few hundred ms at most); after that, silence.
    await asyncio.sleep(0.4)
    silent_from = await inbound_audio_energy(page, "window.s2s.pc")
    await asyncio.sleep(1.0)  # a second in which the interrupted reply must not be heard
    assert await inbound_audio_energy(page, "window.s2s.pc") - silent_from < 0.0005
    await screenshot(page, "page-interrupted")

    # The snapshot button sends a camera frame; the answer is about that picture.
    await page.click("#snapshot")
    await wait_for(page, "window.s2s.sent.some(e => e.type === 'conversation.item.create' "
                   "&& e.item.content[0].type === 'input_image' || e.type === 's2s.image.commit')",
                   timeout=10)  # fmt: skip
    await page.fill("#message", "what am I looking at?")
    await page.press("#message", "Enter")
    await wait_for(page, "document.getElementById('transcript').innerText.includes('pixel "
                   "picture')", timeout=20)  # fmt: skip
    await screenshot(page, "page-snapshot")

    # A server error is shown in plain words: committing an empty push-to-talk turn.
    await page.click("#talk")
    await wait_for(page, "document.getElementById('error').textContent.length > 0", timeout=5)
    assert "audio" in await page.inner_text("#error")

    # The demo tool: the model calls it, the page runs it and answers with its output, and
    # asks for the reply once the response that called it is done.
    await page.fill("#message", "current time")
    await page.press("#message", "Enter")
    await wait_for(page, "[...document.querySelectorAll('#transcript .turn.assistant .text')]"
                   ".some(e => e.textContent.includes('It is'))", timeout=20)  # fmt: skip
    assert "current_time(" in await page.inner_text("#transcript")
    assert not await page.inner_text("#error")

    # On a phone-sized screen the panels stack and nothing overflows sideways.
    await page.set_viewport_size({"width": 390, "height": 844})
    assert await page.evaluate("document.documentElement.scrollWidth <= 390")
    await screenshot(page, "page-phone")

    # The server ends the call (here: a hangup from elsewhere): the page says so and is idle.
    (session,) = server.registry.sessions()
    async with aiohttp.ClientSession() as http:
        hangup = f"{server.url}/v1/realtime/calls/{session.call_id}/hangup"
        async with http.post(hangup) as r:
            assert r.status == 200
    await wait_for(page, "document.getElementById('status').textContent === 'idle'", timeout=10)
    assert "ended" in await page.inner_text("#error")
    assert await page.is_enabled("#connect") and not await page.is_enabled("#message")
    async with asyncio.timeout(5):
        while len(server.registry):  # noqa: ASYNC110 - the registry has no event to await
            await asyncio.sleep(0.05)


async def test_our_page_answers_its_demo_tool_and_shows_the_call_and_output(
    start_server: StartServer, launch_browser: LaunchBrowser, tmp_path: Path
) -> None:
    server = await start_server(model="local")
    browser = await launch_browser(write_wav(tmp_path / "quiet.wav", np.zeros(48_000, np.int16)))
    page = await browser.new_page(timezone_id="Asia/Tokyo")
    await page.goto(server.url + "/")
    await page.click("#connect")
    events = "window.s2s.events"
    await wait_for(page, f"{events}.some(e => e.type === 'session.updated')", timeout=20)
    tools = await page.evaluate(f"{events}.find(e => e.type === 'session.updated').session.tools")
    assert [t["name"] for t in tools] == ["current_time"]
    await page.fill("#message", "what is the current time")
    await page.press("#message", "Enter")
    spoken = f"""{events}.some(e => e.type === 'response.done'
        && e.response.output[0]?.type === 'message')"""
    await wait_for(page, spoken, timeout=30)
    shown = await page.locator("#transcript .turn.tool .text").all_inner_texts()
    assert shown[0] == "current_time({})"
    assert shown[1].startswith("\u2190 It is ") and shown[1].endswith("in Asia/Tokyo")
    replied = await page.locator("#transcript .turn.assistant .text").all_inner_texts()
    assert replied == [shown[1].removeprefix("\u2190 ")]
    assert await page.inner_text("#error") == ""
    await screenshot(page, "page-tool")
