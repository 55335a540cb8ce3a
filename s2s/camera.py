"""A caller's camera (a WebRTC video track): one frame every so often becomes the call's newest
picture, the one a "what am I looking at?" is answered with."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from s2s import images
from s2s.log import CallLogger
from s2s.protocol.server_events import Error, ErrorDetail, ServerEvent
from s2s.realtime.call import Realtime


async def sample_camera(
    track: MediaStreamTrack, fps: float, realtime: Realtime,
    send: Callable[[ServerEvent], None], log: CallLogger,
) -> None:  # fmt: skip
    """Drain ``track``, keeping one frame every ``1 / fps`` seconds, until it ends.

    Only the latest sampled frame is kept (as the call's newest picture); nothing queues: the
    track is drained (aiortc's queue is unbounded) while a frame waits its turn in the server's
    picture decoder. Frames over the pixel cap are skipped, with one ``error`` for the call.
    """
    loop = asyncio.get_running_loop()
    period = 1 / fps
    last, refused = -period, False
    converting: asyncio.Future[images.Picture] | None = None

    def seen(done: asyncio.Future[images.Picture]) -> None:
        # As soon as it is ready, not with the next frame: a camera may send none for a while.
        if done.cancelled():
            return
        if (failed := done.exception()) is None:
            realtime.see(done.result())
        else:  # a frame PIL or av could not convert: the next one may do
            log.warning("a camera frame could not be converted: %r", failed)

    try:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if (converting is not None and not converting.done()) or loop.time() - last < period:
                continue
            last = loop.time()
            assert isinstance(frame, av.VideoFrame)
            try:
                converting = images.convert_video_frame(frame, realtime.image_limits)
                converting.add_done_callback(seen)
            except images.ImageError as exc:
                if not refused:  # once: the camera's next frames are as large
                    send(Error(error=ErrorDetail(message=f"camera frames skipped: {exc}",
                                                 code=exc.code)))  # fmt: skip
                refused = True
    finally:
        if converting is not None:
            converting.cancel()  # if not done: its picture would come after the call
