"""PCM plumbing: framing, resampling and the paced speaker track."""

from __future__ import annotations

import asyncio
from fractions import Fraction

import av
import numpy as np
import pytest

from s2s.audio import (
    PACKET_SAMPLES,
    FrameChunker,
    OpusEncoder,
    PcmQueue,
    Resampler,
    SpeakerTrack,
)
from tests.signals import dominant_frequency, rms, tone


def test_chunker_cuts_exact_frames_and_keeps_the_rest() -> None:
    chunker = FrameChunker(480)
    data = np.arange(1000, dtype=np.int16)
    frames = chunker.push(data[:700]) + chunker.push(data[700:])
    assert [f.size for f in frames] == [480, 480]
    np.testing.assert_array_equal(np.concatenate(frames), data[:960])
    assert [f.size for f in chunker.push(np.zeros(440, np.int16))] == [480]


def test_pcm_queue_pads_with_silence_and_reports_fill() -> None:
    queue = PcmQueue()
    queue.push(np.ones(100, np.int16))
    queue.push(np.full(50, 2, np.int16))
    out, filled = queue.pop(120)
    assert filled == 120 and out[99] == 1 and out[100] == 2
    out, filled = queue.pop(120)
    assert filled == 30 and not out[30:].any()
    assert len(queue) == 0


@pytest.mark.parametrize("rate", [16_000, 24_000])
def test_resampling_keeps_frequency_and_level(rate: int) -> None:
    source = tone(1000, 1.0, amplitude=0.5)
    down = Resampler(rate).from_pcm(source, 48_000)
    assert abs(down.size - rate) < 100
    assert abs(dominant_frequency(down[1000:], rate=rate) - 1000) < 2
    assert abs(rms(down[1000:]) - rms(source)) < 0.01
    up = Resampler(48_000).from_pcm(down, rate)
    assert abs(dominant_frequency(up[2000:]) - 1000) < 2


async def test_speaker_paces_20ms_frames_without_drift() -> None:
    track = SpeakerTrack()
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(100):
        packet = await track.recv()
        assert packet.pts == i * PACKET_SAMPLES and packet.time_base == Fraction(1, 48_000)
        if i == 40:
            # A stalled consumer: the schedule catches up instead of shifting.
            await asyncio.sleep(0.06)
    elapsed = loop.time() - start
    # 100 frames are due over 1.98 s after the first; a drifting clock would be ~60 ms late
    # (the margin is for a loaded machine's late wake-ups).
    assert 1.97 < elapsed < 2.03, elapsed
    track.stop()


async def test_speaker_plays_queued_audio_in_order_and_flush_drops_it() -> None:
    track = SpeakerTrack(lead_ms=0)
    track.write(np.arange(1, 2001, dtype=np.int16))
    first = await track.next_pcm()
    assert first[0] == 1 and first[-1] == 960
    second = await track.next_pcm()
    assert second[0] == 961
    assert track.flush() == 80
    assert not (await track.next_pcm()).any()
    assert track.played_samples == 1920
    track.stop()


async def test_speaker_holds_new_audio_for_its_lead() -> None:
    track = SpeakerTrack(lead_ms=30)
    await track.recv()
    track.write(np.ones(4 * PACKET_SAMPLES, np.int16))
    heard = [bool((await track.next_pcm()).any()) for _ in range(4)]
    # Written right after a tick: the next tick (20 ms) is too soon, the one after (40 ms) plays.
    assert heard == [False, True, True, True]
    track.stop()


async def test_speaker_sends_mono_opus_that_decodes_to_what_was_written() -> None:
    track = SpeakerTrack(lead_ms=0)
    track.write(tone(440, 0.5))
    decoder = av.CodecContext.create("libopus", "r")
    decoder.sample_rate, decoder.layout = 48_000, "mono"
    decoded = []
    for _ in range(25):
        for frame in decoder.decode(await track.recv()):
            decoded.append(frame.to_ndarray().reshape(-1))
    pcm = np.concatenate(decoded)
    assert abs(dominant_frequency(pcm[4800:]) - 440) < 3
    # Mono all the way: no -3 dB upmix.
    assert abs(rms(pcm[4800:]) - rms(tone(440, 0.5))) < 0.02
    track.stop()


def test_encoder_idles_through_silence_and_restarts_cleanly() -> None:
    encoder = OpusEncoder()
    quiet = np.zeros(PACKET_SAMPLES, np.int16)
    speech = tone(440, 0.2)
    decoder = av.CodecContext.create("libopus", "r")
    decoder.sample_rate, decoder.layout = 48_000, "mono"
    decoded = []

    def send(pcm: np.ndarray, index: int) -> bytes:
        packet = encoder.encode(pcm, index, silent=not pcm.any())
        assert packet.pts == index * PACKET_SAMPLES
        decoded.extend(f.to_ndarray().reshape(-1) for f in decoder.decode(packet))
        return bytes(packet)

    frames = [speech[i * PACKET_SAMPLES : (i + 1) * PACKET_SAMPLES] for i in range(10)]
    for i, frame in enumerate(frames):
        send(frame, i)
    idle = [send(quiet, i) for i in range(10, 40)]
    assert set(idle[-15:]) == {b"\xf8\xff\xfe"}
    for i, frame in enumerate(frames, start=40):
        send(frame, i)
    pcm = np.concatenate(decoded)
    # Both bursts decode to the tone; the silence between them is silence.
    first, gap, second = pcm[2400:9600], pcm[15 * 960 : 38 * 960], pcm[43 * 960 : 50 * 960]
    assert abs(dominant_frequency(first) - 440) < 10 and abs(dominant_frequency(second) - 440) < 10
    assert rms(gap) < 0.001 and rms(second) > 0.15


def test_stereo_frames_at_the_target_rate_are_downmixed_at_full_level() -> None:
    mono = tone(440, 0.02)
    stereo = np.repeat(mono, 2).reshape(1, -1)
    frame = av.AudioFrame.from_ndarray(stereo, format="s16", layout="stereo")
    frame.sample_rate = 48_000
    np.testing.assert_array_equal(Resampler(48_000).from_frame(frame), mono)


async def test_live_speaker_trims_a_lasting_backlog_but_not_a_burst() -> None:
    frame = np.ones(PACKET_SAMPLES, np.int16)
    for bound_ms, expect_trim in ((50.0, True), (None, False)):
        track = SpeakerTrack(lead_ms=0, max_backlog_ms=bound_ms)
        # A burst of 200 ms arrives once, then the stream goes on at its pace (one frame a tick).
        track.write(np.ones(10 * PACKET_SAMPLES, np.int16))
        for _ in range(60):
            await track.next_pcm()
            track.write(frame)
        if expect_trim:
            # The lasting 200 ms was cut back to the bound (50 ms) behind the frame in flight.
            assert track.queued_samples <= 2400 + PACKET_SAMPLES
            assert track.trimmed_samples > 0
        else:
            assert track.queued_samples == 10 * PACKET_SAMPLES  # a reply is never trimmed
            assert track.trimmed_samples == 0
        track.stop()
    track = SpeakerTrack(lead_ms=0, max_backlog_ms=50)
    track.write(np.ones(6 * PACKET_SAMPLES, np.int16))  # a burst that drains within the window
    for _ in range(30):
        await track.next_pcm()
    assert track.trimmed_samples == 0
    track.stop()


async def test_live_speaker_sends_input_the_moment_it_arrives() -> None:
    loop = asyncio.get_running_loop()
    track = SpeakerTrack(lead_ms=0, live=True)
    await track.next_pcm()  # the clock starts
    frame = np.ones(PACKET_SAMPLES, np.int16)
    delays = []
    for offset in (0.007, 0.013, 0.029):  # input 7 ms into a slot, 13 ms, 9 ms into the next
        waiting = asyncio.ensure_future(track.next_pcm())
        async with asyncio.timeout(1):
            await asyncio.sleep(offset)
        written = loop.time()
        track.write(frame)
        async with asyncio.timeout(1):
            samples = await waiting
        delays.append(loop.time() - written)
        assert samples.all()  # the frame itself, not a slot of silence before it
    # A fixed 20 ms clock would have held these frames 13, 7 and 11 ms (the median leaves room
    # for one late wake-up on a loaded machine).
    assert sorted(delays)[1] < 0.005, delays
    track.stop()


async def test_a_live_speaker_drops_all_of_a_lasting_backlog() -> None:
    track = SpeakerTrack(lead_ms=0, max_backlog_ms=10, live=True)
    track.write(np.ones(5 * PACKET_SAMPLES, np.int16))  # 100 ms ahead, and it stays ahead
    for _ in range(30):
        await track.next_pcm()
        track.write(np.ones(PACKET_SAMPLES, np.int16))
    # Only the frame about to go out is left: each frame is now sent as it comes.
    assert track.queued_samples <= PACKET_SAMPLES
    assert track.trimmed_samples == 4 * PACKET_SAMPLES
    track.stop()
