"""One call: a peer connection, its model stream, and the tasks that move audio and events.

A ``Session`` owns one ``asyncio.TaskGroup``:

- ``{call_id}/mic`` drains the caller's audio track (aiortc's queue is unbounded, so it is always
  read), resamples it to the model's rate and cuts it into model frames;
- ``{call_id}/model`` feeds those frames to the model stream one at a time and hands what comes
  back to the call's ``Realtime`` conversation, which queues it on the ``SpeakerTrack`` that
  aiortc's sender pulls at a paced 20 ms;
- ``{call_id}/vad`` runs server VAD (when turn detection is on) and reports turn edges;
- ``{call_id}/playout`` follows playback while a response plays (transcript deltas aligned with
  what was heard, ``output_audio_buffer.*``, completion, idle timeout);
- ``{call_id}/events`` hands client events from the ``oai-events`` data channel (an
  ``EventChannel``) to ``Realtime``;
- ``{call_id}/supervise`` ends the call when asked to (hang-up, ICE failure) or when no audio has
  arrived for ``peer_timeout_s``;
- ``{call_id}/stats`` runs ``CallStats``: the call's RTCP figures every ``stats_interval_s`` (one
  ``getStats()``) into its metrics and an ``s2s.session.stats`` event.

Whichever way a call ends, the group is cancelled and ``release()`` frees the peer connection,
the track and the model stream. A failure inside one session never reaches another.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from functools import partial

import av
import numpy as np
from aiortc import RTCDataChannel, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from s2s.audio import PACKET_MS, WEBRTC_RATE, FrameChunker, Resampler, SpeakerTrack
from s2s.backends import Backend, ModelStream
from s2s.callstats import CallStats
from s2s.camera import sample_camera
from s2s.config import Settings
from s2s.datachannel import EVENTS_LABEL, EventChannel
from s2s.eventrate import EventRate
from s2s.feed import Feed
from s2s.images import ImageLimits
from s2s.log import CallLogger
from s2s.metrics import CallMetrics, ServerMetrics
from s2s.protocol.server_events import Error, ErrorDetail, ServerEvent, SessionCreated
from s2s.protocol.session_config import SessionConfig
from s2s.realtime.call import Realtime
from s2s.rtc import (
    MAX_CALL_SOURCES,
    OfferError,
    VoiceInput,
    check_offer,
    close_transports,
    prefer_red,
    receive_one_of_each,
    tune_audio,
    watch_sources,
)
from s2s.vad import VAD_RATE, SpeechDetector, VadService

log = logging.getLogger(__name__)

#: How long closing the peer connection may take before the rest of the call is let go anyway.
CLOSE_TIMEOUT_S = 5.0


class _Ended(Exception):
    """Raised inside the task group to stop every task of an ended call."""


class Session:
    def __init__(
        self,
        call_id: str,
        pc: RTCPeerConnection,
        backend: Backend,
        vad: VadService,
        settings: Settings,
        config: SessionConfig,
        *,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.call_id = call_id
        self.pc = pc
        self.config = config
        tuned = settings.transport == "tuned"
        frame_ms = 1000 * backend.frame_samples / backend.input_rate
        # Frames sent as they arrive, for a live model that outputs one packet at a time (echo).
        # Moshi's 80 ms frames keep the fixed clock: followed chunk by chunk, its packet rate
        # would ride its step time's jitter.
        live = tuned and not backend.turn_based and frame_ms <= PACKET_MS
        # A live model's audio is only worth hearing now: a backlog that lasts is cut (all of it
        # when frames go out as they arrive; down to two model frames on a fixed clock).
        backlog_ms = 10.0 if live else 2 * frame_ms + 10
        self.speaker = SpeakerTrack(
            bitrate=settings.opus_bitrate,
            encode=tuned,
            max_backlog_ms=None if backend.turn_based else backlog_ms,
            live=live,
            lead_ms=10.0 if backend.turn_based or not tuned else 0.0,
        )
        self.log = CallLogger(log, call_id)
        self.end_reason: str | None = None
        #: The server key the call was made with (or that minted its client secret).
        self.owner: str | None = None
        self._events = EventChannel(settings, self.log, self.end)
        #: Sideband watchers: each gets every server event's JSON, as the data channel does.
        self.listeners: set[Callable[[str], None]] = self._events.listeners
        #: Model frames dropped because the model fell behind.
        self.frames_dropped = 0
        #: This call's share of the server's metrics (a private set when none is given).
        self.metrics = CallMetrics(metrics or ServerMetrics(), call_id)
        # The offer has just been read: set-up and data-channel times count from here.
        self._created_at = asyncio.get_running_loop().time()
        #: The call's figures, sampled every stats interval.
        self.stats = CallStats(
            pc, self.speaker, self.metrics, self.log, created_at=self._created_at
        )
        self._connected = False
        self._backend = backend
        self._vad = vad
        self._settings = settings
        self._realtime: Realtime | None = None
        self._stream: ModelStream | None = None
        self._mic: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()
        self._camera: asyncio.Future[MediaStreamTrack] = asyncio.get_running_loop().create_future()
        self._model_in = Feed(backend.frame_samples, backend.input_rate)
        self._vad_in = Feed(backend.frame_samples, backend.input_rate)  # any sizes: never waits
        self._ended = asyncio.Event()
        self._last_audio = asyncio.get_running_loop().time()
        pc.on("track", self._on_track)
        pc.on("datachannel", self._on_datachannel)
        pc.on("connectionstatechange", self._on_connection_state)

    # -- negotiation -----------------------------------------------------------------------------

    async def accept(self, offer_sdp: str) -> str:
        """Apply the caller's offer and return the SDP answer, or raise ``OfferError``."""
        check_offer(offer_sdp)
        try:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=offer_sdp, type="offer"))
        except Exception as exc:  # aiortc raises ValueError, KeyError, IndexError... on bad SDP
            raise OfferError(f"malformed SDP offer: {exc or type(exc).__name__}") from exc
        audio = receive_one_of_each(self.pc, camera=self._settings.camera_fps > 0)
        codecs = None
        if self._settings.transport == "tuned":
            codecs = tune_audio(audio[0], offer_sdp, self._settings.opus_bitrate)
        self.pc.addTrack(self.speaker)
        try:
            await self.pc.setLocalDescription(await self.pc.createAnswer())
        except Exception as exc:
            raise OfferError(f"cannot answer the offer: {exc or type(exc).__name__}") from exc
        if audio[0].currentDirection not in ("sendrecv", "sendonly"):
            # The model's audio goes back on it, and a response's progress and end are paced by
            # that audio being sent: with no sender, no response would ever finish.
            offered = {"recvonly": "sendonly", "inactive": "inactive"}
            direction = offered.get(str(audio[0].currentDirection), "not sendrecv")
            raise OfferError(f"the offer's audio is {direction}: offer it sendrecv")
        answer = str(self.pc.localDescription.sdp)
        if codecs is not None:
            wait = self._settings.max_gap_wait_ms
            self.stats.voice_in = VoiceInput.install(audio[0].receiver, codecs, wait)
            answer = prefer_red(answer, codecs)
        too_many = f"the call sent media under more than {MAX_CALL_SOURCES} SSRCs"
        watch_sources(self.pc, lambda: self.fail("too_many_sources", "too_many_sources", too_many))
        return answer

    @property
    def voice_in(self) -> VoiceInput | None:
        """The tuned inbound audio path, once negotiated (None on the stock path)."""
        return self.stats.voice_in

    # -- running ---------------------------------------------------------------------------------

    @property
    def ended(self) -> bool:
        return self._ended.is_set()

    async def wait_ended(self) -> None:
        await self._ended.wait()

    def end(self, reason: str) -> None:
        """Ask the call to end; the first reason given is the one reported."""
        if not self._ended.is_set():
            self.end_reason = reason
            self.log.info("ending: %s", reason)
            self._ended.set()

    def fail(self, reason: str, code: str, why: str, kind: str = "invalid_request_error") -> None:
        """End the call with an ``error`` event that says why."""
        self.send(Error(error=ErrorDetail(code=code, type=kind, message=why)))
        self.end(reason)

    async def run(self) -> None:
        """Serve the call until it ends, then free everything it holds."""
        cid = self.call_id
        try:
            self._stream = await self._backend.open_stream(cid)
            settings = self._settings
            realtime = Realtime(
                self.config, self._backend, self._stream, self.speaker, self.send,
                image_limits=ImageLimits(
                    settings.image_max_bytes, settings.image_max_pixels, settings.image_max_side
                ),
                image_history=settings.image_history,
                upload_bytes=settings.image_upload_bytes, metrics=self.metrics,
            )  # fmt: skip
            self._realtime = realtime
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._pump_mic(realtime), name=f"{cid}/mic")
                tg.create_task(self._run_model(self._stream, realtime), name=f"{cid}/model")
                tg.create_task(self._run_vad(realtime), name=f"{cid}/vad")
                tg.create_task(self._follow_playout(realtime), name=f"{cid}/playout")
                tg.create_task(self._read_events(realtime), name=f"{cid}/events")
                tg.create_task(self._sample_camera(realtime), name=f"{cid}/camera")
                tg.create_task(self._supervise(), name=f"{cid}/supervise")
                stats = self.stats.run(settings.stats_interval_s, partial(self.send, keep=False))
                tg.create_task(stats, name=f"{cid}/stats")
        except* _Ended:
            pass
        except* Exception:
            self.end("internal_error")
            raise
        finally:
            await self.release()

    async def release(self) -> None:
        """Close the peer connection, the track and the model stream. Safe to call twice."""
        self.end(self.end_reason or "released")
        try:
            # Bounded: a close that never returns (an aiortc task that died without saying so)
            # would keep the model stream, the call's slot and its count forever.
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self.pc.close()
        except TimeoutError:
            self.log.warning("the peer connection did not close in %g s", CLOSE_TIMEOUT_S)
            await close_transports(self.pc)
        except Exception:
            # aiortc can fail to close a connection built from a broken offer (a transceiver
            # without a transport); what it holds is dropped with it all the same.
            self.log.warning("peer connection did not close cleanly", exc_info=True)
        self.speaker.stop()
        if self.voice_in is not None:
            self.voice_in.close()
        self.stats.count()
        self.metrics.close()
        for track in (self._mic, self._camera):
            if not track.done():
                track.cancel()
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await stream.close()
        self.log.info("released (%s)", self.end_reason)

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        timeout = self._settings.peer_timeout_s
        longest = self._settings.max_call_s
        started = loop.time()
        # Poll instead of arming a timer per audio frame: one wake-up a second per call is cheap.
        while True:
            try:
                async with asyncio.timeout(min(1.0, timeout)):
                    await self._ended.wait()
                raise _Ended
            except TimeoutError:
                if loop.time() - self._last_audio > timeout:
                    self.end("peer_timeout")
                elif longest and loop.time() - started > longest:
                    limit = f"calls on this server last at most {longest:g} s"
                    self.fail("max_duration", "call_duration_limit", limit, "limit_error")

    async def _pump_mic(self, realtime: Realtime) -> None:
        track = await self._mic
        resampler = Resampler(self._backend.input_rate)
        chunker = FrameChunker(self._backend.frame_samples)
        loop = asyncio.get_running_loop()
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                self.end("peer_gone")
                return
            self._last_audio = loop.time()
            if isinstance(frame, np.ndarray):  # the tuned path's mono 48 kHz (rtc.VoiceInput)
                realtime.heard(1000 * frame.size // WEBRTC_RATE)
                pcm = resampler.from_pcm(frame, WEBRTC_RATE)
            else:
                assert isinstance(frame, av.AudioFrame)  # aiortc's path yields decoded audio
                realtime.heard(1000 * frame.samples // frame.sample_rate)
                pcm = resampler.from_frame(frame)
            for chunk in chunker.push(pcm):
                self.frames_dropped += self._model_in.put(chunk)
            if realtime.vad is not None:
                self._vad_in.put(pcm)

    async def _run_model(self, stream: ModelStream, realtime: Realtime) -> None:
        to_speaker = Resampler(WEBRTC_RATE)
        rate = self._backend.output_rate
        # A turn-based model's reply goes on whatever the caller sends (nothing, if its track was
        # removed or its uplink lost); a continuous one lives on the caller's time, frame for
        # frame (silence standing in for late frames would delay all it hears after them).
        turns = self._backend.turn_based
        while True:
            frame = await (self._model_in.next_or_silence() if turns else self._model_in.get())
            result = await stream.step(frame)
            realtime.on_step(result, to_speaker.from_pcm(result.audio, rate))

    async def _run_vad(self, realtime: Realtime) -> None:
        detector: SpeechDetector | None = None
        to_vad = Resampler(VAD_RATE)
        rate = self._backend.input_rate
        try:
            while True:
                pcm = await self._vad_in.get()
                settings = realtime.vad
                if settings is None:
                    continue
                if detector is None:
                    detector = await self._vad.detector(settings)
                detector.settings = settings
                for event in await self._vad.feed(detector, to_vad.from_pcm(pcm, rate)):
                    await realtime.on_vad(event)
        finally:
            if detector is not None:
                self._vad.release(detector)

    async def _sample_camera(self, realtime: Realtime) -> None:
        track = await self._camera
        if self._settings.camera_fps <= 0:
            # aiortc hands over the track while the offer is applied, before ``accept`` turns
            # the video off; with no sampling it is never read.
            return
        await sample_camera(track, self._settings.camera_fps, realtime, self.send, self.log)

    async def _follow_playout(self, realtime: Realtime) -> None:
        while True:
            if not realtime.needs_playout():
                realtime.watching.clear()
                await realtime.watching.wait()
                continue
            await self.speaker.ticked()
            await realtime.on_playout()

    # -- events ----------------------------------------------------------------------------------

    def send(self, event: ServerEvent, *, keep: bool = True) -> None:
        """Send a server event to the client, or keep it until the data channel opens.

        An event that is stale by then (``keep=False``) is not kept, only sent to listeners.
        """
        self._events.send(event, keep=keep)

    def receive(self, message: bytes | str, rate: EventRate | None = None) -> bool:
        """A client event from the data channel or an app backend's sideband connection (with
        its own ``rate``); False once that sender floods (``EventChannel.receive``)."""
        return self._events.receive(message, rate)

    async def _read_events(self, realtime: Realtime) -> None:
        while True:
            await realtime.handle(await self._events.next_event())

    # -- aiortc callbacks ------------------------------------------------------------------------

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "audio" and not self._mic.done():
            self._mic.set_result(track)
        elif track.kind == "video" and not self._camera.done():
            self._camera.set_result(track)

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        if channel.label != EVENTS_LABEL or self._events.attached:
            self.log.info("closing unexpected data channel %r", channel.label)
            channel.close()
            return
        self.metrics.channel_open(asyncio.get_running_loop().time() - self._created_at)
        self._events.attach(channel, SessionCreated(session=self.config.to_wire()))

    def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        self.log.debug("connection %s", state)
        if state == "connected" and not self._connected:
            self._connected = True
            self.metrics.connected(asyncio.get_running_loop().time() - self._created_at)
        if state in ("failed", "closed"):
            self.end(f"connection_{state}")
