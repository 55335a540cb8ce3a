"""The inbound audio path on its own: packets in any order, some lost, frames out, none skipped."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable

import numpy as np
import pytest

from s2s import opus
from s2s.voicein import VoiceReceiver, parse_red
from tests.speech import speak

FRAME = opus.FRAME


@pytest.fixture(scope="module")
def packets() -> list[bytes]:
    pcm = speak("Hello there, this is a test of the inbound audio path of the server.")
    frames = pcm[: pcm.size // FRAME * FRAME].reshape(-1, FRAME)
    encoder = opus.Encoder(32_000, fec=True, loss_percent=10)
    return [encoder.encode(f) for f in frames]


def reference(packets: list[bytes]) -> np.ndarray:
    decoder = opus.Decoder()
    return np.concatenate([decoder.decode(p) for p in packets])


class Sink:
    def __init__(self) -> None:
        self.frames: list[np.ndarray] = []
        self.timestamps: list[int] = []
        self.grew = asyncio.Event()

    def __call__(self, pcm: np.ndarray, timestamp: int) -> None:
        self.frames.append(pcm)
        self.timestamps.append(timestamp)
        self.grew.set()

    async def until(self, count: int) -> np.ndarray:
        async with asyncio.timeout(5):
            while len(self.frames) < count:
                self.grew.clear()
                await self.grew.wait()
        return np.concatenate(self.frames)


def feed(
    receiver: VoiceReceiver, packets: list[bytes], order: Iterable[int], seq0: int = 0
) -> list[int]:
    nacked: list[int] = []
    for i in order:
        nacked += receiver.push((seq0 + i) % 65536, (i * FRAME) % 2**32, packets[i])
    return nacked


def corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-9))


async def test_in_order_packets_decode_exactly_without_waiting(packets: list[bytes]) -> None:
    sink = Sink()
    receiver = VoiceReceiver(sink)
    feed(receiver, packets, range(len(packets)))
    # Delivered synchronously: nothing is held back when nothing is missing.
    assert len(sink.frames) == len(packets)
    assert np.array_equal(np.concatenate(sink.frames), reference(packets))
    assert sink.timestamps == [i * FRAME for i in range(len(packets))]
    assert receiver.stats.decoded_frames == len(packets)


async def test_reordered_packets_come_out_in_order(packets: list[bytes]) -> None:
    order = list(range(len(packets)))
    for i in range(1, len(order) - 1, 5):
        order[i], order[i + 1] = order[i + 1], order[i]
    sink = Sink()
    receiver = VoiceReceiver(sink)
    feed(receiver, packets, order)
    out = await sink.until(len(packets))
    assert np.array_equal(out, reference(packets))
    assert receiver.stats.fec_frames == receiver.stats.concealed_frames == 0


async def test_single_losses_are_rebuilt_from_the_next_packets_fec(packets: list[bytes]) -> None:
    lost = set(range(8, len(packets) - 1, 9))
    sink = Sink()
    receiver = VoiceReceiver(sink, min_wait_ms=1, max_wait_ms=5)
    feed(receiver, packets, [i for i in range(len(packets)) if i not in lost])
    out = await sink.until(len(packets))
    assert out.size == len(packets) * FRAME  # nothing skipped
    assert receiver.stats.fec_frames == len(lost)
    assert receiver.stats.concealed_frames == 0
    # The same losses concealed without FEC (an encoder with FEC off) come out worse.
    plain = opus.Encoder(32_000, fec=False)
    pcm = reference(packets).reshape(-1, FRAME)
    plain_packets = [plain.encode(f) for f in pcm]
    plain_sink = Sink()
    plain_receiver = VoiceReceiver(plain_sink, min_wait_ms=1, max_wait_ms=5)
    feed(plain_receiver, plain_packets, [i for i in range(len(packets)) if i not in lost])
    plain_out = await plain_sink.until(len(packets))
    ref = reference(packets)
    lost_samples = np.concatenate([np.arange(i * FRAME, (i + 1) * FRAME) for i in sorted(lost)])
    assert (
        corr(out[lost_samples], ref[lost_samples])
        > corr(plain_out[lost_samples], ref[lost_samples]) + 0.2
    )


async def test_a_burst_is_concealed_then_the_last_frame_rebuilt(packets: list[bytes]) -> None:
    sink = Sink()
    receiver = VoiceReceiver(sink, min_wait_ms=1, max_wait_ms=5)
    feed(receiver, packets, [i for i in range(len(packets)) if i not in (20, 21, 22)])
    await sink.until(len(packets))
    assert receiver.stats.concealed_frames == 2
    assert receiver.stats.fec_frames == 1
    assert sink.timestamps == [i * FRAME for i in range(len(packets))]


async def test_a_packet_after_its_frame_was_rebuilt_is_dropped(packets: list[bytes]) -> None:
    sink = Sink()
    receiver = VoiceReceiver(sink, min_wait_ms=1, max_wait_ms=2)
    feed(receiver, packets, [0, 1, 3])
    await sink.until(4)
    feed(receiver, packets, [2, 4])
    assert len(sink.frames) == 5
    assert receiver.stats.late_packets == 1


async def test_the_wait_for_a_gap_follows_measured_jitter(packets: list[bytes]) -> None:
    receiver = VoiceReceiver(Sink(), min_wait_ms=5, max_wait_ms=80)
    calm = receiver.wait_s
    loop = asyncio.get_running_loop()
    start = loop.time()
    rng = random.Random(1)
    # Packets arriving 0-30 ms off their schedule (as with netem's 30 ms jitter).
    for i in range(40):
        async with asyncio.timeout(1):
            await asyncio.sleep(max(0.0, start + i * 0.02 + rng.uniform(0, 0.03) - loop.time()))
        feed(receiver, packets, [i])
    assert calm == pytest.approx(0.005)
    assert receiver.stats.jitter_ms > 3
    assert 0.015 < receiver.wait_s <= 0.08
    receiver.close()


async def test_red_copies_fill_gaps_exactly(packets: list[bytes]) -> None:
    sink = Sink()
    receiver = VoiceReceiver(sink)
    lost = set(range(5, len(packets), 7))
    for i in range(len(packets)):
        if i in lost:
            continue
        older = [(FRAME, packets[i - 1])] if i else []
        receiver.push(i, i * FRAME, packets[i], older)
    out = await sink.until(len(packets))
    assert np.array_equal(out, reference(packets))
    assert receiver.stats.red_frames == len(lost)
    assert receiver.stats.red_packets == len(packets) - len(lost)


async def test_nack_asks_for_the_gap_and_the_retransmission_fills_it(packets: list[bytes]) -> None:
    sink = Sink()
    receiver = VoiceReceiver(sink, nack=True, max_wait_ms=200)
    asked = feed(receiver, packets, [0, 1, 2, 5, 6], seq0=65534)
    assert asked == [(65534 + 3) % 65536, (65534 + 4) % 65536]
    assert feed(receiver, packets, [7], seq0=65534) == []  # asked once only
    feed(receiver, packets, [3, 4], seq0=65534)  # the retransmissions
    out = await sink.until(8)
    assert np.array_equal(out, reference(packets[:8]))
    assert receiver.stats.retransmits == 2
    assert receiver.stats.nacks_sent == 2


async def test_a_packet_libopus_cannot_read_is_concealed(packets: list[bytes]) -> None:
    """A payload libopus refuses ("corrupted stream") is a lost frame, concealed; raised, it
    ended the call's whole DTLS transport, media and data channel with it."""
    sink = Sink()
    receiver = VoiceReceiver(sink, min_wait_ms=1, max_wait_ms=5)
    broken = [*packets[:5], b"\x03", *packets[6:12]]
    feed(receiver, broken, range(len(broken)))
    out = await sink.until(len(broken))
    assert out.size == len(broken) * FRAME and receiver.stats.bad_packets == 1


def test_parse_red_splits_blocks_and_refuses_short_payloads() -> None:
    older, primary = b"\x01\x02\x03", b"\x09\x08"
    header = bytes([0x80 | 111]) + ((960 << 10) | len(older)).to_bytes(3, "big") + bytes([111])
    assert parse_red(header + older + primary) == (111, primary, [(960, older)])
    for bad in (b"", header[:3], header[:5] + older[:1]):
        with pytest.raises(ValueError):
            parse_red(bad)


async def test_a_stream_that_starts_over_further_back_is_heard_again(packets: list[bytes]) -> None:
    """A sender that restarts (or a gateway that switches source) with sequence numbers behind
    the old ones: after a second of packets all "late", the stream starts over and is heard
    (every packet was dropped until the numbers caught up, minutes later)."""
    sink = Sink()
    receiver = VoiceReceiver(sink, min_wait_ms=1, max_wait_ms=5)
    feed(receiver, packets, range(10), seq0=40_000)
    again = min(len(packets), 120)
    feed(receiver, packets, range(again), seq0=20_000)
    assert receiver.stats.restarts == 1
    out = await sink.until(10 + again - 50)
    assert out.size >= (10 + again - 50) * FRAME


async def test_after_a_long_gap_only_the_last_frames_are_asked_for_once(
    packets: list[bytes],
) -> None:
    """A 3 s outage with NACK on: the packets after it ask for the few frames that could still
    come back in time, once (each asked for the whole gap again, 150 numbers a packet)."""
    receiver = VoiceReceiver(Sink(), nack=True, max_wait_ms=200)
    feed(receiver, packets, range(5))
    after = [i for i in range(155, min(len(packets), 175))]
    asked = [len(feed(receiver, packets, [i])) for i in after]
    assert asked[0] <= 10 and sum(asked[1:]) <= len(after)
