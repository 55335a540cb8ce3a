"""``GET /metrics`` and ``s2s.session.stats`` over real calls; their parts on their own."""

from __future__ import annotations

import asyncio
import datetime
import time
from typing import Any

import aiohttp
from aiortc.stats import (
    RTCInboundRtpStreamStats,
    RTCOutboundRtpStreamStats,
    RTCRemoteInboundRtpStreamStats,
    RTCRemoteOutboundRtpStreamStats,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from s2s.audio import SpeakerTrack
from s2s.metrics import ServerMetrics, merge_expositions
from s2s.rtpstats import LinkSampler
from tests.conftest import Server, StartServer
from tests.peer import MicTrack, Peer
from tests.signals import tone
from tests.speech import speak
from tests.test_realtime import LONG, VOICE, call, say_text

STATS = "s2s.session.stats"


async def scrape(server: Server) -> dict[str, Metric]:
    async with aiohttp.ClientSession() as http, http.get(server.url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        text = await resp.text()
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(families: dict[str, Metric], sample: str, **labels: str) -> float | None:
    """The value of the sample named ``sample`` whose labels include ``labels``."""
    family = families[sample.removesuffix("_total").removesuffix("_count").removesuffix("_sum")]
    for s in family.samples:
        if s.name == sample and labels.items() <= s.labels.items():
            return float(s.value)
    return None


def call_series(families: dict[str, Metric], call_id: str) -> list[str]:
    return [
        s.name for f in families.values() for s in f.samples if s.labels.get("call_id") == call_id
    ]


async def stats_event(peer: Peer, *known: str, timeout: float = 10.0) -> dict[str, Any]:
    """The next ``s2s.session.stats`` event in which every field of ``known`` is not null."""
    async with asyncio.timeout(timeout):
        mark = len(peer.events)
        while True:
            event = await peer.next_event(STATS, after=mark, timeout=timeout)
            mark = peer.events.index(event) + 1
            if all(event[field] is not None for field in known):
                return event


async def test_live_call_metrics_and_their_removal_at_hangup(start_server: StartServer) -> None:
    server = await start_server(stats_interval_s=0.5)
    peer = Peer(server.url, MicTrack(tone(440, 60)))
    try:
        await peer.connect()
        await peer.wait_open()
        assert peer.call_url is not None
        call_id = peer.call_url.rsplit("/", 1)[1]
        # Once an event shows RTCP has given every figure, the gauges hold them too.
        await stats_event(peer, "rtt_ms", "bitrate_in_bps", "bitrate_out_bps")
        live = await scrape(server)
        assert value(live, "s2s_active_calls") == 1
        assert value(live, "s2s_calls_started_total") == 1
        assert (value(live, "s2s_call_setup_seconds_count") or 0) >= 1
        assert (value(live, "s2s_data_channel_open_seconds_count") or 0) >= 1
        setup = value(live, "s2s_call_setup_seconds_sum")
        assert setup is not None and 0 < setup < 5
        rtt = value(live, "s2s_call_rtt_seconds", call_id=call_id)
        assert rtt is not None and 0 <= rtt < 1
        for direction in ("in", "out"):
            jitter = value(live, "s2s_call_jitter_seconds", call_id=call_id, direction=direction)
            assert jitter is not None and 0 <= jitter < 0.5, (direction, jitter)
            lost = value(live, "s2s_call_packets_lost", call_id=call_id, direction=direction)
            assert lost is not None
        bitrate_in = value(
            live, "s2s_call_bitrate_bits_per_second", call_id=call_id, direction="in"
        )
        assert bitrate_in is not None and bitrate_in > 0
        assert (value(live, "s2s_speaker_frames_total") or 0) > 0

        assert await peer.hangup() == 200
        after = await scrape(server)
        assert value(after, "s2s_active_calls") == 0
        assert value(after, "s2s_calls_ended_total", reason="hangup") == 1
        assert call_series(after, call_id) == []
    finally:
        await peer.close()


async def test_stats_events_carry_plausible_figures(start_server: StartServer) -> None:
    server = await start_server(stats_interval_s=0.5)
    peer = Peer(server.url, MicTrack(tone(440, 60)))
    try:
        await peer.connect()
        first = await peer.next_event(STATS, timeout=5)
        event = await stats_event(peer, "rtt_ms", "bitrate_in_bps", "bitrate_out_bps")
        assert 0 < first["call_seconds"] < event["call_seconds"]
        assert 0 <= event["rtt_ms"] < 1000
        # Opus from the test peer's aiortc encoder; the echo's own Opus encoder at 32 kb/s.
        assert 6_000 <= event["bitrate_in_bps"] <= 200_000, event
        assert 6_000 <= event["bitrate_out_bps"] <= 200_000, event
        for direction in ("in", "out"):
            assert 0 <= event[f"jitter_{direction}_ms"] < 500
            assert event[f"packets_lost_{direction}"] is not None
            assert 0 <= event[f"fraction_lost_{direction}"] <= 1
        assert event["frames_late"] >= 0
        assert event["turn_latency_ms"] is None and event["barge_in_latency_ms"] is None
        # The tuned inbound path's counts: every packet so far decoded from itself, none lost.
        audio_in = event["audio_in"]
        assert audio_in["packets"] > 0
        assert audio_in["decoded_frames"] == audio_in["packets"]
        assert audio_in["concealed_frames"] == audio_in["fec_frames"] == 0
    finally:
        await peer.close()


async def test_turn_and_barge_in_latencies(start_server: StartServer) -> None:
    server = await start_server(model="local", stats_interval_s=0.5)
    peer = await call(server)
    try:
        # A reply the caller talks over: its start is a turn latency (the client asked for it),
        # the caller's speech a barge-in, and the end of that speech a spoken turn.
        mark = say_text(peer, LONG)
        await peer.next_event("output_audio_buffer.started", after=mark, timeout=20)
        await peer.wait_audio(0.5, since=asyncio.get_running_loop().time())
        peer.mic.play(speak("stop stop stop", voice=VOICE))
        done = await peer.next_event("response.done", after=mark, timeout=20)
        assert done["response"]["status_details"]["reason"] == "turn_detected"
        mark = peer.events.index(done)
        await peer.next_event("input_audio_buffer.speech_stopped", after=mark, timeout=20)
        await peer.next_event("output_audio_buffer.started", after=mark, timeout=20)

        families = await scrape(server)
        # At least: the VAD may hear "stop stop stop" as more than one turn.
        assert (value(families, "s2s_turn_latency_seconds_count") or 0) >= 2
        assert (value(families, "s2s_barge_in_latency_seconds_count") or 0) >= 1
        turns = value(families, "s2s_turn_latency_seconds_sum")
        assert turns is not None and 0 < turns < 10
        barge_in = value(families, "s2s_barge_in_latency_seconds_sum")
        assert barge_in is not None and 0 <= barge_in < 0.5
        event = await stats_event(peer, "turn_latency_ms", "barge_in_latency_ms")
        assert 0 < event["turn_latency_ms"] < 5000
        assert 0 <= event["barge_in_latency_ms"] < 500
    finally:
        await peer.close()


def test_merged_expositions_label_every_sample_with_its_worker() -> None:
    workers = [ServerMetrics(), ServerMetrics()]
    for i, metrics in enumerate(workers):
        for _ in range(i + 1):
            metrics.call_started()
        metrics.turn_latency.observe(0.2 * (i + 1))
        metrics.rtt.labels(f"rtc_{i}").set(0.01)
    text = merge_expositions([m.exposition().decode() for m in workers], ["0", "1"]).decode()

    assert text.count("# TYPE s2s_turn_latency_seconds histogram") == 1
    assert text.count("# HELP s2s_calls_started_total") == 1
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for family in families.values():
        assert all(s.labels["worker"] in ("0", "1") for s in family.samples), family
    assert value(families, "s2s_calls_started_total", worker="1") == 2
    assert value(families, "s2s_turn_latency_seconds_count", worker="0") == 1
    assert value(families, "s2s_call_rtt_seconds", worker="1", call_id="rtc_1") == 0.01
    started = [s for s in families["s2s_calls_started"].samples if s.name.endswith("_total")]
    assert sum(s.value for s in started) == 3


async def test_a_frame_sent_over_20_ms_after_its_slot_is_late() -> None:
    speaker = SpeakerTrack()
    await speaker.next_pcm()
    # Block the loop on purpose, as a stalled one would: the next slot passes 40 ms before it runs.
    time.sleep(0.06)  # noqa: ASYNC251
    await speaker.next_pcm()
    assert speaker.frames_late == 1
    speaker.stop()


def test_link_figures_from_rtcp_reports() -> None:
    now = datetime.datetime.now(datetime.UTC)
    common = {"timestamp": now, "kind": "audio", "transportId": "t"}

    def report(seconds: float, received: int, lost: int, sent: int) -> dict[str, object]:
        remote_at = now + datetime.timedelta(seconds=seconds)
        stats = [
            RTCInboundRtpStreamStats(type="inbound-rtp", id="i", ssrc=1, packetsReceived=received,
                                     packetsLost=lost, jitter=480, **common),
            RTCRemoteOutboundRtpStreamStats(type="remote-outbound-rtp", id="ro", ssrc=1,
                                            packetsSent=received, bytesSent=sent,
                                            remoteTimestamp=remote_at, **common),
            RTCOutboundRtpStreamStats(type="outbound-rtp", id="o", ssrc=2, packetsSent=received,
                                      bytesSent=sent, trackId="x", **common),
            RTCRemoteInboundRtpStreamStats(type="remote-inbound-rtp", id="ri", ssrc=2,
                                           packetsReceived=received, packetsLost=3, jitter=96,
                                           roundTripTime=0.04, fractionLost=64, **common),
        ]  # fmt: skip
        return {s.id: s for s in stats}

    sampler = LinkSampler(started=100.0)
    first = sampler.sample(report(0, received=90, lost=10, sent=10_000), now=101.0)
    assert first.bitrate_out_bps == 80_000 and first.bitrate_in_bps is None  # one sender report
    assert first.fraction_lost_in == 0.1 and first.packets_lost_in == 10
    assert first.jitter_in_s == 0.01 and first.jitter_out_s == 0.002
    assert first.rtt_s == 0.04 and first.fraction_lost_out == 0.25 and first.packets_lost_out == 3
    second = sampler.sample(report(2, received=190, lost=10, sent=30_000), now=103.0)
    assert second.bitrate_in_bps == 80_000 and second.bitrate_out_bps == 80_000
    assert second.fraction_lost_in == 0.0
