"""A real aiortc client for tests and benchmarks: a microphone, ``oai-events``, recorded replies.

It sets up a call exactly as OpenAI's WebRTC clients do (offer with a data channel named
``oai-events``, posted as ``application/sdp``) and keeps what comes back: the audio, with the time
each frame arrived, and every event, decoded.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import av
import numpy as np
from aiortc import RTCDataChannel, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack, VideoStreamTrack

from s2s.audio import OpusEncoder
from s2s.rtc import VoiceCodecs, VoiceInput, new_peer_connection, set_audio_prefetch

RATE = 48_000
FRAME = 960  # 20 ms


class MicTrack(MediaStreamTrack):
    """A paced 48 kHz mono microphone that plays what it is given, then silence.

    ``frame_times[i]`` is the loop time at which frame ``i`` (samples ``i*960`` onward) was handed
    to aiortc's sender, so a sample's send time can be looked up after the fact.
    """

    kind = "audio"

    def __init__(self, pcm: np.ndarray | None = None, *, encode: bool = False) -> None:
        super().__init__()
        # encode: send Opus packets made here (mono, FEC) instead of aiortc's encoder's.
        self._encoder = OpusEncoder() if encode else None
        self._pcm = np.zeros(0, np.int16) if pcm is None else pcm
        self._pos = 0
        self._start: float | None = None
        self.frame_times: list[float] = []

    @property
    def samples_sent(self) -> int:
        return len(self.frame_times) * FRAME

    def play(self, pcm: np.ndarray) -> int:
        """Play ``pcm`` from the next frame on; returns the sample offset where it starts."""
        self._pcm = np.concatenate([self._pcm[: self._pos], pcm]) if self._pos else pcm
        return self.samples_sent

    async def recv(self) -> av.AudioFrame | av.Packet[Any]:
        if self.readyState != "live":
            raise MediaStreamError
        loop = asyncio.get_running_loop()
        if self._start is None:
            self._start = loop.time()
        wait = self._start + len(self.frame_times) * FRAME / RATE - loop.time()
        if wait > 0:
            await asyncio.sleep(wait)
        chunk = np.zeros(FRAME, np.int16)
        part = self._pcm[self._pos : self._pos + FRAME]
        chunk[: part.size] = part
        self._pos += part.size
        if self._encoder is not None:
            packet = self._encoder.encode(chunk, len(self.frame_times), silent=not chunk.any())
            self.frame_times.append(loop.time())
            return packet
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = len(self.frame_times) * FRAME
        frame.time_base = fractions.Fraction(1, RATE)
        self.frame_times.append(loop.time())
        return frame


class ColourCamera(VideoStreamTrack):
    """A camera that films a wall of one colour (aiortc paces it at 30 fps)."""

    def __init__(self, rgb: tuple[int, int, int], size: tuple[int, int] = (320, 240)) -> None:
        super().__init__()
        self.frames_sent = 0
        self._pixels = np.empty((size[1], size[0], 3), np.uint8)
        self._pixels[:] = rgb

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = av.VideoFrame.from_ndarray(self._pixels, format="rgb24")
        frame.pts, frame.time_base = pts, time_base
        self.frames_sent += 1
        return frame


@dataclass(frozen=True)
class RtpTiming:
    """An inbound RTP stream's timing against its own RTP clock (48 kHz)."""

    packets: int
    #: Packets per 20 ms of wall time over the span, as a fraction of real time (1.0 is exact).
    packet_rate: float
    #: RTP time covered per second of wall time (1.0: the sender's clock is the wall clock).
    clock_rate: float
    #: How late each packet arrived against its RTP timestamp, relative to the earliest one:
    #: the depth a receiver's jitter buffer needs. Drift shows here as a growing lag.
    lag_p50_s: float
    lag_p99_s: float
    lag_max_s: float
    #: Consecutive packets whose timestamps were not 960 apart, and repeated timestamps.
    steps: int
    repeats: int

    @classmethod
    def of(cls, rtp: list[tuple[float, int, int, int]]) -> RtpTiming:
        if len(rtp) < 2:
            raise ValueError("fewer than two RTP packets")
        arrival = np.array([r[0] for r in rtp])
        stamps = np.unwrap(np.array([r[1] for r in rtp], np.float64), period=2**32)
        span = arrival[-1] - arrival[0]
        media = (stamps - stamps[0]) / RATE
        lag = (arrival - arrival[0]) - media
        lag -= lag.min()
        deltas = np.diff(stamps)
        return cls(
            packets=len(rtp),
            packet_rate=(len(rtp) - 1) * 0.020 / span,
            clock_rate=float(media[-1] / span),
            lag_p50_s=float(np.percentile(lag, 50)),
            lag_p99_s=float(np.percentile(lag, 99)),
            lag_max_s=float(lag.max()),
            steps=int(np.count_nonzero(deltas != 960)),
            repeats=int(np.count_nonzero(deltas == 0)),
        )


class CallRefused(Exception):
    def __init__(self, status: int, body: str, headers: dict[str, str]) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body
        self.headers = headers


class Peer:
    def __init__(
        self,
        base_url: str,
        mic: MicTrack | None = None,
        *,
        prefetch: int | None = 0,
        session: dict[str, Any] | None = None,
        camera: MediaStreamTrack | None = None,
        tuned: bool = False,
        edit_offer: Callable[[str], str] | None = None,
        loss: float = 0.0,
        decode: bool = True,
    ) -> None:
        """``tuned``: receive through s2s's own inbound path (as the server does) instead of
        aiortc's; ``edit_offer`` rewrites the SDP offer before it is posted; ``loss`` drops
        that fraction of outbound RTP (seeded), as a lossy uplink would; ``decode=False`` only
        records inbound RTP (``rtp``) and decodes nothing, the cheapest caller for load tests."""
        self.base_url = base_url.rstrip("/")
        self.mic = mic or MicTrack()
        self.pc = new_peer_connection()
        self.channel: RTCDataChannel = self.pc.createDataChannel("oai-events")
        self.events: list[dict[str, Any]] = []
        #: ``(arrival loop time, mono int16 samples)`` for every audio frame received.
        self.frames: list[tuple[float, np.ndarray]] = []
        self.call_url: str | None = None
        self.answer: str | None = None
        self.setup_s: float | None = None
        self.channel_open_s: float | None = None
        self.states: list[str] = []
        self._prefetch = prefetch
        self._tuned = tuned
        self._edit_offer = edit_offer
        self._loss = loss
        self._decode = decode
        #: The inbound path when ``tuned``; RTP sequence numbers sent and dropped on a lossy uplink.
        self.voice_in: VoiceInput | None = None
        #: ``(arrival loop time, RTP timestamp, sequence number, payload bytes)`` of every
        #: inbound audio RTP packet, as it came off the wire: the server's clock, not a jitter
        #: buffer's.
        self.rtp: list[tuple[float, int, int, int]] = []
        self.dropped: list[int] = []
        self.sent: list[int] = []
        self._session = session
        self._camera = camera
        self._event_arrived = asyncio.Event()
        self._audio_arrived = asyncio.Event()
        self._connected = asyncio.Event()
        self._recorder: asyncio.Task[None] | None = None
        self._t0 = 0.0
        self.channel.on("open", self._on_open)
        self.channel.on("message", self._on_message)
        self.pc.on("track", self._on_track)
        self.pc.on("connectionstatechange", self._on_state)

    async def connect(self, *, timeout: float = 10.0) -> None:
        """Offer, post, answer, wait for ``connected``; raises ``CallRefused`` on HTTP errors."""
        transceiver = self.pc.addTransceiver(self.mic, direction="sendrecv")
        if self._camera is not None:
            self.pc.addTransceiver(self._camera, direction="sendonly")
        if self._prefetch is not None:
            set_audio_prefetch(transceiver.receiver, self._prefetch)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        loop = asyncio.get_running_loop()
        self._t0 = loop.time()
        offer = self.pc.localDescription.sdp
        if self._edit_offer is not None:
            offer = self._edit_offer(offer)
        async with asyncio.timeout(timeout):
            try:
                status, body, headers = await self._post_offer(offer)
            except BaseException:
                await self.pc.close()  # its sockets are not left to the garbage collector
                raise
            if status != 201:
                await self.pc.close()
                raise CallRefused(status, body, headers)
            self.call_url = self.base_url + headers["Location"]
            self.answer = body
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=body, type="answer"))
            if self._tuned:
                opus = next(c for c in transceiver._codecs if c.mimeType.lower() == "audio/opus")
                assert opus.payloadType is not None
                codecs = VoiceCodecs(opus.payloadType)
                self.voice_in = VoiceInput.install(transceiver.receiver, codecs, 80.0)
            self._watch_rtp(transceiver.receiver)
            if self._loss:
                self._drop_uplink(transceiver.sender.transport)
            await self._connected.wait()

    def _watch_rtp(self, receiver: Any) -> None:
        # aiortc has no public hook for raw inbound RTP; the DTLS transport calls this method
        # of the receiver for each packet of its stream. Observed only, then passed on as is.
        handle = receiver._handle_rtp_packet
        loop = asyncio.get_running_loop()

        async def watched(packet: Any, arrival_time_ms: int) -> None:
            now = loop.time()
            self.rtp.append((now, packet.timestamp, packet.sequence_number, len(packet.payload)))
            self._audio_arrived.set()
            if self._decode:
                await handle(packet, arrival_time_ms)

        receiver._handle_rtp_packet = watched

    async def wait_rtp(self, packets: int, *, since: float = 0.0, timeout: float = 10.0) -> None:
        """Wait until ``packets`` inbound RTP packets have arrived from loop time ``since`` on."""
        async with asyncio.timeout(timeout):
            while sum(1 for r in self.rtp if r[0] >= since) < packets:
                self._audio_arrived.clear()
                await self._audio_arrived.wait()

    def rtp_timing(self, since: float = 0.0) -> RtpTiming:
        """How the inbound RTP stream kept time from loop time ``since`` on."""
        return RtpTiming.of([r for r in self.rtp if r[0] >= since])

    def _drop_uplink(self, transport: Any) -> None:
        rng = random.Random(7)
        send = transport._send_rtp

        async def lossy_send(data: bytes) -> None:
            if 192 <= data[1] <= 223:  # RTCP shares the path (RFC 5761); only media is dropped
                await send(data)
                return
            seq = int.from_bytes(data[2:4], "big")
            self.sent.append(seq)
            # The first second goes through whole: set-up losses are not the lossy link's.
            if len(self.sent) > 50 and rng.random() < self._loss:
                self.dropped.append(seq)
                return
            await send(data)

        transport._send_rtp = lossy_send

    async def _post_offer(self, sdp: str) -> tuple[int, str, dict[str, str]]:
        url = self.base_url + "/v1/realtime/calls"
        async with aiohttp.ClientSession() as http:
            if self._session is None:
                request = http.post(url, data=sdp, headers={"Content-Type": "application/sdp"})
            else:
                form = aiohttp.FormData(default_to_multipart=True)
                form.add_field("sdp", sdp)
                form.add_field("session", json.dumps(self._session))
                request = http.post(url, data=form)
            async with request as resp:
                return resp.status, await resp.text(), dict(resp.headers)

    @property
    def call_id(self) -> str:
        """The server's id of this call (the last part of its ``Location``)."""
        assert self.call_url is not None
        return self.call_url.rsplit("/", 1)[1]

    async def hangup(self) -> int:
        assert self.call_url is not None
        async with aiohttp.ClientSession() as http, http.post(self.call_url + "/hangup") as resp:
            return resp.status

    async def close(self) -> None:
        if self._recorder is not None:
            self._recorder.cancel()
            await asyncio.gather(self._recorder, return_exceptions=True)
        await self.pc.close()

    # -- events ----------------------------------------------------------------------------------

    def send(self, event: dict[str, Any] | str | bytes) -> None:
        self.channel.send(event if isinstance(event, str | bytes) else json.dumps(event))

    async def wait_open(self, timeout: float = 5.0) -> None:
        async with asyncio.timeout(timeout):
            while self.channel.readyState != "open":
                await self._wait_event_change()

    async def next_event(
        self, type_: str, *, after: int = 0, timeout: float = 5.0
    ) -> dict[str, Any]:
        """The first event of ``type_`` at index ``after`` or later, waiting for it if need be."""
        async with asyncio.timeout(timeout):
            while True:
                for event in self.events[after:]:
                    if event.get("type") == type_:
                        return event
                await self._wait_event_change()

    async def _wait_event_change(self) -> None:
        self._event_arrived.clear()
        await self._event_arrived.wait()

    def _on_open(self) -> None:
        self.channel_open_s = asyncio.get_running_loop().time() - self._t0
        self._event_arrived.set()

    def _on_message(self, message: str | bytes) -> None:
        self.events.append(json.loads(message))
        self._event_arrived.set()

    def _on_state(self) -> None:
        state = self.pc.connectionState
        self.states.append(state)
        if state == "connected":
            self.setup_s = asyncio.get_running_loop().time() - self._t0
            self._connected.set()
        self._event_arrived.set()

    # -- audio -----------------------------------------------------------------------------------

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio" and self._recorder is None:
            self._recorder = asyncio.create_task(self._record(track), name="peer/record")

    async def _record(self, track: MediaStreamTrack) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if isinstance(frame, np.ndarray):  # s2s's receive path (tuned=True): mono 48 kHz
                pcm = frame
            else:
                pcm = frame.to_ndarray().reshape(-1)
                channels = len(frame.layout.channels)
                if channels > 1:
                    pcm = pcm.reshape(-1, channels).mean(axis=1).astype(np.int16)
            self.frames.append((loop.time(), pcm))
            self._audio_arrived.set()

    def audio(self, since: float = 0.0) -> np.ndarray:
        """Everything received (from loop time ``since`` on), as one mono 48 kHz array."""
        chunks = [pcm for t, pcm in self.frames if t >= since]
        return np.concatenate(chunks) if chunks else np.zeros(0, np.int16)

    def arrival_time(self, offset: int, since: float = 0.0) -> float:
        """When the sample at ``offset`` in ``audio(since)`` arrived."""
        for t, pcm in self.frames:
            if t < since:
                continue
            if offset < pcm.size:
                return t
            offset -= pcm.size
        raise IndexError("no such sample received")

    async def wait_sound(
        self, *, level: float = 0.01, since: float = 0.0, timeout: float = 10.0
    ) -> float:
        """Wait for the first 20 ms frame received from loop time ``since`` on louder than
        ``level`` (RMS, full scale 1); returns its arrival (loop time)."""
        async with asyncio.timeout(timeout):
            while True:
                for t, pcm in self.frames:
                    if t < since or not pcm.size:
                        continue
                    if np.sqrt(np.mean(pcm.astype(np.float64) ** 2)) > level * 32768:
                        return t
                self._audio_arrived.clear()
                await self._audio_arrived.wait()

    async def wait_audio(
        self, seconds: float, *, since: float = 0.0, timeout: float = 10.0
    ) -> None:
        """Wait until ``seconds`` of audio have arrived (counting from loop time ``since``)."""
        async with asyncio.timeout(timeout):
            while sum(p.size for t, p in self.frames if t >= since) < seconds * RATE:
                self._audio_arrived.clear()
                await self._audio_arrived.wait()
